"""Time the author's original code (Smerity/sha-rnn) against sharnn's training step on the same machine.

    python -m bench.original --original PATH/TO/sha-rnn --lamb PATH/TO/pytorch-lamb \\
        [--rounds 2] [--batches 100] --json bench/out/original.json

The issue asks for sharnn's `small` step at >= 3x the original code's speed on the same machine. This runs
both, each in a fresh process, alternating over --rounds rounds (round 1 the original first, round 2 sharnn
first, ...: drift of a shared machine falls on both), with the same OMP/MKL thread count (--threads, default
torch's: the physical cores). No code of the original is copied into this repository: it runs from the
checkouts given, Smerity/sha-rnn at commit 218d748 and Smerity/pytorch-lamb (704f733), the way the fixtures
in tests/fixtures/original_trained were made (its README):

- `main.py` unmodified, from a temporary work directory (its corpus cache and --save file land there), on the
  CPU: `--cuda` is passed (it is store_false: passing it turns CUDA off); CUDA_VISIBLE_DEVICES is empty for
  both programs. apex is replaced by a stand-in package written into the work directory: `FusedLayerNorm` a
  plain nn.Module with a weight (1) and a bias (0) as apex's has (the original's init leaves both alone),
  computing F.layer_norm with the eps it is given (the model passes 1e-12); `amp.initialize` returns (model,
  optimizer), `amp.scale_loss` yields the loss: fp32 throughout (amp's O1 fp16 is CUDA-only). When
  tensorboardX is not installed, pytorch_lamb (which imports it for a type annotation only) gets a stand-in
  module too.
- The data: uniform random bytes (sharnn's bench step also trains on random bytes), all 256 values present, so
  the original's vocabulary is 256 as sharnn's (byte 10 becomes its <eos>), in its format
  (data/enwik8/prep_enwik8.py): each byte a decimal token, single spaces between, a real newline where the
  byte is 10. Just enough training bytes for --batches + 10 batches; the process is killed once its log shows
  batch --batches, before the validation at its epoch's end.
- Flags: sharnn's preset of the scenario (small: d_model 256 -> --emsize, d_ff 1024 -> --nhid, 4 layers,
  batch 16, bptt 128, dropout/dropouth/dropouti 0.1, LAMB lr 2e-3, warmup 100, weight decay 1.2e-6, clip
  0.25, seed 5512); --emsize ... --batch-size shrink it (tests).
- The same model, checked in the original's model.py: an LSTM (hidden = emsize) in every block, the one
  attention head in block nlayers - 2, keys = memory + segment cut to 5000 (its num_max_positions, fixed; as
  sharnn's mem_len), Boom emsize -> nhid summed over nhid // emsize chunks, tied output layer with a bias,
  LAMB min_trust 0.25 (fixed in its main.py). It also holds parameters it never uses (lnout, qkvs, r_gate;
  lnmem and lnmid in blocks without attention): no gradient, so LAMB skips them. Its attention multiplies
  the gates into the 5000-long keys and values, drops out the values, copies the transposed keys
  (.contiguous()) and adds a float -inf mask; sharnn computes the same function with the gates on the
  128-long side (see sharnn/model.py): that is implementation, part of what is measured.
- Timing: its own log, `| epoch   0 |    60/  ... | ms/batch 1234.56 | ...` every --log-interval batches:
  wall time over the interval, everything in its loop (slicing the batch, drawing the segment length, the lr
  warmup, the mask, forward, backward, clipping, LAMB, detaching, summing the loss for its log). Only
  intervals that start after --warmup-batches count (default: where its attention memory is full, 5000 / the
  expected segment length, rounded up to the log interval: 50 for small, so batches 51-100). Its segment
  length is random per batch (bptt, or bptt / 2 with p = 0.05, plus N(0, 5), clamped to [5, bptt]): ms/batch
  becomes bytes/s with the EXPECTED length (122.6 at bptt 128) x the batch size.
- sharnn: `python -m bench --scenario small-fp32 --json X` as a subprocess (its record: median and min-max
  bytes/s of 5 steps after warm-up with the memory full; the step is forward, backward, clipping, LAMB, zero
  grad, detach, on fixed random batches of exactly bptt bytes: no loader, no lr schedule, no logging).
- 'others': the cores other processes kept busy meanwhile (/proc/stat less this benchmark's own CPU time), per
  log interval of the original and over each sharnn run; above 0.1 the table says the machine was not quiet.
  With 2 threads on 2 cores, a second busy process slows either program several-fold.

What the original does per step that sharnn's bench step does not: draw a segment length (numpy), set the lr,
slice its batch, rebuild the (T, 5000) mask, SplitCrossEntropyLoss's split bookkeeping (one split), a Python
loop over parameters in pytorch-lamb (comparing its norms in Python), and add its loss to the log sum.
The table gives both programs' bytes/s per round and the ratio sharnn / original (the issue's target: >= 3)
with its spread over rounds; the JSON record holds the machine, the commands, every interval's ms/batch and
the ratios, and is rewritten after every round.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORIGINAL_COMMIT = "218d748"  # Smerity/sha-rnn, the code sharnn follows
ORIGINAL_MEMORY = 5000  # SHARNN.num_max_positions in the original's model.py
TARGET_RATIO = 3.0  # the issue: sharnn's small step >= 3x the original's

# ------------------------------------------------------------------------------- the original's inputs
APEX_STANDIN = {
    "apex/__init__.py": '"""Stand-in for NVIDIA apex, written by sharnn\'s bench.original (CPU, fp32)."""\n',
    "apex/normalization/__init__.py": "from .fused_layer_norm import FusedLayerNorm\n",
    "apex/normalization/fused_layer_norm.py": '''\
"""apex's FusedLayerNorm as a plain module: F.layer_norm with an affine weight (1) and bias (0), like apex's
own (which is not an nn.LayerNorm subclass, so the original's init_weights leaves both as they are)."""
import torch
import torch.nn.functional as F
from torch import nn


class FusedLayerNorm(nn.Module):
    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape))
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
''',
    "apex/amp.py": '''\
"""apex.amp as no-ops: fp32 throughout (amp's O1 casts to fp16 on CUDA only). main.py calls initialize once,
after building the model and before training: with $SHARNN_BENCH_INITIAL_WEIGHTS set it saves the model's
state dict there (bench.sidebyside starts sharnn from the same weights)."""
import contextlib
import os

import torch


def initialize(model, optimizer, opt_level=None, **kwargs):
    print(f"apex stand-in: amp.initialize(opt_level={opt_level}) does nothing; "
          f"torch threads {torch.get_num_threads()}", flush=True)
    path = os.environ.get("SHARNN_BENCH_INITIAL_WEIGHTS")
    if path:
        torch.save(model.state_dict(), path)
    return model, optimizer


@contextlib.contextmanager
def scale_loss(loss, optimizer, **kwargs):
    yield loss
''',
}
# pytorch_lamb imports SummaryWriter only for the annotation of a function main.py never calls
TENSORBOARDX_STANDIN = {
    "tensorboardX/__init__.py": '"""Stand-in for tensorboardX, written by sharnn\'s bench.original."""\n\n\n'
                                "class SummaryWriter:\n    pass\n",
}


def write_standins(root: Path, tensorboardx: bool) -> list[str]:
    """Write the apex stand-in (and tensorboardX's, if asked) under `root`, a directory for PYTHONPATH;
    returns the package names written."""
    files = {**APEX_STANDIN, **(TENSORBOARDX_STANDIN if tensorboardx else {})}
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return sorted({rel.split("/")[0] for rel in files})


def original_text(data: bytes) -> str:
    """Bytes in the original's text format (its data/enwik8/prep_enwik8.py): each byte a decimal token,
    single spaces between them, a real newline in place of byte 10 (its data.Corpus turns it into <eos>)."""
    return " ".join("\n" if b == 10 else str(b) for b in data)


def random_bytes(n: int, seed: int = 0) -> bytes:
    """n bytes (n >= 256): every value once, then uniform random bytes: the original's vocabulary, built from
    the training file, then has all 256 symbols (255 byte tokens and <eos>), as sharnn's output layer."""
    import numpy as np

    if n < 256:
        raise ValueError(f"need at least 256 bytes, got {n}")
    return bytes(range(256)) + np.random.default_rng(seed).integers(0, 256, n - 256, dtype=np.uint8).tobytes()


def write_corpus(root: Path, batch_size: int, bptt: int, batches: int, seed: int = 0) -> dict:
    """train.txt / valid.txt / test.txt under root: enough training bytes for `batches` + 10 batches of at
    most bptt bytes per stream (the original stops its epoch when a stream runs out)."""
    sizes = {"train": batch_size * (bptt * (batches + 10) + 2), "valid": 4096, "test": 4096}
    root.mkdir(parents=True, exist_ok=True)
    for i, (split, n) in enumerate(sizes.items()):
        (root / f"{split}.txt").write_text(original_text(random_bytes(max(n, 256), seed + i)))
    return sizes


# ------------------------------------------------------------------------------ the original's log
LOG_LINE = re.compile(r"^\| epoch\s+(\d+) \|\s*(\d+)/\s*(\d+) batches \| lr\s+([-+.\deE]+) \| "
                      r"ms/batch\s+([-+.\deE]+) \|")


@dataclass
class Interval:
    batch: int  # the batch number its log line shows: the interval is batches batch - log_interval + 1..batch
    ms_per_batch: float
    timed: bool  # after the warm-up


def parse_log(lines: list[str], log_interval: int, warmup_batches: int) -> list[Interval]:
    """The original's `| epoch ... | ms/batch ...` lines as intervals. An interval is timed when all its
    batches come after the first `warmup_batches` (its line's batch >= warmup_batches + log_interval). The
    first line is never timed: the original counts batches from 0, so it divides 11 batches' time (and the
    first steps' start-up) by 10."""
    out = []
    for line in lines:
        m = LOG_LINE.match(line.strip())
        if m:
            batch = int(m.group(2))
            timed = batch >= warmup_batches + log_interval and batch > log_interval
            out.append(Interval(batch, float(m.group(5)), timed))
    return out


def expected_seq_len(bptt: int) -> float:
    """The mean segment length of the original's draw: bptt w.p. 0.95 else bptt / 2, int(N(that, 5)), at least
    5, at most bptt (its main.py train()). sharnn's loader draws the same distribution."""
    from sharnn.corpus.data import _expected_seq_len

    return _expected_seq_len(bptt)


def bytes_per_s(ms_per_batch: float, batch_size: int, seq_len: float) -> float:
    """Training bytes per second of a batch of `batch_size` streams x `seq_len` bytes taking ms_per_batch."""
    return batch_size * seq_len / (ms_per_batch / 1000.0)


def default_warmup(bptt: int, log_interval: int) -> int:
    """Batches until the original's attention memory (5000 positions) is full at the expected segment
    length, rounded up to a whole log interval."""
    full = math.ceil(ORIGINAL_MEMORY / expected_seq_len(bptt))
    return log_interval * math.ceil(full / log_interval)


# ------------------------------------------------------------------------------------------ checks
def check_original(path: Path) -> str | None:
    missing = [f for f in ("main.py", "model.py") if not (path / f).is_file()]
    if missing:
        return (f"--original {path} has no {' or '.join(missing)}: point it at a checkout of Smerity/sha-rnn "
                f"(commit {ORIGINAL_COMMIT})")
    return None


def check_lamb(path: Path) -> str | None:
    if not (path / "pytorch_lamb" / "__init__.py").is_file():
        return (f"--lamb {path} has no pytorch_lamb/__init__.py: point it at a checkout of "
                f"Smerity/pytorch-lamb (the directory that holds the pytorch_lamb package)")
    return None


def git_commit(path: Path) -> str | None:
    """The checkout's commit, if it is a git work tree (else None: an archive, a copy)."""
    try:
        proc = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    top = subprocess.run(["git", "-C", str(path), "rev-parse", "--show-toplevel"], capture_output=True,
                         text=True, timeout=30)
    # Only the checkout's own repository: a path inside some other work tree (an archive unpacked in a
    # repository) would report that repository's commit.
    if proc.returncode != 0 or Path(top.stdout.strip()).resolve() != path.resolve():
        return None
    return proc.stdout.strip()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ the shapes
@dataclass
class Shape:
    emsize: int
    nhid: int
    nlayers: int
    bptt: int
    batch_size: int


def scenario_config(name: str):
    """(scenario, train config, model config, batch, bptt) of a `python -m bench` CPU scenario."""
    import bench.__main__ as bench

    table = bench.scenarios("cpu")
    if name not in table or table[name].kind != "train":
        trains = [n for n, s in table.items() if s.kind == "train"]
        raise KeyError(f"--scenario {name!r} is not a training scenario of python -m bench; "
                       f"choose from {', '.join(trains)}")
    sc = table[name]
    cfg, model_cfg, batch, bptt = bench._model_config(sc)
    return sc, cfg, model_cfg, batch, bptt


def original_flags(cfg, shape: Shape, data: Path, save: Path, log_interval: int) -> list[str]:
    """The original main.py's flags for a sharnn train config (its optimizer settings, dropouts, seed) at
    `shape`. --cuda is store_false there: passing it runs on the CPU. --dropoute is not used by its SHARNN."""
    m = cfg.model
    return ["--data", f"{data}/", "--epochs", "1", "--emsize", str(shape.emsize), "--nhid", str(shape.nhid),
            "--nlayers", str(shape.nlayers), "--bptt", str(shape.bptt), "--batch_size", str(shape.batch_size),
            "--dropout", str(m.dropout), "--dropouth", str(m.dropouth), "--dropouti", str(m.dropouti),
            "--dropoute", "0", "--optimizer", "lamb", "--lr", str(cfg.lr), "--warmup", str(cfg.warmup_steps),
            "--wdecay", str(cfg.weight_decay), "--clip", str(cfg.clip), "--seed", str(cfg.seed),
            "--log-interval", str(log_interval), "--save", str(save), "--cuda"]


def shape_differences(cfg, model_cfg, batch: int, bptt: int, shape: Shape) -> list[str]:
    """How the original's run differs in shape from the sharnn scenario (empty: the same model and batch)."""
    want = {"emsize": model_cfg.d_model, "nhid": model_cfg.d_ff, "nlayers": model_cfg.n_layer, "bptt": bptt,
            "batch_size": batch}
    out = [f"{k} {getattr(shape, k)} (sharnn {v})" for k, v in want.items() if getattr(shape, k) != v]
    if model_cfg.mem_len != ORIGINAL_MEMORY:
        out.append(f"memory {ORIGINAL_MEMORY} (sharnn {model_cfg.mem_len})")
    if model_cfg.attn != "penultimate" or model_cfg.vocab_size != 256:
        out.append(f"attention {model_cfg.attn}, vocabulary {model_cfg.vocab_size} "
                   "(original: penultimate, 256)")
    if getattr(cfg, "min_trust", 0.25) != 0.25:
        out.append(f"LAMB min_trust 0.25 (sharnn {cfg.min_trust})")
    return out


# ---------------------------------------------------------------------------------------------- runs
def run_env(threads: int, pythonpath: list[Path]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(str(p) for p in pythonpath),
               TOKENIZERS_PARALLELISM="false")
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def machine_cpu_s() -> float | None:
    """CPU seconds spent so far by every process on the machine (/proc/stat: all but idle and iowait; steal
    included), or None where there is no /proc/stat."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) of a running process, or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and its finished children."""
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def others_cores(machine0: float | None, machine1: float | None, ours: float | None,
                 wall: float) -> float | None:
    """Cores that other processes kept busy on average over `wall` seconds: the machine's CPU time less ours
    (a shared machine disturbs a timing; 0 is a quiet machine)."""
    if machine0 is None or machine1 is None or ours is None or wall <= 0:
        return None
    return max(0.0, (machine1 - machine0 - ours) / wall)


def run_original(cmd: list[str], cwd: Path, env: dict, batches: int, log_interval: int, timeout: float,
                 echo: bool = False) -> tuple[list[str], float, dict[int, float | None]]:
    """Run the original until its log shows batch `batches`, then kill it. Returns its output lines (each
    prefixed with the seconds since start), the wall time, and for each log interval the cores other
    processes used meanwhile. Raises RuntimeError if it ends or times out first."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    lines, reached, others = [], False, {}
    last = (start, machine_cpu_s(), 0.0, own_cpu_s())  # wall, machine CPU, the original's CPU, ours
    try:
        for line in proc.stdout:
            now = time.perf_counter()
            lines.append(f"{now - start:9.3f} {line.rstrip()}")
            if echo:
                print("    " + lines[-1], flush=True)
            intervals = parse_log([line], log_interval, 0)
            if intervals:
                sample = (now, machine_cpu_s(), process_cpu_s(proc.pid), own_cpu_s())
                ours = None if sample[2] is None else sample[2] - last[2] + sample[3] - last[3]
                others[intervals[0].batch] = others_cores(last[1], sample[1], ours, now - last[0])
                last = sample
                if intervals[0].batch >= batches:
                    reached = True
                    break
    finally:
        timed_out = not timer.is_alive() and not reached
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
    wall = time.perf_counter() - start
    if not reached:
        why = f"timed out after {timeout:.0f} s" if timed_out else f"exited {proc.returncode}"
        tail = "\n".join(lines[-25:])
        raise RuntimeError(f"the original {why} before its log showed batch {batches}:\n{tail}")
    return lines, wall, others


def original_summary(lines: list[str], log_interval: int, warmup: int, batch_size: int, seq_len: float,
                     others: dict[int, float | None] | None = None) -> dict:
    """One run of the original: every log interval (ms/batch, bytes/s, cores other processes used), and the
    median and min-max over the timed ones."""
    others = others or {}
    raw = [line[10:] for line in lines]  # without the time prefix
    intervals = parse_log(raw, log_interval, warmup)
    timed = [i for i in intervals if i.timed]
    if not timed:
        tail = "\n".join(lines[-10:])
        raise RuntimeError(f"no log interval after the warm-up of {warmup} batches:\n{tail}")
    ms = sorted(i.ms_per_batch for i in timed)
    rates = sorted(bytes_per_s(i.ms_per_batch, batch_size, seq_len) for i in timed)
    found = {key: next((m.group(1) for line in raw if (m := re.search(pattern, line))), None)
             for key, pattern in {"vocabulary": r"Total number of tokens: (\d+)",
                                  "params_printed": r"Model total parameters: (\d+)",
                                  "threads": r"torch threads (\d+)"}.items()}
    busy = [others[i.batch] for i in timed if others.get(i.batch) is not None]
    return {"intervals": [{"batch": i.batch, "ms_per_batch": i.ms_per_batch, "timed": i.timed,
                           "bytes_per_s": bytes_per_s(i.ms_per_batch, batch_size, seq_len),
                           "others_cores": others.get(i.batch)} for i in intervals],
            "others_cores": statistics.median(busy) if busy else None,
            "ms_per_batch": statistics.median(ms), "ms_per_batch_min": ms[0], "ms_per_batch_max": ms[-1],
            "bytes_per_s": statistics.median(rates), "bytes_per_s_min": rates[0],
            "bytes_per_s_max": rates[-1],
            **{k: int(v) if v is not None else None for k, v in found.items()}}


def run_sharnn(scenario: str, out: Path, env: dict, timeout: float) -> tuple[list[str], dict]:
    """`python -m bench --scenario SCENARIO --json OUT`: its record, with the cores other processes used
    meanwhile (over the whole run: its warm-up and matmul ceiling included)."""
    cmd = [sys.executable, "-m", "bench", "--scenario", scenario, "--json", str(out)]
    start, machine0, own0 = time.perf_counter(), machine_cpu_s(), own_cpu_s()
    # its own session, so that a timeout or Ctrl-C also ends the worker process it starts
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(cmd)} timed out after {timeout:.0f} s") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    wall = time.perf_counter() - start
    others = others_cores(machine0, machine_cpu_s(), own_cpu_s() - own0, wall)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{stderr[-3000:]}")
    record = json.loads(out.read_text())[0]
    if not record.get("bytes_per_s"):
        raise RuntimeError(f"{' '.join(cmd)} gave no timing: "
                           f"{record.get('skipped') or record.get('error') or record}")
    return cmd, {**record, "wall_s": wall, "others_cores": others}


# ------------------------------------------------------------------------------------------ machine
def machine() -> dict:
    import numpy
    import torch

    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (s.strip() for s in line.partition(":"))
            if key in ("model name", "cpu family", "model", "flags") and key not in info:
                info[key] = value
    except OSError:
        pass
    return {"cpu": info.get("model name") or platform.processor() or platform.machine(),
            "cpu_family": info.get("cpu family"), "cpu_model": info.get("model"), "cpus": os.cpu_count(),
            "flags": info.get("flags"), "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def sharnn_revision() -> dict:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True)
    return {"commit": head.stdout.strip() or None,
            "modified_files": [line[3:] for line in dirty.stdout.splitlines()]}


# ------------------------------------------------------------------------------------------------ main
BUSY_CORES = 0.1  # a run with other processes using more than this (cores, on average) is flagged


def summarize(rounds: list[dict]) -> dict:
    """Over all rounds: the original's timed intervals pooled, sharnn's per-round medians, and the ratio
    sharnn / original: its median over rounds, with the min-max."""
    pooled = sorted(i["bytes_per_s"] for r in rounds for i in r["original"]["intervals"] if i["timed"])
    sharnn_medians = [r["sharnn"]["bytes_per_s"] for r in rounds]
    ratios = sorted(r["ratio"] for r in rounds)
    summary = {"original_bytes_per_s": statistics.median(pooled), "original_bytes_per_s_min": pooled[0],
               "original_bytes_per_s_max": pooled[-1],
               "sharnn_bytes_per_s": statistics.median(sharnn_medians),
               "sharnn_bytes_per_s_min": min(r["sharnn"]["bytes_per_s_min"] for r in rounds),
               "sharnn_bytes_per_s_max": max(r["sharnn"]["bytes_per_s_max"] for r in rounds),
               "ratio": statistics.median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1],
               "target_ratio": TARGET_RATIO}
    summary["meets_target"] = summary["ratio"] >= TARGET_RATIO
    # The original's intervals while the machine was quiet (sharnn's record has no per-step split)
    timed = [i for r in rounds for i in r["original"]["intervals"] if i["timed"]]
    quiet = sorted(i["bytes_per_s"] for i in timed
                   if i.get("others_cores") is not None and i["others_cores"] <= BUSY_CORES)
    summary.update(original_quiet_intervals=len(quiet), original_intervals=len(timed),
                   original_quiet_bytes_per_s=statistics.median(quiet) if quiet else None,
                   original_quiet_bytes_per_s_min=quiet[0] if quiet else None,
                   original_quiet_bytes_per_s_max=quiet[-1] if quiet else None)
    return summary


def fmt_rate(r: dict) -> str:
    return f"{r['bytes_per_s']:,.0f} ({r['bytes_per_s_min']:,.0f}-{r['bytes_per_s_max']:,.0f})"


def fmt_cores(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(rounds: list[dict], summary: dict) -> list[str]:
    head = (f"{'round':>5s}  {'first':8s}  {'original bytes/s (median, min-max)':>34s}  {'ms/batch':>9s}  "
            f"{'others':>6s}  {'sharnn bytes/s (median, min-max)':>32s}  {'others':>6s}  "
            f"{'sharnn/original':>15s}")
    out = [head]
    for r in rounds:
        o, s = r["original"], r["sharnn"]
        first = "original" if r["round"] % 2 else "sharnn"
        out.append(f"{r['round']:5d}  {first:8s}  {fmt_rate(o):>34s}  {o['ms_per_batch']:9,.1f}  "
                   f"{fmt_cores(o['others_cores']):>6s}  {fmt_rate(s):>32s}  "
                   f"{fmt_cores(s['others_cores']):>6s}  {r['ratio']:15.2f}")
    orig = {k.removeprefix("original_"): v for k, v in summary.items() if k.startswith("original_")}
    shar = {k.removeprefix("sharnn_"): v for k, v in summary.items() if k.startswith("sharnn_")}
    ratio = f"{summary['ratio']:.2f} ({summary['ratio_min']:.2f}-{summary['ratio_max']:.2f})"
    out.append(f"{'all':>5s}  {'':8s}  {fmt_rate(orig):>34s}  {'':9s}  {'':6s}  {fmt_rate(shar):>32s}  "
               f"{'':6s}  {ratio:>15s}")
    out.append(f"sharnn / original = {summary['ratio']:.2f} (over rounds {summary['ratio_min']:.2f}-"
               f"{summary['ratio_max']:.2f}); the issue's target >= {TARGET_RATIO:g}: "
               f"{'met' if summary['meets_target'] else 'NOT met'}. 'others': cores other processes kept "
               f"busy (the original: median over its timed intervals; sharnn: its whole run)")
    n_quiet, n = summary.get("original_quiet_intervals", 0), summary.get("original_intervals", 0)
    if n_quiet < n:
        quiet = {k.removeprefix("original_quiet_"): v for k, v in summary.items()
                 if k.startswith("original_quiet_")}
        out.append(f"the original over its quiet intervals only (others <= {BUSY_CORES:g}), {n_quiet} of "
                   f"{n}: {fmt_rate(quiet) + ' bytes/s' if n_quiet else 'none'}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.original", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", type=Path, required=True,
                        help=f"a checkout of Smerity/sha-rnn (commit {ORIGINAL_COMMIT}): main.py, model.py")
    parser.add_argument("--lamb", type=Path, required=True,
                        help="a checkout of Smerity/pytorch-lamb (the directory holding pytorch_lamb/)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of one original and one sharnn run, alternating (default 2)")
    parser.add_argument("--batches", type=int, default=100,
                        help="the original's batches per run, warm-up included (default 100)")
    parser.add_argument("--warmup-batches", type=int,
                        help="the original's batches before the timed log intervals (default: until its "
                             "attention memory is full, rounded up to --log-interval: 50 for small)")
    parser.add_argument("--log-interval", type=int, default=10, help="the original's --log-interval (10)")
    parser.add_argument("--scenario", default="small-fp32",
                        help="the `python -m bench` training scenario to compare (default small-fp32); its "
                             "preset gives the original's flags")
    for name in ("emsize", "nhid", "nlayers", "bptt", "batch-size"):
        parser.add_argument(f"--{name}", type=int, help=f"the original's --{name.replace('-', '_')} "
                            "(default: the scenario's; smaller for tests)")
    parser.add_argument("--threads", type=int,
                        help="OMP/MKL threads of both programs (default: torch's default here)")
    parser.add_argument("--timeout", type=float, default=3600,
                        help="seconds one run may take before it counts as failed (3600)")
    parser.add_argument("--json", type=Path, help="write the record here (atomically, after every round)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temporary work directory")
    parser.add_argument("--echo", action="store_true", help="print the original's output as it runs")
    return parser.parse_args(argv)


def error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    from bench import check_output, written_by

    args = parse_args(argv)
    original, lamb = args.original.expanduser().resolve(), args.lamb.expanduser().resolve()
    for problem in (check_original(original), check_lamb(lamb)):
        if problem:
            return error(problem)
    if min(args.rounds, args.batches, args.log_interval) < 1:
        return error("--rounds, --batches and --log-interval must be >= 1")
    if args.batches % args.log_interval:
        return error(f"--batches {args.batches} must be a multiple of --log-interval {args.log_interval}")
    try:
        _, cfg, model_cfg, scenario_batch, scenario_bptt = scenario_config(args.scenario)
    except KeyError as e:
        return error(e.args[0])
    shape = Shape(emsize=args.emsize or model_cfg.d_model, nhid=args.nhid or model_cfg.d_ff,
                  nlayers=args.nlayers or model_cfg.n_layer, bptt=args.bptt or scenario_bptt,
                  batch_size=args.batch_size or scenario_batch)
    warmup = args.warmup_batches
    if warmup is None:
        warmup = default_warmup(shape.bptt, args.log_interval)
    first_timed = max(warmup, args.log_interval) + args.log_interval  # the first timed log line
    if args.batches < first_timed:
        return error(f"--batches {args.batches} leaves no timed log interval after the warm-up of {warmup} "
                     f"batches (the first interval is never timed): use at least {first_timed}")
    check_output(args.json, "--json", written_by("bench.original"), "record of python -m bench.original",
                 inputs=[("original's checkout", original), ("LAMB checkout", lamb)])

    import importlib.util

    import torch

    threads = args.threads or torch.get_num_threads()
    seq_len = expected_seq_len(shape.bptt)
    differences = shape_differences(cfg, model_cfg, scenario_batch, scenario_bptt, shape)
    record = {
        "benchmark": "bench.original", "date": time.strftime("%Y-%m-%d"),
        "command": "python -m bench.original " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(), "threads": threads, "scenario": args.scenario, "shape": vars(shape),
        "same_shape": not differences, "shape_differences": differences,
        "original": {"path": str(original), "commit": git_commit(original),
                     "expected_commit": ORIGINAL_COMMIT, "main_py_sha256": sha256(original / "main.py"),
                     "model_py_sha256": sha256(original / "model.py"), "lamb_path": str(lamb),
                     "lamb_commit": git_commit(lamb), "expected_seq_len": seq_len,
                     "batch_size": shape.batch_size, "log_interval": args.log_interval,
                     "warmup_batches": warmup, "batches": args.batches,
                     "bytes_per_s_from": "batch_size * expected_seq_len / (ms_per_batch / 1000)"},
        "sharnn": sharnn_revision(), "rounds": [], "summary": None,
    }
    print(f"original: {original} (commit {record['original']['commit'] or 'unknown: not a git work tree'}); "
          f"{threads} threads for both programs")
    print(f"shape: emsize {shape.emsize} nhid {shape.nhid} nlayers {shape.nlayers} bptt {shape.bptt} batch "
          f"{shape.batch_size}; expected segment {seq_len:.2f} bytes; timed: batches "
          f"{first_timed - args.log_interval + 1}-{args.batches} of each original run")
    if differences:
        print(f"note: the original's shape differs from {args.scenario}: {'; '.join(differences)}")

    work = Path(tempfile.mkdtemp(prefix="sharnn-original-"))
    rounds = record["rounds"]
    try:
        no_tensorboardx = importlib.util.find_spec("tensorboardX") is None
        standins = write_standins(work / "standins", tensorboardx=no_tensorboardx)
        record["original"]["standins"] = standins
        record["original"]["corpus_bytes"] = write_corpus(work / "data", shape.batch_size, shape.bptt,
                                                          args.batches)
        original_env = run_env(threads, [work / "standins", lamb])
        sharnn_env = run_env(threads, [REPO])
        for r in range(1, args.rounds + 1):
            result = {"round": r, "first": "original" if r % 2 else "sharnn"}
            for program in ("original", "sharnn") if r % 2 else ("sharnn", "original"):
                if program == "original":
                    run_dir = work / f"run-{r}"
                    run_dir.mkdir()
                    flags = original_flags(cfg, shape, work / "data", run_dir / "model.pt", args.log_interval)
                    cmd = [sys.executable, str(original / "main.py"), *flags]
                    lines, wall, others = run_original(cmd, run_dir, original_env, args.batches,
                                                       args.log_interval, args.timeout, args.echo)
                    summary = original_summary(lines, args.log_interval, warmup, shape.batch_size, seq_len,
                                               others)
                    result["original"] = {**summary, "wall_s": wall, "log": lines}
                    record["original"]["command"] = cmd
                else:
                    cmd, result["sharnn"] = run_sharnn(args.scenario, work / f"sharnn-{r}.json", sharnn_env,
                                                       args.timeout)
                    record["sharnn"]["command"] = cmd
            result["ratio"] = result["sharnn"]["bytes_per_s"] / result["original"]["bytes_per_s"]
            rounds.append(result)
            record["summary"] = summarize(rounds)
            o, s = result["original"], result["sharnn"]
            print(f"round {r}: original {fmt_rate(o)} bytes/s ({o['ms_per_batch']:,.1f} ms/batch, "
                  f"{o['wall_s']:.0f} s), sharnn {fmt_rate(s)} bytes/s ({s['wall_s']:.0f} s): "
                  f"ratio {result['ratio']:.2f}", flush=True)
            for name, ran in (("original", o.get("threads")), ("sharnn", s.get("threads"))):
                if ran is not None and ran != threads:
                    print(f"note: {name} ran with {ran} threads, not {threads}")
            if args.json:  # after every round: an interrupted measurement keeps its finished rounds
                from sharnn.io import atomic

                atomic.write_json(args.json, record)
    finally:
        if args.keep_workdir:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print()
    for line in table(rounds, record["summary"]):
        print(line)
    if differences:
        print(f"shapes differ: {'; '.join(differences)}")
    busy = [x for r in rounds for x in (r["original"]["others_cores"], r["sharnn"]["others_cores"])
            if x is not None]
    if busy and max(busy) > BUSY_CORES:
        print(f"note: other processes kept up to {max(busy):.2f} cores busy during these timings (column "
              f"'others'): the machine was not quiet, rerun when it is")
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
