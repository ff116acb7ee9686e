"""A golden training curve: the tiny preset's first 40 logged losses and its validation bpc on a fixed text
(license texts, tests/fixtures/license_texts/), stored in tests/golden/tiny_curve.json.

Any change that alters what is trained (data order, segment lengths, initialisation, dropout masks, kernels,
schedule, optimizer, state handling) moves these numbers and fails here loudly. A change that means to alter
training regenerates the file, and says why in its commit:

    .venv/bin/python -m tests.integration.test_golden --update
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import FIXTURES, REPO

GOLDEN = REPO / "tests" / "golden" / "tiny_curve.json"
TEXTS = FIXTURES / "license_texts"
ARGS = ["--preset", "tiny", "--max_steps", "40", "--log_every", "1", "--eval_every", "20",
        "--save_every", "0", "--sample_bytes", "0", "--no_test_at_end"]
# Float noise: the same run on 1 and on 2 threads (other reduction orders) differed by at most 1.5e-7 relative
# in these losses; a change in what is trained moves them by far more within a few steps.
RTOL = 1e-4


def train_curve(workdir: Path) -> dict:
    """Prepare the corpus and train; the logged train losses and validation bpc by step."""
    from sharnn.corpus.prepare import prepare_files

    corpus = workdir / "corpus"
    prepare_files([TEXTS / "train.bytes", TEXTS / "valid.bytes", TEXTS / "test.bytes"], corpus,
                  valid_bytes=20_000, test_bytes=20_000)
    out = workdir / "run"
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "train", *ARGS, "--data", str(corpus), "--out", str(out)], cwd=REPO,
                   env=env, check=True, capture_output=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"args": ARGS,
            "train_loss": {str(r["step"]): r["train/loss"] for r in records if "train/loss" in r},
            "val_bpc": {str(r["step"]): r["val/bpc"] for r in records if "val/bpc" in r}}


@pytest.mark.slow
def test_tiny_training_curve_matches_the_golden_one(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    assert golden["args"] == ARGS, "the run's flags changed: regenerate with --update"
    got = train_curve(tmp_path)
    for key in ("train_loss", "val_bpc"):
        assert got[key].keys() == golden[key].keys(), key
        for step, want in golden[key].items():
            assert math.isclose(got[key][step], want, rel_tol=RTOL), (
                f"{key} at step {step}: {got[key][step]!r}, golden {want!r}. Training changed; if that is "
                "meant, regenerate: python -m tests.integration.test_golden --update")


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        raise SystemExit("usage: python -m tests.integration.test_golden --update")
    with tempfile.TemporaryDirectory() as tmp:
        curve = train_curve(Path(tmp))
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(curve, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {len(curve['train_loss'])} losses, val bpc {curve['val_bpc']}")
