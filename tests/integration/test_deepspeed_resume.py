"""A DeepSpeed run resumed from its checkpoint trains what the uninterrupted run trains (issue 23 item 5):
2 gloo ranks on this CPU, the world size unchanged, N steps straight against N/2 steps, save, a fresh launch
that resumes, N/2 more. The paths: ZeRO 0 with LAMB (the paper's optimizer: DeepSpeed keeps the model's
tensors) and ZeRO 1 and 2 with AdamW (DeepSpeed's flat fp32 partitions, its optimizer state sharded per
rank), all fp32.

Bitwise: in fp32 nothing depends on the interruption. Each rank restores its own carried LSTM state and
attention memory, its RNG streams (dropout is on, drawn per rank) and, through DeepSpeed's checkpoint, its
share of the optimizer state; the loader continues at the saved byte; the all-reduces add the same numbers
in the same order. Any difference is a resume that lost something, so no tolerance is allowed."""

from __future__ import annotations

import json

import pytest
import torch

from sharnn.io import rundir
from tests.helpers import deepspeed, metrics, run, series, train_cmd, weights

pytestmark = pytest.mark.slow

N = 8
# Dropout on (the tiny preset's) and random state resets: each rank's RNG and carried state must come back.
ARGS = ["--preset", "tiny", "--warmup_steps", "3", "--log_every", "1", "--sample_bytes", "0",
        "--eval_every", str(N // 2), "--save_every", str(N // 2), "--eval_max_segments", "4",
        "--batch_size", "4", "--bptt", "32", "--state_reset_prob", "0.2", "--no_test_at_end",
        "--peak_flops", "1e11"]  # (a stated peak: no matmul measured at every start)


@pytest.mark.parametrize("stage,optimizer", [(0, "lamb"), (1, "adamw"), (2, "adamw")],
                         ids=["zero0-lamb", "zero1-adamw", "zero2-adamw"])
def test_a_deepspeed_run_resumes_bitwise(stage, optimizer, text_corpus, tmp_path):
    """The uninterrupted run saves at N/2 (and goes on); a fresh launch resumes from that checkpoint into
    another run directory and trains steps N/2+1..N. Two launches instead of three: the checkpoint is the
    one a run stopped at N/2 would have written (the same step, state and files)."""
    launch = deepspeed(tmp_path, stage)
    args = [*ARGS, "--data", str(text_corpus), "--optimizer", optimizer, "--max_steps", str(N)]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = run(train_cmd(*args, "--out", str(straight), launch=launch))
    assert "world size 2 (DistributedType.DEEPSPEED)" in proc.stdout
    half = straight / "checkpoints" / f"step-{N // 2:08d}"
    meta = json.loads((half / rundir.META_NAME).read_text())
    assert meta["distributed_type"] == "DistributedType.DEEPSPEED" and meta["world_size"] == 2
    assert all((half / rundir.carry_name(rank)).is_file() for rank in (0, 1))
    proc = run(train_cmd(*args, "--out", str(resumed), "--resume", str(half), launch=launch))
    assert f"resumed from {half} at step {N // 2}" in proc.stdout

    last = f"checkpoints/step-{N:08d}"
    a, b = weights(straight / last), weights(resumed / last)
    assert a.keys() == b.keys()
    differ = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not differ, f"weights differ after the resume (max abs difference per tensor): {differ}"
    assert [m["step"] for m in metrics(resumed) if "train/loss" in m] == list(range(N // 2 + 1, N + 1))
    for key in ("train/loss", "train/grad_norm", "val/bpc"):
        want = {step: v for step, v in series(straight, key).items() if step > N // 2}
        assert want and series(resumed, key) == want, key
