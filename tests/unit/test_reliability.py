"""What a run trusts is checked, and bad input stops with one `error:` line that names the file or field.

The corpus is hashed against its manifest at the start and recorded in every checkpoint, and a resume on
other data is refused; a damaged checkpoint (weights, train state, optimizer, carried state, random states)
is refused before anything is written, leaving the run directory byte for byte as it was. One tiny trained
run (tests/conftest.py `trained`) serves every case that needs one (marked slow): each works on a copy of it.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from tests.conftest import TRAIN
from tests.helpers import exits_with

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """train.loop.main and sharnn-eval build an Accelerator in-process; forget it after each test."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def train_main(argv: list[str]) -> int:
    """train.loop.main with the tiny run's flags (tests/conftest.py TRAIN) before `argv`."""
    from train.loop import main

    return main([*TRAIN, *argv])


def test_a_manifest_entry_without_n_bytes_is_named(text_corpus, tmp_path):
    corpus = Path(shutil.copytree(text_corpus, tmp_path / "corpus"))
    manifest = json.loads((corpus / "manifest.json").read_text())
    del manifest["splits"]["valid"]["n_bytes"]
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    message = exits_with(train_main, ["--data", str(corpus), "--out", str(tmp_path / "new")],
                         "manifest.json: the entry of split 'valid' has no valid n_bytes", "sharnn-prepare")
    assert "--skip_data_check" not in message  # offered only for splits whose bytes changed


def access_as_owner(path, mode, **kwargs) -> bool:
    """os.access as it answers an unprivileged user who owns `path`: by the owner's permission bits (root's
    answer ignores them, and the tests run as root in CI)."""
    bits = os.stat(path, follow_symlinks=kwargs.get("follow_symlinks", True)).st_mode
    wanted = {os.R_OK: stat.S_IRUSR, os.W_OK: stat.S_IWUSR, os.X_OK: stat.S_IXUSR}
    return all(bits & bit for flag, bit in wanted.items() if mode & flag)


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_an_out_that_cannot_be_written_is_refused_at_once(where, text_corpus, tmp_path, monkeypatch):
    target = tmp_path / "file"
    target.write_text("x")
    out = {"a file": target, "under a file": target / "run", "read-only": tmp_path / "ro" / "run"}[where]
    if where == "read-only":
        (tmp_path / "ro").mkdir(mode=0o555)
        monkeypatch.setattr(os, "access", access_as_owner)  # as root would be answered too on a read-only fs
    message = exits_with(train_main, ["--data", str(text_corpus), "--out", str(out)], f"--out {out}",
                         "cannot write the run there")
    if where == "read-only":
        assert f"directory {tmp_path / 'ro'} is not writable" in message
        assert list((tmp_path / "ro").iterdir()) == []


def test_init_from_a_file_that_is_not_safetensors(text_corpus, tmp_path):
    bogus = tmp_path / "random.safetensors"
    bogus.write_bytes(os.urandom(2048))
    exits_with(train_main, ["--data", str(text_corpus), "--out", str(tmp_path / "new"), "--init_from",
                            str(bogus)], f"cannot read the weights {bogus}", "not a safetensors file")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "nan", "must be a finite number >= 0, got nan"),
    ("--temperature", "inf", "must be a finite number >= 0, got inf"),
    ("--seed", str(2**70), "must be in [0, 2**64)"),
    ("--seed", "-1", "must be in [0, 2**64)"),
])
def test_generate_refuses_values_torch_cannot_use(random_model, flag, value, message, capsys):
    from sharnn.generate import main as generate

    with pytest.raises(SystemExit) as info:
        generate([str(random_model), flag, value, "--length", "1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument" in err and flag in err and message in err, err
