"""GPU acceptance: one command, at most 10 minutes on one GPU, that checks what only a GPU can show and writes
one JSON record (GPU, driver, torch, CUDA, cuDNN, DeepSpeed versions and every check's numbers).

    python -m bench.gpu                        # every check; the record goes to bench/results/
    python -m bench.gpu --list                 # the checks, in the order they run
    python -m bench.gpu --only attention --only lstm --json /tmp/gpu.json

The checks, in order (each passes, fails, or is skipped with its reason):
  lstm        for each --precision, under accelerate's autocast (one process, DDP) and under DeepSpeed's
              16-bit module: the dtype nn.LSTM's kernels receive (train.distributed.lstm_kernel_dtypes)
              against the README's promise (train.distributed.promised_lstm_dtype), and the kernel: cuDNN's
              RNN op, not torch's step-by-step fallback (the profiler's CUDA kernel names go to the record)
  gradients   gradient fidelity of the paper model, dropout off, one B 16 x T 1024 segment with the memory
              full: bf16 and fp16 (with a loss scale) against fp32 (TF32 off); for every LSTM weight cosine
              > 0.99, norm ratio 0.9-1.1, exact zeros where fp32's gradient is not zero < 1%
  attention   the paper's attention (B 16, T 1024, memory 5000, C 1024) forward + backward with each
              formulation (sharnn.kernels: "written", "sdpa") in bf16 and fp32: time, the kernels that ran,
              agreement without dropout; fails while the default (sharnn.kernels.ATTENTION_DEFAULT) is more
              than 10% slower than the other in bf16
  sync        one training step (train.step.train_step: paper model, bf16, LAMB) under
              torch.cuda.set_sync_debug_mode("error"): nothing in a step waits for the GPU
  profile     where a paper training step's GPU time goes (torch.profiler): the LSTM recurrences' share
  throughput  the trainer (launch/single_gpu.yaml, paper preset): 10 warm-up steps, then 20 measured, at batch
              16 and at --batch_size 64 --lr_scaling linear: bytes/s, MFU, peak memory (metrics.jsonl);
              fails below 150,000 bytes/s at batch 16 on an H100/H200-class GPU
  resume      the trainer saves at step 2 of 4; a second run resumes from that checkpoint: its losses at
              steps 3 and 4 equal the uninterrupted run's, its carried state at step 4 too, and the carried
              state loads onto the GPU in float32
  launchers   scripts/gpu_smoke.sh: DDP and DeepSpeed, bf16 and fp16, 10 steps each
  pytest      pytest -m gpu: the tests that need a GPU

Exit status: 0 when every check passed; 1 when one failed (a check that did not finish within --budget_s
failed); 3 when none failed but some were skipped (no GPU, a GPU without bf16, --only/--skip): a GPU that
could not show everything is not accepted. Without a GPU every check is skipped with its reason, and no
record is written unless --json names a file. The functions below take a device, so
tests/unit/test_bench_gpu.py runs their logic on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
BUDGET_S = 600
H100_CLASS = re.compile(r"H100|H200|B100|B200", re.IGNORECASE)
"""GPUs whose throughput must reach MIN_BYTES_PER_S at batch 16 (the issue's estimate for today's design on
an H100/H200-class GPU: the four LSTM recurrences, 1,024 dependent steps each, are 70-90 ms of a 90-120 ms
step)."""
MIN_BYTES_PER_S = 150_000
COSINE_MIN, NORM_RATIO, ZEROS_MAX = 0.99, (0.9, 1.1), 0.01
LSTM_WEIGHTS = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
SLOWER_BY = 0.10  # the attention default may be this much slower than the other formulation
AGREEMENT = {"fp32": 1e-4, "bf16": 2e-2}  # relative error of the two formulations without dropout
PRECISIONS = ("fp32", "bf16", "fp16")


class Skipped(Exception):
    """A check (or a part of one) that cannot run here; the message says why."""


@dataclasses.dataclass
class Outcome:
    status: str  # passed | failed | skipped
    reason: str = ""
    results: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0


def verdict(parts: list[dict]) -> tuple[str, str]:
    """(status, reason) of a check from its parts, each {"status", "reason"}: failed if any failed, else
    skipped if any was skipped, else passed."""
    for status in ("failed", "skipped"):
        bad = [p for p in parts if p["status"] == status]
        if bad:
            return status, "; ".join(p["reason"] for p in bad)
    return "passed", ""


def part(name: str, problems: list[str], skipped: str | None = None, **numbers) -> dict:
    """One part of a check: failed with its problems, skipped with a reason, or passed."""
    if skipped:
        return {"name": name, "status": "skipped", "reason": f"{name}: {skipped}", **numbers}
    if problems:
        return {"name": name, "status": "failed", "reason": f"{name}: {'; '.join(problems)}", **numbers}
    return {"name": name, "status": "passed", "reason": "", **numbers}


def _torch():
    import torch

    return torch


def _sync(device) -> None:
    if device.type == "cuda":
        _torch().cuda.synchronize(device)


def precision_skip(device, precision: str) -> str | None:
    """Why `precision` cannot run on `device`, or None."""
    torch = _torch()
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    return None


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 for cuBLAS matmuls and cuDNN (the RNN too: torch gives cuDNN's LSTM CUDNN_DEFAULT_MATH, which
    lets Ampere and later GPUs run float32 products in TF32, unless cudnn.allow_tf32 is off)."""
    torch = _torch()
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def paper_model_config(**changes):
    from train.config import preset

    return dataclasses.replace(preset("paper").model, **changes)


def top_kernels(prof, n: int = 8) -> list[dict]:
    """The GPU kernels of a profile, by total time (ms), or on a CPU the operators by self time."""
    from torch.autograd import DeviceType

    rows = []
    for event in prof.key_averages():
        if event.device_type == DeviceType.CUDA:
            rows.append((event.device_time_total, event.key))
    if not rows:
        rows = [(e.self_cpu_time_total, e.key) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    rows.sort(reverse=True)
    return [{"kernel": key, "ms": round(us / 1000, 3)} for us, key in rows[:n]]


def _profiler(device):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities)


# ------------------------------------------------------------------------------------------------ lstm
def lstm_case(device, precision: str, engine: str, d_model: int = 1024, T: int = 64, B: int = 16) -> dict:
    """One of the model's LSTM blocks (`Block.recur`) forward and backward as a run in `precision` computes it
    under `engine` ("autocast": accelerate's autocast with float32 weights; "deepspeed": the module cast to
    16 bits, as DeepSpeed's engine casts it): the dtypes its kernels receive against the promised one, and
    which kernel ran."""
    torch = _torch()
    from sharnn import ModelConfig
    from sharnn.model import Block
    from train.distributed import DTYPES, lstm_kernel_dtypes, promised_lstm_dtype

    name = f"{precision} {engine}"
    skip = precision_skip(device, precision)
    if skip:
        return part(name, [], skipped=skip)
    dtype, deepspeed = DTYPES[precision], engine == "deepspeed"
    weights = dtype if deepspeed else torch.float32
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=d_model, d_ff=4 * d_model, n_layer=1, attn="none", mem_len=8)
    block = Block(cfg, use_attn=False).to(device, weights).train()
    x = torch.randn(T, B, d_model, device=device, dtype=weights, requires_grad=True)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=not deepspeed and precision != "fp32")
    promised = promised_lstm_dtype(precision, device.type, deepspeed)
    try:
        with _profiler(device) as prof, lstm_kernel_dtypes() as seen:
            with autocast:
                y, _ = block.recur(x, None)
            y.float().square().sum().backward()
            _sync(device)
    except RuntimeError as e:
        return part(name, [f"nn.LSTM does not run: {str(e).splitlines()[0]}"])
    computed = sorted(str(d).removeprefix("torch.") for d in seen.dtypes)
    ops = sorted(seen.kernels)
    problems = []
    if set(computed) != {str(promised).removeprefix("torch.")}:
        problems.append(f"computed in {', '.join(computed) or 'nothing seen'}, the README promises "
                        f"{str(promised).removeprefix('torch.')}")
    if device.type == "cuda" and not any("_cudnn_rnn" in op for op in ops):
        problems.append(f"not cuDNN's RNN kernel: {', '.join(ops) or 'no RNN op'} (torch's step-by-step "
                        "LSTM, several times slower)")
    # a CPU without bf16/fp16 instructions runs a 16-bit LSTM step by step in torch's ops (in that dtype)
    from train.distributed import native_cpu_matmul

    if device.type == "cpu" and native_cpu_matmul(precision) and not any("mkldnn" in op for op in ops):
        problems.append(f"not oneDNN's RNN kernel: {', '.join(ops) or 'no RNN op'}")
    grad = block.lstm.weight_hh_l0.grad
    if grad is None or not torch.isfinite(grad).all() or not grad.count_nonzero():
        problems.append("the LSTM's weights got no finite, non-zero gradient")
    numbers = {"computed": computed, "promised": str(promised).removeprefix("torch."), "rnn_ops": ops,
               "kernels": top_kernels(prof, 5)}
    if device.type == "cuda" and "float32" in computed:
        numbers["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    return part(name, problems, **numbers)


def check_lstm(ctx) -> Outcome:
    parts = [lstm_case(ctx.device, "fp32", "autocast")]
    for precision in ("bf16", "fp16"):
        for engine in ("autocast", "deepspeed"):
            parts.append(lstm_case(ctx.device, precision, engine))
    status, reason = verdict(parts)
    note = ""
    if any(p.get("cudnn_allow_tf32") for p in parts):
        note = ("torch.backends.cudnn.allow_tf32 is on (torch's default; the trainer leaves it): cuDNN may "
                "run the float32 LSTM's matrix products in TF32 on this GPU")
    return Outcome(status, reason, {"cases": parts, "note": note})


# ------------------------------------------------------------------------------------------- gradients
def compare_gradients(reference: dict, got: dict) -> list[dict]:
    """For each named gradient: cosine with the reference, norm ratio, the fraction of exact zeros where the
    reference is not zero, and whether all three are within the limits (and the gradient finite)."""
    torch = _torch()
    rows = []
    for name, ref in reference.items():
        r, g = ref.double().flatten(), got[name].double().flatten()
        finite = bool(torch.isfinite(g).all())
        r_norm, g_norm = r.norm().item(), g.norm().item()
        cosine = (r @ g).item() / (r_norm * g_norm) if r_norm and g_norm and finite else float("nan")
        ratio = g_norm / r_norm if r_norm and finite else float("nan")
        nonzero = r != 0
        zeros = ((g == 0) & nonzero).sum().item() / max(1, nonzero.sum().item())
        problems = []
        if not finite:
            problems.append("not finite")
        if not cosine > COSINE_MIN:
            problems.append(f"cosine {cosine:.4f} <= {COSINE_MIN}")
        if not NORM_RATIO[0] <= ratio <= NORM_RATIO[1]:
            problems.append(f"norm ratio {ratio:.3f} outside {NORM_RATIO[0]}-{NORM_RATIO[1]}")
        if not zeros < ZEROS_MAX:
            problems.append(f"{zeros:.1%} exact zeros where fp32's gradient is not zero "
                            f"(limit {ZEROS_MAX:.0%})")
        rows.append({"name": name, "cosine": round(cosine, 6), "norm_ratio": round(ratio, 6),
                     "zeros": round(zeros, 6), "passed": not problems, "problems": problems})
    return rows


def model_gradients(model, x, y, state, device, precision: str) -> tuple[dict, dict]:
    """Every parameter's gradient of one forward and backward of (x, y) from `state`, as the trainer computes
    it under accelerate's autocast in `precision` (fp16: the loss scaled by 2^16, halved until the gradients
    are finite, as a loss scaler skips and backs off; the gradients unscaled). Returns (grads, info)."""
    torch = _torch()
    from train.distributed import DTYPES

    scale = 2.0**16 if precision == "fp16" else 1.0
    for _ in range(12):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32"):
            _, loss, _ = model(x, state, targets=y)
        (loss * scale).backward()
        grads = {n: p.grad.detach().float() / scale for n, p in model.named_parameters()}
        if precision != "fp16" or all(torch.isfinite(g).all() for g in grads.values()):
            return grads, {"loss": loss.item(), "loss_scale": scale}
        scale /= 2
    return grads, {"loss": loss.item(), "loss_scale": scale}


def gradient_fidelity(device, cfg, B: int, T: int, precisions=("bf16", "fp16"), seed: int = 0) -> list[dict]:
    """The model (dropout off) on one (T, B) segment with the memory full: each precision's gradients against
    float32's (TF32 off), per LSTM weight (the limits of compare_gradients); the other parameters' worst
    cosine is reported, not judged."""
    torch = _torch()
    from sharnn import SHARNN

    cfg = dataclasses.replace(cfg, dropout=0.0, dropouth=0.0, dropouti=0.0)
    torch.manual_seed(seed)
    model = SHARNN(cfg).to(device).train()
    x, y = (torch.randint(0, 256, (T, B), device=device) for _ in range(2))
    state = None
    with torch.no_grad():  # the memory full, as in a long run
        for _ in range(-(-cfg.mem_len // T) if cfg.attn_layers else 0):
            _, _, state = model(torch.randint(0, 256, (T, B), device=device), state)
    with tf32(False):
        reference, ref_info = model_gradients(model, x, y, state, device, "fp32")
    parts = []
    for precision in precisions:
        skip = precision_skip(device, precision)
        if skip:
            parts.append(part(precision, [], skipped=skip))
            continue
        got, info = model_gradients(model, x, y, state, device, precision)
        lstm = [n for n in reference if n.rsplit(".", 1)[-1] in LSTM_WEIGHTS and ".lstm." in n]
        rows = compare_gradients({n: reference[n] for n in lstm}, got)
        others = compare_gradients({n: reference[n] for n in reference if n not in lstm}, got)
        worst = min(others, key=lambda r: r["cosine"] if r["cosine"] == r["cosine"] else -1, default=None)
        problems = [f"{r['name']}: {', '.join(r['problems'])}" for r in rows if not r["passed"]]
        parts.append(part(precision, problems, lstm_weights=rows, loss=info["loss"],
                          loss_fp32=ref_info["loss"], loss_scale=info["loss_scale"],
                          worst_other=worst and {k: worst[k] for k in ("name", "cosine", "norm_ratio")}))
    return parts


def check_gradients(ctx) -> Outcome:
    parts = gradient_fidelity(ctx.device, paper_model_config(), B=16, T=1024)
    status, reason = verdict(parts)
    return Outcome(status, reason, {"shape": "B 16, T 1024, memory full", "precisions": parts})


# ------------------------------------------------------------------------------------------- attention
def relative_error(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def attention_case(device, impl: str, precision: str, B: int, T: int, M: int, C: int, p: float = 0.1,
                   repeats: int = 5, seed: int = 0) -> dict:
    """The model's attention module (SingleHeadAttention, training mode, dropout p) forward and backward with
    the `impl` formulation, as the model runs it on this device (on a CPU: under set_cpu_kernels("torch"), the
    CUDA code path): median ms over `repeats` after warm-up, the kernels (or CPU operators) of one step."""
    torch = _torch()
    from sharnn import kernels
    from sharnn.model import SingleHeadAttention
    from train.distributed import DTYPES

    torch.manual_seed(seed)
    attn = SingleHeadAttention(C, p).to(device).train()
    h = torch.randn(T, B, C, device=device, requires_grad=True)
    memory = torch.randn(M, B, C, device=device)
    segment = torch.randn(T, B, C, device=device, requires_grad=True)
    autocast = torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")

    def step():
        keys = torch.cat([memory, segment])  # as Block.forward: memory then the segment's keys
        with autocast:
            out = attn(h, keys, segment)
        out.float().square().mean().backward()
        attn.zero_grad(set_to_none=True)
        h.grad = segment.grad = None

    previous = kernels.set_attention_impl(impl), kernels.set_cpu_kernels("torch")
    try:
        for _ in range(2):
            step()
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
        with _profiler(device) as prof:
            step()
            _sync(device)
    finally:
        kernels.set_attention_impl(previous[0])
        kernels.set_cpu_kernels(previous[1])
    sdpa_ops = sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key})
    return {"impl": impl, "precision": precision, "ms": round(1000 * statistics.median(times), 3),
            "ms_min": round(1000 * min(times), 3), "sdpa_ops": sdpa_ops, "kernels": top_kernels(prof, 6)}


def attention_agreement(device, precision: str, B: int, T: int, M: int, C: int, seed: int = 0) -> dict:
    """Dropout off: the two formulations' outputs and gradients (queries' input, the segment's keys), as
    relative errors of "written" against "sdpa" (float32 with TF32 off; bf16 under autocast)."""
    torch = _torch()
    from sharnn import kernels
    from sharnn.model import SingleHeadAttention
    from train.distributed import DTYPES

    torch.manual_seed(seed)
    attn = SingleHeadAttention(C, 0.0).to(device).train()
    h = torch.randn(T, B, C, device=device, requires_grad=True)
    memory = torch.randn(M, B, C, device=device)
    segment = torch.randn(T, B, C, device=device, requires_grad=True)
    autocast = torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")
    results = {}
    previous = kernels.get_attention_impl(), kernels.set_cpu_kernels("torch")
    try:
        with tf32(False):
            for impl in kernels.ATTENTION_IMPLS:
                kernels.set_attention_impl(impl)
                with autocast:
                    out = attn(h, torch.cat([memory, segment]), segment)
                grads = torch.autograd.grad(out.float().square().mean(), (h, segment))
                results[impl] = (out.detach().float(), *grads)
    finally:
        kernels.set_attention_impl(previous[0])
        kernels.set_cpu_kernels(previous[1])
    errors = [relative_error(a, b) for a, b in zip(results["written"], results["sdpa"])]
    return {"precision": precision, "output": errors[0], "grad_h": errors[1], "grad_segment_keys": errors[2]}


def choose_default(ms: dict, default: str, slower_by: float = SLOWER_BY) -> tuple[bool, str]:
    """Whether `default` may stay the default given each formulation's time, and what to say."""
    fastest = min(ms, key=ms.get)
    if fastest == default:
        return True, f"{default} is the faster ({ms[default]:.2f} ms against " + \
            ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items() if k != default) + ")"
    if ms[default] <= ms[fastest] * (1 + slower_by):
        return True, (f"{default} ({ms[default]:.2f} ms) is within {slower_by:.0%} of {fastest} "
                      f"({ms[fastest]:.2f} ms): the default stays")
    return False, (f"{default} takes {ms[default]:.2f} ms, {fastest} {ms[fastest]:.2f} ms: make {fastest!r} "
                   f"the default (sharnn.kernels.ATTENTION_DEFAULT; for now SHARNN_ATTENTION={fastest})")


def attention_report(device, B: int, T: int, M: int, C: int, repeats: int = 5) -> list[dict]:
    """Both formulations timed and compared in bf16 (the paper's precision, which picks the default) and
    fp32; one part per precision."""
    from sharnn import kernels

    parts = []
    for precision in ("bf16", "fp32"):
        skip = precision_skip(device, precision)
        if skip:
            parts.append(part(precision, [], skipped=skip))
            continue
        cases = [attention_case(device, impl, precision, B, T, M, C, repeats=repeats)
                 for impl in kernels.ATTENTION_IMPLS]
        agreement = attention_agreement(device, precision, B, T, M, C)
        problems = [f"the formulations differ without dropout: {k} relative error {v:.1e} (limit "
                    f"{AGREEMENT[precision]:.0e})" for k, v in agreement.items()
                    if k != "precision" and not v < AGREEMENT[precision]]
        ms = {c["impl"]: c["ms"] for c in cases}
        ok, choice = choose_default(ms, kernels.ATTENTION_DEFAULT)
        if precision == "bf16" and not ok:
            problems.append(choice)
        parts.append(part(precision, problems, cases=cases, agreement=agreement, default_choice=choice))
    return parts


def check_attention(ctx) -> Outcome:
    cfg = paper_model_config()
    T = 1024
    parts = attention_report(ctx.device, B=16, T=T, M=cfg.mem_len - T, C=cfg.d_model)
    status, reason = verdict(parts)
    return Outcome(status, reason, {"shape": f"B 16, T {T}, keys {cfg.mem_len}, C {cfg.d_model}, dropout 0.1",
                                    "precisions": parts})


# ------------------------------------------------------------------------------------------------ sync
def check_sync(ctx) -> Outcome:
    """One train_step of the paper model (bf16, LAMB) after two warm-up steps, under
    torch.cuda.set_sync_debug_mode("error")."""
    torch = _torch()
    from accelerate import Accelerator

    from sharnn import SHARNN, CarryState
    from sharnn.corpus.data import ByteSplit, StreamLoader
    from sharnn.optim import LAMB
    from train.config import preset
    from train.distributed import ACCEL_PRECISION
    from train.step import NonFiniteGuard, train_step

    cfg = dataclasses.replace(preset("paper"), vary_bptt=False, warmup_steps=1)
    precision = cfg.precision if not precision_skip(ctx.device, cfg.precision) else "fp16"
    accelerator = Accelerator(mixed_precision=ACCEL_PRECISION[precision])
    torch.manual_seed(0)
    model = SHARNN(cfg.model)
    optimizer = LAMB(model.parameters(), lr=1e-4, weight_decay=cfg.weight_decay, min_trust=cfg.min_trust)
    model, optimizer = accelerator.prepare(model, optimizer)
    data = bytes(torch.randint(0, 256, (cfg.batch_size * (cfg.bptt + 1) * 8,), dtype=torch.uint8).tolist())
    loader = StreamLoader(ByteSplit.from_bytes(data), cfg.batch_size, cfg.bptt, 0, 1, cfg.seed,
                          vary_bptt=False)
    guard, carry = NonFiniteGuard(accelerator.device), CarryState.empty(cfg.model.n_layer)
    for step in (1, 2):  # lazy state (optimizer, cuDNN plans) first
        _, carry = train_step(accelerator, model, optimizer, loader, carry, cfg, step, guard)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, carry = train_step(accelerator, model, optimizer, loader, carry, cfg, 3, guard)
    except RuntimeError as e:
        frames = [f"{Path(f.filename).name}:{f.lineno} {f.name}"
                  for f in traceback.extract_tb(e.__traceback__)
                  if "/sharnn/" in f.filename or "/train/" in f.filename]
        return Outcome("failed", f"a synchronizing CUDA operation in a training step ({precision}): "
                       f"{str(e).splitlines()[0]} at {' <- '.join(reversed(frames[-3:]))}")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    guard.check()
    accelerator.free_memory()
    return Outcome("passed", "", {"precision": precision, "shape": f"B {cfg.batch_size}, T {cfg.bptt}"})


# --------------------------------------------------------------------------------------------- profile
LSTM_OPS = re.compile(r"_cudnn_rnn|miopen_rnn|mkldnn_rnn|lstm_cell")


def step_profile(device, cfg, B: int, T: int, precision: str, steps: int = 2) -> dict:
    """Where the time of a training step (forward, backward, clip, LAMB, carry) goes: the device time per
    step (CPU time on a CPU) of the LSTM's kernels and of the largest operators."""
    torch = _torch()
    from torch.autograd import DeviceType

    from sharnn import SHARNN
    from sharnn.optim import LAMB
    from train.distributed import DTYPES

    torch.manual_seed(0)
    model = SHARNN(cfg).to(device).train()
    optimizer = LAMB(model.parameters(), lr=1e-4, weight_decay=1.2e-6, min_trust=0.25)
    autocast = torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")
    x, y = (torch.randint(0, 256, (T, B), device=device) for _ in range(2))
    state = None

    def step():
        nonlocal state
        with autocast:
            _, loss, state = model(x, state, targets=y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state = state.detach()

    for _ in range(-(-cfg.mem_len // T) + 1):  # the memory full, then one more: warm
        step()
    _sync(device)
    with _profiler(device) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        wall = (time.perf_counter() - start) / steps
    on_gpu = device.type == "cuda"

    def self_us(e) -> float:
        return e.self_device_time_total if on_gpu else e.self_cpu_time_total

    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU]
    total = sum(self_us(e) for e in events) / steps / 1000
    lstm = sum(self_us(e) for e in events if LSTM_OPS.search(e.key)) / steps / 1000
    top = sorted(events, key=self_us, reverse=True)[:10]
    share = lstm / total if total else float("nan")
    clock = "GPU" if on_gpu else "CPU"
    return {"precision": precision, "shape": f"B {B}, T {T}", "wall_ms_per_step": round(1000 * wall, 2),
            "busy_ms_per_step": round(total, 2), "lstm_ms_per_step": round(lstm, 2),
            "lstm_share": round(share, 3),
            "top_ops": [{"op": e.key, "ms_per_step": round(self_us(e) / steps / 1000, 2)} for e in top],
            "bound": (f"the LSTM recurrences take {lstm:.1f} of the {total:.1f} ms of {clock} time per step "
                      f"({share:.0%}); the wall time is {1000 * wall:.1f} ms")}


def check_profile(ctx) -> Outcome:
    precision = "bf16" if not precision_skip(ctx.device, "bf16") else "fp16"
    return Outcome("passed", "", step_profile(ctx.device, paper_model_config(), B=16, T=1024,
                                              precision=precision))


# ------------------------------------------------------------------------------- the trainer, launched
def accelerate_launch(port: int) -> list[str]:
    """`accelerate launch` on one GPU (launch/single_gpu.yaml), from this Python's environment."""
    exe = Path(sys.executable).with_name("accelerate")
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    return [*launcher, "--config_file", str(REPO / "launch" / "single_gpu.yaml"), "--num_processes", "1",
            "--main_process_port", str(port)]


def train_command(launch: list[str] | None, data: Path, out: Path, *args: str,
                  preset: str = "paper") -> list[str]:
    """The trainer on `data` into `out` for a short measured run: no sample, no test, no attention report,
    validation only at the end on 2 segments. `launch` None: `python -m train` (one process)."""
    head = [*launch, "-m", "train"] if launch else [sys.executable, "-m", "train"]
    return [*head, "--preset", preset, "--data", str(data), "--out", str(out), "--eval_every", "0",
            "--no_test_at_end", "--sample_bytes", "0", "--eval_max_segments", "2", "--no_attention_report",
            "--progress_interval_s", "0", *args]


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> int:
    """Run cmd with its output in `log`; returns the exit status (124 on timeout)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        try:
            return subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=max(1, timeout),
                                  env={**os.environ, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[bench.gpu: timed out after {timeout:.0f} s]\n")
            return 124


def tail(log: Path, n: int = 6) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = [line for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-n:])


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def throughput_summary(rows: list[dict], measured_steps: int) -> dict:
    """The logged intervals covering the last `measured_steps` steps: bytes/s (their bytes over their time),
    MFU (time-weighted), the peak memory, the step time."""
    perf = [r for r in rows if r.get("perf/bytes_per_s")]
    if not perf:
        raise ValueError("no perf/bytes_per_s in metrics.jsonl")
    last = perf[-1]["step"]
    window = [r for r in perf if r["step"] > last - measured_steps]
    starts = [last - measured_steps] + [r["step"] for r in window]
    steps = [r["step"] - start for r, start in zip(window, starts)]
    seconds = [n * r["perf/step_time_s"] for n, r in zip(steps, window)]
    n_bytes = sum(s * r["perf/bytes_per_s"] for s, r in zip(seconds, window))
    mfu = [r.get("perf/mfu") for r in window]
    mean_mfu = sum(m * s for m, s in zip(mfu, seconds)) / sum(seconds) if None not in mfu else None
    return {"steps": sum(steps), "bytes_per_s": round(n_bytes / sum(seconds)),
            "step_time_s": round(sum(seconds) / sum(steps), 4),
            "mfu": round(mean_mfu, 4) if mean_mfu is not None else None,
            "peak_memory_bytes": max(r.get("perf/memory_bytes") or 0 for r in perf)}


def throughput_verdict(gpu_name: str, bytes_per_s: float) -> tuple[bool, str]:
    if H100_CLASS.search(gpu_name):
        if bytes_per_s < MIN_BYTES_PER_S:
            return False, (f"{bytes_per_s:,.0f} bytes/s at batch 16 on an H100/H200-class GPU, below "
                           f"{MIN_BYTES_PER_S:,}")
        return True, f"at least {MIN_BYTES_PER_S:,} bytes/s at batch 16 on an H100/H200-class GPU"
    return True, (f"no threshold for {gpu_name} (the {MIN_BYTES_PER_S:,} bytes/s floor is for "
                  "H100/H200-class GPUs)")


WARMUP_STEPS, MEASURED_STEPS = 10, 20


def throughput_runs(launch, data: Path, work: Path, gpu_name: str, timeout: float, preset: str = "paper",
                    batches=((16, ()), (64, ("--lr_scaling", "linear"))), extra=(),
                    warmup: int = WARMUP_STEPS, measured: int = MEASURED_STEPS) -> list[dict]:
    """The trainer for `warmup` + `measured` steps at each batch, logging every measured / 2 steps; one part
    per batch, from the intervals of the measured steps."""
    parts = []
    deadline = time.monotonic() + timeout
    for batch, flags in batches:
        name = f"batch {batch}" + (f" {' '.join(flags)}" if flags else "")
        out = work / f"throughput-b{batch}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = train_command(launch, data, out, "--batch_size", str(batch), *flags, "--max_steps",
                            str(warmup + measured), "--warmup_steps", str(min(5, warmup)), "--log_every",
                            str(max(1, measured // 2)), "--save_every", "0", *extra, preset=preset)
        rc = run_logged(cmd, work / f"throughput-b{batch}.log", deadline - time.monotonic())
        if rc != 0:
            parts.append(part(name, [f"the trainer exited {rc}: {tail(work / f'throughput-b{batch}.log')}"]))
            continue
        summary = throughput_summary(read_metrics(out), measured)
        problems = []
        if batch == 16:
            ok, why = throughput_verdict(gpu_name, summary["bytes_per_s"])
            summary["threshold"] = why
            problems = [] if ok else [why]
        parts.append(part(name, problems, **summary))
    return parts


def check_throughput(ctx) -> Outcome:
    parts = throughput_runs(accelerate_launch(ctx.port), ctx.data(), ctx.work, ctx.gpu_name, ctx.remaining())
    status, reason = verdict(parts)
    results = {"warmup_steps": WARMUP_STEPS, "measured_steps": MEASURED_STEPS, "runs": parts}
    times = [p.get("step_time_s") for p in parts]
    if len(times) == 2 and None not in times:  # a latency-bound step: 4x the bytes for little more time
        results["step_time_b64_over_b16"] = round(times[1] / times[0], 3)
    return Outcome(status, reason, results)


def losses(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in rows if r.get("train/loss") is not None}


CARRY_TOLERANCE = 1e-4  # the carried state (LSTM h and c, normalised memory: order 1) after a resume


def resume_verdict(uninterrupted: dict[int, float], resumed: dict[int, float], steps, rel_tol: float = 1e-6
                   ) -> tuple[list[str], dict]:
    """Problems (none: equal) of the resumed run's losses at `steps` against the uninterrupted run's. Equal
    bitwise is expected (the same kernels on the same GPU); a relative difference up to rel_tol is accepted
    and reported (a GPU reduction whose order varies); more is a wrong resume (other dropout masks, carried
    state or weights)."""
    problems, numbers = [], {"bitwise": True, "losses": {}}
    for step in steps:
        a, b = uninterrupted.get(step), resumed.get(step)
        numbers["losses"][step] = [a, b]
        if a is None or b is None:
            problems.append(f"no loss logged at step {step}")
            continue
        if a != b:
            numbers["bitwise"] = False
            if abs(a - b) > rel_tol * abs(a):
                problems.append(f"step {step}: loss {b!r} after resuming, {a!r} uninterrupted")
    return problems, numbers


def resume_run(launch, data: Path, work: Path, device, timeout: float, preset: str = "paper",
               extra=()) -> dict:
    """Save at step 2 of an uninterrupted 4-step run; resume a second run from that checkpoint; compare the
    losses of steps 3 and 4, and the carried state both runs saved at step 4; load that state onto `device`
    as the trainer does (float32, on the device)."""
    torch = _torch()
    from safetensors.torch import load_file

    from sharnn.io import rundir

    deadline = time.monotonic() + timeout
    common = ("--max_steps", "4", "--warmup_steps", "1", "--log_every", "1", *extra)
    whole, resumed = work / "resume-whole", work / "resume-resumed"
    for d in (whole, resumed):
        shutil.rmtree(d, ignore_errors=True)
    rc = run_logged(train_command(launch, data, whole, *common, "--save_every", "2", preset=preset),
                    work / "resume-whole.log", deadline - time.monotonic())
    if rc != 0:
        return part("resume", [f"the uninterrupted run exited {rc}: {tail(work / 'resume-whole.log')}"])
    ckpt2 = whole / "checkpoints" / "step-00000002"
    rc = run_logged(train_command(launch, data, resumed, *common, "--save_every", "0", "--resume", str(ckpt2),
                                  preset=preset), work / "resume-resumed.log", deadline - time.monotonic())
    if rc != 0:
        return part("resume", [f"the resumed run exited {rc}: {tail(work / 'resume-resumed.log')}"])
    problems, numbers = resume_verdict(losses(read_metrics(whole)), losses(read_metrics(resumed)), (3, 4))
    carry_name = rundir.carry_name(0)
    carries = [load_file(d / "checkpoints" / "step-00000004" / carry_name, device=str(device))
               for d in (whole, resumed)]
    worst = max(((a - carries[1][k]).abs().max().item() for k, a in carries[0].items()), default=0.0)
    numbers["carry_max_difference"] = worst
    if set(carries[0]) != set(carries[1]) or worst > CARRY_TOLERANCE:
        problems.append(f"the carried state at step 4 differs from the uninterrupted run's (max {worst:.2e})")
    placed = {(t.device.type, t.dtype) for t in carries[1].values()}
    numbers["carry_loaded_as"] = sorted(f"{d} {str(t).removeprefix('torch.')}" for d, t in placed)
    if placed != {(device.type, torch.float32)}:
        problems.append(f"the carried state loads as {numbers['carry_loaded_as']}, not {device.type} float32")
    return part("resume", problems, **numbers)


def check_resume(ctx) -> Outcome:
    result = resume_run(accelerate_launch(ctx.port), ctx.data(), ctx.work, ctx.device, ctx.remaining())
    status, reason = verdict([result])
    return Outcome(status, reason, result)


def check_launchers(ctx) -> Outcome:
    log = ctx.work / "launchers.log"
    exe = Path(sys.executable).with_name("accelerate")
    env = {"STEPS": "10", "GPU_TESTS": "0", "WORK": str(ctx.work / "launchers"), "DATA": str(ctx.data()),
           "PYTHON": sys.executable, "ACCELERATE": str(exe) if exe.exists() else "accelerate",
           "PORT": str(ctx.port + 1)}
    rc = run_logged(["bash", str(REPO / "scripts" / "gpu_smoke.sh")], log, ctx.remaining(), env)
    text = log.read_text(errors="replace") if log.exists() else ""
    head = "case      bytes per second"
    summary = text.split(head, 1)[1].strip().splitlines() if head in text else []
    if rc != 0:
        return Outcome("failed", f"scripts/gpu_smoke.sh exited {rc}: {tail(log)}", {"summary": summary})
    return Outcome("passed", "", {"summary": summary})


def check_pytest(ctx) -> Outcome:
    log = ctx.work / "pytest-gpu.log"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/"]
    rc = run_logged(cmd, log, ctx.remaining())
    last = tail(log, 1)
    if rc != 0:
        return Outcome("failed", f"pytest -m gpu exited {rc}: {tail(log, 10)}", {"summary": last})
    return Outcome("passed", "", {"summary": last})


# ------------------------------------------------------------------------------------------ the command
@dataclasses.dataclass
class Check:
    name: str
    run: object  # Context -> Outcome
    doc: str


CHECKS = [
    Check("lstm", check_lstm, "the LSTM's computed dtype and kernel for each --precision"),
    Check("gradients", check_gradients, "bf16/fp16 gradients of the paper model against fp32"),
    Check("attention", check_attention, "both attention formulations: time, kernels, agreement"),
    Check("sync", check_sync, "a training step under torch.cuda.set_sync_debug_mode('error')"),
    Check("profile", check_profile, "where a paper training step's GPU time goes"),
    Check("throughput", check_throughput, "the trainer at batch 16 and 64: bytes/s, MFU, memory"),
    Check("resume", check_resume, "save, resume, the next losses equal the uninterrupted run's"),
    Check("launchers", check_launchers, "scripts/gpu_smoke.sh: DDP and DeepSpeed, bf16 and fp16"),
    Check("pytest", check_pytest, "pytest -m gpu"),
]
NAMES = [c.name for c in CHECKS]


@dataclasses.dataclass
class Context:
    device: object
    gpu_name: str
    work: Path
    data_dir: Path | None
    deadline: float
    port: int

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def data(self) -> Path:
        """The corpus for the trainer's runs: --data, or the demo corpus prepared once under the work dir."""
        if self.data_dir is None:
            self.data_dir = self.work / "data"
            if not (self.data_dir / "manifest.json").is_file():
                from sharnn.corpus.prepare import prepare_demo

                prepare_demo(self.data_dir, overwrite=True)
        return self.data_dir


def versions() -> dict:
    """The software and the machine: torch, CUDA, cuDNN, NCCL, accelerate, DeepSpeed, the driver, the GPU."""
    torch = _torch()

    def dist(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "accelerate": dist("accelerate"), "deepspeed": dist("deepspeed"), "driver": None,
           "platform": platform.platform(), "cpu": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": props.name, "memory_bytes": props.total_memory,
                      "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
                      "bf16": torch.cuda.is_bf16_supported()}
        with contextlib.suppress(Exception):
            out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            if smi.returncode == 0 and smi.stdout.strip():
                out["driver"] = smi.stdout.strip().splitlines()[0]
    return out


def no_gpu_reason() -> str | None:
    torch = _torch()
    if torch.cuda.is_available():
        return None
    return f"no CUDA GPU: torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees none"


def exit_status(outcomes: dict[str, Outcome]) -> int:
    statuses = {o.status for o in outcomes.values()}
    return 1 if "failed" in statuses else 3 if "skipped" in statuses or not outcomes else 0


def default_record_path(gpu_name: str, day: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"
    path = RESULTS / f"{day}-gpu-{slug}.json"
    n = 2
    while path.exists():
        path = RESULTS / f"{day}-gpu-{slug}-{n}.json"
        n += 1
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=NAMES, default=[], metavar="CHECK",
                        help=f"run only this check (repeatable): {', '.join(NAMES)}")
    parser.add_argument("--skip", action="append", choices=NAMES, default=[], metavar="CHECK",
                        help="leave this check out (repeatable); it counts as skipped")
    parser.add_argument("--list", action="store_true", help="print the checks and exit")
    parser.add_argument("--json", type=Path, default=None,
                        help="the record's path (default on a GPU: bench/results/DATE-gpu-NAME.json; "
                             "without a GPU none is written unless this is given)")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "gpu_acceptance",
                        help="the trainer's run directories and logs (replaced run by run)")
    parser.add_argument("--data", type=Path, default=None,
                        help="a prepared corpus for the trainer's runs (default: the demo corpus, prepared "
                             "under --work)")
    parser.add_argument("--budget_s", type=float, default=BUDGET_S,
                        help="the whole command's time limit: a check that does not finish in it fails")
    parser.add_argument("--port", type=int, default=29660, help="accelerate's main process port")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        for check in CHECKS:
            print(f"{check.name:<11} {check.doc}")
        return 0
    if not args.budget_s > 0:
        parser.error(f"--budget_s must be > 0, got {args.budget_s}")
    if args.data is not None and not (args.data / "manifest.json").is_file():
        parser.error(f"--data {args.data}: not a prepared corpus (no manifest.json); make one with "
                     "sharnn-prepare")
    torch = _torch()

    start, wall = time.monotonic(), time.time()
    selected = [c for c in CHECKS if (not args.only or c.name in args.only) and c.name not in args.skip]
    missing_gpu = no_gpu_reason()
    gpu_name = torch.cuda.get_device_name(0) if missing_gpu is None else "no GPU"
    ctx = Context(torch.device("cuda", 0) if missing_gpu is None else torch.device("cpu"), gpu_name,
                  args.work.resolve(), args.data.resolve() if args.data else None, start + args.budget_s,
                  args.port)
    print(f"bench.gpu: {gpu_name}; checks: {', '.join(c.name for c in selected) or 'none'}; "
          f"budget {args.budget_s:g} s", flush=True)
    outcomes: dict[str, Outcome] = {}
    for check in CHECKS:
        if check not in selected:
            flag = "--skip" if check.name in args.skip else "--only"
            outcomes[check.name] = Outcome("skipped", f"not selected ({flag})")
        elif missing_gpu:
            outcomes[check.name] = Outcome("skipped", missing_gpu)
        elif ctx.remaining() <= 0:
            outcomes[check.name] = Outcome("failed", f"not run: the {args.budget_s:g} s budget was spent")
        else:
            ctx.work.mkdir(parents=True, exist_ok=True)
            t = time.monotonic()
            try:
                outcomes[check.name] = check.run(ctx)
            except Skipped as e:
                outcomes[check.name] = Outcome("skipped", str(e))
            except Exception as e:  # a check that crashes has failed; the record says where
                where = traceback.extract_tb(e.__traceback__)[-1]
                first = str(e).splitlines()[0] if str(e) else ""
                outcomes[check.name] = Outcome("failed", f"{type(e).__name__}: {first} "
                                               f"({Path(where.filename).name}:{where.lineno})")
            outcomes[check.name].seconds = round(time.monotonic() - t, 1)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        o = outcomes[check.name]
        print(f"  {check.name:<11} {o.status.upper():<8} {o.seconds:6.1f} s  {o.reason}", flush=True)
    status = exit_status(outcomes)
    n_skipped = sum(o.status == "skipped" for o in outcomes.values())
    verdict_line = {0: "ACCEPTED: every check passed",
                    1: f"FAILED: {', '.join(n for n, o in outcomes.items() if o.status == 'failed')}",
                    3: f"NOT ACCEPTED: {n_skipped} check(s) skipped"
                       + (f" ({missing_gpu})" if missing_gpu else "")}[status]
    record = {"kind": "gpu-acceptance",
              "date": datetime.datetime.fromtimestamp(wall).isoformat(timespec="seconds"),
              "command": "python -m bench.gpu " + " ".join(argv if argv is not None else sys.argv[1:]),
              "git": _git_sha(), "versions": versions(),
              "attention": {"default": _attention_default(), "selected": os.environ.get("SHARNN_ATTENTION")},
              "budget_s": args.budget_s, "wall_s": round(time.monotonic() - start, 1), "exit_status": status,
              "verdict": verdict_line,
              "checks": [{"name": n, **dataclasses.asdict(o)} for n, o in outcomes.items()]}
    path = args.json
    if path is None and not missing_gpu:
        path = default_record_path(gpu_name, datetime.date.fromtimestamp(wall).isoformat())
    if path is not None:
        from sharnn.io.atomic import write_json

        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, _jsonable(record))
    print(f"bench.gpu: {verdict_line} ({record['wall_s']:.0f} s); record: {path or 'none written (no GPU)'}")
    return status


def _attention_default() -> str:
    from sharnn import kernels

    return kernels.ATTENTION_DEFAULT


def _git_sha() -> str:
    from train.log import git_sha

    return git_sha()


def _jsonable(value):
    """NaN and infinities as null (strict JSON), tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
