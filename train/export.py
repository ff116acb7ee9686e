"""`sharnn-export SOURCE --out DIR`: a run, checkpoint or exported model -> DIR/model.safetensors + config.

    sharnn-export runs/paper --out models/paper            # the run's best checkpoint
    python -c 'from sharnn.io.pretrained import load_model; m = load_model("models/paper")'
    sharnn-export runs/paper --out models/paper --push_to_hub owner/sharnn-paper   # and upload it

The export holds a model card, README.md (sharnn.io.hub.model_card): architecture, parameter count, the corpus
(from its manifest), steps and the run's test bpc. `--push_to_hub REPO` uploads the finished export to the
Hugging Face Hub in one commit (the repo is created if needed, `--private` for a private one; the token is
the Hub's: HF_TOKEN or `hf auth login`); without --out it is exported to a temporary directory only.

The result loads with `sharnn.io.pretrained.load_model` alone (no accelerate, no DeepSpeed). Checkpoints
already
hold plain weights (model.safetensors, written at every save, under DeepSpeed too); a DeepSpeed checkpoint
without them (or with --from_zero) is consolidated from DeepSpeed's own files: the fp32 master weights from
the ZeRO 1/2 shards (deepspeed's zero_to_fp32), or the module state that ZeRO 0 saves whole. `--onnx` also
writes one forward step as ONNX.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from sharnn import attention_report, cli
from sharnn.io import atomic, hub, signals
from sharnn.io.pretrained import (
    WEIGHTS_NAME,
    ModelError,
    ModelSource,
    build_model,
    check_output_dir,
    check_state_dict,
    find_model,
    read_state_dict,
    save_state_dict,
)
from sharnn.io.rundir import EXPORT_FILES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def is_deepspeed_checkpoint(ckpt: Path) -> bool:
    """DeepSpeed's engine files: a `latest` tag file and/or a tag folder with mp_rank_*_model_states.pt."""
    return (ckpt / "latest").is_file() or any(ckpt.glob("*/mp_rank_*_model_states.pt"))


def consolidate_zero(ckpt: Path) -> tuple[dict[str, Tensor], str]:
    """Full weights from the engine files of a DeepSpeed checkpoint, and where they came from.

    ZeRO 1-3 partition the fp32 master weights across the ranks' optimizer shards: deepspeed's zero_to_fp32
    gathers them. ZeRO 0 writes no shards (zero_to_fp32 fails on it): its mp_rank_00_model_states.pt holds
    the whole module state, read here without running code from the pickle (sharnn.io.safe_pickle).
    """
    latest = ckpt / "latest"
    tag = latest.read_text().strip() if latest.is_file() else None
    if tag is None:  # accelerate names the tag folder pytorch_model; take the one there
        tags = sorted(p.parent.name for p in ckpt.glob("*/mp_rank_*_model_states.pt"))
        tag = tags[0] if tags else "pytorch_model"
    tag_dir = ckpt / tag
    try:
        if not any(tag_dir.glob("*optim_states.pt")):
            from sharnn.io.safe_pickle import safe_torch_load

            states = safe_torch_load(tag_dir / "mp_rank_00_model_states.pt")
            return ({k: v.detach().clone() for k, v in states["module"].items()},
                    "DeepSpeed model states (ZeRO stage 0)")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(sys.stderr):  # zero_to_fp32 reports progress on stdout
            state_dict = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AssertionError, IndexError) as e:
        reason = str(e).splitlines()[0] if str(e) else ""
        raise ModelError(f"cannot consolidate the DeepSpeed ZeRO shards of {ckpt} ({type(e).__name__}: "
                         f"{reason}); the checkpoint is incomplete or damaged: export another checkpoint of "
                         "the run") from None
    return ({k: v.detach().clone() for k, v in state_dict.items()},
            "DeepSpeed ZeRO shards (fp32 master weights, zero_to_fp32)")


def source_weights(source: ModelSource, from_zero: bool) -> tuple[dict[str, Tensor], str]:
    """The weights of a found model and where they came from."""
    if source.kind == "checkpoint" and (from_zero or not source.weights_path.is_file()):
        if is_deepspeed_checkpoint(source.path):
            return consolidate_zero(source.path)
        if from_zero:
            raise ModelError(f"--from_zero: {source.path} is not a DeepSpeed checkpoint (no `latest` file or "
                             "ZeRO shards); leave out --from_zero to export its model.safetensors")
        raise ModelError(f"checkpoint {source.path} holds no {WEIGHTS_NAME} and no DeepSpeed shards to "
                         "consolidate; it is damaged: export another checkpoint of the run")
    return read_state_dict(source), str(source.weights_path)


# ----------------------------------------------------------------------------------------------------- ONNX
class OneStep(torch.nn.Module):
    """One forward step with explicit state tensors, for ONNX: (x, h, c, memory) -> (logits, h, c, memory).

    x (T, B) int64 bytes; h, c (n_layer, B, C): every block's LSTM state; memory (n_attn, M, B, C): the
    attention memory of the blocks that attend, M <= mem_len (M = 0 at the start of a stream; a model without
    attention takes and returns an empty (0, 1, B, C) placeholder). Zero h/c and an empty memory are what the
    model does with no carried state.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.attn_layers = list(model.cfg.attn_layers)

    def forward(self, x: Tensor, h: Tensor, c: Tensor, memory: Tensor):
        from sharnn.state import CarryState

        n_layer = self.model.cfg.n_layer
        mem = [None] * n_layer
        for j, i in enumerate(self.attn_layers):
            mem[i] = memory[j]
        state = CarryState(hidden=[(h[i:i + 1], c[i:i + 1]) for i in range(n_layer)], memory=mem)
        logits, _, new = self.model(x, state)
        new_h = torch.cat([hc[0] for hc in new.hidden], dim=0)
        new_c = torch.cat([hc[1] for hc in new.hidden], dim=0)
        new_mem = torch.stack([new.memory[i] for i in self.attn_layers], dim=0) if self.attn_layers \
            else memory
        return logits, new_h, new_c, new_mem


def export_onnx(model, path: Path, batch_size: int = 1) -> str:
    """Write one step (T = 1 byte per stream, `batch_size` streams) of `model` as ONNX with a dynamic memory
    length, and check it against PyTorch with onnxruntime when that is installed (at memory lengths 0, 1, a
    few, mem_len - 1 and mem_len: the start of a stream up to the steady state). Returns what was checked.

    The batch is fixed: with a dynamic batch, torch.export guards the memory length to at most mem_len - 2
    and the graph then fails in the steady state (memory of mem_len positions); measured with torch 2.13.
    """
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it, and onnxscript)
        import onnxscript  # noqa: F401
    except ImportError:
        raise ModelError("--onnx needs the onnx and onnxscript packages: pip install 'sharnn[onnx]'") \
            from None
    import warnings

    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        # traced and checked with CPU float32 inputs: export a CPU float32 copy of a model on a GPU or in
        # bf16/fp16 (the caller's model stays as it is)
        model = copy.deepcopy(model).to("cpu", torch.float32)
    cfg = model.cfg
    step = OneStep(model).eval()
    B, C, n_attn = batch_size, cfg.d_model, len(cfg.attn_layers)
    # example memory length for tracing; a model without attention takes an empty (0, 1, B, C) placeholder
    m0 = max(1, min(cfg.mem_len - 1, 8)) if n_attn else 1
    x = torch.randint(0, 256, (1, B))
    h, c = torch.randn(cfg.n_layer, B, C) * 0.1, torch.randn(cfg.n_layer, B, C) * 0.1
    dynamic = {"x": None, "h": None, "c": None, "memory": None}
    if n_attn:
        dynamic["memory"] = {1: torch.export.Dim("M", min=1, max=max(2, cfg.mem_len - 1))}
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        torch.onnx.export(step, (x, h, c, torch.randn(n_attn, m0, B, C)), str(path), dynamo=True,
                          external_data=False, input_names=["x", "h", "c", "memory"],
                          output_names=["logits", "h_out", "c_out", "memory_out"], dynamic_shapes=dynamic)
    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime is not installed: the ONNX graph was not checked against PyTorch"
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    lengths = sorted({0, 1, m0, cfg.mem_len - 1, cfg.mem_len}) if n_attn else [m0]
    with torch.no_grad():
        for m_len in lengths:
            mem = torch.randn(n_attn, m_len, B, C)
            want = step(x, h, c, mem)
            got = session.run(None, {"x": x.numpy(), "h": h.numpy(), "c": c.numpy(), "memory": mem.numpy()})
            worst = max(worst, max((torch.from_numpy(g) - w).abs().max().item() for g, w in zip(got, want)
                                   if w.numel()))  # an empty memory has nothing to compare
    if worst > 1e-4:
        raise ModelError(f"the ONNX graph disagrees with PyTorch by {worst:.2e}; not exported")
    return (f"model.onnx: one step for {B} stream(s), memory 0..{cfg.mem_len}; onnxruntime matches PyTorch "
            f"to {worst:.1e} at memory lengths {lengths}")


# ---------------------------------------------------------------------------------------------- command line
def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="sharnn-export",
        description="Write a trained model as OUT/model.safetensors + OUT/config.json (the ModelConfig), "
                    "loadable with sharnn.io.pretrained.load_model alone.")
    parser.add_argument("source", help="run directory (its best checkpoint), checkpoint, or exported model")
    parser.add_argument("--out", type=Path,
                        help="directory to write (must not exist or be empty); required unless --push_to_hub")
    parser.add_argument("--overwrite", action="store_true", help="replace an exported model already in --out")
    parser.add_argument(*cli.spellings("--from_zero"), action="store_true",
                        help="take the weights from a DeepSpeed checkpoint's ZeRO shards (fp32 master "
                             "weights) even when it holds model.safetensors (done anyway when it does not)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                        help="dtype of the written weights (default fp32)")
    parser.add_argument(*cli.spellings("--mem_len"), type=int,
                        help="record this attention memory length instead of the model's")
    parser.add_argument("--onnx", action="store_true",
                        help="also write OUT/model.onnx: one forward step (one byte per stream) with "
                             "explicit state in and out (needs onnx and onnxscript; checked with onnxruntime "
                             "if installed)")
    parser.add_argument(*cli.spellings("--onnx_batch"), type=int, default=1,
                        help="streams (batch size) of the ONNX step; fixed in the graph (default 1)")
    parser.add_argument(*cli.spellings("--push_to_hub"), metavar="REPO",
                        help="upload the export to this Hugging Face Hub model repo (owner/name), created if "
                             "needed; the token from HF_TOKEN or `hf auth login`")
    parser.add_argument("--private", action="store_true",
                        help="with --push_to_hub: create the repo private (an existing repo keeps its "
                             "visibility)")
    parser.add_argument("--license", type=cli.checked(hub.license_id),
                        help="license of the weights for the model card's metadata (a Hub license id such "
                             "as mit or cc-by-sa-4.0); left out if not given")
    return parser


@signals.command
def main(argv: list[str] | None = None) -> int:
    """Entry point of `sharnn-export` and `python -m train.export`; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.mem_len is not None and args.mem_len < 1:
        raise SystemExit(f"error: --mem_len must be >= 1, got {args.mem_len}")
    if args.onnx_batch < 1:
        raise SystemExit(f"error: --onnx_batch must be >= 1, got {args.onnx_batch}")
    if args.out is None and args.push_to_hub is None:
        raise SystemExit("error: give --out DIR (where to write the model), --push_to_hub REPO, or both")
    if args.private and args.push_to_hub is None:
        raise SystemExit("error: --private applies to the repo that --push_to_hub creates; add --push_to_hub")
    if args.push_to_hub is not None and hub.constants.HF_HUB_OFFLINE:
        raise SystemExit(f"error: --push_to_hub: {hub.OFFLINE_UPLOAD}")
    if args.push_to_hub is not None and not hub.is_repo_name(args.push_to_hub):
        raise SystemExit(f"error: --push_to_hub {args.push_to_hub!r} is not a Hub repo id: give owner/name "
                         "(letters, digits, '-', '_', '.')")
    if args.out is None:  # --push_to_hub only: export to a temporary directory, upload it, remove it
        with tempfile.TemporaryDirectory(prefix="sharnn-export-") as tmp:
            return export(args, Path(tmp) / "model", keep=False)
    return export(args, args.out, keep=True)


def export(args, out: Path, keep: bool) -> int:
    """Export to `out` (and upload) as the parsed arguments say; returns the exit code. `keep`: `out` is the
    user's (a failed upload leaves a complete export there), not a temporary directory."""
    try:
        check_output_dir(out, args.overwrite)
        if problem := atomic.cannot_write_into(Path(out).parent):
            raise ModelError(f"--out {out}: cannot write there ({problem}); choose another directory")
        source = find_model(args.source)
        if keep:  # the rule of every output (sharnn.io.atomic.check_output), with what the export reads
            try:
                atomic.check_output(out, "--out", kind="dir", what="exported model",
                                    is_ours=atomic.holds_only(EXPORT_FILES),
                                    inputs=source.inputs())
            except atomic.OutputRefused as e:
                raise ModelError(str(e)) from None
        state_dict, origin = source_weights(source, args.from_zero)
        config = source.config
        if args.mem_len is not None:
            config = dataclasses.replace(config, mem_len=args.mem_len)
        check_state_dict(config, state_dict, where=origin)
        if args.onnx:  # the check runs one step over a memory of mem_len: --mem_len and --onnx_batch bounded
            need = 4 * attention_report.forward_bytes(config, 1, config.mem_len + 1, args.onnx_batch)  # io
            try:
                attention_report.check_fits(need, "cpu", f"checking the ONNX step at a memory of "
                                            f"{config.mem_len:,} for {args.onnx_batch} stream(s)",
                                            "lower --mem_len or --onnx_batch")
            except ValueError as e:
                raise ModelError(str(e)) from None
        dtype = DTYPES[args.dtype]
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        notes = []

        def write_onnx(tmp: Path) -> None:
            model = build_model(config, state_dict)
            notes.append(export_onnx(model, tmp / "model.onnx", args.onnx_batch))

        metadata = {"source": source.repo_id or str(source.path), "weights_from": origin}
        provenance = hub.run_provenance(source)
        if provenance.steps is not None:
            metadata["step"] = str(provenance.steps)
        metadata[hub.PROVENANCE_KEY] = provenance.to_json()
        n_params = sum(v.numel() for v in state_dict.values())
        card = hub.model_card(config, n_params, provenance, repo_id=args.push_to_hub or str(out),
                              license=args.license)
        save_state_dict(state_dict, config, out, overwrite=args.overwrite, metadata=metadata,
                        extra=write_onnx if args.onnx else None, card=card)
    except ModelError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"exported {source.describe()}: {n_params:,} parameters ({args.dtype}), weights from {origin}, "
          f"to {out}", file=sys.stderr)
    for note in notes:
        print(note, file=sys.stderr)
    if args.push_to_hub is not None:
        try:
            url = hub.upload(out, args.push_to_hub, private=args.private or None,
                             commit_message=f"sharnn-export of {source.describe()}")
        except ModelError as e:
            retry = f"`hf upload {args.push_to_hub} {out} .`"
            kept = f"; the export in {out} is complete: upload it with {retry}" if keep else ""
            raise SystemExit(f"error: {e}{kept}") from None
        print(f"uploaded {out} to {args.push_to_hub}: {url}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
