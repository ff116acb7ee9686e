"""Pieces of the loop that are reused or tested on their own: evaluation and the precision check."""

from __future__ import annotations

import math

import torch
from accelerate.utils import DistributedType

from sharnn.data import ByteSplit, EvalStreams


@torch.no_grad()
def evaluate(accelerator, model, split: ByteSplit, n_streams: int, seg_len: int,
             max_segments: int | None = None) -> float:
    """Bits per byte over `n_streams` streams of `split`, split among the ranks, state carried.

    Every rank calls this (it all-reduces). The number does not depend on the world size: the streams are
    the same for any world size, each rank scores its share, and the sums are added. bpc = sum of per-byte
    losses / bytes predicted / ln 2 (the reference divides by the stream length, one more than the bytes
    predicted: a relative difference of 1/L).
    """
    was_training = model.training
    model.eval()
    streams = EvalStreams(split, n_streams, seg_len, accelerator.process_index, accelerator.num_processes)
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (sum of losses, bytes)
    state = None
    with accelerator.autocast():
        for i, (x, y) in enumerate(streams):
            if max_segments is not None and i >= max_segments:
                break
            x, y = x.to(accelerator.device).t(), y.to(accelerator.device).t()  # (T, b): time-major
            _, loss, state = model(x, state, targets=y)
            totals += torch.stack([loss.double() * y.numel(), torch.tensor(float(y.numel()), dtype=torch.float64,
                                                                           device=totals.device)])
    model.train(was_training)
    totals = accelerator.reduce(totals, reduction="sum")
    return (totals[0] / totals[1]).item() / math.log(2)


def native_cpu_matmul(precision: str) -> bool:
    """Whether this CPU multiplies bf16/fp16 matrices in hardware (avx512_bf16 or AMX). Without it, oneDNN
    emulates them: measured on a 2-core AMD EPYC without avx512, a 2048^2 bf16 product ran at 0.3 GFLOP/s
    against 120 in fp32."""
    cpu = torch.cpu
    if precision == "fp32":
        return True
    if precision == "bf16":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    else:
        probes = ("_is_amx_fp16_supported",)
    return any(getattr(cpu, name, lambda: False)() for name in probes)


def check_precision(precision: str, device: torch.device) -> str:
    """Run a small LSTM forward and backward in the chosen precision; return a line saying what runs.

    bf16/fp16 support for nn.LSTM differs between devices and CUDA/oneDNN versions: fail at start-up with a
    clear message rather than 20 minutes into a run.
    """
    if precision == "fp32":
        return "precision fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    lstm = torch.nn.LSTM(64, 64).to(device)
    x = torch.randn(8, 2, 64, device=device)
    try:
        with torch.autocast(device.type, dtype=dtype):
            y, _ = lstm(x.to(dtype))
        y.float().sum().backward()
    except RuntimeError as e:
        raise SystemExit(f"error: --precision {precision}: nn.LSTM does not run in {precision} on "
                         f"{device.type} here ({str(e).splitlines()[0]}). Use --precision fp32"
                         f"{'' if precision == 'bf16' else ' or bf16'}.") from None
    line = f"precision {precision}: LSTM forward/backward checked on {device.type} (output {y.dtype})"
    if device.type == "cpu" and not native_cpu_matmul(precision):
        line += (f"\nwarning: this CPU has no {precision} matrix instructions (avx512_bf16/AMX): {precision} runs "
                 f"emulated, typically 100x slower than fp32 here. Use --precision fp32 on this machine.")
    return line


def backward_and_step(accelerator, model, optimizer, loss: torch.Tensor, clip: float,
                      on_nonfinite: str, step: int) -> torch.Tensor | None:
    """Backward; at an optimizer step also clip and step. Returns the pre-clip global gradient norm at
    optimizer steps (None on accumulation micro-steps). The norm is all-reduced, hence the same on every
    rank, so every rank takes the same decision on a non-finite one."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return _deepspeed_backward_and_step(accelerator, model, loss, step)
    accelerator.backward(loss)
    if not accelerator.sync_gradients:
        return None
    norm = torch.as_tensor(accelerator.clip_grad_norm_(model.parameters(), clip or float("inf")))
    if not math.isfinite(norm.item()):  # host sync, once per optimizer step
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
        super().__init__(f"error: non-finite gradient norm ({norm}) at step {step}; the last good checkpoint is "
                         "intact. Lower --lr, use --precision fp32, or (DDP / one process) --on_nonfinite skip.")
