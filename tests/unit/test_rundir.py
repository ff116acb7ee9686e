"""sharnn.io.rundir (the run directory and checkpoint layout, and resolving a path to a model) and
sharnn.io.atomic
(files and directories that appear complete or not at all), on directories built by hand."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sharnn.io import atomic, rundir
from sharnn.io.rundir import ModelError


def make_checkpoint(path: Path, step: int, complete: bool = True) -> Path:
    """A checkpoint directory as train/checkpoint.py leaves it (the files the layout names; fake contents)."""
    path.mkdir(parents=True)
    (path / rundir.WEIGHTS_NAME).write_bytes(b"weights")
    (path / rundir.CKPT_CONFIG_NAME).write_text("model: {}\n")
    (path / rundir.META_NAME).write_text(json.dumps({"format_version": rundir.FORMAT_VERSION}))
    if complete:
        (path / rundir.TRAIN_STATE_NAME).write_text(json.dumps({"step": step}))
    return path


@pytest.fixture
def run(tmp_path) -> Path:
    """A run with complete checkpoints at steps 5, 10 and 30 (the last under a name that says 99: the
    recorded step decides), a partial `.tmp-` checkpoint holding every file (it was being renamed), an
    incomplete step-00000040 without train_state.json, and best.json naming step 10."""
    run = tmp_path / "run"
    for step in (5, 10):
        make_checkpoint(rundir.checkpoint_dir(run, step), step)
    make_checkpoint(rundir.checkpoints_root(run) / "step-00000099", 30)
    make_checkpoint(rundir.tmp_checkpoint_dir(run, 50), 50)
    make_checkpoint(rundir.checkpoint_dir(run, 40), 40, complete=False)
    rundir.write_best(run, 10, 1.25)
    return run


# ------------------------------------------------------------------------------------------------ layout
def test_names():
    assert rundir.step_name(1200) == "step-00001200"
    assert rundir.checkpoint_dir("R", 1200) == Path("R/checkpoints/step-00001200")
    assert rundir.tmp_checkpoint_dir("R", 1200) == Path("R/checkpoints/.tmp-step-00001200")
    assert rundir.carry_name(3) == "carry_rank3.safetensors"


def test_complete_checkpoints_by_recorded_step_and_never_partial(run):
    root = rundir.checkpoints_root(run)
    listed = rundir.complete_checkpoints(run)
    assert [p.name for p in listed] == ["step-00000005", "step-00000010", "step-00000099"]
    assert [rundir.checkpoint_step(p) for p in listed] == [5, 10, 30]
    assert not rundir.is_complete(rundir.tmp_checkpoint_dir(run, 50))  # holds train_state.json, hidden name
    assert not rundir.is_complete(root / "step-00000040")
    assert rundir.latest_checkpoint(run) == root / "step-00000099"
    assert rundir.complete_checkpoints(run / "nothing") == [] and rundir.latest_checkpoint(run / "x") is None


def test_best_checkpoint_then_latest(run):
    root = rundir.checkpoints_root(run)
    assert json.loads((root / rundir.BEST_NAME).read_text()) == {"step": 10, "dir": "step-00000010",
                                                                 "val_bpc": 1.25}
    assert rundir.best_checkpoint(run) == rundir.run_checkpoint(run) == root / "step-00000010"
    (root / rundir.BEST_NAME).unlink()  # a run that never validated: its latest checkpoint
    assert rundir.best_checkpoint(run) is None and rundir.run_checkpoint(run) == root / "step-00000099"


@pytest.mark.parametrize("best_json, message", [
    ("{not json", "best.json is unreadable"),
    ('{"dir": "../../elsewhere"}', "best.json is unreadable"),
    (json.dumps({"step": 40, "dir": "step-00000040", "val_bpc": 1.0}), "names step-00000040, which is not a "
     "complete checkpoint"),
])
def test_an_unusable_best_json_is_an_error_not_the_latest_checkpoint(run, best_json, message):
    """Taking the latest checkpoint instead would silently give sharnn-eval/export/generate another model."""
    (rundir.checkpoints_root(run) / rundir.BEST_NAME).write_text(best_json)
    for resolve in (rundir.best_checkpoint, rundir.run_checkpoint, rundir.locate):
        with pytest.raises(ModelError, match=f"{message}.*give a checkpoint directory.*or delete best.json"):
            resolve(run)


def test_train_checkpoint_uses_the_layout(run):
    from train import checkpoint

    assert checkpoint.complete_checkpoints(run) == rundir.complete_checkpoints(run)
    assert checkpoint.best_checkpoint(run) == rundir.best_checkpoint(run)
    assert checkpoint.resolve_resume("auto", run) == rundir.latest_checkpoint(run)
    assert checkpoint.resolve_resume(str(run), run.parent / "other") == rundir.latest_checkpoint(run)
    with pytest.raises(SystemExit, match="checkpoint under its temporary name: it holds train_state.json"):
        checkpoint.weights_file(rundir.tmp_checkpoint_dir(run, 50))
    with pytest.raises(SystemExit, match=r"temporary name.*mv \S*\.tmp-step-00000050 \S*/step-00000050$"):
        checkpoint.resolve_resume(str(rundir.tmp_checkpoint_dir(run, 50)), run)
    (rundir.checkpoint_dir(run, 10) / rundir.TRAIN_STATE_NAME).write_text("garbage")
    with pytest.raises(SystemExit, match="^error: --resume auto: checkpoint .* cannot read the step from"):
        checkpoint.resolve_resume("auto", run)


# -------------------------------------------------------------------------------------------- resolution
def test_resolution_of_run_checkpoint_export_and_weights_file(run, tmp_path):
    best = rundir.checkpoint_dir(run, 10)
    assert rundir.locate(run) == rundir.Located("checkpoint", best)
    assert rundir.locate(rundir.checkpoint_dir(run, 5)).path == rundir.checkpoint_dir(run, 5)
    assert rundir.locate(best / rundir.WEIGHTS_NAME).path == best  # a file inside a checkpoint
    exported = tmp_path / "model"
    exported.mkdir()
    (exported / rundir.WEIGHTS_NAME).write_bytes(b"weights")
    (exported / rundir.EXPORT_CONFIG_NAME).write_text("{}")
    assert rundir.locate(exported) == rundir.Located("exported", exported)
    assert rundir.locate(exported / rundir.EXPORT_CONFIG_NAME).kind == "exported"
    bare = tmp_path / "w.safetensors"
    bare.write_bytes(b"weights")
    assert rundir.weights_path(bare) == bare
    assert rundir.weights_path(run) == best / rundir.WEIGHTS_NAME
    assert rundir.weights_path(best) == best / rundir.WEIGHTS_NAME
    assert rundir.weights_path(exported) == exported / rundir.WEIGHTS_NAME


@pytest.mark.parametrize("target, message", [
    (lambda run, tmp: rundir.tmp_checkpoint_dir(run, 50), "under its temporary name: it holds train_state"),
    (lambda run, tmp: rundir.checkpoint_dir(run, 40), "incomplete checkpoint"),
    (lambda run, tmp: rundir.checkpoints_root(run), "checkpoints folder"),
    (lambda run, tmp: tmp / "missing", "does not exist"),
    (lambda run, tmp: tmp, "is not a sharnn model"),
])
def test_resolution_errors_name_the_problem(run, tmp_path, target, message):
    with pytest.raises(ModelError, match=message):
        rundir.locate(target(run, tmp_path))


def test_a_run_without_a_complete_checkpoint(tmp_path):
    make_checkpoint(rundir.tmp_checkpoint_dir(tmp_path / "run", 5), 5)
    with pytest.raises(ModelError, match=r"no complete checkpoint yet \(only incomplete ones: .tmp-step-0"):
        rundir.locate(tmp_path / "run")
    bare = tmp_path / "w.safetensors"
    bare.write_bytes(b"")
    with pytest.raises(ModelError, match="bare weights file"):
        rundir.locate(bare)


# ---------------------------------------------------------------------------------------------- atomic
def test_atomic_file_writes(tmp_path):
    atomic.write_text(tmp_path / "a.txt", "one")
    atomic.write_json(tmp_path / "b.json", {"x": 1})
    atomic.write_bytes(tmp_path / "c.bin", b"\x00\xff")
    atomic.write_text(tmp_path / "a.txt", "two")  # replaces
    assert (tmp_path / "a.txt").read_text() == "two" and (tmp_path / "c.bin").read_bytes() == b"\x00\xff"
    assert (tmp_path / "b.json").read_text() == '{\n "x": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "c.bin"]


def test_atomic_file_write_failure_leaves_the_old_file_and_nothing_else(tmp_path, monkeypatch):
    atomic.write_text(tmp_path / "a.txt", "old")
    with pytest.raises(TypeError):
        atomic.write_json(tmp_path / "a.txt", {"x": object()})  # fails before writing

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic.write_text(tmp_path / "a.txt", "new")
    assert [(p.name, p.read_text()) for p in tmp_path.iterdir()] == [("a.txt", "old")]


def test_build_dir_replaces_only_when_complete(tmp_path):
    out = tmp_path / "new" / "parents" / "out"
    with pytest.raises(RuntimeError):
        with atomic.build_dir(out) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []  # no temporary directory, no parents created for it
    with atomic.build_dir(out) as tmp:
        (tmp / "first").write_text("1")
    assert [p.name for p in out.iterdir()] == ["first"]
    assert out.stat().st_mode & 0o777 == 0o777 & ~atomic.umask()  # as a plain mkdir, not mkdtemp's 0700
    with pytest.raises(KeyboardInterrupt):
        with atomic.build_dir(out) as tmp:
            (tmp / "second").write_text("2")
            raise KeyboardInterrupt
    assert [p.name for p in out.iterdir()] == ["first"]
    with atomic.build_dir(out) as tmp:
        (tmp / "second").write_text("2")
    assert [p.name for p in out.iterdir()] == ["second"]
    assert [p.name for p in out.parent.iterdir()] == ["out"]


def test_replace_dir_puts_the_old_directory_back_when_the_rename_fails(tmp_path, monkeypatch):
    out, new = tmp_path / "out", tmp_path / ".out.new"
    out.mkdir()
    (out / "old").write_text("old")
    new.mkdir()
    real_replace = os.replace

    def replace(src, dst):
        if Path(src) == new:
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        atomic.replace_dir(new, out)
    assert [p.name for p in out.iterdir()] == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.new", "out"]  # the caller removes its tmp


def test_staging_dir_keeps_nothing_unless_replaced(tmp_path):
    with atomic.staging_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
    assert list(tmp_path.iterdir()) == []


def test_apply_umask(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"")
    f.chmod(0o600)  # as safetensors writes it
    atomic.apply_umask(tmp_path)
    assert f.stat().st_mode & 0o777 == 0o666 & ~atomic.umask()
