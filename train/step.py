"""One optimizer step, whole: micro-batches forward with the carried state, backward, clip, step, carry on.

`train_step` is the only place that touches the carried LSTM state and attention memory during training:
it resets them at every epoch start (the reference's `hidden = None; mems = None` in `train()`), detaches them
after every micro-batch (truncated backpropagation through time) and, if `state_reset_prob` > 0, forgets them
at random after a step (an option; the reference at 218d748 has it commented out).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from sharnn.corpus.data import StreamLoader
from sharnn.state import CarryState
from train.config import TrainConfig
from train.distributed import is_deepspeed


@dataclass
class StepOutput:
    loss: torch.Tensor
    """Sum of the micro-batches' mean losses (nats), on the device: no host sync."""
    grad_norm: torch.Tensor | None
    """Global gradient norm before clipping, on the device (None if the engine reported none, or DeepSpeed's
    fp16 loss scaler skipped the step)."""
    bytes: int
    """Bytes predicted on this rank."""
    epoch: int
    """Epoch of the last micro-batch."""
    data_s: float
    """Seconds spent fetching the batches."""


def train_step(accelerator, model, optimizer, loader: StreamLoader, carry: CarryState, cfg: TrainConfig,
               step: int, guard: NonFiniteGuard | None = None) -> tuple[StepOutput, CarryState]:
    """Optimizer step `step` (1-based) over `cfg.grad_accum` micro-batches of this rank's streams.

    With a `guard`, `--on_nonfinite stop` records a non-finite gradient norm on the device for the guard's
    next `check()` instead of reading every norm on the host."""
    loss_sum, n_bytes, data_s, grad_norm = torch.zeros((), device=accelerator.device), 0, 0.0, None
    for _ in range(cfg.grad_accum):
        t0 = time.perf_counter()
        batch = next(loader)
        if batch.is_epoch_start:  # the streams restart: so does the state
            carry = carry.reset()
        x = to_device(batch.inputs, accelerator.device).t()  # (T, B): time-major
        y = to_device(batch.targets, accelerator.device).t()
        data_s += time.perf_counter() - t0
        with accelerator.accumulate(model):
            _, loss, carry = model(x, carry, targets=y)
            norm = backward_and_step(accelerator, model, optimizer, loss, cfg.clip, cfg.on_nonfinite, step,
                                     guard)
        grad_norm = norm if norm is not None else grad_norm
        carry = carry.detach()
        loss_sum += loss.detach().float()
        n_bytes += y.numel()
    carry = random_reset(carry, cfg.seed, step, cfg.state_reset_prob)
    return StepOutput(loss_sum, grad_norm, n_bytes, batch.epoch, data_s), carry


def random_reset(carry: CarryState, seed: int, step: int, p: float) -> CarryState:
    """Forget the LSTM state and (independently) the memory with probability p each, after step `step`."""
    reset_hidden, reset_memory = draw_resets(seed, step, p)
    empty = carry.reset()
    return CarryState(hidden=empty.hidden if reset_hidden else carry.hidden,
                      memory=empty.memory if reset_memory else carry.memory)


def draw_resets(seed: int, step: int, p: float) -> tuple[bool, bool]:
    """Drawn from (seed, step), so that every rank and every resumed run draws the same."""
    if p == 0:
        return False, False
    u = np.random.default_rng([seed, step, 1]).random(2)
    return bool(u[0] < p), bool(u[1] < p)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on `device`. To a GPU through page-locked (pinned) memory: a `non_blocking` copy from
    ordinary pageable memory may make the host wait for it, which stalls the queue of GPU work every batch.
    (torch's caching host allocator reuses the pinned blocks, and keeps one until its copy has finished.)"""
    if device.type == "cuda":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


class NonFiniteGuard:
    """The first optimizer step whose gradient norm was not finite, and that norm, kept on the device:
    `--on_nonfinite stop` then costs one host sync per `check()` (the loop checks at log intervals and
    before every save, so no checkpoint holds the weights of a non-finite step) instead of one per step.
    The norm is all-reduced, so every rank stops at the same check."""

    def __init__(self, device: torch.device):
        self.first_step = torch.zeros((), dtype=torch.int64, device=device)
        self.first_norm = torch.zeros((), device=device)

    def record(self, norm: torch.Tensor, step: int) -> None:
        is_first = ~torch.isfinite(norm) & (self.first_step == 0)
        self.first_step = torch.where(is_first, step, self.first_step)
        self.first_norm = torch.where(is_first, norm.float(), self.first_norm)

    def check(self) -> None:
        """Raise NonFiniteError if a recorded step had a non-finite gradient norm (a host sync)."""
        step = int(self.first_step.item())
        if step:
            raise NonFiniteError(step, self.first_norm.item())


def stop_if_nonfinite(norm: torch.Tensor, step: int, guard: NonFiniteGuard | None) -> None:
    """--on_nonfinite stop: record the norm for the guard's next check, or without a guard check it now."""
    if guard is not None:
        guard.record(norm, step)
    elif not math.isfinite(norm.item()):  # host sync
        raise NonFiniteError(step, norm.item())


def backward_and_step(accelerator, model, optimizer, loss: torch.Tensor, clip: float,
                      on_nonfinite: str, step: int,
                      guard: NonFiniteGuard | None = None) -> torch.Tensor | None:
    """Backward; at an optimizer step also clip and step. Returns the pre-clip global gradient norm at
    optimizer steps (None on accumulation micro-steps and on steps DeepSpeed's fp16 loss scaler skipped).
    The norm is all-reduced, hence the same on every rank, so every rank takes the same decision on a
    non-finite one."""
    if is_deepspeed(accelerator):
        return _deepspeed_backward_and_step(accelerator, model, loss, step, guard)
    accelerator.backward(loss)
    if not accelerator.sync_gradients:
        return None
    norm = torch.as_tensor(accelerator.clip_grad_norm_(model.parameters(), clip or float("inf")))
    if accelerator.scaler is not None:
        # fp16 loss scaling: GradScaler skips an overflowing step and lowers its scale. (Its step() reads
        # found_inf on the host, and accelerate compares the scales: syncs per step that fp16 always had.)
        optimizer.step()
        optimizer.zero_grad()
        return norm
    if on_nonfinite == "skip":
        if not math.isfinite(norm.item()):  # host sync per step: skipping is decided before the step
            accelerator.print(f"skipping step {step}: non-finite gradient norm {norm.item()}")
            optimizer.zero_grad()
            return norm
    else:
        stop_if_nonfinite(norm, step, guard)
    optimizer.step()
    optimizer.zero_grad()
    return norm


def _deepspeed_backward_and_step(accelerator, engine, loss: torch.Tensor, step: int,
                                 guard: NonFiniteGuard | None) -> torch.Tensor | None:
    # accelerator.backward would run engine.backward and engine.step back to back; we need the gradient norm
    # in between where DeepSpeed does not record it (ZeRO-0 in fp32). Clipping is the engine's own
    # (`gradient_clipping` in ds_config.json, filled from --clip).
    engine.set_gradient_accumulation_boundary(accelerator.sync_gradients)
    scale = unfused_loss_scale(engine)
    # DeepSpeed 0.19.8's engine.backward applies the loss scale of its ZeRO optimizers only (engine.py,
    # backward: `if isinstance(self.optimizer, ZeROOptimizer): loss = self.optimizer.scale_if_loss(loss)`),
    # yet FP16_UnfusedOptimizer.step() divides the gradients by its scale: unscaled, fp16 gradients would
    # underflow and the optimizer would get them 65536x too small. Scale the loss here.
    engine.backward(loss * scale if scale != 1.0 else loss)
    if not accelerator.sync_gradients:
        return None
    if engine.zero_optimization_stage() == 0 and not (engine.fp16_enabled() or engine.bfloat16_enabled()):
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        stop_if_nonfinite(norm, step, guard)
        engine.step()
        return norm
    engine.step()  # may raise the loss scale: `scale` is the one this step's gradients carry
    if engine.fp16_enabled() and not engine.was_step_applied():
        return None  # an fp16 overflow: DeepSpeed skipped the step and lowered its loss scale
    reported = engine.get_global_grad_norm()
    if reported is None:
        return None
    norm = torch.as_tensor(reported, dtype=torch.float32) / scale
    if not engine.fp16_enabled():
        stop_if_nonfinite(norm, step, guard)
    return norm


def unfused_loss_scale(engine) -> float:
    """The loss scale of DeepSpeed's FP16_UnfusedOptimizer (fp16 or bf16 without ZeRO, any optimizer but
    DeepSpeed's FusedAdam), else 1. That wrapper's step() divides the gradients by it and records the norm
    of the still-scaled gradients as the engine's global gradient norm (deepspeed/runtime/fp16/
    unfused_optimizer.py, step: `_global_grad_norm = get_global_norm(norm_groups)`), so that norm is divided
    by it too; ZeRO optimizers scale the loss and divide the norm themselves."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(engine.optimizer, FP16_UnfusedOptimizer):
        return float(engine.optimizer.loss_scale)
    return 1.0


class NonFiniteError(SystemExit):
    def __init__(self, step: int, norm: float):
        super().__init__(f"error: non-finite gradient norm ({norm}) at step {step}; the last good checkpoint "
                         "is intact. Lower --lr, use --precision fp32, or (DDP / one process) "
                         "--on_nonfinite skip.")
