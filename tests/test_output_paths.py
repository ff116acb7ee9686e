"""Nothing of the user's is destroyed by an output path (issue 26): every command that writes to a path the
user names refuses what it did not write there itself (sharnn.io.atomic.check_output), reads only what it
uses,
bounds its size options by the memory they need, and meets a full disk with one line.

One test per command, each calling the real command (its `main` in-process, or a subprocess where it would
otherwise hang or allocate without bound). The full-disk and mount-point cases mount a small tmpfs: they need
root (CAP_SYS_ADMIN) and are skipped without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, exits_with, subprocess_env

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden ones included) with its bytes: what must survive a refusal."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def tmpfs(tmp_path):
    """A mount point (a tmpfs of a few MB) under tmp_path; the test is skipped where mounting is refused."""
    made = []

    def mount(size: str = "4m") -> Path:
        point = tmp_path / f"disk{len(made)}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
        made.append(point)
        return point

    yield mount
    for point in made:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """A tiny untrained model (d_model 16, memory 64) saved with save_model."""
    from sharnn import SHARNN, ModelConfig
    from sharnn.io.pretrained import save_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("small") / "model"
    save_model(SHARNN(ModelConfig(d_model=16, d_ff=64, n_layer=2, mem_len=64)), out)
    return out


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


def test_eval_reads_only_the_window_of_an_endless_input(small_model, tmp_path):
    """--text /dev/urandom read the whole input before keeping mem_len + bptt bytes (issue 26, item 4): a
    pipe that never ends (a FIFO whose writer stays open) must give a report from the bytes it needs; a
    --bptt whose attention cannot fit is one error line (item 5)."""
    fifo = tmp_path / "endless"
    os.mkfifo(fifo)
    stop = threading.Event()

    def writer():
        with open(fifo, "wb") as f:
            try:
                f.write(b"bytes from a pipe " * 1000)  # 18 kB: more than mem_len 64 + bptt 32
                f.flush()
                stop.wait(300)  # open until the reader is done: no end of input
            except BrokenPipeError:
                pass

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "train.eval_command", str(small_model), "--attention_report", str(out),
           "--text", str(fifo), "--bptt", "32"]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("sharnn-eval --text PIPE waited for the end of an endless input")
    finally:
        stop.set()
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "report.json").read_text())["segment_len"] == 32
    # a segment whose attention cannot fit (2 MB of text in one piece: 48 TB of scores): one line, at once
    text = tmp_path / "text.txt"
    text.write_bytes(b"text " * 400_000)
    limit = "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30)); "
    cmd = [sys.executable, "-c", limit + "sys.argv = sys.argv[1:]; runpy.run_module('train.eval_command', "
           "run_name='__main__')", "sharnn-eval", str(small_model), "--attention_report",
           str(tmp_path / "big"), "--text", str(text), "--bptt", "2000000"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.startswith("error: the attention report's window") and \
        "--bptt" in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr


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
    from tests.test_fidelity import FIXTURE

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


# ------------------------------------------------------------------------------------- sharnn-generate
def test_generate_bounds_its_size_options(small_model, tmp_path):
    """--prompt_chunk 100000 allocated 40 GB (issue 26, item 5): a chunk whose attention cannot fit is one
    error line, before anything is allocated; so are 10**8 streams (a random generator each: 2.7 kB); a
    memory longer than anything generation can hold (--mem_len 10**12) is not allocated; an endless
    --prompt_file is refused after its limit."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"a long prompt " * 80_000)  # 1.1 MB: in one piece, (T x T) scores of 4.5 TB

    def generate(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        # a limit on the address space: an unbounded allocation fails here instead of reaching the OOM killer
        limit = "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30)); "
        cmd = [sys.executable, "-c", limit + "sys.argv = sys.argv[1:]; runpy.run_module('sharnn.generate', "
               "run_name='__main__')", "sharnn-generate", str(small_model), *args]
        return subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, timeout=timeout)

    proc = generate("--prompt_file", str(prompt), "--prompt_chunk", "2000000", "--length", "4", "--seed", "1")
    stderr = proc.stderr.decode()
    assert proc.returncode != 0 and stderr.strip().count("\n") == 0, stderr
    assert stderr.startswith("error: --prompt_chunk 2000000") and "memory" in stderr, stderr

    proc = generate("--prompt", "hello", "--mem_len", str(10**12), "--length", "20", "--seed", "1")
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(proc.stdout) == 20
    same = generate("--prompt", "hello", "--length", "20", "--seed", "1")  # memory 64 > 5 + 20 positions
    assert same.stdout == proc.stdout

    proc = generate("--prompt", "hello", "--num_samples", str(10**8), "--length", "4", "--seed", "1")
    stderr = proc.stderr.decode()
    assert proc.returncode == 1 and stderr.startswith("error: --num_samples 100000000") and \
        stderr.strip().count("\n") == 0, stderr

    proc = generate("--prompt_file", "/dev/zero", "--length", "1", timeout=120)
    stderr = proc.stderr.decode()
    assert proc.returncode != 0 and stderr.startswith("error: --prompt_file /dev/zero") and \
        stderr.strip().count("\n") == 0, stderr


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

    from tests.test_bench_original import fake_checkouts

    main = importlib.import_module(module if module != "bench" else "bench.__main__").main
    fake_checkouts(tmp_path)  # bench.original checks its inputs first
    args = [a.format(tmp=tmp_path) for a in args]
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}\n')
    exits_with(main, [*args, "--json", str(notes)], "--json", "not a")
    (tmp_path / "a_dir").mkdir()
    exits_with(main, [*args, "--json", str(tmp_path / "a_dir")], "--json", "is a directory")
    assert notes.read_text() == '{"mine": true}\n'


# ------------------------------------------------------------------------------ the trainer's checkpoints
TINY = ["--preset", "tiny", "--max_steps", "4", "--warmup_steps", "1", "--eval_every", "2", "--save_every",
        "2", "--eval_max_segments", "2", "--sample_bytes", "0", "--log_every", "1", "--bptt", "32",
        "--test_streams", "2", "--model.d_model", "32", "--model.d_ff", "64", "--model.n_layer", "2",
        "--model.mem_len", "64"]
"""About 0.5 MB a checkpoint."""


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The run stopped with exit status 1 and exactly one 'error:' line, and no traceback."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


@pytest.mark.slow  # three short training runs
def test_a_full_disk_stops_training_cleanly_and_keeps_the_last_checkpoint(text_corpus, tmpfs):
    """A full disk while writing a checkpoint: a traceback and a `.tmp-step-*` left (issue 26, item 6). Now
    one line naming the disk and the space needed, nothing incomplete left, the last complete checkpoint
    intact and the run continues from it once there is space."""
    from tests.helpers import run, train_cmd

    small = tmpfs("256k")  # the run's records fit, its first checkpoint does not: it fails while writing
    proc = run(train_cmd(*TINY, "--data", str(text_corpus), "--out", str(small / "run")), check=False)
    line = one_error_line(proc)
    assert "no space left" in line and str(small) in line and "checkpoint step 2" in line, line
    assert "no checkpoint of this run is complete yet" in line, line
    assert not list((small / "run" / "checkpoints").iterdir())  # the incomplete checkpoint removed

    disk = tmpfs("800k")  # one checkpoint fits, a second does not: refused before writing it
    out = disk / "run"
    proc = run(train_cmd(*TINY, "--data", str(text_corpus), "--out", str(out)), check=False)
    line = one_error_line(proc)
    step2 = out / "checkpoints" / "step-00000002"
    assert "checkpoint step 4 needs" in line and f"the last complete checkpoint, {step2}, is intact" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.json", "step-00000002"]
    subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
    run(train_cmd(*TINY, "--data", str(text_corpus), "--out", str(out), "--resume", "auto"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 4 and summary["exit"] == "finished"
