"""Nothing of the user's is destroyed by an output path: every command that writes to a path the
user names refuses what it did not write there itself (sharnn.io.atomic.check_output), reads only what it
uses, bounds its size options by the memory they need, and meets a full disk with one line.

One test per command, each calling the real command (its `main` in-process, or a subprocess where it would
otherwise hang or allocate without bound). The full-disk and mount-point cases mount a small tmpfs: they need
root (CAP_SYS_ADMIN) and are skipped without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import exits_with

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden ones included) with its bytes: what must survive a refusal."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------ the rule itself
def test_check_output_accepts_only_what_the_command_wrote(tmp_path):
    """sharnn.io.atomic.check_output: a new path, an empty directory or file and the command's own earlier
    output pass; anything else is refused with its reason."""
    from sharnn.io import atomic

    ours = atomic.json_with_keys("command")
    record, other, empty = tmp_path / "record.json", tmp_path / "other.json", tmp_path / "empty.json"
    record.write_text('{"command": "x"}')
    other.write_text('{"mine": 1}')
    empty.write_text("")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "link").symlink_to(record)
    for path, kind in ((tmp_path / "new" / "out.json", "file"), (record, "file"), (empty, "file"),
                       (tmp_path / "empty_dir", "dir"), (tmp_path / "new_dir", "dir")):
        assert atomic.check_output(path, "--out", kind=kind, is_ours=ours) == path
    refused = [(other, "file", "is not an output"), (tmp_path / "link", "file", "symbolic link"),
               (Path("/dev/null"), "file", "not a regular file"), (Path("/"), "dir", "root directory"),
               (tmp_path, "dir", "holds what is not"), (record, "dir", "is a file"),
               (tmp_path / "empty_dir", "file", "is a directory")]
    for path, kind, reason in refused:
        with pytest.raises(atomic.OutputRefused, match=reason):
            atomic.check_output(path, "--out", kind=kind, is_ours=ours)
    with pytest.raises(atomic.OutputRefused, match="pass --overwrite"):
        atomic.check_output(record, "--out", kind="file", is_ours=ours, overwrite=False)
    with pytest.raises(atomic.OutputRefused, match="lies inside the corpus"):
        atomic.check_output(tmp_path / "empty_dir" / "x.json", "--json", kind="file",
                            inputs=[("corpus", tmp_path / "empty_dir")])
    assert record.read_text() == '{"command": "x"}' and other.read_text() == '{"mine": 1}'


def test_writers_on_a_full_disk_raise_one_message_and_leave_nothing(tmpfs):
    """atomic.write_bytes, build_dir (what export, import and prepare write through) and safetensors inside
    it on a full disk: DiskFull naming the filesystem and the space, no temporary left."""
    from safetensors.torch import save_file

    from sharnn.io import atomic

    disk = tmpfs("256k")
    with pytest.raises(atomic.DiskFull, match=f"no space left on the disk holding {disk}.*needs 1.0 MB"):
        atomic.write_bytes(disk / "big.bin", bytes(1_000_000))
    with pytest.raises(atomic.DiskFull, match=r"mounted at .*needs more than the .* written before"):
        with atomic.build_dir(disk / "out") as tmp:
            (tmp / "big.bin").write_bytes(bytes(1_000_000))
    with pytest.raises(atomic.DiskFull, match="no space left"):
        with atomic.build_dir(disk / "weights") as tmp:
            save_file({"w": torch.zeros(250_000)}, tmp / "model.safetensors")
    assert list(disk.iterdir()) == []


# ----------------------------------------------------------------------------------------- sharnn-eval
def test_eval_refuses_every_output_it_did_not_write(random_model, text_corpus, tmp_path, monkeypatch,
                                                     tmpfs):
    """--attention_report replaced a file, a folder of notes, the model's own directory, the corpus, the
    current directory and a mount point (issue 26, item 1); --json wrote into the corpus. Each is refused
    with nothing touched; a previous report is replaced, a previous report with a note added is not."""
    from train.eval_command import main

    text = tmp_path / "text.txt"
    text.write_bytes(b"The single head reads the memory. " * 40)
    model = str(random_model)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me too")
    here = tmp_path / "here"
    here.mkdir()
    (here / "work.txt").write_text("the current directory's")
    mounted = tmpfs("1m")
    kept = {p: snapshot(p) for p in (notes, random_model, text_corpus, here, mounted)}
    kept_file = a_file.read_bytes()

    def report(out, *more) -> list[str]:
        return [model, "--attention_report", str(out), "--text", str(text), *more]

    exits_with(main, report(a_file), "--attention_report", "is a file")
    exits_with(main, report(notes), "already exists", "todo.txt")
    exits_with(main, report(random_model), "is the model")
    exits_with(main, report(random_model / "report"), "inside the model")
    exits_with(main, [model, "--attention_report", str(text_corpus), "--data", str(text_corpus)],
               "is the corpus")
    exits_with(main, [model, "--attention_report", str(text_corpus.parent), "--data", str(text_corpus)],
               "holds the corpus")
    exits_with(main, report(mounted), "mount point")
    monkeypatch.chdir(here)
    exits_with(main, report("."), "current directory")
    exits_with(main, report(here), "current directory")
    exits_with(main, report(here.parent), "holds the current directory")
    # --json: a file of the corpus, the corpus itself, a file that is not an evaluation record
    scores = [model, "--data", str(text_corpus), "--max_segments", "1", "--streams", "2"]
    exits_with(main, [*scores, "--json", str(text_corpus / "manifest.json")], "--json", "inside the corpus")
    exits_with(main, [*scores, "--json", str(a_file)], "--json", "not a", "evaluation")
    assert {p: snapshot(p) for p in kept} == kept and a_file.read_bytes() == kept_file
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries, no .old-*

    out = tmp_path / "report"
    assert main(report(out)) == 0
    first = json.loads((out / "report.json").read_text())
    assert first["format"] == "sharnn-attention-report"
    assert main(report(out, "--bptt", "32")) == 0  # its own earlier report: replaced as a whole
    assert json.loads((out / "report.json").read_text())["segment_len"] == 32
    (out / "mine.txt").write_text("a note")
    exits_with(main, report(out), "already exists", "mine.txt")
    assert (out / "mine.txt").read_text() == "a note"


# --------------------------------------------------------------------------------------- sharnn-export
def test_export_refuses_the_current_directory_a_mount_point_and_its_input(random_model, tmp_path,
                                                                          monkeypatch, tmpfs):
    """`--out .` in an empty current directory and `--out MOUNT` ended in a traceback from the rename (or
    replaced the directory); an --out inside the model's directory mixed the export into it."""
    from train.export import main

    here = tmp_path / "here"
    here.mkdir()
    mounted = tmpfs("1m")
    before = snapshot(random_model)
    monkeypatch.chdir(here)
    exits_with(main, [str(random_model), "--out", "."], "--out", "current directory")
    exits_with(main, [str(random_model), "--out", str(mounted)], "--out", "mount point")
    exits_with(main, [str(random_model), "--out", str(random_model / "again")], "--out", "inside the model")
    exits_with(main, [str(random_model), "--out", str(random_model), "--overwrite"], "--out", "is the model")
    assert snapshot(random_model) == before and not list(here.iterdir()) and not list(mounted.iterdir())
    out = tmp_path / "exported"
    assert main([str(random_model), "--out", str(out)]) == 0
    exits_with(main, [str(random_model), "--out", str(out)], "--overwrite")
    assert main([str(random_model), "--out", str(out), "--overwrite"]) == 0  # an export: replaced


def test_export_on_a_full_disk_says_so_and_leaves_nothing(random_model, tmpfs, capsys):
    """A full disk: a SafetensorError traceback, a half-written temporary left (issue 26, item 6). Now one
    line naming the disk and the space needed, and nothing left on it."""
    from train.export import main

    disk = tmpfs("1m")  # the model's weights are about 3 MB
    message = exits_with(main, [str(random_model), "--out", str(disk / "model")], "no space left",
                         str(disk), "needs")
    assert "\n" not in message
    assert list(disk.iterdir()) == []


# --------------------------------------------------------------------------------------- sharnn-import
def test_import_refuses_the_current_directory_and_a_mount_point(tmp_path, monkeypatch, tmpfs):
    """sharnn-import --out has the same rule as sharnn-export."""
    from sharnn.convert import main
    from tests.unit.test_fidelity import FIXTURE

    ref = [str(FIXTURE), "--prefix", "penultimate.weights.", "--mem_len", "40"]
    here = tmp_path / "here"
    here.mkdir()
    mounted = tmpfs("1m")
    monkeypatch.chdir(here)
    exits_with(main, [*ref, "--out", "."], "--out", "current directory")
    exits_with(main, [*ref, "--out", str(mounted)], "--out", "mount point")
    assert not list(here.iterdir()) and not list(mounted.iterdir())
    assert main([*ref, "--out", str(tmp_path / "imported")]) == 0


# -------------------------------------------------------------------------------------- sharnn-prepare
@pytest.mark.parametrize("where", ["current directory", "mount point"])
def test_prepare_refuses_the_current_directory_and_a_mount_point(where, tmp_path, monkeypatch, tmpfs, capsys):
    """`sharnn-prepare files X --out .` (an empty current directory) or --out MOUNT: a traceback from the
    rename and a `.old-*` folder left (issue 26, item 1)."""
    from sharnn.corpus.prepare import main

    src = tmp_path / "text.txt"
    src.write_bytes(b"some text to prepare\n" * 5000)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    out = "." if where == "current directory" else str(tmpfs("4m"))
    assert main(["files", str(src), "--out", out]) == 1  # sharnn-prepare's errors: one line, exit 1
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and where in err and err.count("\n") == 1, err
    assert not list(Path(out).iterdir())


# --------------------------------------------------------------------------------------------- bench
BENCH = [("bench", ["--scenario", "no-such-scenario"]),
         ("bench.loader", ["--size_gb", "0.0001", "--compare_gb", "0", "--max_seconds", "1"]),
         ("bench.quality", ["--data", "no-such-corpus"]),
         ("bench.recipe", ["--data", "no-such-corpus"]),
         ("bench.scaling", ["--data", "no-such-corpus"]),
         ("bench.original", ["--original", "{tmp}/sha-rnn", "--lamb", "{tmp}/pytorch-lamb"])]


@pytest.mark.parametrize(("module", "args"), BENCH, ids=[m for m, _ in BENCH])
def test_bench_json_refuses_what_it_did_not_write(module, args, tmp_path):
    """Every bench command's --json replaced any file at the path at its end (after minutes or hours of
    measuring): now a file that is not that command's record is refused before any work."""
    import importlib

    from tests.unit.test_bench_original import fake_checkouts

    main = importlib.import_module(module if module != "bench" else "bench.__main__").main
    fake_checkouts(tmp_path)  # bench.original checks its inputs first
    args = [a.format(tmp=tmp_path) for a in args]
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}\n')
    exits_with(main, [*args, "--json", str(notes)], "--json", "not a")
    (tmp_path / "a_dir").mkdir()
    exits_with(main, [*args, "--json", str(tmp_path / "a_dir")], "--json", "is a directory")
    assert notes.read_text() == '{"mine": true}\n'
"""About 0.5 MB a checkpoint."""
