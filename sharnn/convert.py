"""Bring state dicts in the reference's naming (Smerity/sha-rnn model.py) into `SHARNN`.

Reference -> sharnn names (per block i):
    encoder.weight -> embed.weight (the reference ties decoder.weight to it)    decoder.bias -> out_bias
    lnstart/lnmem/lnmid/lnff/lnxff -> ln_start/ln_mem/ln_mid/ln_ff/ln_xff      rnn.* -> lstm.*
    ff.linear1 -> boom.proj      attn.qs/ks/vs -> attn.q_gate/k_gate/v_gate (1x1xd -> d)
    attn.q -> attn.query         attn.qln -> attn.query_ln
    attn.vq.l1 -> attn.v_overparam.proj
Ignored (held by the reference, never read by its forward): lnout, attn.qkvs, attn.r_gate, and
lnmem/lnmid of blocks without attention.

`sharnn-import` (`main` below) turns a file written by the reference code into an exported sharnn model
(model.safetensors + config.json) that `sharnn-eval`, `sharnn-generate` and `sharnn.pretrained.load_model`
take. It reads a state dict in the reference's naming (safetensors, or torch.save'd) or the reference's own
checkpoint, a pickled `[model, criterion]` list (its `model_save`). Pickles are read with the restricted
unpickler of `sharnn.safe_pickle`: tensors and containers only, every other class the file names an inert stub
that records the pickled `_parameters`, `_buffers` and `_modules`; nothing from the file is executed.
"""

from __future__ import annotations

import pickle
import re
import sys
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from sharnn import cli
from sharnn.config import ModelConfig
from sharnn.safe_pickle import PickledObject, safe_torch_load

_BLOCK_RENAMES = {
    "lnstart": "ln_start", "lnmem": "ln_mem", "lnmid": "ln_mid", "lnff": "ln_ff", "lnxff": "ln_xff",
    "rnn": "lstm", "ff.linear1": "boom.proj",
    "attn.qs": "attn.q_gate", "attn.ks": "attn.k_gate", "attn.vs": "attn.v_gate",
    "attn.qln": "attn.query_ln", "attn.q": "attn.query", "attn.vq.l1": "attn.v_overparam.proj",
}
UNUSED_IN_REFERENCE = ("lnout", "attn.qkvs", "attn.r_gate")


def infer_config(ref: dict[str, Tensor], mem_len: int = 5000) -> ModelConfig:
    """Read the architecture off a reference state dict (sizes, blocks, attention placement)."""
    if "encoder.weight" not in ref:
        raise ValueError("not a SHA-RNN reference state dict: no 'encoder.weight' key")
    vocab, d = ref["encoder.weight"].shape
    blocks = sorted({int(m.group(1)) for k in ref if (m := re.match(r"blocks\.(\d+)\.", k))})
    n_layer = len(blocks)
    if not blocks or blocks != list(range(n_layer)) or "blocks.0.ff.linear1.weight" not in ref:
        raise ValueError(f"not a complete SHA-RNN reference state dict: blocks {blocks}, "
                         f"{'with' if 'blocks.0.ff.linear1.weight' in ref else 'without'} "
                         "'blocks.0.ff.linear1.weight'")
    d_ff = ref["blocks.0.ff.linear1.weight"].shape[0]
    with_attn = tuple(i for i in blocks if f"blocks.{i}.attn.q.weight" in ref)
    if with_attn == tuple(range(n_layer)):
        attn = "all"
    elif with_attn == (n_layer - 2,):
        attn = "penultimate"
    elif not with_attn:
        attn = "none"
    else:
        raise ValueError(f"attention in blocks {with_attn} is not a placement sharnn knows "
                         "('penultimate', 'all', 'none')")
    return ModelConfig(vocab_size=vocab, d_model=d, d_ff=d_ff, n_layer=n_layer, attn=attn, mem_len=mem_len)


def from_reference(ref: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """A sharnn state dict from a reference one; unused reference tensors are dropped."""
    out: dict[str, Tensor] = {}
    for key, value in ref.items():
        if key == "encoder.weight":
            out["embed.weight"] = value
        elif key == "decoder.bias":
            out["out_bias"] = value
        elif key == "decoder.weight":
            if not torch.equal(value, ref["encoder.weight"]):
                raise ValueError("decoder.weight differs from encoder.weight: sharnn ties them, "
                                 "so an untied reference model cannot be converted")
        else:
            leaves = "weight|bias|weight_ih_l0|weight_hh_l0|bias_ih_l0|bias_hh_l0"
            m = re.match(rf"blocks\.(\d+)\.(.+)\.({leaves})$", key)
            gate = re.match(r"blocks\.(\d+)\.(attn\.(?:qs|ks|vs|qkvs|r_gate))$", key)
            if gate:
                i, name, leaf = gate.group(1), gate.group(2), None
            elif m:
                i, name, leaf = m.groups()
            else:
                raise ValueError(f"unexpected key {key!r} in the reference state dict")
            if name in UNUSED_IN_REFERENCE:
                continue
            if name in ("lnmem", "lnmid") and int(i) not in cfg.attn_layers:
                continue
            if name not in _BLOCK_RENAMES:
                raise ValueError(f"unexpected key {key!r} in the reference state dict")
            new = f"blocks.{i}.{_BLOCK_RENAMES[name]}"
            out[new if leaf is None else f"{new}.{leaf}"] = value.reshape(-1) if leaf is None else value
    return out


def load_reference(model: torch.nn.Module, ref: dict[str, Tensor]) -> None:
    """Load a reference state dict into `model`, strictly: every tensor the model holds must be given."""
    converted = from_reference(ref, model.cfg)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(f"reference state dict does not fit this model: missing {missing}, "
                         f"unexpected {unexpected}")


# ------------------------------------------------------------------ reading the reference's files safely
def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{")


def _module_tensors(obj: PickledObject, prefix: str = "") -> dict[str, Tensor]:
    """The state dict of a pickled nn.Module: its `_parameters` and persistent `_buffers`, recursively."""
    out: dict[str, Tensor] = {}
    skip = getattr(obj, "_non_persistent_buffers_set", None) or set()
    for attr in ("_parameters", "_buffers"):
        for name, t in (getattr(obj, attr, None) or {}).items():
            if isinstance(t, Tensor) and not (attr == "_buffers" and name in skip):
                out[prefix + name] = t
    for name, child in (getattr(obj, "_modules", None) or {}).items():
        if isinstance(child, PickledObject):
            out.update(_module_tensors(child, f"{prefix}{name}."))
    return out


def _state_dict_of(obj, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, (list, tuple)) and obj:  # the reference's model_save: [model, criterion(, optimizer)]
        obj = obj[0]
    if isinstance(obj, PickledObject):
        if not isinstance(getattr(obj, "_parameters", None), dict):
            raise ValueError(f"{path} holds a pickled {obj.pickled_name}, which is not an nn.Module")
        return _module_tensors(obj)
    if isinstance(obj, dict):
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return dict(obj)
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj:
                return _state_dict_of(obj[key], path)
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict or a pickled [model, criterion]")


def read_reference_file(path: str | Path, prefix: str = "") -> dict[str, Tensor]:
    """A state dict in the reference's naming from a safetensors file, a torch.save'd state dict or the
    reference's pickled [model, criterion] (read safely), keys under `prefix` only (prefix removed)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is not a file; give a checkpoint written by the reference code (a state "
                         "dict saved with torch.save or safetensors, or its pickled [model, criterion])")
    try:
        if _is_safetensors(path):
            tensors = load_file(path)
        else:
            tensors = _state_dict_of(safe_torch_load(path), path)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, TypeError,
            AttributeError, KeyError, IndexError, OSError) as e:
        raise ValueError(f"cannot read {path} as a safetensors or torch.save file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); give a reference state dict or "
                         "pickled [model, criterion]") from None
    if prefix:
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not tensors:
            raise ValueError(f"{path} holds no tensor whose name starts with {prefix!r}")
    if "encoder.weight" not in tensors and "module.encoder.weight" in tensors:  # saved from nn.DataParallel
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    if "encoder.weight" not in tensors:
        names = sorted(tensors)
        tops = sorted({k.split(".")[0] for k in names})
        if "embed.weight" in tensors:
            hint = ("it is already in sharnn's naming: load it with sharnn.pretrained (it needs its "
                    "config.json beside it) rather than importing it")
        else:
            hint = (f"its top-level names are {tops[:10]}; if the weights sit under a prefix, pass --prefix "
                    "(e.g. --prefix model.)")
        raise ValueError(f"{path} is not a SHA-RNN reference state dict (no 'encoder.weight'): {hint}")
    # sharnn computes in fp32: bring half-precision reference weights over as fp32 (exactly representable).
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous()
            for k, v in tensors.items()}


def import_reference(path: str | Path, out: str | Path, mem_len: int = 5000, prefix: str = "",
                     overwrite: bool = False) -> tuple[ModelConfig, list[str]]:
    """Convert a reference checkpoint into an exported sharnn model directory. Returns the config and the
    names of the reference tensors left out (held by the reference, never read by its forward)."""
    from sharnn.pretrained import check_output_dir, check_state_dict, save_state_dict

    check_output_dir(out, overwrite)
    ref = read_reference_file(path, prefix)
    cfg = infer_config(ref, mem_len=mem_len)
    converted = from_reference(ref, cfg)
    check_state_dict(cfg, converted, where=f"the tensors of {path} (in sharnn's naming)",
                     hint="the architecture was read off the file's own tensors, so the file is "
                          "incomplete or not a SHA-RNN of the reference code")
    ignored = [k for k in ref if k != "decoder.weight" and _renamed(k) not in converted]
    save_state_dict(converted, cfg, out, overwrite=overwrite,
                    metadata={"source": str(path), "converted_from": "Smerity/sha-rnn reference naming"})
    return cfg, ignored


def _renamed(key: str) -> str:
    """The sharnn name of a reference key (for reporting only)."""
    if key == "encoder.weight":
        return "embed.weight"
    if key == "decoder.bias":
        return "out_bias"
    m = re.match(r"blocks\.(\d+)\.(.+?)(\.(?:weight|bias|weight_ih_l0|weight_hh_l0|bias_ih_l0|bias_hh_l0))?$",
                 key)
    if not m or m.group(2) not in _BLOCK_RENAMES:
        return ""
    return f"blocks.{m.group(1)}.{_BLOCK_RENAMES[m.group(2)]}{m.group(3) or ''}"


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="sharnn-import",
        description="Convert a checkpoint of the reference code (Smerity/sha-rnn) into an exported sharnn "
                    "model (OUT/model.safetensors + OUT/config.json) that sharnn-eval and sharnn-generate "
                    "take. "
                    "Accepts a state dict in the reference's naming (safetensors or torch.save) or the "
                    "reference's pickled [model, criterion] file, read without running code from it.")
    parser.add_argument("source", type=Path, help="the reference checkpoint file")
    parser.add_argument("--out", type=Path, required=True, help="directory to write the sharnn model to")
    parser.add_argument(*cli.spellings("--mem_len"), type=int, default=5000,
                        help="attention memory length to record (the reference used 5000; "
                             "default %(default)s)")
    parser.add_argument("--prefix", default="",
                        help="take only the tensors whose names start with this and strip it "
                             "(e.g. 'model.' for a state dict nested in a training checkpoint)")
    parser.add_argument("--overwrite", action="store_true", help="replace an exported model already in --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `sharnn-import` and `python -m sharnn.convert`; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.mem_len < 1:
        raise SystemExit(f"error: --mem_len must be >= 1, got {args.mem_len}")
    try:
        cfg, ignored = import_reference(args.source, args.out, args.mem_len, args.prefix, args.overwrite)
    except ValueError as e:  # includes sharnn.pretrained.ModelError
        raise SystemExit(f"error: {e}") from None
    arch = ", ".join(f"{k}={getattr(cfg, k)}" for k in ("d_model", "d_ff", "n_layer", "attn", "mem_len"))
    print(f"imported {args.source} ({arch}) to {args.out}", file=sys.stderr)
    if ignored:
        print(f"left out {len(ignored)} reference tensors its forward never reads: {', '.join(ignored)}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
