"""What every command's command line shares: bad input exits non-zero without a traceback, console scripts
point at the entry points, counts are checked, and the old and canonical option spellings parse the same."""

from __future__ import annotations

import sys

import pytest

from tests.helpers import cli, run, sharnn_only


@pytest.mark.slow
def test_bad_input_exits_nonzero_without_traceback(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    for cmd, fragment in [
            (cli("sharnn.convert", str(tmp_path / "garbage.pt"), "--out", str(tmp_path / "m")),
             "cannot read"),
            (cli("sharnn.generate", str(tmp_path)), "is not a sharnn model")]:
        proc = run([sys.executable, "-X", "importtime", *cmd[1:]], check=False)
        assert proc.returncode == 1 and fragment in proc.stderr, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr
        sharnn_only(proc.stderr)
    assert not (tmp_path / "m").exists()
