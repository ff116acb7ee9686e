"""`sharnn-eval MODEL --data CORPUS`: bits per byte of a trained model on a prepared corpus's split.

    sharnn-eval runs/paper --data data/enwik8                            # test split, 8 streams (the paper)
    sharnn-eval runs/paper --data data/enwik8 --mem_len 1000 5000 10000  # bpc as the attention memory grows
    accelerate launch --config_file launch/cpu_ddp.yaml -m train.eval_command runs/paper --data data/enwik8
    sharnn-eval runs/paper --attention_report report/ --text notes.txt  # what the attention head reads

The evaluation is train.step.evaluate, the one the training loop runs: the streams are the same for any world
size and each rank scores its share, so 1 process and N processes give the same number. The model is
evaluated unwrapped (no gradients, so no DDP/DeepSpeed wrapper is needed).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from sharnn import attention_report, cli
from sharnn.cli import positive_int
from sharnn.corpus.data import SPLITS, CorpusChanged, CorpusError, EvalStreams, open_split
from sharnn.io import atomic, signals
from sharnn.io.pretrained import (
    ModelError,
    ModelSource,
    build_model,
    check_state_dict,
    find_model,
    read_state_dict,
)
from train.config import eval_segment_len, paper
from train.distributed import build_accelerator, check_precision
from train.evaluation import evaluate

PAPER = paper()
PAPER_STREAMS = {"train": PAPER.eval_streams, "valid": PAPER.eval_streams, "test": PAPER.test_streams}
"""The paper preset's streams (train/config.py): validation on 16, test on 8, as the reference."""
PAPER_BPTT = PAPER.eval_len
"""The paper preset's evaluation segment length (1024 bytes, as the reference)."""


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="sharnn-eval",
        description="Bits per byte (character) of a trained SHA-RNN on a split of a prepared corpus, state "
                    "and attention memory carried through each stream. Runs as one process or under "
                    "`accelerate launch` (the streams are divided among the ranks; the result is the same).")
    parser.add_argument("model",
                        help="run directory (its best checkpoint), checkpoint, or exported model directory")
    parser.add_argument("--data", help="prepared corpus directory (made by sharnn-prepare); required but "
                                       "with --attention_report --text")
    parser.add_argument("--split", choices=SPLITS, default="test", help="split to score (default: test)")
    parser.add_argument("--streams", type=positive_int,
                        help="number of contiguous streams the split is cut into (default: the paper's, 16 "
                             "for valid and 8 for test)")
    parser.add_argument(*cli.spellings("--bptt", "--seg_len"), type=positive_int,
                        help="segment length in bytes (default: the run's evaluation length for a "
                             f"checkpoint, else {PAPER_BPTT} as the paper); --seg_len is the same option")
    parser.add_argument(*cli.spellings("--mem_len"), type=positive_int, nargs="+", metavar="N",
                        help="attention memory length(s) to evaluate with, replacing the model's own; "
                             "several values print a table, e.g. --mem_len 1000 5000 10000")
    parser.add_argument(*cli.spellings("--max_segments"), type=positive_int,
                        help="score only the first N segments of every stream (quick checks; not a full "
                             "result)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32, or bf16 autocast (default fp32)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file (atomically)")
    parser.add_argument(*cli.spellings("--attention_report"), type=Path, metavar="DIR",
                        help="instead of bpc: write what the attention head reads in one window of --text or "
                             "of the split (attention.png, distance.png, report.json, report.md) to DIR")
    parser.add_argument("--text", type=Path, metavar="FILE",
                        help="with --attention_report: the text to read (any file), instead of --data")
    parser.add_argument(*cli.spellings("--skip_data_check"), action="store_true",
                        help="do not hash the split against the corpus manifest first (about a second per "
                             "GB)")
    parser.add_argument(*cli.spellings("--timeout_s"), type=positive_int, default=600,
                        help="seconds a collective may wait for a missing rank (default 600)")
    return parser


def _default_bptt(source: ModelSource) -> int:
    train_config = source.train_config or {}
    return int(eval_segment_len(train_config.get("eval_bptt"), train_config.get("bptt") or PAPER_BPTT))


def predicted_bytes(streams: EvalStreams, max_segments: int | None) -> int:
    """Targets scored over all ranks: every stream predicts L - 1 bytes (or its first max_segments)."""
    per_stream = streams.stream_len - 1
    if max_segments is not None:
        per_stream = min(per_stream, max_segments * streams.bptt)
    return streams.n_streams * per_stream


@signals.command
def main(argv: list[str] | None = None) -> int:
    """Entry point of `sharnn-eval` and `python -m train.eval_command`; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.text is not None and args.attention_report is None:  # it would score --data, not the text
        raise SystemExit("error: --text goes with --attention_report DIR (what the attention head reads in "
                         "it); to score a text's bpc, prepare it as a corpus (sharnn-prepare files FILE "
                         "--out DIR) and give --data DIR")
    # Check everything that can be wrong before starting processes groups or reading the split.
    try:
        source = find_model(args.model)
        state_dict = read_state_dict(source)
        check_state_dict(source.config, state_dict, where=str(source.weights_path))
    except ModelError as e:
        raise SystemExit(f"error: {e}") from None
    if source.config.vocab_size != 256:
        raise SystemExit(f"error: the model's vocabulary has {source.config.vocab_size} symbols; sharnn "
                         "corpora are bytes (vocabulary 256)")
    if args.attention_report is not None:
        return write_attention_report(args, source, state_dict)
    if args.data is None:
        raise SystemExit("error: --data is required: the prepared corpus to score (or --attention_report DIR "
                         "--text FILE for what the attention head reads)")
    try:
        split = open_split(args.data, args.split, verify=not args.skip_data_check)
    except CorpusError as e:
        hint = " (or pass --skip_data_check to score it as it is)" if isinstance(e, CorpusChanged) else ""
        raise SystemExit(f"error: --data: {e}{hint}") from None
    n_streams = args.streams or PAPER_STREAMS[args.split]
    bptt = args.bptt or _default_bptt(source)
    mem_lens = args.mem_len or [source.config.mem_len]
    try:
        layout = EvalStreams(split, n_streams, bptt, rank=0, world_size=1)
    except ValueError as e:
        raise SystemExit(f"error: --streams {n_streams}: {e}") from None
    if args.json is not None:
        check_json_output(args.json, [*source.inputs(), ("corpus", args.data)])

    accelerator = start_accelerator(args, source, layout, n_streams, bptt, mem_lens)
    say = accelerator.print
    world = accelerator.num_processes
    n_predicted = predicted_bytes(layout, args.max_segments)
    n_params = sum(v.numel() for v in state_dict.values())
    say(f"model: {source.describe()}, {n_params:,} parameters")
    partial = " (--max_segments: partial)" if args.max_segments else ""
    say(f"data: {args.data} {args.split} split, {len(split):,} bytes in {n_streams} streams, segments of "
        f"{bptt}, {n_predicted:,} bytes predicted{partial}; {args.precision}, {world} "
        f"process{'es' if world > 1 else ''}")
    say(f"{'mem_len':>9} {'bpc':>9} {'seconds':>9}")
    results = []
    for mem_len in mem_lens:
        config = dataclasses.replace(source.config, mem_len=mem_len)
        model = build_model(config, state_dict, accelerator.device)
        start = time.perf_counter()
        bpc = evaluate(accelerator, model, split, n_streams, bptt, args.max_segments)
        seconds = time.perf_counter() - start
        results.append({"mem_len": mem_len, "bpc": bpc, "seconds": round(seconds, 3)})
        say(f"{mem_len:>9} {bpc:>9.5f} {seconds:>9.1f}")

    if args.json is not None and accelerator.is_main_process:
        record = {"model": str(source.path), "model_kind": source.kind, "step": source.step,
                  "data": str(args.data), "split": args.split, "split_bytes": len(split),
                  "n_streams": n_streams, "seg_len": bptt, "max_segments": args.max_segments,
                  "predicted_bytes": n_predicted,
                  "precision": args.precision, "world_size": world, "results": results}
        if len(results) == 1:
            record["bpc"] = results[0]["bpc"]
        try:
            check_json_output(args.json, [])  # checked at the start: still so?
            args.json.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_json(args.json, record)
        except OSError as e:  # the directory changed since, or the disk is full (one line naming it)
            raise SystemExit(f"error: --json {args.json}: {e}") from None
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def start_accelerator(args, source, layout: EvalStreams, n_streams: int, bptt: int, mem_lens: list[int]):
    """The training loop's Accelerator (process group, device, precision, world-size guard), with the
    precision checked and --bptt, --mem_len and --streams bounded by the memory they need."""
    accelerator = build_accelerator(args.precision, timeout_s=args.timeout_s)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and args.precision != "fp32":
        raise SystemExit(f"error: --precision {args.precision} under a DeepSpeed launch: accelerate leaves "
                         "precision to DeepSpeed's engine, which evaluation does not use. Launch with a DDP "
                         "config instead (e.g. launch/cpu_ddp.yaml, or accelerate launch --multi_gpu)")
    check_precision(args.precision, accelerator.device)
    # --bptt, --mem_len and --streams bounded by what they need: the attention's (B, T, K) scores above all
    B = -(-n_streams // accelerator.num_processes)
    T, M = min(bptt, layout.stream_len - 1), min(max(mem_lens), layout.stream_len)
    try:
        need = attention_report.forward_bytes(source.config, T, M + T, B)
        attention_report.check_fits(need, accelerator.device,
                                    f"scoring {B} streams in segments of {T:,} bytes with a memory of {M:,}",
                                    "lower --bptt, --mem_len or --streams (or launch more processes)")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return accelerator


JSON_KEYS = ("model", "split", "results", "precision")
"""What marks a JSON file as an evaluation record of this command (one that --json may replace)."""


def check_json_output(path: Path, inputs: list) -> None:
    """--json: a file that is not an earlier evaluation record, or one among the inputs, is refused."""
    try:
        atomic.check_output(path, "--json", kind="file", what="evaluation record (sharnn-eval --json)",
                            is_ours=atomic.json_with_keys(*JSON_KEYS), inputs=inputs)
    except atomic.OutputRefused as e:
        raise SystemExit(f"error: {e}") from None


def write_attention_report(args, source: ModelSource, state_dict: dict) -> int:
    """`--attention_report DIR`: sharnn.attention_report's report on one window of --text (or of the --split
    of
    --data), read in segments of --bptt after warming the memory, written atomically to DIR. One process; a
    GPU when there is one. DIR may be new, empty or an earlier report (sharnn.io.atomic.check_output)."""
    if (args.text is None) == (args.data is None):
        raise SystemExit("error: --attention_report reads --text FILE or --data CORPUS (its --split); give "
                         "one of them")
    if args.mem_len is not None and len(args.mem_len) > 1:
        raise SystemExit("error: --attention_report takes one --mem_len")
    inputs = [*source.inputs(), ("corpus", args.data), ("text", args.text)]
    try:
        atomic.check_output(args.attention_report, "--attention_report", kind="dir", what="attention report",
                            is_ours=attention_report.is_report_dir, inputs=inputs)
    except atomic.OutputRefused as e:
        raise SystemExit(f"error: {e}") from None
    config = source.config
    if args.mem_len is not None:
        config = dataclasses.replace(config, mem_len=args.mem_len[0])
    bptt = args.bptt or _default_bptt(source)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n_wanted = config.mem_len + bptt  # the window lies within these
    if args.text is not None:
        try:
            if args.text.is_file():
                n_wanted = min(n_wanted, args.text.stat().st_size)
            check_window_fits(config, bptt, n_wanted, device)
            data = signals.read_head(args.text, n_wanted)
        except OSError as e:
            raise SystemExit(f"error: --text {args.text}: cannot read it ({e.strerror})") from None
    else:
        try:
            split = open_split(args.data, args.split)
        except CorpusError as e:
            raise SystemExit(f"error: --data: {e}") from None
        n_wanted = min(len(split), n_wanted)
        check_window_fits(config, bptt, n_wanted, device)
        data = bytes(split.read(0, n_wanted))
    if not data:
        raise SystemExit(f"error: --text {args.text} is empty; give a file with text to read")
    model = build_model(config, state_dict, device)
    try:
        window = attention_report.read_window(model, data, bptt)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    report = attention_report.summarize(window)
    try:
        attention_report.write_report_dir(window, report, args.attention_report, inputs)
    except atomic.OutputRefused as e:  # the path changed since the check
        raise SystemExit(f"error: {e}") from None
    except OSError as e:  # a full disk (DiskFull: one line naming it), or the directory gone
        raise SystemExit(f"error: --attention_report {args.attention_report}: {e}") from None
    layers = ", ".join(f"block {i}: {layer['entropy_bits']:.2f} bits, mean distance "
                       f"{layer['mean_distance']:.0f} bytes" for i, layer in report.layers.items())
    print(f"attention report: {args.attention_report} (bytes {window.start - window.n_memory}.."
          f"{window.start + window.segment_len - 1}; {layers})")
    return 0


def check_window_fits(config, bptt: int, n_bytes: int, device: str) -> None:
    """--bptt and --mem_len bounded by the memory of the window's forward (T = bptt, keys up to the memory
    and the segment, of at most the `n_bytes` read)."""
    T = max(1, min(bptt, n_bytes))
    try:
        need = attention_report.forward_bytes(config, T, min(config.mem_len + T, max(n_bytes, T)))
        attention_report.check_fits(need, device, f"the attention report's window (a segment of {T:,} bytes, "
                                                  f"a memory of {config.mem_len:,})",
                                    "lower --bptt or --mem_len")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
