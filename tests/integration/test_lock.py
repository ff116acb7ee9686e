"""One trainer per run directory (sharnn/io/runlock.py): two real trainers started together on one --out, a
second launch beside a running multi-rank launch, and a SIGKILLed trainer's run resumed (the OS freed its
lock)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import TRAIN
from tests.helpers import (
    DDP,
    REPO,
    free_port,
    metrics,
    run,
    subprocess_env,
    train_cmd,
    wait_for,
    wait_for_steps,
    workers_of,
)

pytestmark = pytest.mark.slow

LOCK = ".lock"  # sharnn.io.rundir.LOCK_NAME
REFUSED = "is in use by another trainer"


def start(cmd: list[str], threads: int = 1) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(threads), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_two_trainers_started_together_one_trains_one_is_refused(text_corpus, tmp_path):
    out = tmp_path / "run"
    args = [*TRAIN, "--max_steps", "30", "--data", str(text_corpus), "--out", str(out)]
    procs = {seed: start(train_cmd(*args, "--seed", str(seed))) for seed in (1, 2)}
    results = {seed: (*p.communicate(timeout=600), p.returncode) for seed, p in procs.items()}
    winners = [seed for seed, (_, _, rc) in results.items() if rc == 0]
    assert len(winners) == 1, {seed: (rc, err[-3000:]) for seed, (_, err, rc) in results.items()}
    (winner,), (loser,) = winners, set(procs) - set(winners)
    _, stderr, rc = results[loser]
    assert rc != 0 and "Traceback" not in stderr, stderr[-3000:]
    (line,) = error_lines(stderr)
    assert REFUSED in line and f"--out {out}" in line
    assert f"host {socket.gethostname()}, pid {procs[winner].pid}, started " in line, line
    # the run is the winner's alone: its config, each step logged once
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == winner
    steps = [m["step"] for m in metrics(out) if "train/loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 30
    # TensorBoard files by the winner only (events.out.tfevents.TIME.HOST.PID.N)
    assert {p.name.split(".")[-2] for p in (out / "tensorboard").rglob("events.out.tfevents.*")} == {
        str(procs[winner].pid)}
    assert json.loads((out / "summary.json").read_text())["step"] == 30
    assert not (out / LOCK).exists()  # released: removed at the end of the run


def test_the_lock_belongs_to_the_launch_not_to_each_rank(text_corpus, tmp_path):
    """A two-rank launch trains (rank 1 does not compete with rank 0 for the lock); a second launch on its
    --out is refused by its rank 0 naming the first launch's rank 0, and its other rank ends with it."""
    out = tmp_path / "run"
    args = [*TRAIN, "--max_steps", "100000", "--eval_every", "0", "--save_every", "0", "--log_every", "1",
            "--data", str(text_corpus), "--out", str(out)]
    first = start(train_cmd(*args, launch=DDP))
    try:
        wait_for_steps(out, [first], 2)
        holder = json.loads((out / LOCK).read_text())
        assert holder["pid"] in workers_of(first) and holder["host"] == socket.gethostname()
        t0 = time.time()
        second = run(train_cmd(*args, launch=DDP), check=False, timeout=300)
        assert second.returncode != 0 and time.time() - t0 < 120
        lines = [line for line in error_lines(second.stderr) if REFUSED in line]
        assert lines and f"pid {holder['pid']}," in lines[0], second.stderr[-3000:]
        assert first.poll() is None  # undisturbed
    finally:
        for pid in workers_of(first):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 0
    assert json.loads((out / "summary.json").read_text())["exit"] == "stopped by SIGTERM"
    steps = [m["step"] for m in metrics(out) if "train/loss" in m]
    assert steps == list(range(1, len(steps) + 1))  # one run's steps, once each


def test_sigkilled_trainer_leaves_its_lock_and_the_run_resumes(text_corpus, tmp_path):
    out = tmp_path / "run"
    args = [*TRAIN, "--max_steps", "100000", "--save_every", "3", "--eval_every", "0", "--log_every", "1",
            "--data", str(text_corpus), "--out", str(out)]
    proc = start(train_cmd(*args))
    wait_for(out / "checkpoints" / "step-00000003" / "train_state.json", [proc])
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    # the killed trainer's lock file is still there, naming it; the kernel released the lock itself
    assert json.loads((out / LOCK).read_text())["pid"] == proc.pid
    resumed = run(train_cmd(*[a if a != "100000" else "5" for a in args], "--resume", "auto"))
    assert "resumed from" in resumed.stdout
    assert json.loads((out / "summary.json").read_text())["step"] == 5
    assert not (out / LOCK).exists()


HOLD = """import sys, time
from sharnn.io.runlock import RunLock
with RunLock() as lock:
    lock.acquire(sys.argv[1])
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_refused_multi_node_launch_ends_on_every_node(text_corpus, tmp_path):
    """Two nodes (launch/node.sh on this machine) start a run whose --out another process holds: rank 0 is
    refused before the process group forms, and the other node's rank does not wait for --timeout_s."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=REPO, env=subprocess_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        env = subprocess_env() | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                                  "NNODES": "2", "NGPU": "1", "MAIN_ADDR": "127.0.0.1",
                                  "PORT": str(free_port()), "PRESET": "tiny", "DATA": str(text_corpus),
                                  "OUT": str(out)}
        t0 = time.time()
        cmd = ["bash", "launch/node.sh", "--timeout_s", "600", *TRAIN[2:]]  # TRAIN[:2]: --preset tiny
        paths = [tmp_path / f"node{r}.log" for r in (0, 1)]
        nodes = [subprocess.Popen(cmd, cwd=REPO, env=env | {"MACHINE_RANK": str(r)}, stdout=path.open("w"),
                                  stderr=subprocess.STDOUT) for r, path in enumerate(paths)]
        for node in nodes:
            node.wait(timeout=600)
        logs = [path.read_text() for path in paths]
        assert [node.returncode != 0 for node in nodes] == [True, True], logs[0][-3000:]
        assert time.time() - t0 < 300, "a node waited for the process group's timeout"
        refused = [line for line in error_lines(logs[0]) if REFUSED in line]
        assert refused and f"pid {holder.pid}," in refused[0], logs[0][-3000:]
        assert sorted(p.name for p in out.iterdir()) == [LOCK]  # nothing of the refused run was written
    finally:
        holder.kill()
        holder.wait()


FORK_AND_HOLD = """import os, sys, time
from sharnn.io.runlock import RunLock
lock = RunLock()
lock.acquire(sys.argv[1])
if os.fork() == 0:  # a child (a data worker, say) that outlives the trainer
    time.sleep(600)
    os._exit(0)
print("held", flush=True)
time.sleep(600)
"""


def test_a_killed_holder_frees_the_lock_even_when_its_child_lives_on(tmp_path):
    """SIGKILL to the holder: the kernel frees its flock, and the forked child it leaves behind does not keep
    it (the child closed its copy of the descriptor); the next trainer takes the lock over."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", FORK_AND_HOLD, str(out)], cwd=REPO, env=subprocess_env(),
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline() == "held\n"
        taker = subprocess.run([sys.executable, "-c", HOLD.replace("600", "0"), str(out)], cwd=REPO,
                               env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert taker.returncode != 0 and f"pid {holder.pid}," in taker.stderr  # held: refused
        holder.kill()
        holder.wait()
        assert json.loads((out / LOCK).read_text())["pid"] == holder.pid  # left behind, naming the dead
        taker = subprocess.run([sys.executable, "-c", HOLD.replace("600", "0"), str(out)], cwd=REPO,
                               env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert taker.returncode == 0 and taker.stdout == "held\n", taker.stderr
        assert not (out / LOCK).exists() and out.is_dir()  # the taker's release removed its lock file
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)  # the child too
