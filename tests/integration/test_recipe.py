"""The paths a long cluster run crosses, run for real: epoch boundaries, gradient accumulation under DDP and
DeepSpeed, two-rank resume after SIGTERM and SIGKILL, --init_from and the two-stage recipe, best-checkpoint
selection and pruning, --resume PATH, SIGINT, bf16/fp16 runs; and the recipe's unit-level pieces."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from sharnn.corpus.data import StreamLoader, open_split
from tests.helpers import (
    DDP,
    REPO,
    assert_same_training,
    deepspeed,
    metrics,
    run,
    series,
    subprocess_env,
    train_cmd,
    wait_for,
    wait_for_steps,
    weights,
    workers_of,
)

# Segments of 64 bytes over 8 streams of a 20 kB training split: an epoch is about 40 steps.
EPOCH = ["--preset", "tiny", "--batch_size", "8", "--bptt", "64", "--warmup_steps", "5", "--log_every", "1",
         "--sample_bytes", "0", "--eval_every", "0", "--save_every", "0", "--max_steps", "100000"]


def epoch_lengths(corpus: Path, batch_size: int, bptt: int, seed: int, n_epochs: int) -> list[int]:
    """Steps per epoch as the trainer's loader draws them (one process)."""
    loader = StreamLoader(open_split(corpus, "train"), batch_size, bptt, 0, 1, seed)
    counts = [0] * n_epochs
    while loader.epoch < n_epochs:
        counts[next(loader).epoch] += 1
    return counts


def deepspeed_cpu_fp16() -> bool:
    """What DeepSpeed's CPU accelerator says of fp16 on this machine."""
    return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


# ------------------------------------------------------------------------------------------ real runs
@pytest.mark.slow
def test_epochs_end_with_validation_and_resume_across_the_boundary(small_corpus, tmp_path):
    n0, n1 = epoch_lengths(small_corpus, 8, 64, 1234, 2)
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = [*EPOCH, "--data", str(small_corpus), "--epochs", "2", "--no_test_at_end"]
    run(train_cmd(*args, "--out", str(straight)), threads=2)
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["step"] == n0 + n1 and summary["epoch"] == 1  # no step of a third epoch
    assert list(series(straight, "val/bpc")) == [n0, n0 + n1]  # at each epoch end, once
    assert [m["train/epoch"] for m in metrics(straight) if "train/epoch" in m] == [0] * n0 + [1] * n1
    # stop 3 steps before the boundary, resume across it: the same run, bit for bit
    run(train_cmd(*args, "--out", str(split), "--max_steps", str(n0 - 3)), threads=2)
    proc = run(train_cmd(*args, "--out", str(split), "--resume", "auto"), threads=2)
    assert f"at step {n0 - 3}" in proc.stdout
    last = f"checkpoints/step-{n0 + n1:08d}"
    a, b = weights(straight / last), weights(split / last)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert series(straight, "train/loss") == series(split, "train/loss")


# Dropout off so that ranks and one process compute the same thing (masks are drawn per rank).
ACCUM = ["--preset", "tiny", "--max_steps", "6", "--warmup_steps", "2", "--eval_every", "3",
         "--log_every", "1", "--model.dropouth", "0", "--sample_bytes", "0", "--eval_max_segments", "5",
         "--grad_accum", "2", "--bptt", "32"]


@pytest.mark.slow
def test_gradient_accumulation_under_ddp_and_deepspeed_matches_one_process(text_corpus, tmp_path):
    one = tmp_path / "one"
    run(train_cmd(*ACCUM, "--data", str(text_corpus), "--out", str(one), "--batch_size", "4"), threads=2)
    ddp, ds = tmp_path / "ddp", tmp_path / "ds"
    run(train_cmd(*ACCUM, "--data", str(text_corpus), "--out", str(ddp), "--batch_size", "2", launch=DDP))
    run(train_cmd(*ACCUM, "--data", str(text_corpus), "--out", str(ds), "--batch_size", "2",
                  launch=deepspeed(tmp_path, 0)))
    assert_same_training(one, ddp)
    assert_same_training(one, ds)
    # an accumulated step is not a plain step: the same run without accumulation differs
    plain = tmp_path / "plain"
    run(train_cmd(*ACCUM, "--data", str(text_corpus), "--out", str(plain), "--batch_size", "4",
                  "--grad_accum", "1"), threads=2)
    assert series(plain, "train/loss")[2] != pytest.approx(series(one, "train/loss")[2], rel=1e-4)


# Dropout on: each rank's own masks must be restored too.
TWO_RANKS = ["--preset", "tiny", "--warmup_steps", "3", "--log_every", "1", "--sample_bytes", "0",
             "--eval_every", "8", "--eval_max_segments", "4", "--save_every", "8", "--batch_size", "4",
             "--bptt", "32", "--no_test_at_end", "--max_steps", "60", "--state_reset_prob", "0.1"]


@pytest.mark.slow
def test_two_rank_resume_is_bitwise_after_sigterm_and_after_sigkill(text_corpus, tmp_path):
    args = [*TWO_RANKS, "--data", str(text_corpus)]
    straight, termed, killed = tmp_path / "straight", tmp_path / "termed", tmp_path / "killed"
    run(train_cmd(*args, "--out", str(straight), launch=DDP))
    env = subprocess_env(1)
    # SIGTERM to every worker, as a cluster's preemption does: each rank saves its carry, all exit 0
    proc = subprocess.Popen(train_cmd(*args, "--out", str(termed), launch=DDP), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(termed / "checkpoints" / "step-00000008" / "train_state.json", [proc])
    for pid in workers_of(proc):
        os.kill(pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    stopped = json.loads((termed / "summary.json").read_text())
    assert stopped["exit"] == "stopped by SIGTERM" and stopped["step"] < 60
    # SIGKILL to the whole launch after the first checkpoint
    proc = subprocess.Popen(train_cmd(*args, "--out", str(killed), launch=DDP), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(killed / "checkpoints" / "step-00000008" / "train_state.json", [proc])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "step-00000060").exists()
    for out in (termed, killed):
        run(train_cmd(*args, "--out", str(out), "--resume", "auto", launch=DDP))
        a, b = weights(straight / "checkpoints/step-00000060"), weights(out / "checkpoints/step-00000060")
        assert all(torch.equal(a[k], b[k]) for k in a), out.name
        assert series(out, "train/loss") == series(straight, "train/loss"), out.name
        assert series(out, "val/bpc") == series(straight, "val/bpc"), out.name


STAGE = ["--preset", "tiny", "--batch_size", "4", "--bptt", "32", "--log_every", "1", "--sample_bytes", "0",
         "--eval_max_segments", "4", "--no_test_at_end"]


@pytest.mark.slow
def test_init_from_a_run_a_checkpoint_or_a_file_and_the_second_stage(text_corpus, tmp_path):
    stage1 = tmp_path / "stage1"
    run(train_cmd(*STAGE, "--data", str(text_corpus), "--out", str(stage1), "--max_steps", "12",
                  "--warmup_steps", "3", "--eval_every", "4", "--save_every", "0"), threads=2)
    best = json.loads((stage1 / "checkpoints" / "best.json").read_text())
    best_dir = stage1 / "checkpoints" / best["dir"]
    assert (best_dir / "train_state.json").exists()  # written when validation found it, whatever save_every
    sources = {"run": stage1, "checkpoint": best_dir, "file": best_dir / "model.safetensors"}
    losses = {}
    for name, source in sources.items():
        out = tmp_path / f"stage2-{name}"
        proc = run(train_cmd(*STAGE, "--data", str(text_corpus), "--out", str(out), "--max_steps", "4",
                             "--warmup_steps", "4", "--lr", "1e-3", "--seed", "125", "--eval_every", "0",
                             "--init_from", str(source)), threads=2)
        assert f"initialised weights from {best_dir / 'model.safetensors'}" in proc.stdout
        losses[name] = series(out, "train/loss")
        lrs = series(out, "train/lr")
        assert lrs == pytest.approx({1: 2.5e-4, 2: 5e-4, 3: 7.5e-4, 4: 1e-3})  # the warmup starts again
    assert losses["run"] == losses["checkpoint"] == losses["file"]
    # from the best weights, not a fresh model: the first stage-2 loss is far below a fresh start's
    fresh = tmp_path / "fresh"
    run(train_cmd(*STAGE, "--data", str(text_corpus), "--out", str(fresh), "--max_steps", "1",
                  "--warmup_steps", "1", "--lr", "1e-3", "--seed", "125", "--eval_every", "0"), threads=2)
    assert losses["run"][1] < series(fresh, "train/loss")[1] - 0.5


@pytest.mark.slow
def test_best_checkpoint_survives_pruning_and_resume_path_and_sigint(text_corpus, tmp_path):
    out = tmp_path / "run"
    args = [*STAGE, "--data", str(text_corpus), "--out", str(out), "--eval_every", "3", "--save_every", "3",
            "--keep_last", "1"]
    run(train_cmd(*args, "--max_steps", "12", "--warmup_steps", "3"), threads=2)
    # continue from the run directory with a learning rate that ruins the weights: later validations are
    # worse, so the best checkpoint is an old one and must outlive --keep_last 1
    run(train_cmd(*args, "--max_steps", "21", "--warmup_steps", "1", "--lr", "3.0", "--resume", str(out)),
        threads=2)
    val = series(out, "val/bpc")
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    assert best["step"] <= 12 and best["val_bpc"] == min(val.values()) and val[21] > best["val_bpc"]
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert kept == [best["dir"], "step-00000021"]
    # --resume CHECKPOINT (not the latest): continues from that checkpoint's step
    other = tmp_path / "other"
    proc = run(train_cmd(*STAGE, "--data", str(text_corpus), "--out", str(other), "--max_steps",
                         str(best["step"] + 2), "--warmup_steps", "1", "--resume",
                         str(out / "checkpoints" / best["dir"])), threads=2)
    assert f"at step {best['step']}" in proc.stdout
    assert min(series(other, "train/loss")) == best["step"] + 1
    # SIGINT (Ctrl-C) stops cleanly with a checkpoint that a resume continues from
    ctrl_c = tmp_path / "ctrl-c"
    proc = subprocess.Popen(train_cmd(*STAGE, "--data", str(text_corpus), "--out", str(ctrl_c), "--max_steps",
                                      "100000", "--warmup_steps", "1", "--eval_every", "0", "--save_every",
                                      "0"),
                            cwd=REPO, env=subprocess_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_steps(ctrl_c, [proc], 3)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    stopped = json.loads((ctrl_c / "summary.json").read_text())
    assert stopped["exit"] == "stopped by SIGINT"
    proc = run(train_cmd(*STAGE, "--data", str(text_corpus), "--out", str(ctrl_c), "--max_steps",
                         str(stopped["step"] + 2), "--warmup_steps", "1", "--resume", "auto"), threads=2)
    assert f"at step {stopped['step']}" in proc.stdout
    assert json.loads((ctrl_c / "summary.json").read_text())["step"] == stopped["step"] + 2


def mixed_precision_cmd(precision: str, launch: str | None, corpus: Path, out: Path,
                        tmp_path: Path) -> list[str]:
    how = {None: None, "ddp": DDP, "deepspeed": deepspeed(tmp_path, 0)}[launch]
    return train_cmd("--preset", "tiny", "--data", str(corpus), "--out", str(out), "--precision", precision,
                     "--max_steps", "30", "--warmup_steps", "5", "--log_every", "5", "--eval_every", "15",
                     "--eval_max_segments", "4", "--sample_bytes", "0", "--batch_size", "4", "--bptt", "32",
                     "--test_streams", "2", launch=how)


NO_FP16 = ("this CPU has no fp16 kernels (oneDNN; e.g. AMD Zen 4: avx512_bf16 but no AVX512-FP16), so "
           "DeepSpeed's CPU accelerator cannot train in fp16 here; the refusal is "
           "test_deepspeed_fp16_is_refused_on_a_cpu_without_fp16_kernels")


@pytest.mark.slow
@pytest.mark.parametrize("precision,launch", [("bf16", None), ("bf16", "ddp"), ("fp16", "deepspeed")])
def test_mixed_precision_trains_end_to_end(precision, launch, small_corpus, tmp_path):
    if precision == "fp16" and launch == "deepspeed" and not deepspeed_cpu_fp16():
        pytest.skip(NO_FP16)
    out = tmp_path / precision
    proc = run(mixed_precision_cmd(precision, launch, small_corpus, out, tmp_path), threads=2)
    assert f"precision {precision}: LSTM forward/backward checked" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit"] == "finished" and summary["step"] == 30 and math.isfinite(summary["test_bpc"])
    loss = series(out, "train/loss")
    assert all(math.isfinite(v) for v in loss.values()) and loss[30] < loss[5]
    # autocast keeps fp32 weights; under DeepSpeed fp16 the checkpoint holds its fp32 masters (issue 18)
    for value in weights(out / "checkpoints/step-00000030").values():
        assert value.dtype == torch.float32 and torch.isfinite(value).all()


@pytest.mark.slow
def test_deepspeed_fp16_is_refused_on_a_cpu_without_fp16_kernels(small_corpus, tmp_path):
    """Where DeepSpeed's CPU accelerator refuses fp16, the run stops at start with one clear line and writes
    nothing (the check itself, on either kind of CPU: test_deepspeed_fp16_on_a_cpu_without_fp16_kernels_is_
    refused_at_start)."""
    if deepspeed_cpu_fp16():
        pytest.skip("this CPU has fp16 kernels: DeepSpeed trains fp16 here "
                    "(test_mixed_precision_trains_end_to_end[fp16-deepspeed]), there is nothing to refuse")
    out = tmp_path / "fp16"
    proc = run(mixed_precision_cmd("fp16", "deepspeed", small_corpus, out, tmp_path), threads=2, check=False)
    assert proc.returncode != 0
    assert "error: --precision fp16: DeepSpeed's CPU accelerator refuses fp16" in proc.stderr, proc.stderr
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())


# Dropout off: ranks draw their own masks, so only without dropout do 2 x 4 and 1 x 8 compute the same thing.
ELASTIC = ["--preset", "tiny", "--warmup_steps", "3", "--log_every", "1", "--sample_bytes", "0",
           "--eval_every", "10", "--eval_max_segments", "4", "--save_every", "10", "--bptt", "32",
           "--model.dropouth", "0", "--no_test_at_end"]


@pytest.mark.slow
def test_elastic_resume_keeps_the_streams_on_another_number_of_ranks(text_corpus, tmp_path):
    args = [*ELASTIC, "--data", str(text_corpus)]
    straight = tmp_path / "straight"
    run(train_cmd(*args, "--out", str(straight), "--batch_size", "8", "--max_steps", "20"), threads=2)
    two_to_one, one_to_two = tmp_path / "2to1", tmp_path / "1to2"
    run(train_cmd(*args, "--out", str(two_to_one), "--batch_size", "4", "--max_steps", "10", launch=DDP))
    proc = run(train_cmd(*args, "--out", str(two_to_one), "--batch_size", "8", "--max_steps", "20",
                         "--resume", "auto"), threads=2)
    assert "at step 10" in proc.stdout
    run(train_cmd(*args, "--out", str(one_to_two), "--batch_size", "8", "--max_steps", "10"), threads=2)
    run(train_cmd(*args, "--out", str(one_to_two), "--batch_size", "4", "--max_steps", "20", "--resume",
                  "auto", launch=DDP))
    want = weights(straight / "checkpoints/step-00000020")
    for out in (two_to_one, one_to_two):
        # the same streams with the same carried state: equal up to the all-reduce's float noise
        for key in ("train/loss", "val/bpc"):
            got, ref = series(out, key), series(straight, key)
            assert got.keys() == ref.keys()
            assert all(math.isclose(got[s], ref[s], rel_tol=1e-5) for s in ref), (out.name, key, got, ref)
        got = weights(out / "checkpoints/step-00000020")
        assert all(torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6) for k in want), out.name
    # another number of streams: refused with the layouts that work, or fresh streams on request
    fresh = tmp_path / "fresh"
    run(train_cmd(*args, "--out", str(fresh), "--batch_size", "8", "--max_steps", "10"), threads=2)
    proc = run(train_cmd(*args, "--out", str(fresh), "--batch_size", "4", "--max_steps", "11", "--resume",
                         "auto"), check=False)
    assert proc.returncode != 0 and "1 x 8, 2 x 4, 4 x 2, 8 x 1" in proc.stderr
    assert "--restart_streams" in proc.stderr
    run(train_cmd(*args, "--out", str(fresh), "--batch_size", "4", "--max_steps", "11", "--resume", "auto",
                  "--restart_streams"), threads=2)
    loader = json.loads((fresh / "checkpoints/step-00000011/train_state.json").read_text())["loader"]
    assert (loader["batch_size"], loader["world_size"], loader["epoch"]) == (4, 1, 0)
    assert list(series(fresh, "train/loss"))[-1] == 11
