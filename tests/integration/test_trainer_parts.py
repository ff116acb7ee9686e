"""The trainer's parts on their own (train/loop.py: start, train, finish, validate, save), the values derived
in one place, and what a start must refuse (or warn about) before anything is written to --out: options that
would be accepted and then ignored, tracker settings the tracker refuses, paths no UTF-8 record can hold
(issue 26 items 9 and 10)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO, subprocess_env

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow  # a trainer process
def test_the_trainer_given_non_utf8_or_bad_wandb_exits_with_one_line(text_corpus, tmp_path):
    cases = [([b"--out", bytes(tmp_path / "run") + b"\xff"], {}, tmp_path.glob("run*")),
             ([b"--out", bytes(tmp_path / "w"), b"--report_to", b"wandb"], {"WANDB_MODE": "bogus"},
              tmp_path.glob("w*"))]
    for args, env, written in cases:
        proc = subprocess.run([sys.executable, "-m", "train", "--data", str(text_corpus), *args], cwd=REPO,
                              env=subprocess_env() | env, capture_output=True, timeout=300)
        stderr = proc.stderr.decode(errors="replace")
        assert proc.returncode != 0
        assert [line for line in stderr.splitlines() if line.startswith("error:")] != [], stderr
        assert "Traceback" not in stderr, stderr
        assert list(written) == []
