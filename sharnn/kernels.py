"""Two of the model's ops, made fast on CPU (dropout and the single-head attention), and the attention as a
GPU runs it.

On a CPU, dropout with torch's own masks takes most of a SHA-RNN training step: torch draws a Bernoulli mask
with one call to its Mersenne Twister per element (about 400 ms for the 21M-element memory-long keys of the
`small` preset, more than the attention's matrix products). Here the mask comes from numpy's PCG64, which
fills a buffer 3-6x faster, seeded by one draw from torch's default generator: `torch.manual_seed` and saved
RNG states still govern every mask, so runs stay reproducible and resume bitwise. Masks are drawn in chunks of
1M elements on torch's thread count and applied to each chunk as it is drawn; the backward reuses the mask,
kept as bool.

The attention is written out on CPU (`attend_cpu`) so that its two large dropouts (on the (B, T, K) weights
and on the (K, B, C) values) use those masks, and their 1/(1-p) scales move onto the small (T, B, C) output.
It computes what `F.scaled_dot_product_attention` computes. Under `torch.compile` on CPU, dropout is torch's
(inductor fuses it with its neighbours) and the attention stays this one (the graph breaks around it).

On CUDA (any device but the CPU) dropout is torch's own (F.dropout: a fused kernel, on-device random numbers)
and the attention is `attend` ("written", the default of `set_attention_impl`) or torch's SDPA ("sdpa"). SDPA
at the paper's head size (1024) with a mask and dropout can use neither its flash nor its cuDNN kernel and
computes the keys' and values' gradients over the whole memory (~5,000 positions) that has none; `attend` is
`attend_cpu`'s formulation in torch's ops for any device: batched matmuls in the autocast dtype, the softmax
in float32, torch's dropout op (aten.native_dropout) on the weights and values, gradients for the segment's
own keys only. `python -m bench.gpu` times both on a GPU. The attention implementation is a switch,
`set_attention_impl(name)` / `get_attention_impl()`, initialised from $SHARNN_ATTENTION (default "written").

Which implementation runs on CPU is a switch, `set_cpu_kernels(name)` / `get_cpu_kernels()`, initialised at
import from the environment variable SHARNN_CPU_KERNELS (default "fast"):

    "fast"            numpy masks in every dropout, the attention as `attend_cpu`
    "torch"           exactly the CUDA code path: F.dropout, and the attention `get_attention_impl()` names
                      (`attend` with torch's dropout op, or SDPA)
    "fast-masks"      numpy masks in every dropout (also on the values), torch's SDPA for the attention
    "fast-attention"  `attend_cpu`, its two masks and every other dropout's drawn by torch (bernoulli_)

The last two split "fast" into its halves, for diagnosis. Tensors on other devices always take torch's ops.
A value of $SHARNN_CPU_KERNELS or $SHARNN_ATTENTION that names no setting is not an error at import:
`settings_problem()` says what is wrong, the model's first forward raises `SettingError` with it, and a
command checks it when it starts (one error line); an explicit `set_cpu_kernels`/`set_attention_impl`
replaces the environment's value.

Without gradients on a CPU (evaluation, generation), `lstm_packed` runs oneDNN's LSTM, the kernel nn.LSTM
itself calls, with its weights reordered into oneDNN's layout once (`kept` in eval mode) rather than at every
call; results are nn.LSTM's bit for bit.

Three helpers the model shares: `tracing()` (is torch.compile, torch.export or torch.jit tracing this code),
`causal_mask` (one cached mask per device, every smaller one a view of it) and `kept` (gradient-free results
built from parameters, kept in eval mode only; docs/caching.md states the rule).
"""

from __future__ import annotations

import math
import os
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

CPU_KERNELS = ("fast", "torch", "fast-masks", "fast-attention")
ENV_VAR = "SHARNN_CPU_KERNELS"
_NUMPY_MASKS = {"fast", "fast-masks"}  # settings whose masks come from numpy's PCG64
_WRITTEN_ATTENTION = {"fast", "fast-attention"}  # settings whose attention is attend_cpu
_cpu_kernels = "fast"
_ENV_PROBLEMS: dict[str, str] = {}  # environment variable -> why its value names no setting


class SettingError(ValueError):
    """$SHARNN_CPU_KERNELS or $SHARNN_ATTENTION names no setting (raised at the model's first forward)."""


def _from_environment(var: str, choices: tuple[str, ...], default: str) -> str:
    """The setting $var names (its default when unset or empty). A value that names none leaves the default
    and a problem in _ENV_PROBLEMS for `settings_problem`: an import must not fail on it."""
    value = os.environ.get(var) or default
    if value in choices:
        return value
    _ENV_PROBLEMS[var] = (f"${var}={value!r} names no setting: use one of {', '.join(choices)} "
                          f"(or leave it unset for {default!r})")
    return default


def settings_problem() -> str | None:
    """Why an environment variable of this module names no setting (one line), or None when all are fine.
    Commands check it when they start; the model's forward raises it as a SettingError."""
    return "; ".join(_ENV_PROBLEMS.values()) or None


def check_settings() -> None:
    """SettingError when `settings_problem()` has something to say (called at every forward: a dict check)."""
    if _ENV_PROBLEMS:
        raise SettingError(settings_problem())


def set_cpu_kernels(name: str) -> str:
    """Select the CPU implementation of dropout and attention (see the module docstring); returns the previous
    setting. Takes effect at the next forward, and replaces a $SHARNN_CPU_KERNELS that named no setting."""
    global _cpu_kernels
    if name not in CPU_KERNELS:
        raise ValueError(f"cpu kernels must be one of {', '.join(CPU_KERNELS)}; got {name!r}")
    previous, _cpu_kernels = _cpu_kernels, name
    _ENV_PROBLEMS.pop(ENV_VAR, None)
    return previous


def get_cpu_kernels() -> str:
    """The current CPU implementation: one of CPU_KERNELS (SettingError while $SHARNN_CPU_KERNELS or
    $SHARNN_ATTENTION names no setting)."""
    check_settings()
    return _cpu_kernels


def _numpy_masks() -> bool:
    return _cpu_kernels in _NUMPY_MASKS


def tracing() -> bool:
    """Whether this code is being traced into a graph: by torch.compile, torch.export (and the ONNX export
    built on it) or torch.jit. Traced code builds what eager code caches (a cached tensor would become a graph
    constant, and a tensor made while tracing is a fake one that must not reach a cache) and takes no
    numpy-backed path."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def fast_path(x: Tensor) -> bool:
    """Whether dropout uses the numpy CPU masks: a CPU tensor outside tracing, with a setting that draws them
    ("fast", "fast-masks")."""
    return x.device.type == "cpu" and _numpy_masks() and not tracing()


_cpu_kernels = _from_environment(ENV_VAR, CPU_KERNELS, "fast")


ATTENTION_IMPLS = ("written", "sdpa")
ATTENTION_ENV_VAR = "SHARNN_ATTENTION"
ATTENTION_DEFAULT = "written"
"""The attention implementation without $SHARNN_ATTENTION: `python -m bench.gpu` times both on a GPU and fails
while this one is more than 10% slower than the other."""
_attention_impl = ATTENTION_DEFAULT


def set_attention_impl(name: str) -> str:
    """Select the attention of CUDA (every device but the CPU, and the CPU under set_cpu_kernels("torch")):
    "written" (`attend`) or "sdpa" (F.scaled_dot_product_attention). Returns the previous setting; takes
    effect at the next forward, and replaces a $SHARNN_ATTENTION that named no setting."""
    global _attention_impl
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_IMPLS)}; got {name!r}")
    previous, _attention_impl = _attention_impl, name
    _ENV_PROBLEMS.pop(ATTENTION_ENV_VAR, None)
    return previous


def get_attention_impl() -> str:
    """The current attention implementation for CUDA: one of ATTENTION_IMPLS (SettingError while an
    environment variable of this module names no setting)."""
    check_settings()
    return _attention_impl


def attention_path(keys: Tensor) -> str:
    """Which attention runs for these keys: "cpu" (`attend_cpu`: a CPU tensor under "fast" or
    "fast-attention"), "sdpa" (a CPU tensor under "fast-masks"), else the attention implementation ("written"
    or "sdpa"): on every other device, and on the CPU under "torch"."""
    if keys.device.type == "cpu" and _cpu_kernels != "torch":
        return "cpu" if _cpu_kernels in _WRITTEN_ATTENTION else "sdpa"
    return _attention_impl


_attention_impl = _from_environment(ATTENTION_ENV_VAR, ATTENTION_IMPLS, ATTENTION_DEFAULT)


_CHUNK = 1 << 20  # elements per generator: a mask depends on the seed and its size, not on the thread count
_pool: ThreadPoolExecutor | None = None


def _in_chunks(n: int, fill) -> None:
    """fill(i, seed, part) for the chunks i of n elements, in parallel on torch's thread count (numpy releases
    the GIL while it works). One 63-bit draw from torch's default CPU generator seeds them all."""
    global _pool
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    parts = [slice(i * _CHUNK, min(n, (i + 1) * _CHUNK)) for i in range(-(-n // _CHUNK))]
    workers = torch.get_num_threads()
    if len(parts) == 1 or workers == 1:
        for i, part in enumerate(parts):
            fill(i, seed, part)
        return
    if _pool is None or _pool._max_workers != workers:
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sharnn-mask")
    list(_pool.map(fill, range(len(parts)), [seed] * len(parts), parts))


def _draw_keep(i: int, seed: int, p: float, out: np.ndarray) -> None:
    """Chunk i's mask: uniform float32 u from PCG64 stream [seed, i] (24 random bits each), keep where
    u >= p."""
    u = np.random.Generator(np.random.PCG64([seed, i])).random(out.size, dtype=np.float32)
    np.greater_equal(u, np.float32(p), out=out)


def keep_mask(shape: tuple[int, ...], p: float) -> Tensor:
    """A bool CPU tensor, True with probability 1 - p for each element independently (drawn by torch's
    bernoulli_ under the setting "fast-attention", else by numpy)."""
    if not _numpy_masks():
        return torch.empty(shape, dtype=torch.float32).bernoulli_(1.0 - p).bool()
    n = math.prod(shape)
    keep = np.empty(n, dtype=np.bool_)
    _in_chunks(n, lambda i, seed, part: _draw_keep(i, seed, p, keep[part]))
    return torch.from_numpy(keep).view(shape)


def masked(x: Tensor, p: float, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """(x * keep * scale, keep) with keep = keep_mask(x.shape, p): the same mask for the same seed. For a
    contiguous float32 x the mask is applied chunk by chunk right after it is drawn, while both are in
    cache."""
    if x.dtype != torch.float32 or not x.is_contiguous() or not _numpy_masks():
        keep = keep_mask(x.shape, p)
        out = torch.where(keep, x, 0)
        return (out.mul_(scale) if scale != 1.0 else out), keep
    n = x.numel()
    src = x.detach().numpy().reshape(n)
    keep, out = np.empty(n, dtype=np.bool_), np.empty(n, dtype=np.float32)

    def fill(i: int, seed: int, part: slice) -> None:
        _draw_keep(i, seed, p, keep[part])
        np.multiply(src[part], keep[part], out=out[part])
        if scale != 1.0:
            out[part] *= np.float32(scale)

    _in_chunks(n, fill)
    return torch.from_numpy(out).view(x.shape), torch.from_numpy(keep).view(x.shape)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        out, keep = masked(x, p, 1.0 / (1.0 - p))
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0).mul_(ctx.scale), None


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """F.dropout(x, p, training), with the fast mask on CPU."""
    if not training or p == 0.0:
        return x
    if not fast_path(x):
        return F.dropout(x, p, True)
    return _Dropout.apply(x, p)


class Dropout(nn.Dropout):
    """nn.Dropout with the fast CPU mask (same parameters, same state dict: none)."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


_CAUSAL_MASKS: dict[torch.device, Tensor] = {}  # per device, the largest mask asked for (see causal_mask)


def causal_mask(T: int, mem_len: int, device: torch.device) -> Tensor:
    """(T, mem_len + T) bool, True = may attend: all of memory and segment positions <= t.

    Query t may see key j iff j <= mem_len + t. One (T_max, M_max + T_max) mask with
    [t, k] = k <= M_max + t per device holds every smaller one as the view [:T, M_max - mem_len : M_max + T],
    so random segment lengths and a memory growing during generation cost no more than the largest mask.
    While tracing (`tracing()`) the mask is built in the graph instead."""
    if tracing():
        keys = torch.arange(mem_len + T, device=device)
        return keys[None, :] <= torch.arange(T, device=device)[:, None] + mem_len
    big = _CAUSAL_MASKS.get(device)
    if big is None or big.shape[0] < T or big.shape[1] - big.shape[0] < mem_len:
        t_max = max(T, big.shape[0] if big is not None else 0)
        m_max = max(mem_len, big.shape[1] - big.shape[0] if big is not None else 0)
        keys = torch.arange(m_max + t_max, device=device)
        big = keys[None, :] <= torch.arange(t_max, device=device)[:, None] + m_max  # (t_max, m_max + t_max)
        _CAUSAL_MASKS[device] = big
    m_max = big.shape[1] - big.shape[0]
    return big[:T, m_max - mem_len: m_max + T]


@torch.compiler.disable  # under torch.compile too: the compiled graph breaks around it
def attend_cpu(q: Tensor, keys: Tensor, segment_keys: Tensor, p: float) -> Tensor:
    """softmax(q keys^T / sqrt(C) + causal mask) with dropout p on the weights, times dropout(keys).

    q: (T, B, C) queries of the segment; keys: (K, B, C), the memory then the segment's T keys, which are
    `segment_keys` (the tensor gradients flow to); keys are the values too. Every query sees the K - T
    memory positions and the segment up to itself. Returns (T, B, C). Gradients flow to q and to the
    segment's keys only: the memory is carried state without gradient, so its (K - T)-long gradient
    products are never computed."""
    if torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad):
        return _Attention.apply(q, keys.detach(), segment_keys, p)
    return _attend(q, keys, p)[0]


def batch_major(keys: Tensor) -> Tensor:
    """(K, B, C) keys (or values) as (B, K, C) for a batched GEMM, in the dtype the GEMM runs in (under
    autocast: its dtype). fp32's GEMM reads the transposed view in place. Autocast's own cast of that view
    keeps its strides, and oneDNN's bf16 batched GEMM on them (batch stride C, not K x C) ran 3-7x slower
    than on contiguous (B, K, C) rows (the `small` preset's attention on a Zen 4 CPU; bench/RESULTS.md
    2026-12-05): other dtypes get one copy that casts and lays out at once."""
    device = keys.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else keys.dtype
    rows = keys.transpose(0, 1)
    if dtype == torch.float32 or not keys.is_floating_point():
        return rows
    return rows.contiguous() if rows.dtype == dtype else rows.to(dtype, memory_format=torch.contiguous_format)


def _attend(q: Tensor, keys: Tensor, p: float):
    """The forward; also returns what the backward reads, keys and values already batch-major (one copy
    each per step under bf16, shared by the forward's and the backward's GEMMs)."""
    T, _, C = q.shape
    K = keys.shape[0]
    keys_bkc = batch_major(keys)
    scores = torch.bmm(q.transpose(0, 1) * (1.0 / math.sqrt(C)), keys_bkc.transpose(1, 2))  # (B, T, K)
    scores[:, :, K - T:].masked_fill_(causal_mask(T, 0, q.device).logical_not(), float("-inf"))  # the future
    weights = torch.softmax(scores, dim=-1)  # (B, T, K)
    keep_w = keep_v = None
    dropped, values_bkc, scale = weights, keys_bkc, 1.0
    if p > 0.0:
        # numpy draws each mask and applies it chunk by chunk (in cache); under autocast the cast and layout
        # follow as one copy. Measured slower (bench/RESULTS.md 2026-12-05): torch.mul of the fp32 operand and
        # the bool mask straight into a bf16 (B, K, C) output, 94 ms against 55 ms for the values of `small`.
        dropped, keep_w = masked(weights, p)
        values, keep_v = masked(keys, p)
        values_bkc = batch_major(values)
        scale = 1.0 / (1.0 - p) ** 2  # both dropouts' rescaling, applied to the (T, B, C) result
    out = torch.bmm(dropped, values_bkc).transpose(0, 1) * scale  # (T, B, C)
    return out, weights, dropped, keys_bkc, values_bkc, keep_w, keep_v, scale


class _Attention(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, q: Tensor, keys: Tensor, segment_keys: Tensor, p: float) -> Tensor:
        out, weights, dropped, keys_bkc, values_bkc, keep_w, keep_v, scale = _attend(q, keys, p)
        ctx.save_for_backward(q, weights, dropped, keys_bkc, values_bkc, keep_w, keep_v)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out: Tensor):
        q, weights, dropped, keys_bkc, values_bkc, keep_w, keep_v = ctx.saved_tensors
        T, _, C = q.shape
        K = keys_bkc.shape[1]
        g = (grad_out * ctx.scale).transpose(0, 1)  # (B, T, C)
        grad_dropped = torch.bmm(g.to(values_bkc.dtype), values_bkc.transpose(1, 2))  # (B, T, K)
        # values' gradient, for the segment's keys only: dropped[:, :, -T:]^T @ g
        grad_values = torch.bmm(dropped[:, :, K - T:].transpose(1, 2), g.to(dropped.dtype))  # (B, T, C)
        if keep_v is not None:
            grad_values = grad_values * keep_v[K - T:].transpose(0, 1)
            grad_dropped.masked_fill_(~keep_w, 0.0)
        grad_scores = torch._softmax_backward_data(grad_dropped.to(weights.dtype), weights, -1, weights.dtype)
        # the scores' 1/sqrt(C) goes on the (B, T, C) products
        grad_q = torch.bmm(grad_scores.to(keys_bkc.dtype), keys_bkc) * (1.0 / math.sqrt(C))
        grad_keys = torch.bmm(grad_scores[:, :, K - T:].transpose(1, 2),
                              q.transpose(0, 1).to(grad_scores.dtype))
        grad_segment = (grad_keys * (1.0 / math.sqrt(C)) + grad_values).transpose(0, 1)  # (T, B, C)
        return grad_q.transpose(0, 1), None, grad_segment, None


# -------------------------------------------------------------------- the attention on CUDA (any device)
def torch_dropout(x: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """(x * keep / (1 - p), keep): torch's dropout op, aten.native_dropout, the kernel F.dropout runs on CUDA
    (fused, random numbers drawn on the device from torch's generator); on the CPU it draws F.dropout's mask
    (bernoulli_ on torch's CPU generator)."""
    return torch.native_dropout(x, p, True)


def as_rows(x: Tensor, dtype: torch.dtype) -> Tensor:
    """(N, B, C) -> (B, N, C) in `dtype` for a batched GEMM: the transposed view in float32 (read in place),
    otherwise one copy that casts and lays out at once (see batch_major)."""
    rows = x.transpose(0, 1)
    if rows.dtype == dtype == torch.float32:
        return rows
    return rows.to(dtype, memory_format=torch.contiguous_format)


@torch.compiler.disable  # as attend_cpu: under torch.compile the graph breaks around it
def attend(q: Tensor, keys: Tensor, segment_keys: Tensor, p: float) -> Tensor:
    """softmax(q keys^T / sqrt(C) + causal mask) with dropout p on the weights, times dropout(keys): the
    attention of CUDA (`attention_path` "written"), in torch's ops on any device.

    Shapes and gradients as `attend_cpu`: q (T, B, C), keys (K, B, C) = memory then `segment_keys`; returns
    (T, B, C). The memory is detached: gradients flow to q and the segment's keys only, and the backward's
    products over keys run over the segment's T keys, not all K. The compute dtype is the autocast dtype of
    q's device inside an autocast region, else q's: the four batched matmuls (and the backward's four) run in
    it, the softmax and its backward in float32 (at least), the output comes back in it (as SDPA's under
    autocast). Dropout is torch's op (`torch_dropout`) on the float32 weights and on the keys. Everything is
    cast explicitly, with autocast off inside: the CPU computes exactly what a GPU does (CPU autocast, unlike
    CUDA's, keeps a softmax in bf16)."""
    device = q.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype
    if torch.is_grad_enabled() and (q.requires_grad or segment_keys.requires_grad):
        return _WrittenAttention.apply(q, keys.detach(), segment_keys, p, dtype)
    with torch.autocast(device, enabled=False):
        return _attend_written(q, keys, p, dtype)[0]


def _attend_written(q: Tensor, keys: Tensor, p: float, dtype: torch.dtype):
    """`attend`'s forward, autocast off; also returns what the backward reads."""
    T, _, C = q.shape
    K = keys.shape[0]
    q_rows = as_rows(q * (1.0 / math.sqrt(C)), dtype)  # (B, T, C), the scale on the small operand
    keys_rows = as_rows(keys, dtype)  # (B, K, C)
    scores = torch.bmm(q_rows, keys_rows.transpose(1, 2))  # (B, T, K) in dtype
    scores[:, :, K - T:].masked_fill_(causal_mask(T, 0, q.device).logical_not(), float("-inf"))  # the future
    weights = torch.softmax(scores.to(torch.promote_types(dtype, torch.float32)), dim=-1)  # (B, T, K)
    keep_w = keep_v = None
    dropped, values = weights, keys
    if p > 0.0:
        dropped, keep_w = torch_dropout(weights, p)  # scaled by 1 / (1 - p)
        values, keep_v = torch_dropout(keys, p)
    dropped = dropped.to(dtype)
    values_rows = as_rows(values, dtype)  # (B, K, C)
    out = torch.bmm(dropped, values_rows).transpose(0, 1)  # (T, B, C) in dtype
    # the values' gradient needs the segment's T columns only: a (B, T, T) copy, not the (B, T, K) weights
    dropped_segment = dropped[:, :, K - T:].contiguous() if K > T else dropped
    return out, (q_rows, keys_rows, weights, dropped_segment, values_rows, keep_w, keep_v)


class _WrittenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, keys: Tensor, segment_keys: Tensor, p: float, dtype: torch.dtype) -> Tensor:
        with torch.autocast(q.device.type, enabled=False):
            out, saved = _attend_written(q, keys, p, dtype)
        ctx.save_for_backward(*saved)
        ctx.p, ctx.dtype, ctx.q_dtype, ctx.segment_dtype = p, dtype, q.dtype, segment_keys.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q_rows, keys_rows, weights, dropped_segment, values_rows, keep_w, keep_v = ctx.saved_tensors
        T, C = q_rows.shape[1], q_rows.shape[2]
        K = keys_rows.shape[1]
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.transpose(0, 1).to(ctx.dtype)  # (B, T, C)
            grad_dropped = torch.bmm(g, values_rows.transpose(1, 2))  # (B, T, K)
            # the values' gradient, for the segment's keys only: dropped[:, :, -T:]^T @ g
            grad_values = torch.bmm(dropped_segment.transpose(1, 2), g)  # (B, T, C)
            grad_weights = grad_dropped.to(weights.dtype)  # float32 from here, as the weights
            if ctx.p > 0.0:  # dropout's backward: through the forward's masks, times 1 / (1 - p)
                scale = 1.0 / (1.0 - ctx.p)
                grad_weights = torch.ops.aten.native_dropout_backward(grad_weights, keep_w, scale)
                grad_values = torch.ops.aten.native_dropout_backward(
                    grad_values, keep_v[K - T:].transpose(0, 1), scale)
            grad_scores = torch._softmax_backward_data(grad_weights, weights, -1, weights.dtype).to(ctx.dtype)
            grad_q = torch.bmm(grad_scores, keys_rows) * (1.0 / math.sqrt(C))  # (B, T, C)
            # q_rows carries the 1/sqrt(C) already
            grad_keys = torch.bmm(grad_scores[:, :, K - T:].transpose(1, 2), q_rows)  # (B, T, C)
            grad_segment = (grad_keys + grad_values).transpose(0, 1)  # (T, B, C)
        return grad_q.transpose(0, 1).to(ctx.q_dtype), None, grad_segment.to(ctx.segment_dtype), None, None


# ------------------------------------------------------------------------------ gradient-free results
_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> {name: what build() returned}


def kept(owner: nn.Module, name: str, build):
    """build(), kept for `owner` while it is in eval mode: a result computed from parameters alone that the
    caller uses without gradient (reordered LSTM weights, the Boom's scaled weights, the value gate). In
    training mode, and while tracing, built at every call. Nothing checks whether the parameters changed:
    what is kept is dropped by `forget_kept`, which SHARNN calls whenever its weights may change (train(),
    eval(), load_state_dict, to/half/...; docs/caching.md). Kept beside the module, not in it: state_dict,
    deepcopy and pickling never see it."""
    if owner.training or tracing():
        return build()
    entries = _KEPT.setdefault(owner, {})
    if name not in entries:
        entries[name] = build()
    return entries[name]


def forget_kept(model: nn.Module) -> None:
    """Drop what `kept` holds for `model` and every module in it."""
    for module in model.modules():
        _KEPT.pop(module, None)


def packed_lstm_ok(lstm: nn.LSTM, x: Tensor) -> bool:
    """Whether `lstm_packed` computes what lstm(x, hidden) computes: no gradient needed, no autocast, float32
    input and weights on a CPU where nn.LSTM itself takes oneDNN's kernel (torch's condition for it)."""
    if type(lstm) is not nn.LSTM:  # a subclass or a stand-in computes something of its own
        return False
    w = lstm.weight_ih_l0
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):  # training: the first exit
        return False
    return (x.device.type == "cpu" and x.dtype == w.dtype == torch.float32 and lstm.num_layers == 1
            and lstm.bias and not lstm.bidirectional and not lstm.batch_first and lstm.proj_size == 0
            and torch.backends.mkldnn.is_available() and torch._C._get_mkldnn_enabled()
            and not torch.is_autocast_enabled("cpu") and not tracing())


def lstm_packed(lstm: nn.LSTM, x: Tensor, hidden: tuple[Tensor, Tensor] | None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """lstm(x, hidden) on CPU without gradient, bit for bit: the same oneDNN primitive that nn.LSTM calls
    (aten.mkldnn_rnn_layer), with its weights reordered into oneDNN's layout once and `kept` in eval mode,
    instead of on every call. For one position the reorder was most of the call: 460 of 530 us per `small`
    block (bench/RESULTS.md). Only where `packed_lstm_ok`."""
    H = lstm.hidden_size
    w_ih, w_hh = lstm.weight_ih_l0, lstm.weight_hh_l0
    packed = kept(lstm, "packed", lambda: torch.ops.mkldnn._reorder_mkldnn_rnn_layer_weight(
        w_ih.detach(), w_hh.detach(), H, False, True, False))
    if hidden is None:
        h0 = c0 = x.new_zeros(x.shape[1], H)
    else:
        h0, c0 = hidden[0][0], hidden[1][0]  # (1, B, H) -> (B, H), one layer
    out, hy, cy, _ = torch.ops.aten.mkldnn_rnn_layer(
        x, packed[0], packed[1], lstm.bias_ih_l0.detach(), lstm.bias_hh_l0.detach(), h0, c0,
        False, [], 2, H, 1, True, False, False, lstm.training)  # reverse, batch_sizes, mode LSTM, ...
    return out, (hy.unsqueeze(0), cy.unsqueeze(0))
