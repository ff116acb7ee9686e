"""What do recipe changes do to the bpc a user gets? Variants (trainer flags, optionally another git revision)
trained over seeds, paired by seed.

    python -m bench.recipe --data data/stdlib650k --seeds 5 --json bench/out/recipe.json
    python -m bench.recipe --data DIR --variant 'before@ad49ba3' --variant 'after@HEAD' \\
        --variant 'after+unigram@HEAD:--output_bias_init unigram' --pair after+unigram:after -- --max_steps 50

A variant is NAME[@REV][:FLAGS]: REV a git revision (run from a detached worktree
/tmp/sharnn-rev-<sha>, made if missing and removed at exit if this script made it), absent for this
checkout's working tree; FLAGS extra trainer flags (shell-split) after the common ones. Every run is
`python -m train` in a fresh process, with cwd and PYTHONPATH set to that tree (so the code of that revision
runs: the run's git sha, read from the trainer's log line, and its config.yaml are recorded) and
OMP_NUM_THREADS=--threads, one run at a time. The common trainer flags are COMMON below (the measured tiny
configuration: 2 epochs, validation on the whole split at epoch ends only), then the flags after `--`, then
the variant's. Runs go seed by seed, every variant of a seed in turn; the JSON is rewritten after each run, so
an interrupted measurement keeps its complete pairs.

Per variant: mean, standard deviation and standard error over seeds of the final validation bpc
(summary.json val_bpc), the best validation bpc (best_val_bpc) and the test bpc of the checkpoint the trainer
picked (test_bpc), and the per-seed values; per --pair A:B the paired per-seed differences A - B (the same
seed is the same initial weights and data order), with mean, standard deviation, standard error and t; and
the training bpc early in training (metrics.jsonl train/bpc, the mean over the log_every steps ending at each
of --early_steps) with the same statistics.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import check_output, written_by
from bench.seeds import describe, fmt, paired
from sharnn.io import atomic

REPO = Path(__file__).resolve().parents[1]

# the measured configuration: tiny (d_model 128, 2 blocks, memory 512) with the paper's dropouts raised,
# 16 streams of 64 bytes, 2 epochs (the step limit out of the way), validation on the whole split at epoch
# ends only (as the reference), no samples, a checkpoint every 300 steps. Every flag exists at ad49ba3 and
# after.
COMMON = ["--preset", "tiny", "--model.dropout", "0.1", "--model.dropouth", "0.1", "--model.dropouti", "0.1",
          "--batch_size", "16", "--bptt", "64", "--epochs", "2", "--max_steps", "100000", "--eval_every", "0",
          "--eval_max_segments", "100000", "--sample_bytes", "0", "--save_every", "300", "--log_every", "10"]

DEFAULT_VARIANTS = ["before@ad49ba3", "after@HEAD", "after+unigram@HEAD:--output_bias_init unigram",
                    "after+resets@HEAD:--state_reset_prob 0.025"]
DEFAULT_PAIRS = ["after:before", "after+unigram:after", "after+resets:after", "after+resets:before"]
METRICS = ("best_val_bpc", "test_bpc", "val_bpc")


@dataclass
class Variant:
    name: str
    rev: str | None = None
    flags: list[str] = field(default_factory=list)
    sha: str | None = None  # the resolved revision
    tree: Path = REPO  # where it runs

    @classmethod
    def parse(cls, spec: str) -> "Variant":
        head, _, flags = spec.partition(":")
        name, _, rev = head.partition("@")
        if not name:
            raise ValueError(f"variant {spec!r}: empty name")
        return cls(name=name.strip(), rev=rev.strip() or None, flags=shlex.split(flags))

    def spec(self) -> str:
        rev = f"@{self.rev}" if self.rev else ""
        return self.name + rev + (":" + shlex.join(self.flags) if self.flags else "")


class Worktrees:
    """Detached worktrees /tmp/sharnn-rev-<sha>, one per revision; the ones made here are removed at close."""

    def __init__(self) -> None:
        self.made: list[Path] = []
        atexit.register(self.close)

    def get(self, rev: str) -> tuple[str, Path]:
        sha = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.strip()
        path = Path(tempfile.gettempdir()) / f"sharnn-rev-{sha[:12]}"
        if path.exists():
            here = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True,
                                  text=True).stdout.strip()
            if here != sha:
                raise RuntimeError(f"{path} exists but is not a checkout of {sha} (HEAD {here or 'unknown'})")
        else:
            subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=REPO, check=True,
                           capture_output=True, text=True)
            self.made.append(path)
        return sha, path

    def close(self) -> None:
        while self.made:
            path = self.made.pop()
            subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, capture_output=True)
            shutil.rmtree(path, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=REPO, capture_output=True)


def train_command(variant: Variant, data: Path, out: Path, seed: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "train", *COMMON, "--data", str(data.resolve()), "--out", str(out),
            "--seed", str(seed), *extra, *variant.flags]


def read_config(path: Path) -> dict:
    """The flat top-level `key: value` lines of a run's config.yaml (enough to check what ran)."""
    cfg = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z_]\w*):\s*(\S.*)?$", line)
        if m and m.group(2) is not None:
            cfg[m.group(1)] = m.group(2).strip()
    return cfg


def early_train_bpc(metrics: list[dict], steps: list[int]) -> dict:
    by_step = {m["step"]: m["train/bpc"] for m in metrics if "train/bpc" in m and "step" in m}
    return {str(s): by_step.get(s) for s in steps}


def run_one(variant: Variant, seed: int, args, extra: list[str], root: Path) -> dict:
    out = root / f"{variant.name}-seed{seed}".replace("/", "_")
    shutil.rmtree(out, ignore_errors=True)
    cmd = train_command(variant, args.data, out, seed, extra)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=str(variant.tree), TOKENIZERS_PARALLELISM="false")
    env.pop("ACCELERATE_USE_CPU", None)
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=variant.tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    log = proc.stdout + proc.stderr
    (out.mkdir(parents=True, exist_ok=True), (out / "trainer.log").write_text(log))
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} (cwd {variant.tree}) exited {proc.returncode}:\n{log[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    cfg = read_config(out / "config.yaml")
    m = re.search(r"sharnn \S+ \(([^)]*)\), torch", log)
    ran_sha = m.group(1) if m else None
    if variant.sha and (ran_sha is None or not variant.sha.startswith(ran_sha)):
        raise RuntimeError(f"variant {variant.name}: expected code of {variant.sha}, the trainer says "
                           f"{ran_sha!r}")
    vals = [{"step": r["step"], "bpc": r["val/bpc"]} for r in metrics if "val/bpc" in r]
    return {"variant": variant.name, "seed": seed, "wall_s": wall, "git_sha": ran_sha,
            "state_reset_prob": float(cfg["state_reset_prob"]) if "state_reset_prob" in cfg else None,
            "output_bias_init": cfg.get("output_bias_init"),  # absent before the option existed
            "step": summary.get("step"), "best_step": summary.get("best_step"),
            **{k: summary.get(k) for k in METRICS},
            "val_curve": vals, "early_train_bpc": early_train_bpc(metrics, args.early_steps)}


def summarize(runs: list[dict], names: list[str], pairs: list[tuple[str, str]], get) -> dict:
    """get(run) -> value or None. Per variant: describe + per-seed values; per pair (a, b): a - b by seed."""
    by = {n: {r["seed"]: get(r) for r in runs if r["variant"] == n and get(r) is not None} for n in names}
    return {"variants": {n: {**describe(list(v.values())), "values": v} for n, v in by.items()},
            "paired": {f"{a} - {b}": paired(by.get(a, {}), by.get(b, {})) for a, b in pairs}}


def print_table(title: str, s: dict) -> None:
    print(f"\n{title}\n{'variant':16s} {'n':>2s} {'mean':>7s} {'std':>7s} {'se':>7s}  per seed")
    for name, d in s["variants"].items():
        seeds = " ".join(f"{k}:{v:.4f}" for k, v in sorted(d["values"].items()))
        print(f"{name:16s} {d['n']:2d} {fmt(d['mean']):>7s} {fmt(d['std']):>7s} {fmt(d['se']):>7s}  {seeds}")
    for name, d in s["paired"].items():
        seeds = " ".join(f"{k}:{v:+.4f}" for k, v in sorted(d["values"].items()))
        print(f"  {name:28s} n={d['n']} mean {fmt(d['mean'], sign=True)} std {fmt(d['std'])} "
              f"se {fmt(d['se'])} t {fmt(d['t'], 2, sign=True)}  {seeds}")


def write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, record)


def build_summaries(record: dict, names: list[str], pairs: list[tuple[str, str]]) -> None:
    runs = record["runs"]
    record["summary"] = {k: summarize(runs, names, pairs, lambda r, k=k: r.get(k)) for k in METRICS}
    record["summary_early_train_bpc"] = {
        str(s): summarize(runs, names, pairs, lambda r, s=str(s): r["early_train_bpc"].get(s))
        for s in record["early_steps"]}
    record["wall_s"] = {n: describe([r["wall_s"] for r in runs if r["variant"] == n]) for n in names}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(prog="python -m bench.recipe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="prepared corpus (sharnn-prepare)")
    parser.add_argument("--variant", action="append",
                        help="NAME[@REV][:FLAGS] (repeatable); default: " + " | ".join(DEFAULT_VARIANTS))
    parser.add_argument("--pair", action="append",
                        help="A:B, report the per-seed differences A - B (repeatable); default: "
                             + ", ".join(DEFAULT_PAIRS) + " (those whose variants are measured)")
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (default: 5)")
    parser.add_argument("--first_seed", type=int, default=1, help="seeds are first_seed, first_seed + 1, ...")
    parser.add_argument("--threads", type=int, default=1, help="threads per training process (default: 1)")
    parser.add_argument("--early_steps", type=int, nargs="+", default=[10, 50, 100, 200, 500],
                        help="steps at which train/bpc is read from metrics.jsonl (multiples of log_every)")
    parser.add_argument("--json", type=Path, help="write runs and summaries here (rewritten after every run)")
    parser.add_argument("--keep", action="store_true", help="keep the run directories (printed)")
    args = parser.parse_args(argv)
    check_output(args.json, "--json", written_by("bench.recipe"), "record of python -m bench.recipe",
                 inputs=[("corpus", args.data)])
    if not (args.data / "manifest.json").exists():
        parser.error(f"--data {args.data} is not a prepared corpus (sharnn-prepare)")
    if args.seeds < 1 or args.threads < 1:
        parser.error("--seeds and --threads must be >= 1")
    try:
        variants = [Variant.parse(s) for s in (args.variant or DEFAULT_VARIANTS)]
    except ValueError as e:
        parser.error(str(e))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        parser.error(f"variant names must differ: {names}")
    pairs = []
    for p in args.pair or DEFAULT_PAIRS:
        a, sep, b = p.partition(":")
        if not sep:
            parser.error(f"--pair {p!r}: expected A:B")
        if a in names and b in names:
            pairs.append((a, b))
        elif args.pair:
            parser.error(f"--pair {p!r}: unknown variant (have {names})")

    worktrees = Worktrees()
    root = Path(tempfile.mkdtemp(prefix="sharnn-recipe-"))
    try:
        for v in variants:
            if v.rev:
                v.sha, v.tree = worktrees.get(v.rev)
        command = "python -m bench.recipe " + shlex.join(argv + (["--", *extra] if extra else []))
        record = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "command": command,
                  "machine": f"{platform.processor() or platform.machine()} x{os.cpu_count()} cores",
                  "threads": args.threads, "data": str(args.data), "common_flags": COMMON + extra,
                  "variants": [{"name": v.name, "rev": v.rev, "sha": v.sha, "tree": str(v.tree),
                                "flags": v.flags} for v in variants],
                  "pairs": [f"{a} - {b}" for a, b in pairs], "early_steps": args.early_steps, "runs": []}
        for v in variants:
            print(f"variant {v.name}: {v.sha or 'working tree'} in {v.tree}, "
                  f"flags {shlex.join(v.flags) or '-'}")
        print(f"common trainer flags: {shlex.join(COMMON + extra)}\n")
        print(f"{'seed':>4s} {'variant':16s} {'sha':>9s} {'resets':>6s} {'steps':>5s} {'best@':>5s} "
              f"{'val':>7s} {'best val':>8s} {'test':>7s} {'wall s':>7s}", flush=True)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for v in variants:
                r = run_one(v, seed, args, extra, root)
                record["runs"].append(r)
                print(f"{seed:4d} {v.name:16s} {r['git_sha'] or '-':>9s} {fmt(r['state_reset_prob'], 3):>6s} "
                      f"{r['step']!s:>5s} {r['best_step']!s:>5s} {fmt(r['val_bpc']):>7s} "
                      f"{fmt(r['best_val_bpc']):>8s} {fmt(r['test_bpc']):>7s} {r['wall_s']:7.1f}", flush=True)
                build_summaries(record, names, pairs)
                if args.json:
                    write_json(args.json, record)
        for k in METRICS:
            print_table(k, record["summary"][k])
        for s, summ in record["summary_early_train_bpc"].items():
            print_table(f"train/bpc at step {s} (mean over the log interval ending there)", summ)
        walls = ", ".join(f"{n} {fmt(d['mean'], 1)}" for n, d in record["wall_s"].items())
        print("\nwall s per run: " + walls)
    finally:
        if args.keep:
            print(f"runs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
        worktrees.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
