"""Nothing of the user's is destroyed by an output path, in subprocesses: reading only the window of an
endless input, size options bounded by the memory they need (under an address-space limit), and a full disk
during training (a small tmpfs: needs root, CAP_SYS_ADMIN, else skipped). The in-process cases of every
command: tests/unit/test_output_paths.py.
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

from tests.helpers import REPO, subprocess_env, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """A tiny untrained model (d_model 16, memory 64) saved with save_model."""
    from sharnn import SHARNN
    from sharnn.io.pretrained import save_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("small") / "model"
    save_model(SHARNN(tiny_config(d_ff=64, mem_len=64)), out)
    return out


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

    # the second case, started first to run beside the first: a segment whose attention cannot fit (2 MB of
    # text in one piece: 48 TB of scores) is one line, at once
    text = tmp_path / "text.txt"
    text.write_bytes(b"text " * 400_000)
    limit = "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30)); "
    cmd = [sys.executable, "-c", limit + "sys.argv = sys.argv[1:]; runpy.run_module('train.eval_command', "
           "run_name='__main__')", "sharnn-eval", str(small_model), "--attention_report",
           str(tmp_path / "big"), "--text", str(text), "--bptt", "2000000"]
    big = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
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
    try:
        _, stderr = big.communicate(timeout=300)
    finally:
        if big.poll() is None:
            big.kill()
            big.communicate()
    assert big.returncode == 1 and stderr.startswith("error: the attention report's window") and \
        "--bptt" in stderr and stderr.strip().count("\n") == 0, stderr


# ------------------------------------------------------------------------------------- sharnn-generate
def test_generate_bounds_its_size_options(small_model, tmp_path):
    """--prompt_chunk 100000 allocated 40 GB (issue 26, item 5): a chunk whose attention cannot fit is one
    error line, before anything is allocated; so are 10**8 streams (a random generator each: 2.7 kB); a
    memory longer than anything generation can hold (--mem_len 10**12) is not allocated; an endless
    --prompt_file is refused after its limit."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"a long prompt " * 80_000)  # 1.1 MB: in one piece, (T x T) scores of 4.5 TB

    def generate(*args: str) -> subprocess.Popen:
        # a limit on the address space: an unbounded allocation fails here instead of reaching the OOM killer
        limit = "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30)); "
        cmd = [sys.executable, "-c", limit + "sys.argv = sys.argv[1:]; runpy.run_module('sharnn.generate', "
               "run_name='__main__')", "sharnn-generate", str(small_model), *args]
        return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)

    def finished(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
        stdout, stderr = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    # all five started at once (importing torch is most of each one's time), then each checked
    started = [generate("--prompt_file", str(prompt), "--prompt_chunk", "2000000", "--length", "4", "--seed",
                        "1"),
               generate("--prompt", "hello", "--mem_len", str(10**12), "--length", "20", "--seed", "1"),
               generate("--prompt", "hello", "--length", "20", "--seed", "1"),  # memory 64 > 5 + 20 positions
               generate("--prompt", "hello", "--num_samples", str(10**8), "--length", "4", "--seed", "1"),
               generate("--prompt_file", "/dev/zero", "--length", "1")]
    try:
        chunk, long_memory, same, streams = [finished(proc) for proc in started[:4]]
        endless = finished(started[4], timeout=120)
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()

    stderr = chunk.stderr.decode()
    assert chunk.returncode != 0 and stderr.strip().count("\n") == 0, stderr
    assert stderr.startswith("error: --prompt_chunk 2000000") and "memory" in stderr, stderr

    assert long_memory.returncode == 0, long_memory.stderr.decode()
    assert len(long_memory.stdout) == 20
    assert same.stdout == long_memory.stdout

    stderr = streams.stderr.decode()
    assert streams.returncode == 1 and stderr.startswith("error: --num_samples 100000000") and \
        stderr.strip().count("\n") == 0, stderr

    stderr = endless.stderr.decode()
    assert endless.returncode != 0 and stderr.startswith("error: --prompt_file /dev/zero") and \
        stderr.strip().count("\n") == 0, stderr


# ------------------------------------------------------------------------------ the trainer's checkpoints
TINY = ["--preset", "tiny", "--max_steps", "4", "--warmup_steps", "1", "--eval_every", "2", "--save_every",
        "2", "--eval_max_segments", "2", "--sample_bytes", "0", "--log_every", "1", "--bptt", "32",
        "--test_streams", "2", "--model.d_model", "32", "--model.d_ff", "64", "--model.n_layer", "2",
        "--model.mem_len", "64"]


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
