"""Launching as users do (launch/, scripts/gpu_smoke.sh), for real on this CPU machine.

Two "nodes" on 127.0.0.1 (two `accelerate launch`, one process each) train as one job of world size 2 under
DDP and DeepSpeed, step for step like one process with the same global batch. launch/slurm.sh runs under a
fake SLURM (scontrol/srun written here; srun starts every node's task on this machine), launch/multinode.sh
over a fake ssh. Faults: a node that never joins, a rank killed mid-run, preemption with requeue and resume.
The accelerate configs for GPUs are loaded by accelerate's own loader and start the trainer's --dry-run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DistributedType

from tests import helpers
from tests.helpers import (
    REPO,
    assert_same_training,
    free_port,
    run,
    series,
    subprocess_env,
    train_cmd,
    wait_for_steps,
)
from train.config import parse_args

pytestmark = pytest.mark.slow

LAUNCH = REPO / "launch"
# Where each accelerate config is exercised: a new config fails test_every_config_is_exercised until it is
# added here and to a test.
EXERCISED = {
    "single_gpu.yaml": "test_gpu_configs_dry_run",
    "ddp.yaml": "test_gpu_configs_dry_run",
    "deepspeed.yaml": "test_gpu_configs_dry_run",
    "multinode_ddp.yaml": "test_two_nodes_ddp_match_one_process, test_slurm_*, test_missing_*, test_killed_*",
    "multinode_deepspeed.yaml": "test_two_nodes_deepspeed_over_multinode_sh_match_one_process",
    "cpu_ddp.yaml": "tests/integration/test_train.py",
    "cpu_deepspeed.yaml": "tests/integration/test_train.py",
}
# As tests/integration/test_train.py (helpers.EQUIV): dropout off, so that 2 ranks x 4 streams compute what 1
# process x 8 streams does (dropout masks are drawn per rank); state resets on; validation split across the
# ranks.
EQUIV = [*helpers.EQUIV, "--no_test_at_end"]


def launch_env(**extra: str) -> dict:
    """subprocess_env() with this interpreter's `accelerate` first on PATH, as in an activated venv."""
    env = subprocess_env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(extra)
    return env


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    """Start a process writing stdout and stderr to `log` (a file: no pipe fills up while we wait)."""
    with log.open("w") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        tail = log.read_text()[-4000:]
        raise AssertionError(f"{proc.args} still running after {timeout} s\n{tail}") from None
    return rc, log.read_text()


def kill_tree(pid: int) -> None:
    try:
        procs = [*psutil.Process(pid).children(recursive=True), psutil.Process(pid)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


# -------------------------------------------------------------------------------------- accelerate configs
YAMLS = sorted(p.name for p in LAUNCH.glob("*.yaml"))


def test_every_config_is_exercised():
    assert set(YAMLS) == set(EXERCISED), "add the new config to EXERCISED and to a test"


@pytest.mark.parametrize("name", YAMLS)
def test_config_loads_with_accelerates_loader(name):
    keys = yaml.safe_load((LAUNCH / name).read_text()).keys()
    cfg = load_config_from_file(str(LAUNCH / name))  # raises on unknown keys, as `accelerate launch` does
    assert isinstance(cfg, ClusterConfig)
    assert cfg.rdzv_backend == "static" and cfg.num_processes >= 1
    if cfg.distributed_type == DistributedType.DEEPSPEED:
        assert (REPO / cfg.deepspeed_config["deepspeed_config_file"]).is_file()
        # accelerate refuses mixed_precision beside a DeepSpeed config file; the trainer fills "auto" instead
        assert "mixed_precision" not in keys
        if cfg.num_machines > 1:  # torchrun on every node, no pdsh/ssh
            assert cfg.deepspeed_config["deepspeed_multinode_launcher"] == "standard"
    else:
        assert cfg.mixed_precision == "no"  # precision is the run's --precision


def test_gpu_configs_dry_run(tmp_path):
    """The GPU configs start the trainer (--dry-run of the paper preset) through the same launcher paths as
    on GPUs; without CUDA the trainer picks gloo on CPU. Not runnable here: NCCL, CUDA placement, bf16/fp16
    kernels (scripts/gpu_smoke.sh covers those on a GPU machine)."""
    gpu_or_cpu = r"(GPU|CPU)"
    cases = {  # name: launch args, train args, expected world line
        "single_gpu": ([], [], r"world size: 1 \(DistributedType.NO\)"),
        "ddp": (["--num_processes", "1"], [], rf"world size: 1 \(DistributedType.MULTI_{gpu_or_cpu}\)"),
        # the paper's LAMB under DeepSpeed in fp16 (bf16 is refused by the trainer, see deepspeed.yaml)
        "deepspeed": (["--num_processes", "1"], ["--precision", "fp16"],
                      r"world size: 1 \(DistributedType.DEEPSPEED\)"),
    }
    procs = {}
    for name, (launch, args, _) in cases.items():  # all at once: most of the time is start-up
        launch = ["--config_file", f"launch/{name}.yaml", *launch, "--main_process_port", str(free_port())]
        log = tmp_path / f"{name}.log"
        cmd = train_cmd("--preset", "paper", "--dry-run", *args, launch=launch)
        procs[name] = (start(cmd, launch_env(), log), log)
    for name, (proc, log) in procs.items():
        rc, out = finish(proc, log, timeout=240)
        assert rc == 0, out[-4000:]
        assert re.search(cases[name][2], out), (name, out[-3000:])
        assert "parameters: 53825792" in out


# ------------------------------------------------------------------------------ two nodes on one machine
def two_node_launch(config: str, rank: int, port: int) -> list[str]:
    return ["--config_file", str(LAUNCH / config), "--num_machines", "2", "--machine_rank", str(rank),
            "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]


@pytest.fixture(scope="module")
def single(text_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "lamb"
    # One thread: two OpenMP threads on a busy 2-core machine spin, several times slower.
    run(train_cmd("--preset", "tiny", *EQUIV, "--data", str(text_corpus), "--out", str(out),
                  "--batch_size", "8"))
    return out


def test_two_nodes_ddp_match_one_process(text_corpus, single, tmp_path):
    out, port = tmp_path / "ddp", free_port()
    args = ["--preset", "tiny", *EQUIV, "--data", str(text_corpus), "--out", str(out), "--batch_size", "4"]
    procs = [start(train_cmd(*args, launch=two_node_launch("multinode_ddp.yaml", r, port)), launch_env(),
                   tmp_path / f"node{r}.log") for r in (0, 1)]
    for r, proc in enumerate(procs):
        rc, log = finish(proc, tmp_path / f"node{r}.log", timeout=400)
        assert rc == 0, log[-6000:]
        assert "world size 2 (DistributedType.MULTI_CPU)" in log  # each node prints: each has a local main
    assert_same_training(single, out, test_bpc=False)


def test_two_nodes_deepspeed_over_multinode_sh_match_one_process(text_corpus, single, tmp_path):
    """launch/multinode.sh starts node.sh on each host through ssh; a fake ssh runs it on this machine."""
    fake_ssh = write_exe(tmp_path / "ssh", '#!/usr/bin/env bash\necho "$1" >>"$SSH_LOG"\nexec bash -c "$2"\n')
    out = tmp_path / "ds"
    env = launch_env(SSH=str(fake_ssh), SSH_LOG=str(tmp_path / "ssh.log"), NGPU="1", PRESET="tiny",
                     CONFIG="launch/multinode_deepspeed.yaml", DATA=str(text_corpus), OUT=str(out),
                     PORT=str(free_port()))
    cmd = ["bash", "launch/multinode.sh", "127.0.0.1", "localhost", "--", *EQUIV, "--batch_size", "4"]
    rc, log = finish(start(cmd, env, tmp_path / "multinode.log"), tmp_path / "multinode.log", timeout=400)
    assert rc == 0, log[-6000:]
    # both hosts started (in parallel)
    assert sorted((tmp_path / "ssh.log").read_text().split()) == ["127.0.0.1", "localhost"]
    for rank in (0, 1):  # each host's output, prefixed with its rank
        assert re.search(rf"^\[{rank}\] .*world size 2 \(DistributedType.DEEPSPEED\)", log, re.M), log[-3000:]
    assert_same_training(single, out, test_bpc=False)


def test_multinode_sh_prints_one_command_per_host(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# our cluster\nnode-a slots=4\n\nnode-b slots=4\nnode-c slots=4\n")
    proc = run(["bash", "launch/multinode.sh", "--print", "--hostfile", str(hostfile), "--", "--lr", "1e-3"])
    lines = [shlex.split(line) for line in proc.stdout.splitlines() if not line.startswith("#")]
    assert [line[line.index("--machine_rank") + 1] for line in lines] == ["0", "1", "2"]
    for rank, line in enumerate(lines):
        assert line == ["accelerate", "launch", "--config_file", "launch/multinode_ddp.yaml",
                        "--num_machines", "3", "--num_processes", "12", "--machine_rank", str(rank),
                        "--main_process_ip", "node-a", "--main_process_port", "29500", "--rdzv_conf",
                        "timeout=600", "-m", "train", "--preset", "paper", "--data", "data/enwik8", "--out",
                        "runs/paper", "--resume", "auto", "--lr", "1e-3"]
    no_ngpu = run(["bash", "launch/multinode.sh", "--print", "node-a"], check=False)  # and no nvidia-smi here
    assert no_ngpu.returncode != 0 and "NGPU" in no_ngpu.stderr


# ------------------------------------------------------------------------------------------------- SLURM
FAKE_SCONTROL = """#!/usr/bin/env bash
# fake scontrol: the allocation's host names; requeue requests are only logged
echo "scontrol $*" >>"$FAKE_SLURM_LOG"
case $1 in
    show) tr ' ' '\\n' <<<"$FAKE_HOSTS" ;;
    requeue) ;;
    *) exit 1 ;;
esac
"""
FAKE_SRUN = """#!/usr/bin/env bash
# fake srun: one task per node of the allocation, all at once, each with the variables SLURM gives a task
echo "srun $*" >>"$FAKE_SLURM_LOG"
while [[ $1 == -* ]]; do shift; done
read -r -a hosts <<<"$FAKE_HOSTS"
pids=()
for i in "${!hosts[@]}"; do
    SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 SLURMD_NODENAME=${hosts[i]} "$@" &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def fake_slurm(tmp_path: Path, hosts: list[str], nodelist: str, job_id: int, **extra: str) -> dict:
    """The environment of a batch script in a job of len(hosts) nodes, fake srun/scontrol first on PATH."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    write_exe(bin_dir / "scontrol", FAKE_SCONTROL)
    write_exe(bin_dir / "srun", FAKE_SRUN)
    env = launch_env(SLURM_JOB_ID=str(job_id), SLURM_JOB_NODELIST=nodelist, SLURM_NNODES=str(len(hosts)),
                     SLURM_SUBMIT_DIR=str(REPO), SLURM_RESTART_COUNT="0", FAKE_HOSTS=" ".join(hosts),
                     FAKE_SLURM_LOG=str(tmp_path / "slurm.log"), **extra)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def test_slurm_dry_run_4_nodes_x_8_gpus(tmp_path):
    hosts = ["gpu001", "gpu002", "gpu003", "gpu004"]
    env = fake_slurm(tmp_path, hosts, "gpu[001-004]", 4242, SLURM_GPUS_ON_NODE="8", SLURM_CPUS_ON_NODE="64",
                     MACHINE_RANK="3", DRY_RUN="1")  # a MACHINE_RANK of the caller's must not leak
    proc = subprocess.run(["bash", "launch/slurm.sh", "--lr_scaling", "sqrt"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    commands = sorted((shlex.split(line) for line in lines if line.startswith("accelerate ")),
                      key=lambda argv: int(argv[argv.index("--machine_rank") + 1]))
    assert len(commands) == 4, proc.stdout
    for rank, argv in enumerate(commands):  # each node's task printed its own command
        assert argv == ["accelerate", "launch", "--config_file", "launch/multinode_ddp.yaml",
                        "--num_machines", "4", "--num_processes", "32", "--machine_rank", str(rank),
                        "--main_process_ip", "gpu001", "--main_process_port", str(29500 + 4242 % 1000),
                        "--rdzv_conf", "timeout=600", "-m", "train", "--preset", "paper", "--data",
                        "data/enwik8", "--out", "runs/paper", "--resume", "auto", "--lr_scaling", "sqrt"]
        assert f"# machine_rank {rank} of 4 on {hosts[rank]}" in lines
    srun = (tmp_path / "slurm.log").read_text()
    assert "srun --nodes=4 --ntasks-per-node=1 --cpus-per-task=64 --kill-on-bad-exit=1 bash launch/node.sh " \
        "--lr_scaling sqrt" in srun

    # --gpus-per-node=h100:8 without SLURM_GPUS_ON_NODE; CONFIG, PORT and JOIN_TIMEOUT from the environment
    env = fake_slurm(tmp_path, hosts, "gpu[001-004]", 4242, SLURM_GPUS_PER_NODE="h100:8", DRY_RUN="1",
                     CONFIG="launch/multinode_deepspeed.yaml", PORT="29999", JOIN_TIMEOUT="120")
    out = subprocess.run(["bash", "launch/slurm.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60).stdout
    assert out.count("--config_file launch/multinode_deepspeed.yaml --num_machines 4 --num_processes 32") == 4
    assert out.count("--main_process_port 29999 --rdzv_conf timeout=120") == 4

    outside = subprocess.run(["bash", "launch/slurm.sh"], cwd=REPO, env=launch_env(), capture_output=True,
                             text=True, timeout=60)
    assert outside.returncode != 0 and "not inside a SLURM job" in outside.stderr


def test_slurm_preemption_checkpoints_requeues_and_resumes(text_corpus, tmp_path):
    """`--signal=B:TERM@120`: SIGTERM reaches the batch script only. Through the stop file, the training
    processes of rank 0's node get SIGTERM; every rank stops at the same step, checkpoints and exits 0; the
    script requeues the job, and the requeued job resumes (--resume auto) and finishes."""
    out = tmp_path / "run"
    args = ["--max_steps", "30", "--warmup_steps", "3", "--eval_every", "0", "--save_every", "0",
            "--log_every", "1", "--sample_bytes", "0", "--eval_max_segments", "5", "--no_test_at_end",
            "--batch_size", "4", "--bptt", "32"]
    env = fake_slurm(tmp_path, ["127.0.0.1", "127.0.0.1"], "fake[1-2]", 77, NGPU="1", PRESET="tiny",
                     DATA=str(text_corpus), OUT=str(out), PORT=str(free_port()), POLL_S="0.2")
    log = tmp_path / "job.log"
    job = start(["bash", "launch/slurm.sh", *args], env, log)
    wait_for_steps(out, [job], 3)
    job.send_signal(signal.SIGTERM)
    rc, text = finish(job, log, timeout=180)
    assert rc == 0, text[-6000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit"] == "stopped by SIGTERM" and summary["step"] < 30
    ckpt = out / "checkpoints" / f"step-{summary['step']:08d}"
    assert (ckpt / "carry_rank0.safetensors").exists() and (ckpt / "carry_rank1.safetensors").exists()
    assert "requeueing job 77" in text and "scontrol requeue 77" in (tmp_path / "slurm.log").read_text()
    assert not (out / ".stop-77").exists()

    env["SLURM_RESTART_COUNT"] = "1"  # the requeued job: same script, same arguments
    job = start(["bash", "launch/slurm.sh", *args], env, log)
    rc, text = finish(job, log, timeout=300)
    assert rc == 0, text[-6000:]
    assert f"at step {summary['step']}" in text and "resumed from" in text
    assert json.loads((out / "summary.json").read_text())["exit"] == "finished"
    assert sorted(series(out, "train/loss")) == list(range(1, 31))  # each step once: continued, not redone
    assert (tmp_path / "slurm.log").read_text().count("requeue") == 1


# ---------------------------------------------------------------------------------------------- faults
def test_missing_peer_fails_within_the_timeouts(text_corpus, tmp_path):
    """Two ways a peer goes missing, run at once. (a) Only machine rank 0 of 2 starts: its launcher gives up
    after JOIN_TIMEOUT (--rdzv_conf timeout) with torch's message, and node.sh says what it means. (b) Both
    launchers meet but node 1's training process fails at start-up: node 0's waits in init_process_group
    for --timeout_s, then fails. Neither waits forever."""
    env = launch_env(NNODES="2", NGPU="1", MAIN_ADDR="127.0.0.1", PRESET="tiny", DATA=str(text_corpus),
                     OUT=str(tmp_path / "r"))
    node = ["bash", "launch/node.sh"]
    alone = start(node, env | {"MACHINE_RANK": "0", "PORT": str(free_port()), "JOIN_TIMEOUT": "5"},
                  tmp_path / "alone.log")
    port = str(free_port())
    waiting = start([*node, "--timeout_s", "10"], env | {"MACHINE_RANK": "0", "PORT": port},
                    tmp_path / "waiting.log")
    failing = start([*node, "--batch_size", "0"], env | {"MACHINE_RANK": "1", "PORT": port},
                    tmp_path / "failing.log")
    t0 = time.time()
    rc, log = finish(alone, tmp_path / "alone.log", timeout=120)
    assert rc != 0 and time.time() - t0 < 60  # start-up plus 5 s, on a busy machine
    assert "1/2 clients joined" in log, log[-3000:]  # "Timed out after 6 seconds waiting for clients."
    assert "not every node joined within" in log and "JOIN_TIMEOUT=5s" in log

    rc, log = finish(failing, tmp_path / "failing.log", timeout=120)
    assert rc != 0 and "batch_size must be >= 1" in log
    rc, log = finish(waiting, tmp_path / "waiting.log", timeout=120)
    assert rc != 0 and time.time() - t0 < 80
    assert "wait timeout after 10000ms" in log, log[-3000:]


def test_killed_rank_ends_the_whole_job(text_corpus, tmp_path):
    """SIGKILL to the training process of node 1: both nodes' launchers exit non-zero within seconds, node 1
    naming the signal, node 0 the lost peer."""
    env = launch_env(NNODES="2", NGPU="1", MAIN_ADDR="127.0.0.1", PORT=str(free_port()), PRESET="tiny",
                     DATA=str(text_corpus), OUT=str(tmp_path / "r"))
    args = ["--max_steps", "100000", "--log_every", "1", "--eval_every", "0", "--save_every", "0",
            "--timeout_s", "60"]
    nodes = [start(["bash", "launch/node.sh", *args], env | {"MACHINE_RANK": str(r)}, tmp_path / f"n{r}.log")
             for r in (0, 1)]
    wait_for_steps(tmp_path / "r", nodes, 3)
    workers = [p for p in psutil.Process(nodes[1].pid).children(recursive=True)
               if "train" in p.cmdline() and "accelerate" not in " ".join(p.cmdline())]
    assert len(workers) == 1, [p.cmdline() for p in workers]
    workers[0].kill()
    t0 = time.time()
    (rc0, log0), (rc1, log1) = [finish(node, tmp_path / f"n{r}.log", timeout=120)
                                for r, node in enumerate(nodes)]
    assert time.time() - t0 < 60
    assert rc0 != 0 and rc1 != 0
    assert "Signal 9 (SIGKILL)" in log1, log1[-3000:]
    assert "Connection closed by peer" in log0, log0[-3000:]  # gloo; NCCL waits up to --timeout_s instead
    assert "accelerate launch exited" in log0 and "accelerate launch exited" in log1


# -------------------------------------------------------------------------------------- scripts as files
SCRIPTS = ["launch/node.sh", "launch/slurm.sh", "launch/multinode.sh", "scripts/gpu_smoke.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_valid_bash(script):
    assert os.access(REPO / script, os.X_OK)
    subprocess.run(["bash", "-n", script], cwd=REPO, check=True)
    if shutil.which("shellcheck"):  # not installed everywhere: `apt-get install shellcheck`
        proc = subprocess.run(["shellcheck", script], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


def test_gpu_smoke_fails_clearly_without_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    work = tmp_path / "smoke"
    proc = subprocess.run(["bash", "scripts/gpu_smoke.sh"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=launch_env(PYTHON=sys.executable, WORK=str(work)))
    assert proc.returncode != 0
    assert "needs a CUDA GPU" in proc.stderr and "Nothing was run" in proc.stderr, proc.stderr
    assert not work.exists()


def test_gpu_smoke_commands_parse():
    """The four cases' arguments are valid for the trainer (what a GPU machine runs)."""
    proc = subprocess.run(["bash", "scripts/gpu_smoke.sh"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=launch_env(DRY_RUN="1"))
    assert proc.returncode == 0, proc.stderr
    cases = {}
    for line in proc.stdout.splitlines():
        argv = shlex.split(line)
        config = argv[argv.index("--config_file") + 1]
        cfg, _ = parse_args(argv[argv.index("train") + 1:])
        cases[(config, cfg.precision)] = cfg
    configs, precisions = ("launch/ddp.yaml", "launch/deepspeed.yaml"), ("bf16", "fp16")
    assert set(cases) == {(c, p) for c in configs for p in precisions}
    assert cases[("launch/deepspeed.yaml", "bf16")].optimizer == "adamw"  # LAMB is refused there
    assert all(c.model.n_layer == 4 and c.batch_size == 16 and not c.test_at_end for c in cases.values())
