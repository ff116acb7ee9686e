"""Watching a run: the step total and ETA of epoch-bounded runs, plain progress lines in a log file, MFU from
the FLOP formula and the device peak, the trackers (TensorBoard read back with its own reader, W&B offline
files read back record by record), a resumed run continuing its W&B run, and a torch.profiler trace."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sharnn.config import ModelConfig
from sharnn.corpus.data import StreamLoader, open_split
from train.config import preset
from train.flops import GPU_PEAKS, device_peak_flops, gpu_peak
from train.loop import finished
from train.progress import Progress, duration, estimate_total_steps, expected_segment_len

T = 1e12


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    """About 40 KB of training text: 8 streams of ~5 KB, a few dozen segments per epoch."""
    from sharnn.corpus.prepare import prepare_files

    root = tmp_path_factory.mktemp("watch")
    src = root / "text.txt"
    text = b"".join(p.read_bytes() for p in sorted((Path(json.__file__).parent).glob("*.py")))
    src.write_bytes((text * 4)[:48_000])
    prepare_files([src], root / "corpus", valid_bytes=4_000, test_bytes=4_000)
    return root / "corpus"


# ------------------------------------------------------------------------------------------- step totals
def steps_until_finished(loader: StreamLoader, epochs: float, grad_accum: int = 1) -> int:
    """Run the loader as train.loop does (its own `finished`) and count the optimizer steps."""
    ts, cfg, steps = SimpleNamespace(step=0), SimpleNamespace(max_steps=None, epochs=epochs), 0
    while not finished(cfg, ts, loader):
        for _ in range(grad_accum):
            next(loader)
        ts.step = steps = steps + 1
    return steps


@pytest.mark.parametrize("epochs", [1, 0.4, 2.5])
def test_total_is_exact_for_fixed_segments(small_corpus, epochs):
    split = open_split(small_corpus, "train")
    loader = StreamLoader(split, 8, 64, 0, 1, seed=3, vary_bptt=False)
    mean = expected_segment_len(loader)
    want = steps_until_finished(StreamLoader(split, 8, 64, 0, 1, seed=3, vary_bptt=False), epochs)
    assert estimate_total_steps(0, loader, epochs, None, mean) == want
    assert estimate_total_steps(0, loader, epochs, want - 3, mean) == want - 3  # max_steps bounds it
    for _ in range(want // 2):  # and from any point of the run, as on resume
        next(loader)
    assert estimate_total_steps(want // 2, loader, epochs, None, mean) == want


def test_total_for_random_segments_and_accumulation(small_corpus):
    """With --vary_bptt the count depends on the draws: the estimate is within 5%, and tends to exact as
    the run goes (the rest is estimated from the loader's actual position)."""
    split = open_split(small_corpus, "train")
    make = lambda: StreamLoader(split, 4, 32, 0, 1, seed=11, vary_bptt=True)  # noqa: E731
    for grad_accum in (1, 2):
        want = steps_until_finished(make(), 3, grad_accum)
        loader = make()
        guess = estimate_total_steps(0, loader, 3, None, expected_segment_len(loader), grad_accum)
        assert abs(guess - want) <= 0.05 * want, (guess, want)
        for _ in range((want - 2) * grad_accum):
            next(loader)
        late = estimate_total_steps(want - 2, loader, 3, None, expected_segment_len(loader), grad_accum)
        assert abs(late - want) <= 1


def test_progress_lines_without_a_terminal(small_corpus, capsys):
    split = open_split(small_corpus, "train")
    loader = StreamLoader(split, 8, 64, 0, 1, seed=3, vary_bptt=False)
    progress = Progress(loader, 1, None, 1, start_step=0, enabled=True, interval_s=1e-9, is_terminal=False)
    total = progress.total
    metrics = {"train/loss": 1.2345, "train/bpc": 1.781, "perf/bytes_per_s": 3400.0,
               "perf/flops_per_s": 2.5e9, "perf/mfu": 0.121}
    for step in (1, 2):
        next(loader)
        time.sleep(0.01)
        progress.update(step, 64, metrics if step == 2 else None)
    progress.close(finished=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"step 1/{total} ({1 / total:.1%}) epoch 0.")
    assert lines[1] == lines[-1]  # the closing line is not printed twice
    assert re.fullmatch(rf"step 2/{total} \(\d+\.\d%\) epoch 0\.\d\d/1 loss 1\.234 bpc 1\.781 3\.4 kB/s "
                        r"2\.5 GFLOP/s MFU 12\.1% ETA \d+s", lines[1]), lines[1]
    assert duration(3 * 3600 + 12 * 60 + 7) == "3h12m" and duration(65) == "1m05s"


def test_progress_bar_on_a_terminal_starts_where_the_run_is(small_corpus, capsys):
    split = open_split(small_corpus, "train")
    loader = StreamLoader(split, 8, 64, 0, 1, seed=3, vary_bptt=False)
    for _ in range(5):  # a resumed run: 5 steps done
        next(loader)
    progress = Progress(loader, 1, None, 1, start_step=5, enabled=True, interval_s=60, is_terminal=True)
    total = progress.total
    next(loader)
    progress.update(6, 64, {"train/loss": 1.0, "train/bpc": 1.44})
    progress.close(finished=False)
    captured = capsys.readouterr()
    assert captured.out == ""  # no plain lines on a terminal: tqdm's bar, on stderr
    assert f"6/{total}" in captured.err and "loss 1.000 bpc 1.440" in captured.err


# ------------------------------------------------------------------------------------------- peak FLOP/s
@pytest.mark.parametrize("name, precision, want", [
    ("NVIDIA A100-SXM4-80GB", "bf16", 312 * T),
    ("NVIDIA A100 80GB PCIe", "fp32", 19.5 * T),
    ("NVIDIA A10", "fp16", 125 * T),
    ("NVIDIA H100 80GB HBM3", "bf16", 989.5 * T),
    ("NVIDIA H100 PCIe", "bf16", 756.5 * T),
    ("NVIDIA H200", "fp16", 989.5 * T),
    ("NVIDIA L4", "bf16", 121 * T),
    ("Tesla V100-SXM2-16GB", "fp16", 125 * T),
    ("Tesla V100-PCIE-32GB", "fp32", 14 * T),
    ("NVIDIA GeForce RTX 4090", "bf16", 165.2 * T),
])
def test_gpu_peak_from_the_device_name(monkeypatch, name, precision, want):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert not torch.backends.cuda.matmul.allow_tf32  # torch's default: the fp32 row is the CUDA cores'
    peak, source = device_peak_flops(torch.device("cuda"), precision)
    assert peak == pytest.approx(want) and "datasheet" in source


def test_gpu_peak_tf32_and_gaps():
    assert gpu_peak("NVIDIA A100-SXM4-40GB", "fp32", tf32=True)[0] == 156 * T
    assert gpu_peak("Tesla V100-SXM2-32GB", "bf16") is None  # no bf16 units: measured instead
    assert gpu_peak("Some Future GPU", "bf16") is None
    assert all(p.fp32 < p.fp16 for _, p in GPU_PEAKS)


def test_cpu_peak_is_measured_quickly_and_leaves_the_seeded_draws_alone():
    torch.manual_seed(1)
    want = torch.rand(4)
    torch.manual_seed(1)
    start = time.perf_counter()
    peak, source = device_peak_flops(torch.device("cpu"), "fp32")
    assert time.perf_counter() - start < 3 and peak > 1e8 and source.startswith("measured")
    assert torch.equal(torch.rand(4), want)  # resumed runs restore the RNG before it: bitwise resume holds
    assert device_peak_flops(torch.device("cpu"), "fp32", override=5e11) == (5e11, "--peak_flops")


# --------------------------------------------------------------------------------------- W&B's own files
def wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file: W&B's LevelDB-log format (a 7-byte header, then 32 KiB blocks
    of chunks, each crc32, length, type: full / first / middle / last), read as wandb-core writes it."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        if kind == 0 and length == 0:
            break
        pending += chunk
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(run_file: Path) -> tuple[str, dict[int, dict]]:
    """(run id, {step: {key: value}}) from a .wandb file."""
    run_id, history = None, {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(record.history.step.num, {}).update(items)
    return run_id, history


# ------------------------------------------------------------------------------------------ a real run
PEAK = 4e10
"""The run's --peak_flops (FLOP/s), a round figure instead of the peak it would measure on this CPU."""


def counted_step_flops(model: ModelConfig, corpus: Path, bptt: int, batch_size: int) -> int:
    """FLOPs of one training step as the trainer takes it (train.step.train_step: forward, backward,
    clipping, LAMB), with the memory full, counted by torch's FlopCounterMode. Its LSTMs run decomposed into
    their matrix products (tests/test_flops.py's MatmulLSTM: the counter does not see nn.LSTM's kernel)."""
    from accelerate import Accelerator
    from torch.utils.flop_counter import FlopCounterMode

    from sharnn import SHARNN
    from sharnn.state import CarryState
    from tests.test_flops import MatmulLSTM
    from train.build import build_optimizer
    from train.step import train_step

    cfg = dataclasses.replace(preset("tiny"), model=model, bptt=bptt, batch_size=batch_size, vary_bptt=False)
    torch.manual_seed(0)
    net = SHARNN(model)
    for block in net.blocks:
        block.lstm = MatmulLSTM(block.lstm)
    accelerator = Accelerator(cpu=True)
    net, optimizer = accelerator.prepare(net, build_optimizer(net, cfg, 1e-3))
    loader = StreamLoader(open_split(corpus, "train"), batch_size, bptt, 0, 1, seed=0, vary_bptt=False)
    _, carry = train_step(accelerator, net, optimizer, loader, CarryState.empty(model.n_layer), cfg, step=1)
    with FlopCounterMode(display=False) as counter:
        train_step(accelerator, net, optimizer, loader, carry, cfg, step=2)
    return counter.get_total_flops()


# step 1's line may end after the epoch: nothing logged yet, and no ETA before a second step has ended
LINE = re.compile(r"step (\d+)/(\d+) \((\d+\.\d)%\) epoch (\d+\.\d\d)/([\d.]+) ?(.*)")


def progress_lines(stdout: str) -> list[tuple[int, int, str]]:
    return [(int(m[1]), int(m[2]), m[6]) for m in map(LINE.fullmatch, stdout.splitlines()) if m]


@pytest.mark.slow
def test_watched_run_and_its_resume(small_corpus, tmp_path, fresh_accelerate_state):
    """An epoch-bounded run with stdout in a file, --report_to tensorboard,wandb (offline: no API key here),
    a profile of steps 2-3; then resumed to a longer run that continues the same W&B run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.helpers import REPO, subprocess_env

    out, env = tmp_path / "run", subprocess_env()
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT"):
        env.pop(name, None)
    env["HOME"] = str(tmp_path)  # no ~/.netrc: no W&B login, so offline
    common = ["--preset", "tiny", "--data", str(small_corpus), "--out", str(out), "--max_steps", "None",
              "--no_vary_bptt", "--bptt", "64", "--batch_size", "8", "--model.d_model", "32",
              "--model.d_ff", "64", "--model.mem_len", "64", "--warmup_steps", "2", "--log_every", "2",
              "--eval_every", "0", "--eval_max_segments", "2", "--sample_bytes", "16", "--no_test_at_end",
              "--save_every", "0", "--report_to", "tensorboard,wandb", "--progress_interval_s", "1e-9",
              "--peak_flops", str(PEAK)]

    def train(*args: str) -> str:
        log = tmp_path / "stdout.txt"
        with open(log, "w") as stdout:  # not a terminal: plain lines
            proc = subprocess.run([sys.executable, "-m", "train", *common, *args], cwd=REPO, env=env,
                                  stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return log.read_text()

    stream_len = len(open_split(small_corpus, "train")) // 8
    first_total = math.ceil(0.5 * stream_len / 64)  # the cursor passes half the streams
    stdout = train("--epochs", "0.5", "--profile_steps", "2:3")
    lines = progress_lines(stdout)
    assert [step for step, _, _ in lines] == list(range(1, first_total + 1))
    assert {total for _, total, _ in lines} == {first_total}  # known from the start: no max_steps given
    assert re.fullmatch(r"loss \d\.\d{3} bpc \d\.\d{3} [\d.]+ k?B/s [\d.]+ [MG]FLOP/s MFU [\d.]+% ETA \d+s",
                        lines[-1][2]), lines[-1]

    # MFU against a count of its own: FlopCounterMode over one step of train_step at the logged segment
    # length, steps per second as logged, over the peak given with --peak_flops (which the run says it uses).
    # The formula leaves out the value gate's once-per-call product and counts a gradient for the carried
    # LSTM state: 0.11% of this step, within the tolerance; forgetting the backward, the attention or the
    # peak is not.
    assert f"MFU against {PEAK / 1e9:,.1f} GFLOP/s per device (--peak_flops)" in stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    perf = [r for r in records if "perf/mfu" in r]
    assert len(perf) >= 2
    model = dataclasses.replace(preset("tiny").model, d_model=32, d_ff=64, mem_len=64)
    segment_len = [r["perf/bytes_per_s"] * r["perf/step_time_s"] / 8 for r in perf]  # 8 streams
    assert segment_len == pytest.approx([64] * len(perf))
    step_flops = counted_step_flops(model, small_corpus, bptt=64, batch_size=8)
    for r in perf:
        assert r["perf/mfu"] == pytest.approx(step_flops / r["perf/step_time_s"] / PEAK, rel=2e-3)
        assert r["perf/flops_per_s"] == pytest.approx(r["perf/mfu"] * PEAK, rel=1e-9)

    # TensorBoard, read with its own reader
    events = [p.parent for p in (out / "tensorboard").rglob("events.out.tfevents.*")]
    acc = EventAccumulator(str(events[0]), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars("perf/mfu")] == pytest.approx([r["perf/mfu"] for r in perf])
    assert "perf/flops_per_s" in acc.Tags()["scalars"]

    # W&B: offline, in the run directory, its id kept; scalars, the histogram and the text sample
    kept = json.loads((out / "trackers.json").read_text())["wandb"]
    assert kept["mode"] == "offline"
    (run_file,) = (out / "wandb").glob(f"offline-run-*-{kept['id']}/run-{kept['id']}.wandb")
    run_id, history = wandb_history(run_file)
    assert run_id == kept["id"]
    assert history[2]["train/loss"] == pytest.approx(records[0]["train/loss"])
    assert history[2]["perf/mfu"] == pytest.approx(perf[0]["perf/mfu"])
    assert history[2]["train/lamb_trust_ratio/_type"] == "histogram"  # media: keys nested
    assert history[first_total]["sample/_type"] == "html-file"  # the text sample, in the run's files
    assert "<pre>" in (run_file.parent / "files" / history[first_total]["sample/path"]).read_text()

    # the profile: a Chrome trace of steps 2 and 3 (this process's profiler steps 1 and 2)
    (trace,) = (out / "profile").glob("rank0.*.pt.trace.json")
    steps = {e["name"] for e in json.loads(trace.read_text())["traceEvents"]
             if str(e.get("name", "")).startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#1", "ProfilerStep#2"}

    # resumed to a whole epoch: the progress starts where the run is; the same W&B run goes on
    stdout = train("--epochs", "1", "--resume", "auto")
    lines = progress_lines(stdout)
    total = math.ceil((stream_len - 2) / 64)
    assert lines[0][:2] == (first_total + 1, total) and lines[-1][:2] == (total, total)
    assert json.loads((out / "trackers.json").read_text())["wandb"]["id"] == kept["id"]
    run_files = sorted((out / "wandb").glob(f"offline-run-*-{kept['id']}/run-{kept['id']}.wandb"))
    assert len(run_files) == 2
    resumed_id, resumed = wandb_history(run_files[-1])
    assert resumed_id == kept["id"] and min(resumed) > first_total


# ------------------------------------------------------------------------------------ flags and trackers
@pytest.mark.parametrize("flags, message", [
    (["--profile_steps", "5:2"], "profile_steps '5:2': need 1 <= A <= B"),
    (["--profile_steps", "5"], "profile_steps must be A:B"),
    (["--progress_interval_s", "-1"], "progress_interval_s must be >= 0"),
    (["--peak_flops", "0"], "peak_flops must be > 0"),
])
def test_bad_flags_are_one_error_line(flags, message):
    from train.config import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(flags)
    assert str(e.value).startswith("error: ") and message in str(e.value)


def test_report_to(tmp_path):
    from accelerate.tracking import TensorBoardTracker

    from train.log import WandBRun, build_trackers

    with pytest.raises(SystemExit, match=r"error: --report_to: unknown tracker\(s\) \['tensorbord'\]"):
        build_trackers("tensorbord", tmp_path, resuming=False)
    tb, wb = build_trackers("wandb", tmp_path, resuming=False)  # TensorBoard is always there
    assert isinstance(tb, TensorBoardTracker) and isinstance(wb, WandBRun)
    assert len(build_trackers("tensorboard,tensorboard", tmp_path, resuming=False)) == 1


def test_wandb_goes_offline_without_key_or_server(monkeypatch, tmp_path):
    from train.log import wandb_mode

    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode()[0] is None  # the user's choice: W&B reads it
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert wandb_mode() == ("offline", "no W&B API key (wandb login)")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    mode, why = wandb_mode()
    assert mode == "offline" and "unreachable" in why


def test_metrics_jsonl_is_strict_json_when_a_value_is_not_finite(tmp_path, fresh_accelerate_state):
    """A diverged validation bpc (inf) or an overflow-skipped step's gradient norm (nan) is logged as null in
    metrics.jsonl: NaN and Infinity are not JSON, and strict readers (jq, JavaScript) refuse the line."""
    from accelerate import Accelerator

    from train.log import RunLogger

    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path))
    logger = RunLogger(accelerator, tmp_path, {"lr": 1e-3}, start_step=0)
    values = {"val/bpc": float("inf"), "train/grad_norm": float("nan"), "train/bpc": 2.5, "n": 3}
    logger.scalars(values, step=7)
    logger.close()

    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")

    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    record = json.loads(line, parse_constant=refuse)
    assert record == {"step": 7, "val/bpc": None, "train/grad_norm": None, "train/bpc": 2.5, "n": 3}
