"""python -m bench.sidebyside end to end, where checkouts of the original exist (SHARNN_ORIGINAL,
SHARNN_LAMB): the whole benchmark at a trivial size, without dropout (the same computation in both programs)
and with it, resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_end_to_end_against_the_original_checkouts(tmp_path):
    """Without dropout the two programs run the same computation (same bytes, initial weights, segment
    lengths, schedule and optimizer), so sharnn must end where the original ends; then a second seed with
    dropout, resuming in the same --work."""
    original, lamb = os.environ.get("SHARNN_ORIGINAL"), os.environ.get("SHARNN_LAMB")
    if not (original and lamb):
        pytest.skip("set SHARNN_ORIGINAL and SHARNN_LAMB to checkouts of Smerity/sha-rnn (218d748) and "
                    "Smerity/pytorch-lamb (704f733)")
    base = [sys.executable, "-m", "bench.sidebyside", "--original", original, "--lamb", lamb,
            "--size", "tiny", "--setting", "fast", "--setting", "torch"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    record = tmp_path / "record.json"
    proc = subprocess.run([*base, "--seeds", "1", "--dropout", "0", "--work", str(tmp_path / "w0"), "--json",
                           str(record)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(record.read_text())["runs"]
    assert {r["setting"] for r in runs} == {"original", "fast", "torch"}
    o = next(r for r in runs if r["setting"] == "original")
    for r in runs:
        assert r["steps"] == o["steps"] > 40
        assert abs(r["val_bpc"] - o["val_bpc"]) < 1e-4 and abs(r["test_bpc"] - o["test_bpc"]) < 1e-4

    cmd = [*base, "--seeds", "1", "--first_seed", "2", "--work", str(tmp_path / "w1"), "--json", str(record)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(record.read_text())["runs"]
    assert len(runs) == 3 and json.loads(record.read_text())["problems"] == []
    runs_dir = tmp_path / "w1" / "runs"
    (runs_dir / "torch-s2" / "result.json").unlink()  # as if killed before it finished
    kept = {name: (runs_dir / name / "result.json").stat().st_mtime_ns for name in ("original-s2", "fast-s2")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {name: (runs_dir / name / "result.json").stat().st_mtime_ns for name in kept} == kept
    assert (runs_dir / "torch-s2" / "result.json").exists()
    assert len(json.loads(record.read_text())["runs"]) == 3
