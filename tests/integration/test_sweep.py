"""What a killed writer leaves (SIGKILL: no cleanup can run) is removed by the next write of the same output
once the process named in the temporary's name has ended (sharnn.io.atomic, sharnn.io.signals)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import slow_jsonl, subprocess_env

BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def test_sigkilled_prepare_leaves_a_temporary_the_next_run_removes(tmp_path):
    """SIGKILL (no cleanup possible) while `sharnn-prepare hf` writes: its .corpus.tmp-PID@HOST@* stays; the
    next prepare of the same output removes it, since the process it names has ended."""
    data = slow_jsonl(tmp_path / "d.jsonl")
    out = tmp_path / "corpus"
    cmd = [str(BIN / "sharnn-prepare"), "hf", "json", "--data_files", str(data), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not [p for p in tmp_path.iterdir() if p.name.startswith(".corpus.tmp")]:
        assert proc.poll() is None and time.time() < deadline, "prepare ended before it wrote anything"
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(".corpus.tmp")]
    assert left.name.startswith(f".corpus.tmp-{proc.pid}@")
    done = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "d.jsonl"]
