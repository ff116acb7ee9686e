"""sharnn-prepare: the corpus contract, the enwik8 split, files/demo sources, and every kind of bad input.

CLI tests call ``main([...])`` in-process; one test runs ``python -m sharnn.corpus.prepare`` for the exit
code.
Nothing here touches the internet: downloads go to a closed local port or a local HTTP server.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sharnn.corpus.data import read_manifest
from sharnn.corpus.prepare import (
    prepare_files,
)
from tests.helpers import REPO, random_bytes
from tests.unit.test_prepare import listing


@pytest.mark.slow  # a subprocess: the in-process test above checks the message, this its way to stderr
def test_files_skip_message_reaches_stderr_of_the_command(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_bytes(random_bytes(30_000))
    prepare_files([tmp_path / "d"], tmp_path / "d" / "c1")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "sharnn.corpus.prepare", "files", "d", "--out", "d/c2"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "skipped d/c1: a sharnn corpus (manifest.json), not text\n" in proc.stderr
    assert read_manifest(tmp_path / "d" / "c2")["total_bytes"] == 30_000


def test_python_dash_m_exit_code_and_message(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "sharnn.corpus.prepare", "files", str(tmp_path / "missing"), "--out",
               str(tmp_path / "c")]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: no such file or directory") and "Traceback" not in proc.stderr
    assert listing(tmp_path) == []
