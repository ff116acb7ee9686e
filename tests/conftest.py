"""Shared fixtures: small prepared corpora and a runner for real training processes."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """A prepared corpus of ~700 KB of real text (Python standard library sources): train/valid/test."""
    from sharnn.prepare import prepare_files

    src = tmp_path_factory.mktemp("src") / "stdlib.txt"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join(p.read_bytes() for p in sorted(stdlib.glob("*.py")))[:700_000]
    src.write_bytes(data)
    out = tmp_path_factory.mktemp("corpus") / "text"
    prepare_files([src], out, valid_bytes=50_000, test_bytes=50_000)
    return out


def subprocess_env(threads: int = 1) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def train_cmd(*args: str, launch: list[str] | None = None) -> list[str]:
    """`python -m train ARGS`, or `accelerate launch LAUNCH -m train ARGS`."""
    if launch is None:
        return [sys.executable, "-m", "train", *args]
    return [sys.executable, "-m", "accelerate.commands.launch", *launch, "-m", "train", *args]


def run(cmd: list[str], timeout: float = 600, check: bool = True, threads: int = 1) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(threads), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-8000:]}")
    return proc
