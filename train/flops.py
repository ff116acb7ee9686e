"""Model FLOPs per byte of SHA-RNN, and the device's peak: the two halves of MFU (trainer and benchmark).

The analytic count covers matrix products only (2 FLOPs per multiply-add); tests/unit/test_flops.py checks it
exactly against torch's FlopCounterMode.

Per byte (one position of one stream), forward:
    LSTM, per block:        2 * (d * 4d) input projection + 2 * (d * 4d) recurrent projection = 16 d^2
    Boom, per block:        2 * d * d_ff
    attention, per block:   query Linear 2 d^2, scores q.k over K keys 2 K d, mixing weights.v 2 K d
    output layer:           2 * d * V
K is the number of keys a position is scored against: memory + segment length (the full causal
rectangle is computed, masked entries included, as every dense kernel does).

Backward costs twice the forward (one product for each operand's gradient), except in the attention:
the memory is carried state without gradient, so of the four backward products only the two that make
the query's and the weights' gradients run over all K keys (4 K d); the keys' and values' gradients are
needed for the segment's own T keys only (4 T d: the T x T causal square, dense). Training per byte:
    forward + 2 * (forward - attention's 4 K d) + 4 K d + 4 T d   (per attention block)
Element-wise work (gates, LayerNorm, GELU, softmax, dropout) is left out, as is customary for MFU.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

from sharnn.config import ModelConfig


def forward_flops_per_byte(cfg: ModelConfig, n_keys: float) -> float:
    d, n_attn = cfg.d_model, len(cfg.attn_layers)
    lstm = 16 * d * d * cfg.n_layer
    boom = 2 * d * cfg.d_ff * cfg.n_layer
    attn = n_attn * (2 * d * d + 4 * n_keys * d)
    out = 2 * d * cfg.vocab_size
    return float(lstm + boom + attn + out)


def train_flops_per_byte(cfg: ModelConfig, n_keys: float, bptt: int) -> float:
    """Forward + backward per byte of a training step on segments of bptt bytes."""
    d, n_attn = cfg.d_model, len(cfg.attn_layers)
    forward = forward_flops_per_byte(cfg, n_keys)
    over_keys = n_attn * 4 * n_keys * d  # scores and mixing: in the backward only for q and the weights
    return forward + 2 * (forward - over_keys) + over_keys + n_attn * 4 * bptt * d


def _per_call(cfg: ModelConfig) -> int:
    """The value gate's Overparam: a Linear d -> 2d applied once per call to the gate vector."""
    return len(cfg.attn_layers) * 2 * cfg.d_model * 2 * cfg.d_model


def forward_flops(cfg: ModelConfig, bptt: int, batch: int, n_keys: float) -> float:
    """One forward call on a (bptt, batch) segment without gradient (evaluation): the value gate's Overparam
    depends on parameters only and is computed once, not per call (sharnn.model.SingleHeadAttention)."""
    return forward_flops_per_byte(cfg, n_keys) * bptt * batch


def train_flops(cfg: ModelConfig, bptt: int, batch: int, n_keys: float) -> float:
    """One forward and backward on a (bptt, batch) segment. The per-byte count less, per block, the
    gradient of the first step's recurrent product with respect to the carried LSTM state (no gradient)."""
    carried = cfg.n_layer * 2 * batch * cfg.d_model * 4 * cfg.d_model
    return train_flops_per_byte(cfg, n_keys, bptt) * bptt * batch + 3 * _per_call(cfg) - carried


def steady_keys(cfg: ModelConfig, bptt: int) -> int:
    """Keys per position once the memory is full: the memory is cut to M - T (nothing when T >= M) before
    the T positions of the segment join it."""
    return max(cfg.mem_len, bptt)


def mean_keys(cfg: ModelConfig, mean_bptt: float) -> float:
    """`steady_keys` for a mean segment length (segments of random length, --vary_bptt)."""
    return max(float(cfg.mem_len), mean_bptt)


# ---------------------------------------------------------------------------------------------- the peak
@dataclass(frozen=True)
class GPUPeak:
    """A GPU's dense peak FLOP/s per precision, from its vendor's datasheet: sparsity figures halved, None
    where the GPU has no such units. fp32 is the CUDA cores' rate; tf32 the tensor cores' (used for fp32
    matrix products only when torch.backends.cuda.matmul.allow_tf32 is on, which the trainer leaves off)."""

    name: str
    fp32: float
    tf32: float | None
    bf16: float | None
    fp16: float


T = 1e12
# Matched on torch.cuda.get_device_name() in this order (a more specific name before the one it contains).
GPU_PEAKS: list[tuple[str, GPUPeak]] = [
    (r"H200 NVL", GPUPeak("H200 NVL", 60 * T, 835 / 2 * T, 1671 / 2 * T, 1671 / 2 * T)),
    (r"H200", GPUPeak("H200 SXM", 67 * T, 989 / 2 * T, 1979 / 2 * T, 1979 / 2 * T)),
    (r"H100 NVL", GPUPeak("H100 NVL", 60 * T, 835 / 2 * T, 1671 / 2 * T, 1671 / 2 * T)),
    (r"H100.*PCIe", GPUPeak("H100 PCIe", 51 * T, 756 / 2 * T, 1513 / 2 * T, 1513 / 2 * T)),
    (r"H100", GPUPeak("H100 SXM", 67 * T, 989 / 2 * T, 1979 / 2 * T, 1979 / 2 * T)),
    (r"A100", GPUPeak("A100 (SXM4 and PCIe)", 19.5 * T, 156 * T, 312 * T, 312 * T)),
    (r"A10\b", GPUPeak("A10", 31.2 * T, 62.5 * T, 125 * T, 125 * T)),
    (r"L4\b", GPUPeak("L4", 30.3 * T, 120 / 2 * T, 242 / 2 * T, 242 / 2 * T)),
    (r"V100S", GPUPeak("V100S PCIe", 16.4 * T, None, None, 130 * T)),
    (r"V100.*PCIE", GPUPeak("V100 PCIe", 14 * T, None, None, 112 * T)),
    (r"V100", GPUPeak("V100 SXM2", 15.7 * T, None, None, 125 * T)),
    # GeForce: fp16/bf16 tensor cores accumulating in fp32 (as torch does) run at half the fp16-accumulate one
    (r"RTX 4090", GPUPeak("GeForce RTX 4090", 82.6 * T, 82.6 * T, 165.2 * T, 165.2 * T)),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gpu_peak(device_name: str, precision: str, tf32: bool = False) -> tuple[float, str] | None:
    """(dense peak FLOP/s, which table row) for a CUDA device name, or None if the table does not know it
    (or the GPU has no units for this precision: V100 has no bf16)."""
    for pattern, peak in GPU_PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            key = "tf32" if precision == "fp32" and tf32 and peak.tf32 else precision
            value = getattr(peak, key)
            return (value, f"{peak.name} {key} dense, datasheet") if value else None
    return None


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, budget_s: float = 0.5, min_n: int = 512,
                         max_n: int = 2048) -> tuple[float, int]:
    """FLOP/s of the best timed n x n product, with n doubled from min_n while the best of three products
    takes under 20 ms (up to max_n), then repeated for about `budget_s`: the device's practical matmul
    ceiling for dtype in a bounded time (an emulated bf16 product on a CPU without bf16 instructions is 100x
    slower). Returns (FLOP/s, n). On a shared machine a measurement can catch a slow moment (then MFU can
    read above 100% later): the benchmark measures before and after its timed work and keeps the higher."""
    def timed(a, b) -> float:
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        return time.perf_counter() - t

    n = min_n
    rng = torch.Generator(device=device).manual_seed(0)  # not the global generator: training's draws stay
    while True:
        a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=rng) for _ in range(2))
        first = timed(a, b)  # with the warm-up's costs: enough when one product is that slow
        best = first if first > 0.1 else min(timed(a, b) for _ in range(3))
        if best > 0.02 or n >= max_n:
            break
        n *= 2
    start = time.perf_counter()
    while time.perf_counter() - start < budget_s:
        best = min(best, timed(a, b))
    return 2 * n**3 / best, n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_peak_flops(device: torch.device, precision: str,
                      override: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device for this precision, where the number comes from): `override` if given,
    the datasheet table for a known GPU, else a matmul measured now (CPUs, unknown GPUs)."""
    if override is not None:
        return override, "--peak_flops"
    if device.type == "cuda":
        known = gpu_peak(torch.cuda.get_device_name(device), precision,
                         tf32=torch.backends.cuda.matmul.allow_tf32)
        if known is not None:
            return known
    flops, n = measure_matmul_flops(device, DTYPES[precision])
    return flops, f"measured: best {n}x{n} {precision} matmul"
