"""Does a CPU kernel setting train the same model as torch's ops? Final validation bpc over seeds, paired.

    python -m bench.quality               # small preset, 300 steps, 4 seeds, fast vs torch
    python -m bench.quality --preset tiny --steps 1000 --seeds 20 --json bench/out/quality.json \\
        -- --model.mem_len 1024 --model.dropouth 0.1 --model.dropouti 0.1 --model.dropout 0.1
    python -m bench.quality --impl fast --impl torch --impl fast-masks --impl fast-attention ...
    python -m bench.quality --preset tiny --precision fp32 --precision bf16 ...   # does bf16 cost quality?

Every run is the trainer itself (`python -m train`) in a fresh process, with SHARNN_CPU_KERNELS=<impl>
(sharnn.kernels.set_cpu_kernels) and OMP_NUM_THREADS=--threads, for exactly --steps optimizer steps: no state
resets (--state_reset_prob 0), no evaluation before the end, no checkpoints but the last, no test, no samples.
Flags after `--` go to the trainer (architecture, eval length, ...). Runs go seed by seed, every
implementation of a seed in turn, and the JSON is rewritten after each run, so an interrupted measurement
keeps its complete pairs. The same seed means the same initial weights and the same data order (the loader
draws from the seed, not from torch's generator), so per-seed differences are paired; the table gives each
implementation's mean, standard deviation and standard error over seeds, and the mean and standard error of
the paired differences against the reference implementation (torch's ops, when measured).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench import check_output, written_by
from bench.seeds import describe, fmt, paired
from sharnn.io import atomic

REPO = Path(__file__).resolve().parents[1]


def train_command(preset: str, data: Path, out: Path, steps: int, seed: int, extra: list[str]) -> list[str]:
    from train.config import preset as preset_config

    # the preset's warmup, shortened to the run when the run is shorter (the trainer refuses otherwise)
    warmup = ([] if "--warmup_steps" in extra
              else ["--warmup_steps", str(min(preset_config(preset).warmup_steps, steps))])
    return [sys.executable, "-m", "train", "--preset", preset, "--data", str(data), "--out", str(out),
            "--max_steps", str(steps), "--epochs", "1000", "--seed", str(seed), "--state_reset_prob", "0",
            "--eval_every", "0", "--save_every", "0", "--keep_last", "1", "--no_test_at_end",
            "--sample_bytes", "0", "--log_every", str(max(1, min(50, steps))), *warmup, *extra]


def variant_name(impl: str, precision: str, precisions: list[str]) -> str:
    """'fast' when only fp32 is measured (the kernel comparisons), else 'fast/bf16'."""
    return impl if precisions == ["fp32"] else f"{impl}/{precision}"


def run_one(variant: str, seed: int, args, extra: list[str]) -> dict:
    """One training run of `variant` (a kernel setting, or kernel/precision); its final validation bpc
    (summary.json) and the wall time."""
    impl, _, precision = variant.partition("/")
    out = Path(tempfile.mkdtemp(prefix=f"sharnn-quality-{impl}-{precision or 'fp32'}-{seed}-"))
    cmd = train_command(args.preset, args.data, out, args.steps, seed,
                        [*extra, *(["--precision", precision] if precision else [])])
    env = dict(os.environ, SHARNN_CPU_KERNELS=impl, OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    env.pop("ACCELERATE_USE_CPU", None)
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} (SHARNN_CPU_KERNELS={impl}) exited {proc.returncode}:\n"
                               f"{proc.stderr[-3000:]}")
        summary = json.loads((out / "summary.json").read_text())
        if summary["step"] != args.steps:
            raise RuntimeError(f"run stopped at step {summary['step']}, not {args.steps}: {summary}")
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
        train_bpc = [m["train/bpc"] for m in metrics if "train/bpc" in m]
        precision_run = yaml.safe_load((out / "config.yaml").read_text())["precision"]  # what the trainer ran
        return {"impl": variant, "precision": precision_run, "seed": seed, "val_bpc": summary["val_bpc"],
                "final_train_bpc": train_bpc[-1] if train_bpc else None, "wall_s": wall}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def summarize(runs: list[dict], impls: list[str], key: str = "val_bpc") -> dict:
    """Per implementation: mean, std, se and the per-seed values of `key`; paired differences against the
    reference (torch if measured, else the first implementation) over the seeds both completed."""
    by = {impl: {r["seed"]: r[key] for r in runs if r["impl"] == impl and r.get(key) is not None}
          for impl in impls}
    reference = "torch" if "torch" in impls else impls[0]
    per_impl = {impl: {**describe(list(v.values())), "values": v} for impl, v in by.items()}
    pairs = {impl: paired(by[impl], by[reference]) for impl in impls if impl != reference}
    return {"metric": key, "reference": reference, "impls": per_impl, "paired": pairs}


def print_table(summary: dict) -> None:
    print(f"\n{summary['metric']}\n{'impl':15s} {'n':>3s} {'mean bpc':>9s} {'std':>7s} {'se':>7s}  per seed")
    for impl, d in summary["impls"].items():
        seeds = " ".join(f"{s}:{v:.4f}" for s, v in sorted(d["values"].items()))
        print(f"{impl:15s} {d['n']:3d} {fmt(d['mean']):>9s} {fmt(d['std']):>7s} {fmt(d['se']):>7s}  {seeds}")
    ref = summary["reference"]
    for impl, d in summary["paired"].items():
        seeds = " ".join(f"{s}:{v:+.4f}" for s, v in sorted(d["values"].items()))
        t = "-" if d.get("t") is None else f"{d['t']:+.2f}"
        print(f"{impl + ' - ' + ref:22s} paired n={d['n']} mean {fmt(d['mean'])} std {fmt(d['std'])} "
              f"se {fmt(d['se'])} t {t}  {seeds}")


def write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, record)


# --------------------------------------------------------------------------------- direct mask statistics
def _corr_z(a, b) -> float:
    """sqrt(n) x the Pearson correlation of two equally long bool masks: N(0, 1) when they are independent."""

    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    r = (a * b).sum() / (a.norm() * b.norm())
    return float(r) * math.sqrt(a.numel())


def _rate_z(masks, p: float) -> tuple[float, float]:
    """The keep rate over masks, and its deviation from 1 - p in binomial standard deviations."""
    n = sum(m.numel() for m in masks)
    kept = sum(int(m.sum()) for m in masks)
    return kept / n, (kept / n - (1 - p)) / math.sqrt(p * (1 - p) / n)


def mask_checks(p: float = 0.1, seed: int = 1234) -> list[dict]:
    """Statistics of the dropout masks each setting draws: rate, and correlation (as z = sqrt(n) r, N(0, 1)
    when independent) between consecutive calls, the generator's 1M-element chunks, two ranks seeded as the
    trainer seeds them (accelerate's set_seed(seed, device_specific=True): torch.manual_seed(seed + rank)),
    the model's dropout layers in one step, one layer across steps, and the attention's two masks (weights and
    values, the values' aligned on the same memory content across steps)."""
    import torch

    import sharnn.kernels as kernels
    from sharnn import SHARNN, ModelConfig

    rows = []

    def row(setting, check, z=None, rate=None, n=None):
        rows.append({"setting": setting, "check": check, "z": z, "rate": rate, "n": n})

    def zrow(setting, check, zs):
        """Many correlations: their rms z (about 1 +- 1/sqrt(2k) for k independent pairs) and max |z|."""
        rms = math.sqrt(sum(z * z for z in zs) / len(zs))
        rows.append({"setting": setting, "check": f"{check} ({len(zs)} pairs)", "z": max(map(abs, zs)),
                     "rms_z": rms, "pairs": len(zs)})

    previous = kernels.get_cpu_kernels()
    try:
        for setting in ("fast", "torch"):
            kernels.set_cpu_kernels(setting)
            torch.manual_seed(seed)
            shape = (1 << 20,)
            calls = [kernels.keep_mask(shape, p) for _ in range(32)]
            rate, z = _rate_z(calls, p)
            row(setting, "keep_mask rate, 32 calls of 1M", z, rate, 32 << 20)
            zrow(setting, "consecutive calls", [_corr_z(a, b) for a, b in zip(calls, calls[1:])])
            row(setting, "adjacent elements within a call", _corr_z(calls[0][:-1], calls[0][1:]), n=1 << 20)
            big = kernels.keep_mask((8 << 20,), p).view(8, 1 << 20)  # 8 generator chunks
            zrow(setting, "chunk i vs i+1 of one 8M mask", [_corr_z(big[i], big[i + 1]) for i in range(7)])
            rate, z = _rate_z([big[:, :4096]], p)
            row(setting, "first 4096 elements of each chunk: rate", z, rate, 8 * 4096)
            ranks = []
            for rank in (0, 1):
                torch.manual_seed(seed + rank)
                ranks.append([kernels.keep_mask(shape, p) for _ in range(8)])
            zrow(setting, "rank 0 vs rank 1, same call", [_corr_z(a, b) for a, b in zip(*ranks)])
            zrow(setting, "rank 0 call k+1 vs rank 1 call k",
                 [_corr_z(a, b) for a, b in zip(ranks[0][1:], ranks[1])])

            # the model: masks of its dropout layers (output == 0), the measured tiny configuration
            cfg = ModelConfig(d_model=128, d_ff=512, n_layer=2, mem_len=1024,
                              dropout=p, dropouth=p, dropouti=p)
            torch.manual_seed(seed)
            model = SHARNN(cfg).train()
            seen: dict[str, list] = {}
            hooks = [m.register_forward_hook(
                lambda mod, inp, out, name=name: seen.setdefault(name, []).append(
                    (out != 0) if inp[0].ne(0).all() else None))
                for name, m in model.named_modules() if isinstance(m, kernels.Dropout)]
            attn, inside = [], []
            real_masked, real_attend = kernels.masked, kernels._attend

            def recording(x, p_, scale=1.0):
                out, keep = real_masked(x, p_, scale)
                if inside:
                    attn.append(keep)
                return out, keep

            def attend(*args):
                inside.append(1)
                try:
                    return real_attend(*args)
                finally:
                    inside.pop()

            kernels.masked, kernels._attend = recording, attend
            try:
                state, T, B = None, 64, 8
                for _ in range(40):  # the memory is full from step 16 on
                    x = torch.randint(0, 256, (T, B))
                    _, loss, state = model(x, state, targets=x)
                    loss.backward()
                    state = state.detach()
            finally:
                kernels.masked, kernels._attend = real_masked, real_attend
                for h in hooks:
                    h.remove()
            masks = [m for ms in seen.values() for m in ms if m is not None]
            rate, z = _rate_z(masks, p)
            row(setting, "model dropout layers: rate", z, rate, sum(m.numel() for m in masks))
            by_shape: dict = {}
            for name, ms in seen.items():
                by_shape.setdefault(tuple(ms[0].shape), []).append(name)
            zs = []
            for names in by_shape.values():
                for a, b in zip(names, names[1:]):
                    zs += [_corr_z(x, y) for x, y in zip(seen[a], seen[b]) if x is not None and y is not None]
            zrow(setting, "model: one layer vs another, same step", zs)
            zs = [_corr_z(a, b) for ms in seen.values() for a, b in zip(ms, ms[1:])
                  if a is not None and b is not None and a.shape == b.shape]
            zrow(setting, "model: one dropout module, call k vs k+1", zs)
            if setting == "fast":  # the attention's own masks (torch's SDPA keeps its own out of sight)
                weights, values = attn[0::2], attn[1::2]
                rate, z = _rate_z(weights + values, p)
                row(setting, "attention masks: rate", z, rate, sum(m.numel() for m in weights + values))
                zrow(setting, "attention values, same memory content, step k vs k+1",
                     [_corr_z(a[T:], b[:-T]) for a, b in zip(values, values[1:]) if a.shape == b.shape])
                zrow(setting, "attention weights mask vs values mask, same step",
                     [_corr_z(a.flatten()[:b.numel()], b.flatten()[:a.numel()])
                      for a, b in zip(weights, values)])
    finally:
        kernels.set_cpu_kernels(previous)
    return rows


def print_mask_checks(rows: list[dict]) -> None:
    """z: a rate's deviation in standard deviations, or the largest |z| of several correlations."""
    print(f"{'setting':8s} {'check':66s} {'keep rate':>9s} {'z|max|z|':>8s} {'rms z':>6s}")
    for r in rows:
        print(f"{r['setting']:8s} {r['check']:66s} {fmt(r.get('rate'), 5):>9s} {fmt(r['z'], 2):>8s} "
              f"{fmt(r.get('rms_z'), 2):>6s}")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, as lscpu shows it), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="trainer preset (default: small)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default: 300)")
    parser.add_argument("--seeds", type=int, default=4, help="number of seeds (default: 4)")
    parser.add_argument("--first_seed", type=int, default=1, help="seeds are first_seed, first_seed + 1, ...")
    parser.add_argument("--impl", action="append", choices=None,
                        help="CPU kernel setting (repeatable; sharnn.kernels.CPU_KERNELS); "
                             "default: fast, torch")
    parser.add_argument("--precision", action="append", choices=["fp32", "bf16", "fp16"],
                        help="trainer --precision (repeatable: each kernel setting runs in each precision, "
                             "paired against the first); default: fp32")
    parser.add_argument("--threads", type=int, default=1, help="threads per training process (default: 1)")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "demo",
                        help="prepared corpus (default: data/demo, made by "
                             "`sharnn-prepare demo --out data/demo`)")
    parser.add_argument("--json", type=Path, help="write runs and summary here (rewritten after every run)")
    parser.add_argument("--masks", action="store_true",
                        help="instead of training: direct statistics of the masks (seconds)")
    parser.add_argument("--report", type=Path, metavar="JSON",
                        help="instead of training: print the tables of a JSON this command wrote "
                             "(complete or not)")
    args = parser.parse_args(argv)
    check_output(args.json, "--json", written_by("bench.quality"), "record of python -m bench.quality",
                 inputs=[("corpus", args.data), ("report", args.report)])
    if args.report:
        record = json.loads(args.report.read_text())
        print(f"{record['command']}  ({record['date']}, {record['machine']})")
        for key in ("val_bpc", "final_train_bpc"):
            print_table(summarize(record["runs"], record["impls"], key))
        return 0
    if args.masks:
        import torch

        torch.set_num_threads(args.threads)
        rows = mask_checks()
        print_mask_checks(rows)
        if args.json:
            write_json(args.json, {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                                   "command": "python -m bench.quality " + " ".join(argv),
                                   "mask_checks": rows})
        return 0

    from sharnn.kernels import CPU_KERNELS

    kernel_settings = args.impl or (["fast", "torch"] if not args.precision else ["fast"])
    bad = [i for i in kernel_settings if i not in CPU_KERNELS]
    if bad:
        parser.error(f"unknown --impl {bad}; choose from {', '.join(CPU_KERNELS)}")
    precisions = args.precision or ["fp32"]
    impls = [variant_name(i, p, precisions) for i in kernel_settings for p in precisions]
    if not (args.data / "manifest.json").exists():
        parser.error(f"--data {args.data} is not a prepared corpus; make one with "
                     "`sharnn-prepare demo --out data/demo`")
    if args.steps < 1 or args.seeds < 1 or args.threads < 1:
        parser.error("--steps, --seeds and --threads must be >= 1")
    command = "python -m bench.quality " + " ".join(argv + (["--", *extra] if extra else []))
    record = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "command": command,
              "machine": f"{cpu_model()} x{os.cpu_count()} cores",
              "preset": args.preset, "steps": args.steps, "threads": args.threads, "data": str(args.data),
              "trainer_flags": extra, "impls": impls, "runs": []}
    print(f"{'seed':>4s} {'impl':15s} {'val bpc':>8s} {'train bpc':>9s} {'wall s':>7s}", flush=True)
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for impl in impls:
            run = run_one(impl, seed, args, extra)
            record["runs"].append(run)
            print(f"{seed:4d} {impl:15s} {fmt(run['val_bpc']):>8s} {fmt(run['final_train_bpc']):>9s} "
                  f"{run['wall_s']:7.1f}", flush=True)
            record["summary"] = summarize(record["runs"], impls)
            # secondary: the training loss of the last logging interval (mean over up to 50 steps, dropout on)
            record["summary_train"] = summarize(record["runs"], impls, "final_train_bpc")
            if args.json:
                write_json(args.json, record)
    print_table(record["summary"])
    print_table(record["summary_train"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
