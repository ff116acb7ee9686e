"""Train the author's original code and sharnn side by side, over seeds, and compare their bpc.

    python -m bench.sidebyside --original ~/src/sha-rnn --lamb ~/src/pytorch-lamb --size emb128 \\
        --seeds 8 --work bench/out/sbs-emb128 --json bench/out/sbs-emb128.json [--jobs 2]
    python -m bench.sidebyside ... --setting original --setting fast --setting torch --setting torch/bf16
    python -m bench.sidebyside pool A.json B.json [--json POOLED.json]   # records of other seeds, one table

Each run is one process: the original's `main.py` (Smerity/sha-rnn 218d748, unmodified, run from the user's
checkout with the apex stand-in of bench.original; pytorch-lamb 704f733) or sharnn's trainer with one kernel
setting (`fast`, `torch`, `fast-masks`, `fast-attention`, optionally `/bf16` for CPU bf16 autocast). For one
seed every program gets, as far as the two programs allow, the same run:

- **The same bytes.** A text corpus (default: the running Python's standard library sources, `*.py` sorted by
  path), cut into train / valid / test, each ending with a newline and a multiple of the stream count long;
  the training split starts with the 256 byte values once. So the original's vocabulary is all 256 symbols,
  as sharnn's output layer (byte 10 is its `<eos>`), and its token sequence is exactly the bytes (no extra
  `<eos>` at a split's end), the streams are cut at the same places, and its validation and test cover the
  same predictions as sharnn's.
- **The same initial weights.** The apex stand-in's `amp.initialize` (called by main.py after it built the
  model, before it trains) saves the model's state dict when $SHARNN_BENCH_INITIAL_WEIGHTS names a file;
  `sharnn-import` turns it into sharnn's weights (its ids mapped back to bytes with the run's corpus cache),
  and every sharnn run of that seed starts from them (`--init_from`).
- **The same segment lengths.** The original draws each batch's length from numpy's global generator seeded
  with --seed and nothing else draws from it, so `np.random.RandomState(seed)` replays them; the sharnn run
  is `python -m bench.sidebyside replay`, which sets `sharnn.corpus.data.draw_seq_len` to that sequence and
  runs the trainer. Both take the same number of steps in the epoch (checked).
- **The same configuration and layout**: batch streams, bptt, one epoch, LAMB (min trust 0.25), lr with its
  linear warmup, weight decay, clip 0.25, dropouts 0.1 (dropoute 0: not used by its SHARNN), a memory of
  5000 (the original's fixed num_max_positions), validation on min(100, batch) streams and test on 8, in
  segments of bptt, state carried, at the epoch's end.

What still differs: the dropout masks (torch's generator in the original; numpy's or torch's in sharnn,
seeded by the seed) and float rounding. The original is scored twice: its own printed bpc (3 decimals,
divided by the stream length instead of the predictions: docs/differences.md) and its saved model imported
and scored by `sharnn-eval` (exact; the two agree to the printed rounding, checked), and the exact one is
compared. Per setting the table gives mean and standard deviation over seeds, and the difference from the
original paired by seed with its standard error and 95% interval (the resolution reached). --work holds
the corpus and every run; a run's result.json is written when it has finished, so a rerun with the same
--work skips finished runs and redoes interrupted ones. --json is rewritten after every run. Seeds can be
spread over machines or days (--first_seed) and their records pooled into one table (`pool`: the same size,
corpus and original's commits, disjoint seeds, checked).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import original
from bench.original import original_text

REPO = Path(__file__).resolve().parents[1]
ORIGINAL_MEMORY = 5000  # the original's num_max_positions (model.py), fixed
INITIAL_WEIGHTS_ENV = "SHARNN_BENCH_INITIAL_WEIGHTS"
WORK_MARKER = ".bench-sidebyside"  # marks a --work directory this benchmark made
SETTINGS = ("fast", "torch", "fast-masks", "fast-attention")
NO_BF16 = ("this CPU has no bf16 matrix instructions (avx512_bf16/AMX): bf16 runs emulated (at the `small` "
           "size 10x slower than fp32: 23 s a step, ~5 h a run, on a 2-core AMD EPYC with AVX2 only)")


@dataclass(frozen=True)
class Size:
    emsize: int
    nhid: int
    nlayers: int
    batch: int
    bptt: int
    warmup: int
    train_bytes: int
    valid_bytes: int
    test_bytes: int
    lr: float = 2e-3
    weight_decay: float = 1.2e-6
    clip: float = 0.25
    dropout: float = 0.1

    @property
    def eval_streams(self) -> int:  # the original's eval_batch_size
        return min(100, self.batch)

    test_streams = 8  # the original's test_batch_size


SIZES = {
    # a test's size: seconds per run
    "tiny": Size(emsize=16, nhid=64, nlayers=2, batch=4, bptt=16, warmup=5, train_bytes=3_000,
                 valid_bytes=1_100, test_bytes=1_100),
    # the first size: one epoch is about 640 steps
    "emb128": Size(emsize=128, nhid=512, nlayers=4, batch=16, bptt=64, warmup=100, train_bytes=630_000,
                   valid_bytes=50_000, test_bytes=50_000),
    # sharnn's `small` model (lr, warmup, dropouts as its preset); one epoch is about 730 steps, well past
    # the early plateau: at a memory of 5000 the original takes ~3.9 s a step on one thread, so a seed of
    # the four default settings is ~2 core-hours (a 1,500-step epoch made it 4)
    "small": Size(emsize=256, nhid=1024, nlayers=4, batch=16, bptt=128, warmup=100, train_bytes=1_500_000,
                  valid_bytes=50_000, test_bytes=50_000),
}


# ---------------------------------------------------------------------------------------------- corpus
def default_text() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def read_text(paths: list[Path], pattern: str, limit: int) -> bytes:
    """The first `limit` bytes of the files (directories: their files matching `pattern`, recursively, sorted
    by path; __pycache__ skipped), concatenated."""
    out, n = [], 0
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob(pattern)
                                                     if p.is_file() and "__pycache__" not in p.parts)
        for f in files:
            data = f.read_bytes()
            out.append(data)
            n += len(data)
            if n >= limit:
                return b"".join(out)[:limit]
    return b"".join(out)


def cut_splits(text: bytes, size: Size) -> dict[str, bytes]:
    """train / valid / test from the start of `text`: each at least its size, ending with a newline, a
    multiple of every stream count long; train starts with the 256 byte values once."""
    multiple = math.lcm(size.batch, size.eval_streams, size.test_streams)
    prefix = bytes(range(256))  # 256 is a multiple of every power of two up to 256
    out, pos = {}, 0
    for name, n, head in (("train", size.train_bytes, prefix), ("valid", size.valid_bytes, b""),
                          ("test", size.test_bytes, b"")):
        end = pos + max(n - len(head), 1)
        while end <= len(text) and not (text[end - 1] == 10 and (end - pos + len(head)) % multiple == 0):
            end += 1
        if end > len(text):
            raise ValueError(f"the text ({len(text):,} bytes) is too short for the {name} split of {n:,} "
                             "bytes"
                             "ending with a newline: give more text (--text)")
        out[name] = head + text[pos:end]
        pos = end
    return out


def write_corpus(work: Path, size: Size, paths: list[Path], pattern: str) -> dict:
    """work/corpus (sharnn-prepare files) and work/original-data/{train,valid,test}.txt (the original's
    format); returns the record (sizes, sha256). Done once per --work: an existing corpus is reused after
    checking it is the one these arguments make."""
    import hashlib

    need = size.train_bytes + size.valid_bytes + size.test_bytes + 200_000
    splits = cut_splits(read_text(paths, pattern, need), size)
    record = {name: {"n_bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()}
              for name, b in splits.items()}
    record["sources"] = [str(p) for p in paths]
    record["pattern"] = pattern
    marker = work / "corpus.json"
    if marker.exists():
        if json.loads(marker.read_text()) != record:
            raise SystemExit(f"error: --work {work} holds a corpus made from other text or another --size: "
                             "use a new --work directory")
        return record
    for d in (work / "corpus", work / "original-data", work / "corpus-source"):
        shutil.rmtree(d, ignore_errors=True)
    (work / "original-data").mkdir(parents=True)
    for name, data in splits.items():
        (work / "original-data" / f"{name}.txt").write_text(original_text(data))
    source = work / "corpus-source" / "all.bytes"
    source.parent.mkdir(parents=True)
    source.write_bytes(splits["train"] + splits["valid"] + splits["test"])
    run_checked(sharnn_command("sharnn.corpus.prepare", "files", str(source), "--out", str(work / "corpus"),
                               "--valid_bytes", str(len(splits["valid"])),
                               "--test_bytes", str(len(splits["test"]))), env=run_env(1))
    manifest = json.loads((work / "corpus" / "manifest.json").read_text())
    got = {k: v.get("n_bytes") for k, v in manifest.get("splits", {}).items()}
    if got != {k: record[k]["n_bytes"] for k in ("train", "valid", "test")}:
        raise RuntimeError(f"sharnn-prepare cut the splits {got}, not as asked {record}")
    shutil.rmtree(source.parent)
    from sharnn.io import atomic

    atomic.write_json(marker, record)
    return record


# ------------------------------------------------------------------------------------- segment lengths
def original_seq_lens(seed: int, bptt: int, n: int) -> list[int]:
    """The first n training segment lengths the original draws with --seed `seed` (main.py's train():
    np.random.seed(seed) at its start, then per batch random() and normal(bptt or bptt / 2, 5))."""
    import numpy as np

    rs = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        base = bptt if rs.random_sample() < 0.95 else bptt / 2.0
        out.append(min(max(5, int(rs.normal(base, 5))), bptt))
    return out


def epoch_steps(stream_len: int, lengths: list[int]) -> int:
    """Batches in the original's first epoch: `while i < L - 2`, each segment cut to L - 1 - i."""
    i = steps = 0
    while i < stream_len - 1 - 1:
        i += min(lengths[steps], stream_len - 1 - i)
        steps += 1
    return steps


def replay(argv: list[str]) -> int:
    """`python -m bench.sidebyside replay --seed S --bptt B -- TRAINER ARGS`: sharnn's trainer with the
    original's segment lengths for seed S in its first epoch."""
    parser = argparse.ArgumentParser(prog="python -m bench.sidebyside replay")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--bptt", type=int, required=True)
    parser.add_argument("trainer", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    trainer = args.trainer[1:] if args.trainer[:1] == ["--"] else args.trainer
    from sharnn.corpus import data

    lengths = original_seq_lens(args.seed, args.bptt, 1_000_000)

    def draw_seq_len(bptt: int, seed: int, epoch: int, step_in_epoch: int) -> int:
        if bptt != args.bptt or epoch != 0:
            raise RuntimeError(f"replay covers the first epoch at bptt {args.bptt}, not epoch {epoch} at "
                               f"{bptt}")
        return lengths[step_in_epoch]

    data.draw_seq_len = draw_seq_len
    sys.argv = ["sharnn-train", *trainer]
    from sharnn.entry import run

    run("train.loop")  # exits
    return 0


# ------------------------------------------------------------------------------------------------ runs
def run_env(threads: int, pythonpath: list[Path] | None = None, **extra: str) -> dict:
    """bench.original's environment (threads, CPU only, PYTHONPATH), without the caller's kernel settings:
    each run's setting is its command's."""
    env = original.run_env(threads, pythonpath or [REPO])
    for key in ("SHARNN_CPU_KERNELS", "SHARNN_ATTENTION", INITIAL_WEIGHTS_ENV):
        env.pop(key, None)
    return {**env, **extra}


def sharnn_command(module: str, *args: str) -> list[str]:
    """A sharnn console command (as its entry point runs it), as `python -c`."""
    return [sys.executable, "-c", f"import sys; from sharnn.entry import run; sys.argv[0] = {module!r}; "
            f"run({module!r})", *args]


def run_checked(cmd: list[str], env: dict, cwd: Path | None = None, log: Path | None = None,
                timeout: float | None = None) -> str:
    if log is None:
        proc = subprocess.run(cmd, cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout)
        output = proc.stdout + proc.stderr
    else:  # written as it runs (progress can be followed there)
        with open(log, "w") as f:
            proc = subprocess.run(cmd, cwd=cwd or REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout)
        output = log.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{output[-3000:]}")
    return output


ORIGINAL_VALID = re.compile(r"\| end of epoch\s+1 \|.*\| valid bpc\s+([-+.\deE]+|nan|inf)")
ORIGINAL_TEST = re.compile(r"\| End of training \|.*\| test bpc\s+([-+.\deE]+|nan|inf)")
ORIGINAL_TRAIN = re.compile(r"^\| epoch\s+0 \|\s*(\d+)/\s*\d+ batches \|.*\| bpc\s+([-+.\deE]+|nan|inf)")


def original_flags(size: Size, seed: int, data: Path, save: Path, log_interval: int) -> list[str]:
    d = str(size.dropout)
    return ["--data", f"{data}/", "--epochs", "1", "--emsize", str(size.emsize), "--nhid", str(size.nhid),
            "--nlayers", str(size.nlayers), "--bptt", str(size.bptt), "--batch_size", str(size.batch),
            "--dropout", d, "--dropouth", d, "--dropouti", d, "--dropoute", "0", "--optimizer", "lamb",
            "--lr", str(size.lr), "--warmup", str(size.warmup), "--wdecay", str(size.weight_decay),
            "--clip", str(size.clip), "--seed", str(seed), "--log-interval", str(log_interval),
            "--save", str(save), "--cuda"]  # --cuda is store_false: passing it runs on the CPU


def sharnn_eval(model: Path, corpus: Path, split: str, streams: int, bptt: int, out: Path,
                env: dict) -> float:
    run_checked(sharnn_command("train.eval_command", str(model), "--data", str(corpus), "--split", split,
                               "--streams", str(streams), "--bptt", str(bptt), "--json", str(out)), env=env)
    return json.loads(out.read_text())["bpc"]


def run_original(ctx: Context, seed: int, run_dir: Path) -> dict:
    size, work = ctx.size, ctx.work
    flags = original_flags(size, seed, work / "original-data", run_dir / "final.pt", ctx.log_interval)
    cmd = [sys.executable, str(ctx.original / "main.py"), *flags]
    # main.py torch.load()s its pickled model at the end: torch >= 2.6 refuses that unless told
    env = run_env(ctx.threads, [work / "standins", ctx.lamb], TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1",
                  **{INITIAL_WEIGHTS_ENV: str(run_dir / "initial.pt")})
    start = time.perf_counter()
    log = run_checked(cmd, env, cwd=run_dir, log=run_dir / "main.log", timeout=ctx.timeout)
    wall = time.perf_counter() - start
    valid, test = ORIGINAL_VALID.search(log), ORIGINAL_TEST.search(log)
    if not (valid and test and (run_dir / "initial.pt").exists()):
        raise RuntimeError(f"the original's run in {run_dir} printed no valid/test bpc or saved no initial "
                           f"weights: see {run_dir / 'main.log'}")
    caches = sorted(run_dir.glob("corpus.*.data"))
    sharnn_env = run_env(ctx.threads)
    for name in ("initial", "final"):  # the ids of its vocabulary mapped back to bytes by its corpus cache
        run_checked(sharnn_command("sharnn.convert", str(run_dir / f"{name}.pt"), "--vocab", str(caches[0]),
                                   "--score_bytes", "0", "--out", str(run_dir / name)), env=sharnn_env)
    corpus = work / "corpus"
    val = sharnn_eval(run_dir / "final", corpus, "valid", size.eval_streams, size.bptt,
                      run_dir / "eval-valid.json", sharnn_env)
    tst = sharnn_eval(run_dir / "final", corpus, "test", size.test_streams, size.bptt,
                      run_dir / "eval-test.json", sharnn_env)
    for f in ("final.pt", "initial.pt", *map(str, caches)):
        Path(run_dir, f).unlink(missing_ok=True)
    curve = {int(m[1]): float(m[2]) for m in map(ORIGINAL_TRAIN.match, log.splitlines()) if m}
    printed = {"valid": float(valid[1]), "test": float(test[1])}
    return {"val_bpc": val, "test_bpc": tst, "printed_bpc": printed, "train_bpc": curve, "wall_s": wall,
            "steps": epoch_steps(ctx.corpus["train"]["n_bytes"] // size.batch,
                                 original_seq_lens(seed, size.bptt, 1_000_000)),
            "command": cmd}


def sharnn_train_args(size: Size, seed: int, impl: str, precision: str, corpus: Path, out: Path,
                      init: Path, log_interval: int) -> list[str]:
    d = str(size.dropout)
    return ["--data", str(corpus), "--out", str(out), "--model.d_model", str(size.emsize),
            "--model.d_ff", str(size.nhid), "--model.n_layer", str(size.nlayers),
            "--model.attn", "penultimate",
            "--model.mem_len", str(ORIGINAL_MEMORY), "--model.dropout", d, "--model.dropouth", d,
            "--model.dropouti", d, "--batch_size", str(size.batch), "--bptt", str(size.bptt), "--vary_bptt",
            "--epochs", "1", "--max_steps", "None", "--optimizer", "lamb", "--lr", str(size.lr),
            "--lr_scaling", "none", "--warmup_steps", str(size.warmup),
            "--weight_decay", str(size.weight_decay),
            "--min_trust", "0.25", "--clip", str(size.clip), "--seed", str(seed), "--state_reset_prob", "0",
            "--eval_every", "0", "--eval_streams", str(size.eval_streams), "--test_streams",
            str(size.test_streams), "--eval_bptt", "None", "--eval_max_segments", "None", "--test_at_end",
            "--sample_bytes", "0", "--no_attention_report", "--log_every", str(log_interval), "--save_every",
            "0", "--keep_last", "1", "--progress_interval_s", "0", "--cpu_kernels", impl, "--precision",
            precision, "--init_from", str(init)]


def run_sharnn(ctx: Context, setting: str, seed: int, run_dir: Path) -> dict:
    impl, _, precision = setting.partition("/")
    init = ctx.work / "runs" / f"original-s{seed}" / "initial" / "model.safetensors"
    args = sharnn_train_args(ctx.size, seed, impl, precision or "fp32", ctx.work / "corpus", run_dir / "run",
                             init, ctx.log_interval)
    cmd = [sys.executable, "-m", "bench.sidebyside", "replay", "--seed", str(seed), "--bptt",
           str(ctx.size.bptt), "--", *args]
    start = time.perf_counter()
    run_checked(cmd, run_env(ctx.threads), log=run_dir / "train.log", timeout=ctx.timeout)
    wall = time.perf_counter() - start
    summary = json.loads((run_dir / "run" / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "run" / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    curve = {m["step"]: m["train/bpc"] for m in metrics if "train/bpc" in m}
    shutil.rmtree(run_dir / "run" / "checkpoints", ignore_errors=True)
    return {"val_bpc": summary["val_bpc"], "test_bpc": summary["test_bpc"], "train_bpc": curve,
            "wall_s": wall, "steps": summary["step"], "exit": summary["exit"], "command": cmd}


# ------------------------------------------------------------------------------------------ scheduling
@dataclass
class Context:
    original: Path
    lamb: Path
    work: Path
    size: Size
    corpus: dict
    threads: int
    log_interval: int
    timeout: float


def run_one(ctx: Context, setting: str, seed: int) -> dict:
    """One run, or its earlier result: work/runs/<setting>-s<seed>/result.json."""
    from sharnn.io import atomic

    run_dir = ctx.work / "runs" / f"{setting.replace('/', '-')}-s{seed}"
    done = run_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run starts again
    run_dir.mkdir(parents=True)
    if setting == "original":
        result = run_original(ctx, seed, run_dir)
    else:
        result = run_sharnn(ctx, setting, seed, run_dir)
    result = {"setting": setting, "seed": seed, **result}
    atomic.write_json(done, result)
    return result


def schedule(ctx: Context, settings: list[str], seeds: list[int], jobs: int, on_result) -> None:
    """Seed by seed, the original first (its initial weights start sharnn's runs of that seed); `jobs`
    runs at a time, a sharnn run only once its seed's original has finished."""
    pending = [(st, s) for s in seeds for st in ["original", *[x for x in settings if x != "original"]]]
    done: set[tuple[str, int]] = set()
    running: set[tuple[str, int]] = set()
    failures: list[str] = []
    cond = threading.Condition()

    def ready(task):
        return task[0] == "original" or ("original", task[1]) in done

    def worker():
        while True:
            with cond:
                while True:
                    if failures or not pending:
                        return
                    task = next((t for t in pending if ready(t)), None)
                    if task is not None:
                        pending.remove(task)
                        running.add(task)
                        break
                    if not running:  # nothing can become ready
                        return
                    cond.wait()
            try:
                result = run_one(ctx, *task)
            except Exception as e:  # one run's failure: reported, and no new runs start
                with cond:
                    failures.append(f"{task[0]} seed {task[1]}: {e}")
                    running.discard(task)
                    cond.notify_all()
                continue
            with cond:
                running.discard(task)
                done.add(task)
                on_result(result)
                cond.notify_all()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError("; ".join(failures))


# -------------------------------------------------------------------------------------------- summary
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
       2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
       2.045, 2.042)


def t95(df: int) -> float:
    """Two-sided 95% quantile of Student's t with df >= 1 degrees of freedom (table; past 30 within 0.001)."""
    return T95[df - 1] if df <= len(T95) else 1.960 + 2.46 / df


def summarize(results: list[dict], settings: list[str]) -> dict:
    from bench.seeds import describe, paired

    out = {}
    for key in ("val_bpc", "test_bpc"):
        by = {st: {r["seed"]: r[key] for r in results if r["setting"] == st and r.get(key) is not None}
              for st in settings}
        per = {st: {**describe(list(v.values())), "values": v} for st, v in by.items()}
        diffs = {}
        for st in settings:
            if st == "original" or "original" not in by:
                continue
            d = paired(by[st], by["original"])
            if d["se"]:
                half = t95(d["n"] - 1) * d["se"]
                d.update(ci95=[d["mean"] - half, d["mean"] + half], within_002=d["mean"] <= 0.02,
                         resolved_002=d["mean"] + half <= 0.02)
            diffs[st] = d
        out[key] = {"settings": per, "minus_original": diffs}
    return out


def table(summary: dict) -> list[str]:
    from bench.seeds import fmt

    lines = []
    for key, s in summary.items():
        lines.append(f"\n{key}: mean (sd) over seeds; setting - original paired by seed: mean +- se [95%]")
        for st, d in s["settings"].items():
            row = f"{st:16s} n={d['n']:2d} {fmt(d['mean'])} ({fmt(d['std'])})"
            p = s["minus_original"].get(st)
            if p and p["n"]:
                ci = p.get("ci95")
                row += (f"   {fmt(p['mean'], sign=True)} +- {fmt(p['se'])}"
                        + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""))
            lines.append(row)
    return lines


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.sidebyside", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", type=Path, required=True,
                        help="a checkout of Smerity/sha-rnn (commit 218d748): main.py, model.py")
    parser.add_argument("--lamb", type=Path, required=True,
                        help="a checkout of Smerity/pytorch-lamb (the directory holding pytorch_lamb/)")
    parser.add_argument("--size", choices=sorted(SIZES), default="emb128",
                        help="model, batch and corpus sizes (default emb128: embedding 128, Boom 512, 4 "
                             "blocks, batch 16, bptt 64, ~640 steps)")
    parser.add_argument("--setting", action="append", dest="settings",
                        help="original, or a sharnn kernel setting (fast, torch, fast-masks, "
                             "fast-attention), "
                             "optionally /bf16; repeat (default: original, fast, torch, torch/bf16)")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per setting (default 8)")
    parser.add_argument("--first_seed", type=int, default=1, help="the first seed (default 1)")
    parser.add_argument("--work", type=Path, required=True,
                        help="directory for the corpus and the runs; reuse it to resume")
    parser.add_argument("--json", type=Path, help="write the record here (atomically, after every run)")
    parser.add_argument("--text", type=Path, action="append",
                        help="text files or directories for the corpus (default: this Python's standard "
                             "library)")
    parser.add_argument("--pattern", default="*.py", help="files taken from --text directories (*.py)")
    parser.add_argument("--dropout", type=float,
                        help="every dropout rate (default the size's, 0.1); 0 makes the programs' runs the "
                             "same computation up to rounding (a check of everything but the masks)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="OMP/MKL threads per run (default 1)")
    parser.add_argument("--log_interval", type=int, default=10, help="training bpc logged every N steps")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per run (default 6 h)")
    parser.add_argument("--force", action="store_true",
                        help="run bf16 settings on a CPU without bf16 matrix instructions (emulated: a "
                             "`small` step ~10x fp32's)")
    return parser.parse_args(argv)


def check_args(args) -> str | None:
    from bench.original import check_lamb, check_original

    for problem in (check_original(args.original), check_lamb(args.lamb)):
        if problem:
            return problem
    for name in ("seeds", "jobs", "threads", "log_interval"):
        if getattr(args, name) < 1:
            return f"--{name} must be >= 1"
    if args.dropout is not None and not 0 <= args.dropout < 1:
        return "--dropout must be in [0, 1)"
    if args.first_seed < 0:
        return "--first_seed must be >= 0"
    for st in args.settings:
        impl, _, precision = st.partition("/")
        if st != "original" and (impl not in SETTINGS or precision not in ("", "fp32", "bf16")):
            return (f"--setting {st!r}: use original, or one of {', '.join(SETTINGS)} optionally followed "
                    "by /bf16")
    for p in args.text:
        if not p.exists():
            return f"--text {p} does not exist"
    if args.work.exists() and not args.work.is_dir():
        return f"--work {args.work} is not a directory"
    ours = (args.work / WORK_MARKER).exists() or (args.work / "corpus.json").exists()
    if args.work.is_dir() and any(args.work.iterdir()) and not ours:
        return f"--work {args.work} holds files this benchmark did not write: give a new or empty directory"
    return None


# -------------------------------------------------------------------------------------------- pooling
POOL_SAME = ("shape", "memory", "corpus", "original")  # what records must share to be pooled


def pool_key(record: dict, key: str):
    """The part of `key` that must match to pool: the corpus by its splits' bytes and the original by its
    commits and files, wherever they were on the machine that ran it."""
    value = record.get(key)
    if key == "corpus" and isinstance(value, dict):
        return {k: value.get(k) for k in ("train", "valid", "test")}
    if key == "original" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "path"}
    return value


class PoolError(Exception):
    pass


def read_records(paths: list[Path]) -> list[dict]:
    """The records at `paths`, each checked to be this benchmark's and to match the first (pool_key)."""
    records = []
    for path in paths:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise PoolError(f"{path}: not a readable JSON record ({e})") from None
        if not (isinstance(record, dict)
                and str(record.get("command", "")).startswith("python -m bench.sidebyside")):
            raise PoolError(f"{path} is not a record of python -m bench.sidebyside (its --json)")
        for key in POOL_SAME:
            if records and pool_key(record, key) != pool_key(records[0], key):
                raise PoolError(f"{path} and {paths[0]} differ in their {key}: pool only records of one "
                                "benchmark (the same --size, --dropout, corpus and original's commits)")
        records.append(record)
    return records


def pooled_runs(paths: list[Path], records: list[dict]) -> list[dict]:
    """Every record's runs, sorted; a (setting, seed) in two records is refused."""
    runs, source = [], {}
    for path, record in zip(paths, records):
        for run in record.get("runs") or []:
            key = (run["setting"], run["seed"])
            if key in source:
                raise PoolError(f"{run['setting']} seed {run['seed']} is in both {source[key]} and {path}: "
                                "pool records of other seeds (--first_seed)")
            source[key] = path
            runs.append(run)
    return sorted(runs, key=lambda r: (r["seed"], r["setting"]))


def pool(argv: list[str]) -> int:
    """`python -m bench.sidebyside pool A.json B.json ... [--json OUT]`: one table over the runs of several
    records of the same benchmark (the same size, corpus, memory and original; disjoint seeds, e.g. from
    --first_seed on other machines or days), each run as its record has it."""
    parser = argparse.ArgumentParser(prog="python -m bench.sidebyside pool",
                                     description=pool.__doc__.split(": ", 1)[1])
    parser.add_argument("records", type=Path, nargs="+", help="records written by --json")
    parser.add_argument("--json", type=Path, help="write the pooled record here (atomically)")
    args = parser.parse_args(argv)
    from bench import check_output, written_by
    from sharnn.io import atomic

    try:
        records = read_records(args.records)
        runs = pooled_runs(args.records, records)
    except PoolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    check_output(args.json, "--json", written_by("bench.sidebyside"), "record of python -m bench.sidebyside",
                 inputs=[(f"record {i + 1}", p) for i, p in enumerate(args.records)])
    settings = list(dict.fromkeys(st for r in records for st in r.get("settings") or []))
    summary = summarize(runs, settings)
    first = records[0]
    problems = check_runs(runs, Size(**first["shape"]), first["corpus"])
    sources = [{"path": str(p), "seeds": sorted({run["seed"] for run in r.get("runs") or []}),
                **{k: r.get(k) for k in ("date", "command", "machine", "sharnn")}}
               for p, r in zip(args.records, records)]
    record = {**{k: first.get(k) for k in ("benchmark", "size", *POOL_SAME)},
              "date": time.strftime("%Y-%m-%d"),
              "command": "python -m bench.sidebyside pool " + " ".join(argv), "pooled_from": sources,
              "settings": settings, "seeds": sorted({r["seed"] for r in runs}), "runs": runs,
              "summary": summary, "problems": problems}
    print(f"{len(runs)} runs from {len(records)} records; seeds {record['seeds']}")
    for line in table(summary):
        print(line)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if args.json:
        atomic.write_json(args.json, record)
        print(f"wrote {args.json}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["replay"]:
        return replay(argv[1:])
    if argv[:1] == ["pool"]:
        return pool(argv[1:])
    args = parse_args(argv)
    from train.distributed import native_cpu_matmul

    bf16_native = native_cpu_matmul("bf16")
    if not args.settings:
        args.settings = ["original", "fast", "torch"] + (["torch/bf16"] if bf16_native or args.force else [])
        if "torch/bf16" not in args.settings:
            print(f"torch/bf16 left out: {NO_BF16}; --setting torch/bf16 --force runs it", flush=True)
    elif not (bf16_native or args.force) and any(st.endswith("/bf16") for st in args.settings):
        print(f"error: {NO_BF16}: leave out the /bf16 settings, run on a CPU with avx512_bf16 or AMX, or "
              "pass --force", file=sys.stderr)
        return 2
    if "original" not in args.settings:
        args.settings.insert(0, "original")
    args.text = [p.expanduser().resolve() for p in (args.text or [default_text()])]
    args.original, args.lamb = args.original.expanduser().resolve(), args.lamb.expanduser().resolve()
    args.work = args.work.expanduser().resolve()
    if problem := check_args(args):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from bench import check_output, written_by
    from bench.original import git_commit, machine, sha256, sharnn_revision, write_standins
    from sharnn.io import atomic

    check_output(args.json, "--json", written_by("bench.sidebyside"), "record of python -m bench.sidebyside",
                 inputs=[("--work", args.work), ("original's checkout", args.original)])
    size = SIZES[args.size]
    if args.dropout is not None:
        size = dataclasses.replace(size, dropout=args.dropout)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / WORK_MARKER).touch()  # first: a --work whose corpus was cut off is still ours to finish
    corpus = write_corpus(args.work, size, args.text, args.pattern)
    write_standins(args.work / "standins", tensorboardx=True)
    ctx = Context(original=args.original, lamb=args.lamb, work=args.work, size=size, corpus=corpus,
                  threads=args.threads, log_interval=args.log_interval, timeout=args.timeout)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    record = {"benchmark": "bench.sidebyside", "date": time.strftime("%Y-%m-%d"),
              "command": "python -m bench.sidebyside " + " ".join(argv), "machine": machine(),
              "threads_per_run": args.threads, "jobs": args.jobs, "size": args.size, "shape": asdict(size),
              "memory": ORIGINAL_MEMORY, "corpus": corpus, "settings": args.settings, "seeds": seeds,
              "original": {"path": str(args.original), "commit": git_commit(args.original),
                           "main_py_sha256": sha256(args.original / "main.py"),
                           "model_py_sha256": sha256(args.original / "model.py"),
                           "lamb_commit": git_commit(args.lamb)},
              "sharnn": sharnn_revision(), "runs": [], "summary": None}
    print(f"size {args.size}: {size}; corpus train/valid/test {corpus['train']['n_bytes']:,} / "
          f"{corpus['valid']['n_bytes']:,} / {corpus['test']['n_bytes']:,} bytes; "
          f"seeds {seeds[0]}-{seeds[-1]}; "
          f"{args.jobs} run(s) at a time, {args.threads} thread(s) each", flush=True)

    def on_result(result: dict) -> None:
        record["runs"] = sorted([*record["runs"], result], key=lambda r: (r["seed"], r["setting"]))
        record["summary"] = summarize(record["runs"], args.settings)
        extra = ""
        if result["setting"] == "original":
            extra = f" (printed {result['printed_bpc']['valid']:.3f} / {result['printed_bpc']['test']:.3f})"
        print(f"{result['setting']:>16s} seed {result['seed']}: valid {result['val_bpc']:.4f} test "
              f"{result['test_bpc']:.4f}{extra}, {result['steps']} steps, {result['wall_s']:.0f} s",
              flush=True)
        if args.json:
            atomic.write_json(args.json, record)

    try:
        schedule(ctx, args.settings, seeds, args.jobs, on_result)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        for line in table(record["summary"] or {}):
            print(line)
    problems = check_runs(record["runs"], size, corpus)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if args.json:
        atomic.write_json(args.json, {**record, "problems": problems})
        print(f"wrote {args.json}")
    return 1 if problems else 0


def check_runs(runs: list[dict], size: Size, corpus: dict) -> list[str]:
    """What makes the comparison unsound: a sharnn run that took another number of steps than the
    original's epoch of the same seed, or an imported original that does not score what it printed."""
    problems = []
    originals = {r["seed"]: r for r in runs if r["setting"] == "original"}
    for r in runs:
        o = originals.get(r["seed"])
        if o is None:
            continue
        if r["steps"] != o["steps"]:
            problems.append(f"{r['setting']} seed {r['seed']} took {r['steps']} steps, the original's epoch "
                            f"{o['steps']}")
        if r is o:
            for split, key, streams in (("valid", "val_bpc", size.eval_streams),
                                        ("test", "test_bpc", size.test_streams)):
                L = corpus[split]["n_bytes"] // streams  # the original divides by L, sharnn by L - 1
                if abs(r["printed_bpc"][split] - r[key] * (L - 1) / L) > 6e-4:
                    problems.append(f"original seed {r['seed']}: its {split} bpc printed "
                                    f"{r['printed_bpc'][split]:.3f}, its imported model scores {r[key]:.5f}")
    return problems


if __name__ == "__main__":
    sys.exit(main())
