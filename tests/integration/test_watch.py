"""Watching a run: the step total and ETA of epoch-bounded runs, plain progress lines in a log file, MFU from
the FLOP formula and the device peak, the trackers (TensorBoard read back with its own reader, W&B offline
files read back record by record), a resumed run continuing its W&B run, and a torch.profiler trace."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sharnn.config import ModelConfig
from sharnn.corpus.data import StreamLoader, open_split
from tests.unit import test_watch as unit
from train.config import preset

watch_corpus = unit.watch_corpus  # the unit tests' fixture


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


def counted_step_flops(model: ModelConfig, corpus: Path, bptt: int, batch_size: int) -> int:
    """FLOPs of one training step as the trainer takes it (train.step.train_step: forward, backward,
    clipping, LAMB), with the memory full, counted by torch's FlopCounterMode. Its LSTMs run decomposed into
    their matrix products (tests/unit/test_flops.py's MatmulLSTM: the counter does not see nn.LSTM's
    kernel)."""
    from accelerate import Accelerator
    from torch.utils.flop_counter import FlopCounterMode

    from sharnn import SHARNN
    from sharnn.state import CarryState
    from tests.unit.test_flops import MatmulLSTM
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
def test_watched_run_and_its_resume(watch_corpus, tmp_path, fresh_accelerate_state):
    """An epoch-bounded run with stdout in a file, --report_to tensorboard,wandb (offline: no API key here),
    a profile of steps 2-3; then resumed to a longer run that continues the same W&B run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.helpers import REPO, subprocess_env

    out, env = tmp_path / "run", subprocess_env()
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT"):
        env.pop(name, None)
    env["HOME"] = str(tmp_path)  # no ~/.netrc: no W&B login, so offline
    common = ["--preset", "tiny", "--data", str(watch_corpus), "--out", str(out), "--max_steps", "None",
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

    stream_len = len(open_split(watch_corpus, "train")) // 8
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
    step_flops = counted_step_flops(model, watch_corpus, bptt=64, batch_size=8)
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
