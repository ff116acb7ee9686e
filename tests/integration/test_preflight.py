"""Everything a run would fail on later is refused at the start, by the trainer's main, with one `error:`
line naming the field and its limit, before anything is written to --out (issue 18: "Fails late")."""

from __future__ import annotations

import pytest

from tests.helpers import run, train_cmd


@pytest.mark.slow  # a trainer process
def test_the_trainer_exits_nonzero_with_one_error_line_and_writes_nothing(text_corpus, tmp_path):
    out = tmp_path / "run"
    proc = run(train_cmd("--data", str(text_corpus), "--out", str(out), "--eval_streams", "25001"),
               check=False, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --data {text_corpus}: eval_streams 25001 is too many for the validation split "
                      f"of 50000 bytes: each stream needs at least 2 bytes, so eval_streams must be <= 25000"]
    assert "Traceback" not in proc.stderr
    assert not out.exists()
