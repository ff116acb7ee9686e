"""The paths a long cluster run crosses, run for real: epoch boundaries, gradient accumulation under DDP and
DeepSpeed, two-rank resume after SIGTERM and SIGKILL, --init_from and the two-stage recipe, best-checkpoint
selection and pruning, --resume PATH, SIGINT, bf16/fp16 runs; and the recipe's unit-level pieces."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from sharnn import SHARNN, CarryState
from sharnn.corpus.data import ByteSplit, StreamLoader
from tests.helpers import tiny_config
from train.build import unigram_log_probs
from train.config import TrainConfig
from train.loop import finished
from train.step import train_step


# --------------------------------------------------------------------------------------------- unit level
def test_epoch_start_resets_the_carried_state(fresh_accelerate_state):
    """train_step hands the model an empty state at every epoch start and the carried one otherwise."""
    cfg = TrainConfig(model=tiny_config(mem_len=50), batch_size=2, bptt=8,
                      vary_bptt=False, warmup_steps=0)
    split = ByteSplit.from_bytes(bytes(range(256)) * 2)  # streams of 256 bytes: epochs of 32 segments
    loader = StreamLoader(split, cfg.batch_size, cfg.bptt, 0, 1, cfg.seed, vary_bptt=False)
    model = SHARNN(cfg.model)
    seen = []
    forward = model.forward

    def recording(x, state=None, targets=None):
        seen.append(state.memory_len if state is not None else 0)
        return forward(x, state, targets=targets)

    model.forward = recording
    accelerator = Accelerator(cpu=True)  # a real one, reset afterwards (fixture `fresh_accelerate_state`)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    carry = CarryState.empty(cfg.model.n_layer)
    epochs = []
    for step in range(1, 70):
        out, carry = train_step(accelerator, model, optimizer, loader, carry, cfg, step)
        epochs.append(out.epoch)
    starts = [i for i in range(1, len(epochs)) if epochs[i] != epochs[i - 1]]
    assert starts == [32, 64]  # two epoch boundaries crossed
    for i, memory_len in enumerate(seen):
        assert memory_len == (0 if i in (0, *starts) else min(50, 8 * (i % 32))), (i, memory_len)


def test_fp16_loss_scale_overflow_skips_the_step_instead_of_stopping(fresh_accelerate_state, monkeypatch):
    """With fp16 under DDP or one process on a GPU, accelerate's GradScaler starts at 2^16, which overflows
    in the first steps: the scaler must skip such a step and lower its scale, not stop the run. accelerate
    makes that scaler only on GPUs; a CPU GradScaler stands in for it, set up as accelerate sets up the GPU's
    (scaler before `prepare`, gradients unscaled in `clip_grad_norm_`), and an infinite gradient in step 1
    stands in for the fp16 overflow."""
    cfg = TrainConfig(model=tiny_config(mem_len=20), batch_size=2, bptt=8,
                      vary_bptt=False, warmup_steps=0)
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    model = SHARNN(cfg.model)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    monkeypatch.setattr(Accelerator, "mixed_precision", property(lambda self: "fp16"))
    accelerator.native_amp = True  # after prepare: only unscale_gradients reads it from here on
    overflow = {"left": 1}

    def overflowing(grad):
        if overflow["left"]:
            overflow["left"] -= 1
            return grad * float("inf")
        return grad

    model.out_bias.register_hook(overflowing)
    loader = StreamLoader(ByteSplit.from_bytes(bytes(range(256)) * 2), 2, 8, 0, 1, 1, vary_bptt=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out, _ = train_step(accelerator, model, optimizer, loader, CarryState.empty(2), cfg, 1)
    assert not math.isfinite(float(out.grad_norm))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the step was skipped
    assert accelerator.scaler.get_scale() == 2.0**15  # and the scale lowered
    out, _ = train_step(accelerator, model, optimizer, loader, CarryState.empty(2), cfg, 2)
    assert math.isfinite(float(out.grad_norm))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # this one was taken


def test_fp16_without_deepspeed_on_cpu_is_refused(fresh_accelerate_state):
    """accelerate would train it in fp32 without a word."""
    from train.distributed import build_accelerator

    with pytest.raises(SystemExit, match="silently train in fp32"):
        build_accelerator("fp16")


def test_a_run_bounded_by_epochs_stops_at_the_epoch_end():
    """No step of the next epoch: `finished` looks at where the next segment starts."""
    split = ByteSplit.from_bytes(bytes(range(256)) * 2)
    loader = StreamLoader(split, 2, 8, 0, 1, 1, vary_bptt=False)
    cfg = TrainConfig(epochs=1, warmup_steps=0)

    class Progress:
        step = 0

    steps = 0
    while not finished(cfg, Progress, loader):
        batch = next(loader)
        steps += 1
        assert batch.epoch == 0
    assert steps == 32 and loader.epoch == 1
    half = TrainConfig(epochs=1.5, warmup_steps=0)
    while not finished(half, Progress, loader):
        next(loader)
        steps += 1
    assert steps == 32 + 16


def test_unigram_output_bias_gives_each_byte_its_share():
    counts = np.zeros(256, dtype=np.int64)
    counts[ord("a")], counts[ord("b")] = 700, 300
    probs = torch.softmax(unigram_log_probs(counts).double(), 0)
    assert probs[ord("a")] == pytest.approx(701 / 1256) and probs[ord("b")] == pytest.approx(301 / 1256)
    assert probs[0] == pytest.approx(1 / 1256)  # never seen: add-one smoothing
    split = ByteSplit.from_bytes(b"aab" * 10)
    assert split.byte_counts()[ord("a")] == 20 and split.byte_counts().sum() == 30


def test_the_precision_check_stops_when_the_lstm_cannot_run(monkeypatch):
    """The failing branch (seen on devices whose LSTM kernels lack a dtype), with a stand-in LSTM that raises
    what oneDNN raises."""
    from train.distributed import check_precision

    def unsupported(self, *args, **kwargs):
        raise RuntimeError("could not create a primitive descriptor for the LSTM forward propagation "
                           "primitive")

    monkeypatch.setattr(torch.nn.LSTM, "forward", unsupported)
    with pytest.raises(SystemExit) as e:
        check_precision("fp16", torch.device("cpu"))
    assert "nn.LSTM does not run in fp16" in str(e.value) and "--precision fp32 or bf16" in str(e.value)
    assert check_precision("fp32", torch.device("cpu")) == "precision fp32"  # fp32 is never probed


@pytest.mark.parametrize("supported", [False, True])
def test_deepspeed_fp16_on_a_cpu_without_fp16_kernels_is_refused_at_start(supported, monkeypatch):
    """DeepSpeed's CPU accelerator accepts fp16 only where oneDNN has fp16 kernels; elsewhere its engine
    raised a bare ValueError from inside accelerator.prepare. The trainer asks first
    (both answers stood in)."""
    from deepspeed.accelerator import get_accelerator

    from train.distributed import check_precision

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: supported)
    if supported:
        assert check_precision("fp16", torch.device("cpu"), deepspeed=True).startswith("precision fp16")
    else:
        with pytest.raises(SystemExit, match="DeepSpeed's CPU accelerator refuses fp16 on this CPU"):
            check_precision("fp16", torch.device("cpu"), deepspeed=True)
    assert check_precision("fp16", torch.device("cpu")).startswith("precision fp16")  # DDP: not asked
