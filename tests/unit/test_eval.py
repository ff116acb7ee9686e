"""sharnn-eval (train/eval_command.py) on the tiny trained run and its export (fixtures in tests/conftest.py):
one process and two give the run's own test bpc, several memory lengths, bad inputs."""

from __future__ import annotations

import pytest

from tests.helpers import exits_with

pytestmark = pytest.mark.usefixtures("one_thread")


def test_text_without_an_attention_report_is_refused(tmp_path):
    """`sharnn-eval MODEL --data CORPUS --text FILE` scored the corpus and ignored the text, exit 0 (issue 26
    item 9); now one line saying what --text is for and how to score a text."""
    from train.eval_command import main

    (tmp_path / "notes.txt").write_text("some text\n")
    exits_with(main, ["no-model", "--data", "no-corpus", "--text", str(tmp_path / "notes.txt")],
               "--text goes with --attention_report", "sharnn-prepare files")
