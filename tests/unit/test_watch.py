"""Watching a run: the step total and ETA of epoch-bounded runs, plain progress lines in a log file, MFU from
the FLOP formula and the device peak, the trackers (TensorBoard read back with its own reader, W&B offline
files read back record by record), a resumed run continuing its W&B run, and a torch.profiler trace."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sharnn.corpus.data import StreamLoader, open_split
from train.flops import GPU_PEAKS, device_peak_flops, gpu_peak
from train.loop import finished
from train.progress import Progress, duration, estimate_total_steps, expected_segment_len

T = 1e12


@pytest.fixture(scope="module")
def watch_corpus(shipped_corpus) -> Path:
    """About 40 KB of training text: 8 streams of ~5 KB, a few dozen segments per epoch."""
    return shipped_corpus(48_000, valid_bytes=4_000, test_bytes=4_000)


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
def test_total_is_exact_for_fixed_segments(watch_corpus, epochs):
    split = open_split(watch_corpus, "train")
    loader = StreamLoader(split, 8, 64, 0, 1, seed=3, vary_bptt=False)
    mean = expected_segment_len(loader)
    want = steps_until_finished(StreamLoader(split, 8, 64, 0, 1, seed=3, vary_bptt=False), epochs)
    assert estimate_total_steps(0, loader, epochs, None, mean) == want
    assert estimate_total_steps(0, loader, epochs, want - 3, mean) == want - 3  # max_steps bounds it
    for _ in range(want // 2):  # and from any point of the run, as on resume
        next(loader)
    assert estimate_total_steps(want // 2, loader, epochs, None, mean) == want


def test_total_for_random_segments_and_accumulation(watch_corpus):
    """With --vary_bptt the count depends on the draws: the estimate is within 5%, and tends to exact as
    the run goes (the rest is estimated from the loader's actual position)."""
    split = open_split(watch_corpus, "train")
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


def test_progress_lines_without_a_terminal(watch_corpus, capsys):
    split = open_split(watch_corpus, "train")
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


def test_progress_bar_on_a_terminal_starts_where_the_run_is(watch_corpus, capsys):
    split = open_split(watch_corpus, "train")
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
"""The run's --peak_flops (FLOP/s), a round figure instead of the peak it would measure on this CPU."""


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
