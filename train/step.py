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

from sharnn.data import StreamLoader
from sharnn.state import CarryState
from train.config import TrainConfig
from train.distributed import is_deepspeed


@dataclass
class StepOutput:
    loss: torch.Tensor
    """Sum of the micro-batches' mean losses (nats), on the device: no host sync."""
    grad_norm: torch.Tensor | None
    """Global gradient norm before clipping (None if the engine reported none)."""
    bytes: int
    """Bytes predicted on this rank."""
    epoch: int
    """Epoch of the last micro-batch."""
    data_s: float
    """Seconds spent fetching the batches."""


def train_step(accelerator, model, optimizer, loader: StreamLoader, carry: CarryState, cfg: TrainConfig,
               step: int) -> tuple[StepOutput, CarryState]:
    """Optimizer step `step` (1-based) over `cfg.grad_accum` micro-batches of this rank's streams."""
    loss_sum, n_bytes, data_s, grad_norm = torch.zeros((), device=accelerator.device), 0, 0.0, None
    for _ in range(cfg.grad_accum):
        t0 = time.perf_counter()
        batch = next(loader)
        if batch.is_epoch_start:  # the streams restart: so does the state
            carry = carry.reset()
        x = batch.inputs.to(accelerator.device, non_blocking=True).t()  # (T, B): time-major
        y = batch.targets.to(accelerator.device, non_blocking=True).t()
        data_s += time.perf_counter() - t0
        with accelerator.accumulate(model):
            _, loss, carry = model(x, carry, targets=y)
            norm = backward_and_step(accelerator, model, optimizer, loss, cfg.clip, cfg.on_nonfinite, step)
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


def backward_and_step(accelerator, model, optimizer, loss: torch.Tensor, clip: float,
                      on_nonfinite: str, step: int) -> torch.Tensor | None:
    """Backward; at an optimizer step also clip and step. Returns the pre-clip global gradient norm at
    optimizer steps (None on accumulation micro-steps). The norm is all-reduced, hence the same on every
    rank, so every rank takes the same decision on a non-finite one."""
    if is_deepspeed(accelerator):
        return _deepspeed_backward_and_step(accelerator, model, loss, step)
    accelerator.backward(loss)
    if not accelerator.sync_gradients:
        return None
    norm = torch.as_tensor(accelerator.clip_grad_norm_(model.parameters(), clip or float("inf")))
    if not math.isfinite(norm.item()):  # host sync, once per optimizer step
        # fp16 loss scaling: the scaler skips the step and lowers its scale
        if accelerator.scaler is not None:
            optimizer.step()
            optimizer.zero_grad()
            return norm
        if on_nonfinite == "stop":
            raise NonFiniteError(step, norm.item())
        accelerator.print(f"skipping step {step}: non-finite gradient norm {norm.item()}")
        optimizer.zero_grad()
        return norm
    optimizer.step()
    optimizer.zero_grad()
    return norm


def _deepspeed_backward_and_step(accelerator, engine, loss: torch.Tensor, step: int) -> torch.Tensor | None:
    # accelerator.backward would run engine.backward and engine.step back to back; we need the gradient norm
    # in between where DeepSpeed does not record it (ZeRO-0 in fp32). Clipping is the engine's own
    # (`gradient_clipping` in ds_config.json, filled from --clip).
    engine.set_gradient_accumulation_boundary(accelerator.sync_gradients)
    engine.backward(loss)
    if not accelerator.sync_gradients:
        return None
    norm = None
    if engine.zero_optimization_stage() == 0 and not (engine.fp16_enabled() or engine.bfloat16_enabled()):
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if not math.isfinite(norm.item()):
            raise NonFiniteError(step, norm.item())
    engine.step()
    if norm is None:
        norm = torch.as_tensor(float(engine.get_global_grad_norm()))
        if not math.isfinite(norm.item()) and not engine.fp16_enabled():  # fp16: the loss scaler skips it
            raise NonFiniteError(step, norm.item())
    return norm


class NonFiniteError(SystemExit):
    def __init__(self, step: int, norm: float):
        super().__init__(f"error: non-finite gradient norm ({norm}) at step {step}; the last good checkpoint "
                         "is intact. Lower --lr, use --precision fp32, or (DDP / one process) "
                         "--on_nonfinite skip.")
