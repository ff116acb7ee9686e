"""Interrupted commands (sharnn/io/signals.py): Ctrl-C and SIGTERM end every console command with one line and
exit status 130 / 143, SIGTERM cleans up as Ctrl-C does, and temporaries left by a killed writer are swept
only when their writer is gone."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, slow_jsonl, subprocess_env

BIN = Path(sys.executable).parent


def one_error_line(stderr: str, *fragments: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("name", ["sharnn-prepare", "sharnn-eval", "sharnn-generate"])
def test_ctrl_c_while_a_command_imports_is_one_line(name):
    """Ctrl-C while the command imports torch (and then datasets, accelerate). Before, a 60-line traceback
    from inside the import."""
    proc = subprocess.Popen([str(BIN / name), "--help"], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.time() + 60
    while "libtorch" not in (maps.read_text() if maps.exists() else ""):  # torch is being imported
        assert proc.poll() is None and time.time() < deadline, "the command ended before it imported torch"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    one_error_line(stderr, "interrupted by SIGINT (Ctrl-C)")


def test_ctrl_c_while_sharnn_train_starts_is_one_line():
    """Ctrl-C in the first second: the trainer is still importing torch and accelerate."""
    proc = subprocess.Popen([str(BIN / "sharnn-train"), "--preset", "tiny"], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    one_error_line(stderr, "interrupted by SIGINT (Ctrl-C)")


def test_sigterm_during_prepare_hf_removes_its_temporary(tmp_path):
    """The issue's case: SIGTERM while `sharnn-prepare hf` writes left a hidden .OUT.tmp-* for ever."""
    data = slow_jsonl(tmp_path / "d.jsonl")
    out = tmp_path / "corpus"
    proc = subprocess.Popen([str(BIN / "sharnn-prepare"), "hf", "json", "--data_files", str(data), "--out",
                             str(out)], cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not any(p.name.startswith(".corpus.tmp") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.time() < deadline, "prepare ended before it wrote anything"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode in (130, 143), stderr[-3000:]
    one_error_line(stderr, "interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]  # no temporary, no half output


def test_sigterm_while_generate_reads_its_prompt_is_one_line(random_model, tmp_path):
    """SIGTERM after the imports, while sharnn-generate waits for its --prompt_file (a FIFO)."""
    fifo = tmp_path / "prompt"
    os.mkfifo(fifo)
    proc = subprocess.Popen([str(BIN / "sharnn-generate"), str(random_model), "--prompt_file", str(fifo),
                             "--seed", "0"], cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while True:  # a writer's non-blocking open succeeds once the reader has the FIFO open
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as e:
            assert e.errno == errno.ENXIO, e
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                stderr = proc.communicate()[1]
                raise AssertionError(f"sharnn-generate never opened its prompt: {stderr[-3000:]}")
            time.sleep(0.02)
    try:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        os.close(writer)
    assert proc.returncode == 143, stderr[-3000:]
    one_error_line(stderr, "interrupted by SIGTERM")


# ---------------------------------------------------------------------------------------- stale temporaries
def test_sweep_removes_only_temporaries_of_ended_writers(tmp_path):
    from sharnn.io import signals

    out = tmp_path / "corpus"
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale_dir = tmp_path / (signals.temporary_name(out, ended.pid) + "@abcd1234")
        stale_file = tmp_path / signals.temporary_name(out, ended.pid)
        live_dir = tmp_path / (signals.temporary_name(out, alive.pid) + "@abcd1234")
        mine = tmp_path / signals.temporary_name(out)
        other_host = tmp_path / f".corpus.tmp-{ended.pid}@another-machine.example@abcd1234"
        unnamed = tmp_path / ".corpus.tmp-k2j4h5l1"  # no writer in the name: never judged
        other_output = tmp_path / (signals.temporary_name(tmp_path / "other", ended.pid) + "@abcd1234")
        for d in (stale_dir, live_dir, other_host, unnamed, other_output):
            d.mkdir()
            (d / "_text-train.bin").write_bytes(b"x" * 1000)
        stale_file.write_bytes(b"{}")
        mine.write_bytes(b"{}")
        removed = signals.sweep_stale_temporaries(out)
        assert sorted(removed) == sorted([stale_dir, stale_file])
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            p.name for p in (live_dir, mine, other_host, unnamed, other_output))
    finally:
        alive.kill()
        alive.wait()


@pytest.mark.parametrize("name", ["sharnn-eval", "sharnn-train"])
def test_an_environment_variable_naming_no_setting_is_one_line(name, tmp_path):
    """$SHARNN_CPU_KERNELS=bogus: a ValueError traceback at import in every command (issue 26 item 11); now
    one error line at start (the trainer after its --cpu_kernels, which would replace it)."""
    env = subprocess_env() | {"SHARNN_CPU_KERNELS": "bogus"}
    args = ["--preset", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "run")] \
        if name == "sharnn-train" else [str(tmp_path / "no-model")]
    proc = subprocess.run([str(BIN / name), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    one_error_line(proc.stderr, "$SHARNN_CPU_KERNELS='bogus' names no setting")
