"""Plain helpers shared by the test files: running commands, reading a run's records, launch arguments,
waiting for processes, random bytes. Fixtures live in tests/conftest.py."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported where used: conftest.py imports this module, and not every test needs torch
    import numpy as np
    import torch

    import sharnn

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
"""Data the repository ships for the tests (tests/fixtures/README.md says what each is)."""
SHIPPED_TEXT = FIXTURES / "original_trained" / "train.bytes"
"""197 kB of real text the repository ships for tests (the training text of the original's fixture model):
test data that does not change when the documentation does."""


def shipped_text(n_bytes: int) -> bytes:
    """The first `n_bytes` of the text the repository ships for tests: SHIPPED_TEXT, then the fixture model's
    validation and test texts (237 kB in all), repeated as often as `n_bytes` needs. Below 197 kB it is
    SHIPPED_TEXT's beginning."""
    texts = SHIPPED_TEXT.read_bytes() + b"".join((SHIPPED_TEXT.parent / f"{split}.bytes").read_bytes()
                                                 for split in ("valid", "test"))
    return (texts * (n_bytes // len(texts) + 1))[:n_bytes]

# `accelerate launch` arguments: 2 processes on this CPU under DDP (gloo).
DDP = ["--config_file", str(REPO / "launch" / "cpu_ddp.yaml")]

# Flags of the runs that compare 2 ranks x 4 streams with 1 process x 8 streams
# (tests/integration/test_train.py, tests/integration/test_launch.py). Dropout off, as each rank draws its own
# dropout masks; state resets on (p=0.2), so that the carried state's resets are compared too.
EQUIV = ["--max_steps", "8", "--warmup_steps", "3", "--eval_every", "4", "--save_every", "4",
         "--log_every", "1", "--model.dropouth", "0", "--state_reset_prob", "0.2", "--sample_bytes", "0",
         "--eval_max_segments", "10"]


# ------------------------------------------------------------------------------------------- models
TINY_SIZES = dict(d_model=16, d_ff=32, n_layer=2, mem_len=8)
"""The sizes of tiny_config(): the smallest SHA-RNN with every part (2 blocks, attention in the first)."""


def tiny_config(**kw) -> sharnn.ModelConfig:
    """The tests' one model-config factory: a ModelConfig of TINY_SIZES, any field changed by `kw`
    (tiny_config(d_model=32, attn="all")). Fields not named keep ModelConfig's defaults."""
    from sharnn import ModelConfig

    return ModelConfig(**(TINY_SIZES | kw))


# ------------------------------------------------------------------------------------- running commands
def subprocess_env(threads: int = 1) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    env.pop("ACCELERATE_USE_CPU", None)
    env["CUDA_VISIBLE_DEVICES"] = "-1"  # the CPU runs stay on the CPU on a machine with GPUs (issue 18)
    return env


def cli(module: str, *args: str, launch: list[str] | None = None) -> list[str]:
    """`python -m MODULE ARGS`, or `accelerate launch LAUNCH -m MODULE ARGS`."""
    if launch is None:
        return [sys.executable, "-m", module, *args]
    return [sys.executable, "-m", "accelerate.commands.launch", *launch, "-m", module, *args]


def train_cmd(*args: str, launch: list[str] | None = None) -> list[str]:
    """`python -m train ARGS`, or `accelerate launch LAUNCH -m train ARGS`."""
    return cli("train", *args, launch=launch)


def run(cmd: list[str], timeout: float = 600, check: bool = True,
        threads: int = 1) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(threads), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-8000:]}")
    return proc


def exits_with(main, argv: list[str], *fragments: str) -> str:
    """Call an entry point in-process; it must stop with an 'error: ...' message holding every fragment."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = str(info.value.code)
    assert message.startswith("error: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def sharnn_only(stderr: str) -> None:
    """`python -X importtime` lists every module imported: a sharnn command must not load these."""
    imported = {line.split("|")[-1].strip().split(".")[0] for line in stderr.splitlines()
                if line.startswith("import time:")}
    assert "sharnn" in imported and not imported & {"accelerate", "deepspeed", "train"}, imported


def deepspeed(tmp_path: Path, stage: int) -> list[str]:
    """`accelerate launch` arguments: 2 processes on this CPU under DeepSpeed ZeRO `stage` (ds_config.json
    with the stage changed, written to tmp_path)."""
    cfg = json.loads((REPO / "ds_config.json").read_text())
    cfg["zero_optimization"]["stage"] = stage
    path = tmp_path / f"ds_zero{stage}.json"
    path.write_text(json.dumps(cfg))
    return ["--config_file", str(REPO / "launch" / "cpu_deepspeed.yaml"), "--deepspeed_config_file",
            str(path)]


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ a run's records
def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def series(run_dir: Path, key: str) -> dict[int, float]:
    return {m["step"]: m[key] for m in metrics(run_dir) if key in m}


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(ckpt / "model.safetensors")


def assert_same_training(a: Path, b: Path, test_bpc: bool = True) -> None:
    """Same train loss step by step, same validation bpc (and test bpc unless `test_bpc` is False: runs with
    --no_test_at_end), same gradient norms."""
    keys = [("train/loss", 1e-5), ("val/bpc", 1e-5), ("test/bpc", 1e-5), ("train/grad_norm", 1e-4)]
    for key, rtol in keys:
        if key == "test/bpc" and not test_bpc:
            continue
        sa, sb = series(a, key), series(b, key)
        assert sa.keys() == sb.keys() and sa, key
        for step in sa:
            assert math.isclose(sa[step], sb[step], rel_tol=rtol), (key, step, sa[step], sb[step])


# --------------------------------------------------------------------------------- waiting for processes
def wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 180) -> None:
    """Until `path` exists; fails when a process exits first or after `timeout` seconds."""
    deadline = time.time() + timeout
    while not path.exists():
        assert all(p.poll() is None for p in procs) and time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def wait_for_steps(run_dir: Path, procs: list[subprocess.Popen], n: int, timeout: float = 180) -> None:
    """Until the run's metrics.jsonl holds `n` training steps; fails when a process exits first or after
    `timeout` seconds."""
    deadline = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while not (path.exists() and sum("train/loss" in line for line in path.open()) >= n):
        assert all(p.poll() is None for p in procs), "a launcher exited before training started"
        assert time.time() < deadline, "training did not start"
        time.sleep(0.1)


def workers_of(proc: subprocess.Popen) -> list[int]:
    """The process ids of `proc`'s children (the training processes of an `accelerate launch`)."""
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                           text=True).stdout.split()]


# --------------------------------------------------------------------------------------------- data
def random_array(n: int, seed: int = 0) -> np.ndarray:
    """`n` uniformly random bytes as a uint8 array: the bytes of random_bytes(n, seed)."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random_array(n, seed).tobytes()


def slow_jsonl(path: Path, rows: int = 60_000) -> Path:
    """A JSON-lines dataset of `rows` random 200-character texts (12 MB): `sharnn-prepare hf json` takes
    seconds over it, long enough to be signalled or killed while it writes."""
    import random

    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": "".join(rng.choice("abcdefgh ij\n") for _ in range(200))}) + "\n")
    return path
