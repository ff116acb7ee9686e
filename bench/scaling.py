"""How does the bpc per byte seen hold up as the global batch grows? A data-parallel scaling study on CPU.

    python -m bench.scaling --data data/demo --json docs/scaling/scaling.json --plots docs/scaling
    python -m bench.scaling --report docs/scaling/scaling.json --plots docs/scaling   # tables and plots again

W ranks of B streams each train exactly what one process of W*B streams trains
(tests/integration/test_launch.py proves the equivalence), so the study runs one process per configuration
with `--batch_size` = the global batch.
Every configuration sees the same number of training bytes (`--bytes`), so a larger batch takes
proportionally fewer optimizer steps; validation runs at the same byte counts in every configuration
(`--points` evenly spaced points). The learning rate is `--lr` at the reference global batch 16 (the paper's
one-GPU batch) and follows the trainer's own `--lr_scaling` rule (none, sqrt, linear) above it. Warmup is
`--warmup` optimizer steps ("steps": what a user who changes nothing gets) or the same number of bytes
("bytes": warmup steps x 16 / batch), the second tried for every rule (`--warmups`).

Each run is `python -m train` in a fresh process (OMP_NUM_THREADS=--threads); the JSON is rewritten after
every run and a rerun with the same --json skips runs already recorded, so an interrupted study resumes.
Reported: validation bpc against bytes seen and against optimizer steps (mean and spread over seeds), the
final bpc per configuration, and for each configuration the fewest optimizer steps (and bytes) at which its
mean curve reaches the target bpc: the batch-16 run's final mean bpc (linear interpolation between
validation points; "-" where the budget ends first). Plots (matplotlib, PNG): bpc vs bytes seen and bpc vs
steps, one line per global batch, for the rule and warmup with the lowest mean final bpc at the largest
batch, and one panel per rule.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import check_output, is_png, written_by
from bench.seeds import describe, fmt
from sharnn.io import atomic

REPO = Path(__file__).resolve().parents[1]
REFERENCE_BATCH = 16  # the paper's global batch: 16 streams on one GPU
BPTT = 64

# the measured configuration: the tiny model (d_model 128, 2 blocks, memory 512) with the paper's dropouts at
# 0.1, segments of 64 bytes (varied as the reference does), LAMB, validation on 16 streams x 32 segments
# (the same 32 KiB at every point, so points and runs compare), no samples, no checkpoints, no test.
COMMON = ["--preset", "tiny", "--model.dropout", "0.1", "--model.dropouth", "0.1", "--model.dropouti", "0.1",
          "--bptt", str(BPTT), "--epochs", "1000", "--eval_streams", "16", "--eval_max_segments", "32",
          "--sample_bytes", "0", "--save_every", "0", "--keep_last", "1", "--no_test_at_end",
          "--lr_reference_batch", str(REFERENCE_BATCH)]


def config_name(batch: int, rule: str, warmup: str) -> str:
    return f"b{batch}-{rule}-w{warmup}"


def plan(batches: list[int], rules: list[str], warmups: list[str]) -> list[dict]:
    """The configurations: at the reference batch every rule and warmup trains the same, so it runs once."""
    configs = []
    if REFERENCE_BATCH in batches:
        configs.append({"batch": REFERENCE_BATCH, "rule": "none", "warmup": "steps"})
    # every batch of one (warmup, rule) before the next: an interrupted study has whole curves
    for warmup, rule, b in itertools.product(warmups, rules, batches):
        if b != REFERENCE_BATCH:
            configs.append({"batch": b, "rule": rule, "warmup": warmup})
    for c in configs:
        c["name"] = config_name(c["batch"], c["rule"], c["warmup"])
    return configs


def schedule(batch: int, budget_bytes: int, points: int, warmup_steps: int, warmup: str) -> dict:
    """Optimizer steps, validation interval and warmup steps of one configuration (bytes: B x bptt a step)."""
    per_step = batch * BPTT
    if budget_bytes % (points * per_step):
        raise ValueError(f"--bytes {budget_bytes} is not a multiple of points x batch x bptt = "
                         f"{points} x {batch} x {BPTT}: choose --bytes so that every batch validates at the "
                         "same byte counts")
    steps = budget_bytes // per_step
    warm = warmup_steps if warmup == "steps" else max(1, warmup_steps * REFERENCE_BATCH // batch)
    return {"max_steps": steps, "eval_every": steps // points, "warmup_steps": min(warm, steps)}


def run_one(cfg: dict, seed: int, args, root: Path) -> dict:
    sched = schedule(cfg["batch"], args.bytes, args.points, args.warmup, cfg["warmup"])
    out = root / f"{cfg['name']}-seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "train", *COMMON, "--data", str(args.data.resolve()), "--out", str(out),
           "--seed", str(seed), "--batch_size", str(cfg["batch"]), "--lr", str(args.lr),
           "--lr_scaling", cfg["rule"], "--max_steps", str(sched["max_steps"]),
           "--eval_every", str(sched["eval_every"]), "--warmup_steps", str(sched["warmup_steps"]),
           "--log_every", str(max(1, sched["eval_every"] // 4))]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        log = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}:\n{log}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = {}
    for m in metrics:
        if "val/bpc" in m:
            curve[m["step"]] = m["val/bpc"]
    shutil.rmtree(out, ignore_errors=True)
    return {"config": cfg["name"], "seed": seed, "wall_s": round(wall, 1), **sched,
            "peak_lr": args.lr * {"none": 1.0, "sqrt": (cfg["batch"] / REFERENCE_BATCH) ** 0.5,
                                  "linear": cfg["batch"] / REFERENCE_BATCH}[cfg["rule"]],
            "curve": [{"step": s, "bytes": s * cfg["batch"] * BPTT, "bpc": v}
                      for s, v in sorted(curve.items())]}


# ------------------------------------------------------------------------------------------------ analysis
def mean_curve(runs: list[dict]) -> list[dict]:
    """Per validation point (same bytes in every run of a config): mean, std, n of bpc over seeds."""
    by_step: dict[int, list[float]] = {}
    bytes_at = {}
    for r in runs:
        for p in r["curve"]:
            if p["bpc"] is not None:
                by_step.setdefault(p["step"], []).append(p["bpc"])
                bytes_at[p["step"]] = p["bytes"]
    return [{"step": s, "bytes": bytes_at[s], **describe(v)} for s, v in sorted(by_step.items())]


def first_reach(curve: list[dict], target: float) -> dict | None:
    """The (interpolated) step and bytes at which a mean curve first falls to target; None if never."""
    prev = None
    for p in curve:
        if p["mean"] <= target:
            if prev is None or prev["mean"] == p["mean"]:
                return {"step": p["step"], "bytes": p["bytes"]}
            f = (prev["mean"] - target) / (prev["mean"] - p["mean"])
            return {"step": prev["step"] + f * (p["step"] - prev["step"]),
                    "bytes": prev["bytes"] + f * (p["bytes"] - prev["bytes"])}
        prev = p
    return None


def analyse(record: dict) -> dict:
    configs = record["configs"]
    curves = {c["name"]: mean_curve([r for r in record["runs"] if r["config"] == c["name"]]) for c in configs}
    finals = {}
    for c in configs:
        vals = [r["curve"][-1]["bpc"] for r in record["runs"] if r["config"] == c["name"] and r["curve"]]
        finals[c["name"]] = describe(vals)
    ref = config_name(REFERENCE_BATCH, "none", "steps")
    target = finals.get(ref, {}).get("mean")
    reach = {n: (first_reach(curves[n], target) if target is not None else None) for n in curves}
    # the best rule/warmup: lowest mean final bpc at the largest batch measured
    largest = max(c["batch"] for c in configs)
    at_largest = [c for c in configs if c["batch"] == largest and finals[c["name"]]["n"]]
    best = min(at_largest, key=lambda c: finals[c["name"]]["mean"]) if at_largest else None
    return {"curves": curves, "final": finals, "target_bpc": target, "reach": reach,
            "best_rule": best and {"rule": best["rule"], "warmup": best["warmup"]}}


def print_tables(record: dict, analysis: dict) -> None:
    print(f"\nfinal validation bpc after {record['bytes']:,} training bytes (mean, std over seeds); "
          f"target = batch-{REFERENCE_BATCH} mean {fmt(analysis['target_bpc'])}")
    print(f"{'config':22s} {'batch':>5s} {'rule':>6s} {'warmup':>6s} {'peak lr':>8s} {'steps':>6s} {'n':>2s} "
          f"{'mean':>7s} {'std':>7s} {'steps to target':>15s} {'bytes to target':>15s}")
    for c in record["configs"]:
        f = analysis["final"][c["name"]]
        runs = [r for r in record["runs"] if r["config"] == c["name"]]
        reach = analysis["reach"].get(c["name"])
        steps = runs[0]["max_steps"] if runs else "-"
        lr = f"{runs[0]['peak_lr']:.2e}" if runs else "-"
        print(f"{c['name']:22s} {c['batch']:5d} {c['rule']:>6s} {c['warmup']:>6s} {lr:>8s} {steps!s:>6s} "
              f"{f['n']:2d} {fmt(f['mean']):>7s} {fmt(f['std']):>7s} "
              f"{(format(reach['step'], '.0f') if reach else '-'):>15s} "
              f"{(format(reach['bytes'], ',.0f') if reach else '-'):>15s}")
    if analysis["best_rule"]:
        print(f"\nbest at the largest batch: --lr_scaling {analysis['best_rule']['rule']}, "
              f"warmup in {analysis['best_rule']['warmup']}")


PLOT_NAMES = ("bpc_vs_bytes.png", "bpc_vs_steps.png", "bpc_vs_bytes_all_rules.png")
"""What --plots writes into its directory (each replaces only a PNG of the same name)."""


def save_png(fig, path: Path) -> None:
    """The figure as a PNG at `path`, atomically (a plot half-written never replaces an earlier one)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic.write_bytes(path, buffer.getvalue())


def plot(record: dict, analysis: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    configs = record["configs"]
    rules = sorted({c["rule"] for c in configs if c["batch"] != REFERENCE_BATCH})
    best = analysis["best_rule"]
    ref = config_name(REFERENCE_BATCH, "none", "steps")

    def lines(ax, rule: str, warmup: str, x: str) -> None:
        for c in sorted(configs, key=lambda c: c["batch"]):
            if c["name"] != ref and (c["rule"] != rule or c["warmup"] != warmup):
                continue
            curve = analysis["curves"][c["name"]]
            if not curve:
                continue
            xs = [p[x] for p in curve]
            ms = [p["mean"] for p in curve]
            sd = [p["std"] or 0.0 for p in curve]
            ax.plot(xs, ms, marker=".", label=f"global batch {c['batch']}")
            ax.fill_between(xs, [m - s for m, s in zip(ms, sd)], [m + s for m, s in zip(ms, sd)], alpha=0.2)
        if analysis["target_bpc"] is not None:
            ax.axhline(analysis["target_bpc"], color="grey", lw=0.8, ls="--")
        ax.set_xscale("log" if x == "step" else "linear")
        ax.set_xlabel("training bytes seen" if x == "bytes" else "optimizer steps (log)")
        ax.set_ylabel("validation bpc")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    if best:
        for x, name in (("bytes", PLOT_NAMES[0]), ("step", PLOT_NAMES[1])):
            fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
            lines(ax, best["rule"], best["warmup"], x)
            ax.set_title(f"--lr_scaling {best['rule']}, warmup in {best['warmup']} (mean ± std over seeds)",
                         fontsize=9)
            fig.tight_layout()
            written.append(out_dir / name)
            save_png(fig, written[-1])
            plt.close(fig)
    warmups = sorted({c["warmup"] for c in configs})
    fig, axes = plt.subplots(len(warmups), len(rules), figsize=(4.2 * len(rules), 3.4 * len(warmups)),
                             dpi=100, squeeze=False, sharey=True)
    for (i, warmup), (j, rule) in itertools.product(enumerate(warmups), enumerate(rules)):
        lines(axes[i][j], rule, warmup, "bytes")
        axes[i][j].set_title(f"--lr_scaling {rule}, warmup in {warmup}", fontsize=9)
    fig.tight_layout()
    written.append(out_dir / PLOT_NAMES[2])
    save_png(fig, written[-1])
    plt.close(fig)
    return written


def merge(records: list[dict]) -> dict:
    """One study from several JSONs of the same settings (e.g. seeds run in parallel); a run once."""
    settings = ("bytes", "points", "lr", "warmup", "bptt")
    first = records[0]
    for r in records[1:]:
        if any(r.get(k) != first.get(k) for k in settings):
            raise SystemExit(f"error: --report: the JSONs are of different studies (compare {settings})")
    names = [c["name"] for c in first["configs"]]
    configs = list(first["configs"])
    seen, runs = set(), []
    for rec in records:
        configs += [c for c in rec["configs"] if c["name"] not in names and not names.append(c["name"])]
        for run in rec["runs"]:
            if (run["config"], run["seed"]) not in seen:
                seen.add((run["config"], run["seed"]))
                runs.append(run)
    return first | {"configs": configs, "runs": runs,
                    "parts": [part for r in records  # a merged study keeps the parts it came from
                              for part in r.get("parts", [{"date": r["date"], "command": r["command"]}])]}


def parse_sizes(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="prepared corpus (sharnn-prepare); not with --report")
    parser.add_argument("--batches", type=parse_sizes, default=[16, 32, 64, 128],
                        help="global batches, comma-separated (default: 16,32,64,128)")
    parser.add_argument("--rules", default="none,sqrt,linear", help="lr scaling rules (default: all three)")
    parser.add_argument("--warmups", default="steps,bytes",
                        help="warmup fixed in optimizer steps and/or in bytes (default: steps,bytes)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first_seed", type=int, default=1)
    parser.add_argument("--bytes", type=int, default=2**20, help="training bytes per run (default: 1 MiB)")
    parser.add_argument("--points", type=int, default=8, help="validation points per run (default: 8)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak lr at global batch 16 (default: 2e-3)")
    parser.add_argument("--warmup", type=int, default=100, help="warmup steps at batch 16 (default: 100)")
    parser.add_argument("--threads", type=int, default=1, help="threads per training process (default: 1)")
    parser.add_argument("--json", type=Path, help="write runs and analysis here (rewritten after every run; "
                                                  "with --report: the merged study)")
    parser.add_argument("--plots", type=Path, help="write the PNG plots into this directory")
    parser.add_argument("--report", type=Path, nargs="+",
                        help="only print the tables (and --plots) of these JSONs (runs of the same study, "
                             "e.g. seeds run in parallel, are merged)")
    args = parser.parse_args(argv)
    inputs = [("corpus", args.data), *(("study (--report)", path) for path in args.report or [])]
    check_output(args.json, "--json", written_by("bench.scaling"), "record of python -m bench.scaling",
                 inputs=inputs)
    for name in PLOT_NAMES if args.plots else ():
        check_output(args.plots / name, "--plots", is_png, "plot (PNG)", inputs=inputs)

    if args.report:
        records = []
        for path in args.report:
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError) as e:
                parser.error(f"--report {path}: cannot read the study's JSON: {e}")
        record = merge(records)
        analysis = analyse(record)
        print_tables(record, analysis)
        for p in plot(record, analysis, args.plots) if args.plots else []:
            print(f"wrote {p}")
        if args.json:  # the merged study, e.g. the one JSON the committed plots come from
            atomic.write_json(args.json, record | {"analysis": analysis})
            print(f"wrote {args.json}")
        return 0

    if args.data is None or not (args.data / "manifest.json").exists():
        parser.error(f"--data {args.data} is not a prepared corpus (sharnn-prepare)")
    rules = [r for r in args.rules.split(",") if r]
    warmups = [w for w in args.warmups.split(",") if w]
    if not rules or not warmups or set(rules) - {"none", "sqrt", "linear"} or set(warmups) - {"steps",
                                                                                               "bytes"}:
        parser.error("--rules takes none,sqrt,linear; --warmups takes steps,bytes")
    if args.seeds < 1 or args.points < 1 or args.threads < 1 or not args.batches:
        parser.error("--seeds, --points, --threads must be >= 1 and --batches non-empty")
    configs = plan(args.batches, rules, warmups)
    try:
        for c in configs:
            schedule(c["batch"], args.bytes, args.points, args.warmup, c["warmup"])
    except ValueError as e:
        parser.error(str(e))

    record = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "command": "python -m bench.scaling " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{platform.processor() or platform.machine()} x{os.cpu_count()} cores",
              "threads": args.threads, "data": str(args.data), "bytes": args.bytes, "points": args.points,
              "lr": args.lr, "warmup": args.warmup, "bptt": BPTT, "common_flags": COMMON,
              "configs": configs, "runs": []}
    if args.json and args.json.exists():  # resume an interrupted study with the same settings
        old = json.loads(args.json.read_text())
        same = all(old.get(k) == record[k] for k in ("bytes", "points", "lr", "warmup", "data"))
        if same:
            record["runs"] = [r for r in old["runs"] if r["config"] in {c["name"] for c in configs}]
            print(f"resuming: {len(record['runs'])} runs already in {args.json}")
    root = Path(tempfile.mkdtemp(prefix="sharnn-scaling-"))
    print(f"{'seed':>4s} {'config':22s} {'steps':>6s} {'final bpc':>9s} {'wall s':>7s}", flush=True)
    try:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for c in configs:
                if any(r["config"] == c["name"] and r["seed"] == seed for r in record["runs"]):
                    continue
                r = run_one(c, seed, args, root)
                record["runs"].append(r)
                print(f"{seed:4d} {c['name']:22s} {r['max_steps']:6d} {fmt(r['curve'][-1]['bpc']):>9s} "
                      f"{r['wall_s']:7.1f}", flush=True)
                if args.json:
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    atomic.write_json(args.json, record | {"analysis": analyse(record)})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    analysis = analyse(record)
    print_tables(record, analysis)
    for p in plot(record, analysis, args.plots) if args.plots else []:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
