"""sharnn.kernels: the CPU dropout masks and the written-out attentions (the CPU's `attend_cpu`, CUDA's
`attend`) compute what torch's ops compute."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import sharnn.kernels as kernels
import sharnn.model
from sharnn import SHARNN
from sharnn.kernels import attend, attend_cpu, dropout, keep_mask
from tests.helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: a second thread only waits


def sdpa_reference(q, keys):
    """torch's attention with the model's mask: all of memory, the segment up to each position."""
    T, K = q.shape[0], keys.shape[0]
    mask = torch.cat([torch.ones(T, K - T, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()], 1)
    k = keys.transpose(0, 1)
    return F.scaled_dot_product_attention(q.transpose(0, 1), k, k, attn_mask=mask).transpose(0, 1)


def inputs(T=5, B=3, C=8, M=7):
    torch.manual_seed(0)
    q = torch.randn(T, B, C, dtype=torch.float64, requires_grad=True)
    segment = torch.randn(T, B, C, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(M, B, C, dtype=torch.float64)  # carried state: no gradient
    return q, memory, segment


@pytest.mark.parametrize("M", [0, 7])
def test_attention_matches_sdpa_with_gradients(M):
    q, memory, segment = inputs(M=M)
    keys = torch.cat([memory, segment])
    out, want = attend_cpu(q, keys, segment, 0.0), sdpa_reference(q, keys)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, segment), g)
    expected = torch.autograd.grad(want, (q, segment), g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def assert_dropped_attention(out, q, keys, segment, M: int, p: float, keep_weights, keep_values) -> None:
    """`out` and its gradients (to q and the segment) are the reference formula with these masks: softmax of
    the causal scores over M memory positions and the segment, weights and values each dropped by their mask
    and scaled by 1/(1-p)."""
    T, C = q.shape[0], q.shape[2]
    scores = (q.transpose(0, 1) / math.sqrt(C)) @ keys.permute(1, 2, 0)
    causal = torch.cat([torch.ones(T, M, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()], 1)
    weights = scores.masked_fill(~causal, float("-inf")).softmax(-1) * keep_weights / (1 - p)
    want = (weights @ (keys * keep_values / (1 - p)).transpose(0, 1)).transpose(0, 1)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, segment), g), torch.autograd.grad(want, (q, segment), g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_attention_dropout_is_the_reference_formula(monkeypatch):
    """Dropout p on the weights and on the values, each rescaled by 1/(1-p); gradients through the same
    masks."""
    q, memory, segment = inputs()
    keys = torch.cat([memory, segment])
    masks = []

    def recording_masked(x, p):
        masks.append(keep_mask(x.shape, p))
        return torch.where(masks[-1], x, 0), masks[-1]

    monkeypatch.setattr(kernels, "masked", recording_masked)
    p = 0.3
    out = attend_cpu(q, keys, segment, p)
    keep_weights, keep_values = masks
    assert_dropped_attention(out, q, keys, segment, memory.shape[0], p, keep_weights, keep_values)


# ------------------------------------------------------------- CUDA's attention, written out (any device)
@pytest.mark.parametrize("M", [0, 7])
def test_written_attention_matches_sdpa_with_gradients_and_leaves_the_memory_without(M):
    """Dropout off: `attend` is SDPA with the model's mask, forward and gradients; the memory, a tensor that
    asks for a gradient here, gets none (it is carried state)."""
    q, memory, segment = inputs(M=M)
    memory.requires_grad_(True)
    keys = torch.cat([memory, segment])
    out, want = attend(q, keys, segment, 0.0), sdpa_reference(q, keys)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, segment), g, retain_graph=True)
    expected = torch.autograd.grad(want, (q, segment), g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    out.backward(g)
    assert memory.grad is None and q.grad is not None and segment.grad is not None


def test_written_attention_backward_runs_over_the_segments_keys_only():
    """The backward's four products: two over all K keys (the queries' and the weights' gradients), two over
    the segment's T keys (the keys' and values' gradients; the memory has none): FlopCounterMode counts
    them. SDPA's backward at the same shape computes all four over K: the count tells them apart."""
    from torch.utils.flop_counter import FlopCounterMode

    T, B, C, M = 6, 2, 8, 30
    q, memory, segment = inputs(T=T, B=B, C=C, M=M)
    keys = torch.cat([memory, segment])
    K = M + T
    counted = {}
    for name, fn in (("written", lambda: attend(q, keys, segment, 0.1)),
                     ("sdpa", lambda: sdpa_reference(q, keys))):
        with FlopCounterMode(display=False) as counter:
            fn().sum().backward()
        counted[name] = counter.get_total_flops()
    forward = 2 * (2 * B * T * K * C)
    assert counted["written"] == forward + 2 * (2 * B * T * K * C) + 2 * (2 * B * T * T * C)
    assert counted["sdpa"] > counted["written"]


def test_written_attention_dropout_is_the_reference_formula(monkeypatch):
    """Torch's dropout op on the weights and on the values (keys), each scaled by 1/(1-p); gradients
    through the same masks."""
    q, memory, segment = inputs()
    keys = torch.cat([memory, segment])
    masks = []

    def recording(x, p):
        out, keep = torch.native_dropout(x, p, True)
        masks.append(keep)
        return out, keep

    monkeypatch.setattr(kernels, "torch_dropout", recording)
    p = 0.3
    out = attend(q, keys, segment, p)
    keep_weights, keep_values = masks
    assert keep_weights.dtype == torch.bool and not keep_weights.all() and keep_weights.any()
    assert_dropped_attention(out, q, keys, segment, memory.shape[0], p, keep_weights, keep_values)


def test_written_attention_and_sdpa_agree_in_expectation_with_dropout():
    """Dropout 0.1 on: the two formulations draw other masks, so they agree in distribution, not draw by
    draw. N = 4000 independent draws of each (one call: the batch repeated N times, every element its own
    mask) of the output and both gradients, 360 numbers per draw.

    Mean: dropout is unbiased and the two masks are independent, so the output and both gradients have the
    dropout-free values as expectation; per number z = (mean_written - mean_sdpa) / sqrt(se_w^2 + se_s^2),
    and each mean against the exact value. |z| < 5 for all 360: under agreement z is about N(0, 1) (N =
    4000), P(|z| > 5) = 5.7e-7, so all 360 pass with probability > 0.9997 (union bound); measured max |z|
    3.4 (written vs SDPA) and 2.9 (written vs exact). A missing 1/(1-p) or a mask the backward does not
    reuse gives |z| > 25.
    Variance: the geometric mean over the 360 numbers of var_written / var_sdpa within exp(+-0.1): each log
    variance ratio has standard error sqrt(2 / N) * sqrt(2) = 0.032, so 0.1 is > 3 standard errors even if
    all 360 moved together; measured 1.002. Dropping the values without a mask (a formulation with one
    dropout) gives 0.44."""
    T, B, C, M, n, p = 5, 3, 8, 7, 4000, 0.1
    q0, memory, segment0 = (t.detach() for t in inputs(T=T, B=B, C=C, M=M))
    g = torch.randn(T, B, C, dtype=torch.float64)
    mask = torch.cat([torch.ones(T, M, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()], 1)

    def sdpa(q, keys, segment, p):  # the model's SDPA path: F.dropout on the values, SDPA's on the weights
        v = F.dropout(keys, p, True)
        return F.scaled_dot_product_attention(q.transpose(0, 1), keys.transpose(0, 1), v.transpose(0, 1),
                                              attn_mask=mask, dropout_p=p).transpose(0, 1)

    def draws(fn, p, n):  # (n, 360): output, grad q, grad segment of each of n independent draws
        q, segment = (t.repeat(1, n, 1).requires_grad_() for t in (q0, segment0))
        keys = torch.cat([memory.repeat(1, n, 1), segment])
        out = fn(q, keys, segment, p)
        grads = torch.autograd.grad(out, (q, segment), g.repeat(1, n, 1))
        per_draw = [t.detach().view(T, n, B, C).transpose(0, 1).reshape(n, -1) for t in (out, *grads)]
        return torch.cat(per_draw, 1)

    torch.manual_seed(0)
    written, torch_sdpa = draws(attend, p, n), draws(sdpa, p, n)
    exact = draws(attend, 0.0, 1)[0]
    z = (written.mean(0) - torch_sdpa.mean(0)) / ((written.var(0) + torch_sdpa.var(0)) / n).sqrt()
    assert z.abs().max() < 5
    for sample in (written, torch_sdpa):
        assert ((sample.mean(0) - exact) / (sample.var(0) / n).sqrt()).abs().max() < 5
    assert abs((written.var(0) / torch_sdpa.var(0)).log().mean()) < 0.1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_written_attention_matmuls_run_in_the_autocast_dtype(dtype):
    """Under autocast (CPU here; CUDA's path is the same code): the four forward and four backward batched
    matmuls take the autocast dtype, the softmax and its backward run in float32, the output comes back in
    the autocast dtype and the gradients in their inputs' (float32), close to float32's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("bmm", "_softmax", "_softmax_backward_data"):
                self.ops.append((name, tuple(a.dtype for a in args if isinstance(a, torch.Tensor))))
            return func(*args, **(kwargs or {}))

    q, memory, segment = (t.detach().float() for t in inputs(M=7))
    q.requires_grad_(True)
    segment.requires_grad_(True)
    keys = torch.cat([memory, segment])
    want = attend(q, keys, segment, 0.0)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q, segment), g)
    with Recorder() as recorder:
        with torch.autocast("cpu", dtype=dtype):
            out = attend(q, keys, segment, 0.1)
            assert out.dtype == dtype
        out.backward(g.to(dtype))
    bmm = [dtypes for name, dtypes in recorder.ops if name == "bmm"]
    assert len(bmm) == 2 + 4 and all(d == (dtype, dtype) for d in bmm), recorder.ops
    softmax = [dtypes for name, dtypes in recorder.ops if name != "bmm"]
    assert len(softmax) == 2 and all(set(d) == {torch.float32} for d in softmax), recorder.ops
    assert q.grad.dtype == segment.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=dtype):  # dropout off: within the 16-bit rounding of float32's result
        out = attend(q, keys, segment, 0.0)
    torch.testing.assert_close(out.float(), want, rtol=0.05, atol=0.05)
    grads = torch.autograd.grad(out, (q, segment), g.to(dtype))
    for a, b in zip(grads, want_grads):
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_attention_path_on_other_devices_is_the_implementation(kernels_setting, monkeypatch):
    """Keys on any device but the CPU take the attention implementation, whatever the CPU setting (a meta
    tensor stands in for CUDA); CPU keys take it only under "torch"."""
    meta, cpu = torch.empty(3, 2, 4, device="meta"), torch.empty(3, 2, 4)
    for impl in kernels.ATTENTION_IMPLS:
        monkeypatch.setattr(kernels, "_attention_impl", impl)
        for setting in kernels.CPU_KERNELS:
            kernels.set_cpu_kernels(setting)
            assert kernels.attention_path(meta) == impl
            want = {"fast": "cpu", "fast-attention": "cpu", "fast-masks": "sdpa", "torch": impl}[setting]
            assert kernels.attention_path(cpu) == want


def test_keep_mask_rate_seed_and_thread_independence():
    shape = (3000, 3000)  # several generator chunks
    torch.manual_seed(1)
    a = keep_mask(shape, 0.1)
    b = keep_mask(shape, 0.1)
    assert a.dtype == torch.bool and a.shape == shape
    rate = a.double().mean().item()
    assert abs(rate - 0.9) < 5 * math.sqrt(0.09 / a.numel())  # five standard deviations
    assert not torch.equal(a, b)  # each call draws a new seed from torch's generator
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(1)
            assert torch.equal(keep_mask(shape, 0.1), a)  # the seed decides, not the thread count
    finally:
        torch.set_num_threads(threads)
    # chunks are independent streams: the mask's halves differ
    flat = a.flatten()
    assert not torch.equal(flat[: kernels._CHUNK], flat[kernels._CHUNK: 2 * kernels._CHUNK])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_applies_the_mask_keep_mask_draws(dtype):
    """Chunked float32 fast path and the generic path: the same mask as keep_mask for the same seed."""
    x = torch.randn(3 * kernels._CHUNK + 5, dtype=dtype)
    torch.manual_seed(3)
    want_keep = keep_mask(x.shape, 0.25)
    torch.manual_seed(3)
    out, keep = kernels.masked(x, 0.25, scale=2.0)
    assert torch.equal(keep, want_keep)
    torch.testing.assert_close(out, torch.where(keep, x * 2.0, 0), rtol=0, atol=0)


def test_dropout_gradient_uses_the_forward_mask():
    x = torch.randn(300, 200, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x, 0.3, training=True)
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    torch.testing.assert_close(grad, (y != 0).float() / 0.7)


def test_dropout_zeroes_and_rescales():
    x = torch.randn(200, 300)
    assert dropout(x, 0.2, training=False) is x
    assert dropout(x, 0.0, training=True) is x
    torch.manual_seed(0)
    y = dropout(x, 0.2, training=True)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.8)
    assert abs(kept.double().mean().item() - 0.8) < 0.01


@pytest.mark.parametrize("attn", ["penultimate", "all"])
def test_model_cpu_path_equals_torch_path_in_training(attn, monkeypatch):
    """Training mode, dropout off: the written-out attention gives the loss and every gradient of the SDPA
    path."""
    cfg = tiny_config(d_model=32, d_ff=64, n_layer=3, attn=attn, mem_len=20, dropout=0, dropouth=0,
                      dropouti=0)
    torch.manual_seed(0)
    model = SHARNN(cfg).double().train()
    x, y = torch.randint(0, 256, (8, 2)), torch.randint(0, 256, (8, 2))
    with torch.no_grad():
        _, _, state = model(torch.randint(0, 256, (16, 2)))
    results, calls = [], []

    def counted(*args):
        calls.append(1)
        return attend_cpu(*args)

    monkeypatch.setattr(sharnn.model, "attend_cpu", counted)
    for fast in (True, False):
        monkeypatch.setattr(sharnn.model, "attention_path", lambda keys, fast=fast: "cpu" if fast else "sdpa")
        model.zero_grad()
        _, loss, _ = model(x, state, targets=y)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        assert len(calls) == (len(cfg.attn_layers) if fast else 0)
        calls.clear()
    (loss_fast, grads_fast), (loss_torch, grads_torch) = results
    torch.testing.assert_close(loss_fast, loss_torch, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_fast, grads_torch):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_training_under_bf16_autocast_tracks_fp32_with_the_same_masks():
    """The CPU attention's custom backward under autocast; the bf16 tensors take keep_mask's generic path,
    which draws the masks the fp32 fast path draws for the same seed, so the two runs see the same
    dropout."""
    cfg = tiny_config(d_model=32, d_ff=64, n_layer=3, attn="all", mem_len=20)
    torch.manual_seed(0)
    model = SHARNN(cfg).train()
    x, y = torch.randint(0, 256, (8, 2)), torch.randint(0, 256, (8, 2))
    with torch.no_grad():
        _, _, state = model(torch.randint(0, 256, (16, 2)))
    runs = []
    for bf16 in (False, True):
        model.zero_grad()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, loss, _ = model(x, state, targets=y)
        loss.backward()
        runs.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (loss32, grad32), (loss16, grad16) = runs
    assert abs(loss16 - loss32) < 0.005  # other masks: ~0.014 apart
    assert torch.isfinite(grad16).all()
    assert F.cosine_similarity(grad16, grad32, dim=0) > 0.999  # other masks: ~0.63


# ------------------------------------------------------------------------------ the CPU kernel switch
@pytest.fixture
def kernels_setting():
    """Restores the process-wide setting after a test that changes it."""
    previous = kernels.get_cpu_kernels()
    yield
    kernels.set_cpu_kernels(previous)


def test_switch_sets_gets_and_refuses_unknown_names(kernels_setting):
    for name in kernels.CPU_KERNELS:
        kernels.set_cpu_kernels(name)
        assert kernels.get_cpu_kernels() == name
    assert kernels.set_cpu_kernels("fast") == kernels.CPU_KERNELS[-1]  # returns the previous setting
    with pytest.raises(ValueError, match="fast, torch"):
        kernels.set_cpu_kernels("numpy")
    assert kernels.get_cpu_kernels() == "fast"


def test_attention_switch_sets_gets_and_refuses_unknown_names(monkeypatch):
    monkeypatch.setattr(kernels, "_attention_impl", kernels.get_attention_impl())  # restored afterwards
    assert kernels.ATTENTION_IMPLS == ("written", "sdpa")
    assert kernels.set_attention_impl("sdpa") == "written" and kernels.get_attention_impl() == "sdpa"
    with pytest.raises(ValueError, match="written, sdpa"):
        kernels.set_attention_impl("flash")
    assert kernels.get_attention_impl() == "sdpa"


def small_training_model(dropout=0.1, dtype=torch.float32):
    cfg = tiny_config(d_model=32, d_ff=64, n_layer=3, attn="all", mem_len=20, dropout=dropout,
                      dropouth=dropout, dropouti=dropout)
    torch.manual_seed(0)
    model = SHARNN(cfg).to(dtype).train()
    x, y = torch.randint(0, 256, (8, 2)), torch.randint(0, 256, (8, 2))
    with torch.no_grad():
        _, _, state = model(torch.randint(0, 256, (16, 2)))
    return model, x, y, state


def loss_and_grads(model, x, y, state, seed=1):
    model.zero_grad()
    torch.manual_seed(seed)
    _, loss, _ = model(x, state, targets=y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()], torch.get_rng_state()


# which code each setting runs, per training forward of the 3-block model with attention in every block
PATHS = {  # (setting, attention impl): (attention that runs, numpy masks drawn, F.dropout called)
    ("fast", "written"): ("attend_cpu", True, False),
    ("torch", "written"): ("attend", False, True),
    ("torch", "sdpa"): ("sdpa", False, True),
    ("fast-masks", "written"): ("sdpa", True, False),
    ("fast-attention", "written"): ("attend_cpu", False, True),
}


@pytest.mark.parametrize("setting, impl", list(PATHS))
def test_each_setting_takes_its_path(setting, impl, kernels_setting, monkeypatch):
    model, x, y, state = small_training_model()
    calls = {"attend_cpu": 0, "attend": 0, "sdpa": 0, "numpy": 0, "F.dropout": 0, "bernoulli": 0,
             "native_dropout": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(sharnn.model, "attend_cpu", counting("attend_cpu", attend_cpu))
    monkeypatch.setattr(sharnn.model, "attend", counting("attend", attend))
    monkeypatch.setattr(F, "scaled_dot_product_attention", counting("sdpa", F.scaled_dot_product_attention))
    monkeypatch.setattr(F, "dropout", counting("F.dropout", F.dropout))
    monkeypatch.setattr(kernels, "_draw_keep", counting("numpy", kernels._draw_keep))
    monkeypatch.setattr(torch.Tensor, "bernoulli_", counting("bernoulli", torch.Tensor.bernoulli_))
    monkeypatch.setattr(kernels, "torch_dropout", counting("native_dropout", kernels.torch_dropout))
    kernels.set_cpu_kernels(setting)
    monkeypatch.setattr(kernels, "_attention_impl", impl)
    loss_and_grads(model, x, y, state)
    attention, numpy_masks, torch_dropout = PATHS[setting, impl]
    assert {name: calls[name] for name in ("attend_cpu", "attend", "sdpa")} == \
        {name: 3 if name == attention else 0 for name in ("attend_cpu", "attend", "sdpa")}
    assert (calls["numpy"] > 0) == numpy_masks and (calls["F.dropout"] > 0) == torch_dropout
    # the written-out attentions draw two masks each (weights, values): torch's bernoulli_ for attend_cpu
    # under "fast-attention", torch's dropout op for attend
    assert calls["bernoulli"] == (2 * 3 if setting == "fast-attention" else 0)
    assert calls["native_dropout"] == (2 * 3 if attention == "attend" else 0)
    if setting == "fast-masks":  # SDPA's weights dropout is torch's own; every other dropout is numpy's
        assert calls["F.dropout"] == 0
    model.eval()  # evaluation: no dropout anywhere, the attention as the setting says
    calls.update(dict.fromkeys(calls, 0))
    with torch.no_grad():
        model(x, state)
    assert calls["numpy"] == calls["F.dropout"] == calls["bernoulli"] == calls["native_dropout"] == 0
    assert calls[attention] == 3 and sum(calls[n] for n in ("attend_cpu", "attend", "sdpa")) == 3


@pytest.mark.parametrize("impl", kernels.ATTENTION_IMPLS)
def test_torch_setting_is_the_cuda_code_path(impl, kernels_setting, monkeypatch):
    """Under "torch" a CPU step runs what the model runs on CUDA (where fast_path is False and
    attention_path is the attention implementation): the same loss and gradients bit for bit from the same
    seed, and the same draws from torch's generator."""
    model, x, y, state = small_training_model()
    monkeypatch.setattr(kernels, "_attention_impl", impl)
    kernels.set_cpu_kernels("torch")
    loss_t, grads_t, rng_t = loss_and_grads(model, x, y, state)
    kernels.set_cpu_kernels("fast")
    monkeypatch.setattr(kernels, "fast_path", lambda x: False)  # what a CUDA tensor answers
    monkeypatch.setattr(sharnn.model, "attention_path", lambda keys: impl)
    loss_c, grads_c, rng_c = loss_and_grads(model, x, y, state)
    assert torch.equal(loss_t, loss_c) and torch.equal(rng_t, rng_c)
    for a, b in zip(grads_t, grads_c):
        assert torch.equal(a, b)
    monkeypatch.undo()
    kernels.set_cpu_kernels("fast")
    loss_f, _, _ = loss_and_grads(model, x, y, state)
    assert not torch.equal(loss_f, loss_t)  # other masks: the switch really changed the path


def test_all_settings_agree_without_dropout(kernels_setting, monkeypatch):
    """Dropout off: the four settings, and under "torch" both attention implementations, differ only in how
    they compute, not in what (float64)."""
    model, x, y, state = small_training_model(dropout=0.0, dtype=torch.float64)
    results = {}
    for setting in kernels.CPU_KERNELS:
        kernels.set_cpu_kernels(setting)
        results[setting] = loss_and_grads(model, x, y, state)
    monkeypatch.setattr(kernels, "_attention_impl", "sdpa")
    kernels.set_cpu_kernels("torch")
    results["torch sdpa"] = loss_and_grads(model, x, y, state)
    loss0, grads0, _ = results["torch"]
    for setting, (loss, grads, _) in results.items():
        torch.testing.assert_close(loss, loss0, rtol=1e-12, atol=1e-12)
        for a, b in zip(grads, grads0):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_fast_attention_setting_draws_torch_masks_at_the_rate(kernels_setting):
    kernels.set_cpu_kernels("fast-attention")
    torch.manual_seed(0)
    keep = keep_mask((1000, 1000), 0.1)
    assert keep.dtype == torch.bool and abs(keep.double().mean().item() - 0.9) < 5 * math.sqrt(0.09 / 1e6)
    torch.manual_seed(0)
    assert torch.equal(keep, torch.empty(1000, 1000).bernoulli_(0.9).bool())
    x = torch.randn(300, 200)
    torch.manual_seed(0)
    out, kept = kernels.masked(x, 0.1, scale=2.0)
    torch.testing.assert_close(out, torch.where(kept, x * 2.0, 0), rtol=0, atol=0)


def test_keys_operand_under_bf16_autocast_is_cast_once_into_the_fast_layout():
    """The scores' right operand: fp32 keeps the permuted view (no copy); under bf16 autocast one copy casts
    and lays the keys out as contiguous (B, K, C) rows, whose transpose oneDNN's bf16 GEMM runs ~7x faster
    than the (K, B, C) view autocast's own cast would keep (bench/RESULTS.md 2026-12-05)."""
    from sharnn.kernels import batch_major

    keys = torch.randn(50, 3, 8)
    assert batch_major(keys).data_ptr() == keys.data_ptr() and batch_major(keys).shape == (3, 50, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows = batch_major(keys)
        scores = torch.bmm(torch.randn(3, 4, 8), rows.transpose(1, 2))
    assert rows.dtype == torch.bfloat16 and rows.is_contiguous() and scores.dtype == torch.bfloat16
    assert torch.equal(rows, keys.transpose(0, 1).bfloat16())
    assert batch_major(keys.double()).is_contiguous()  # any other dtype: the same layout


# -------------------------------------------------------------------- generation: packed LSTM weights
@pytest.mark.parametrize("T, B, carried", [(1, 1, True), (1, 5, True), (37, 3, True), (4, 2, False)])
def test_packed_lstm_is_nn_lstm_bit_for_bit(T, B, carried):
    torch.manual_seed(T * 10 + B)
    lstm = torch.nn.LSTM(16, 16).eval()
    x = torch.randn(T, B, 16)
    hidden = (torch.randn(1, B, 16), torch.randn(1, B, 16)) if carried else None
    with torch.no_grad():
        assert kernels.packed_lstm_ok(lstm, x)
        want, (want_h, want_c) = lstm(x, hidden)
        got, (got_h, got_c) = kernels.lstm_packed(lstm, x, hidden)
        assert torch.equal(got, want) and torch.equal(got_h, want_h) and torch.equal(got_c, want_c)
        # the reordered weights are kept in eval mode until forgotten (SHARNN.train(), eval(),
        # load_state_dict and to() forget them: docs/caching.md), then built from the new weights
        packed = kernels._KEPT[lstm]["packed"]
        kernels.lstm_packed(lstm, x, hidden)
        assert kernels._KEPT[lstm]["packed"] is packed
        lstm.weight_hh_l0.add_(0.05)
        kernels.forget_kept(lstm)
        want2, _ = lstm(x, hidden)
        got2, _ = kernels.lstm_packed(lstm, x, hidden)
        assert torch.equal(got2, want2) and not torch.equal(got2, want)


def test_packed_lstm_only_where_it_is_exact():
    lstm = torch.nn.LSTM(8, 8)
    x = torch.randn(3, 2, 8)
    with torch.no_grad():
        assert kernels.packed_lstm_ok(lstm, x)
        assert not kernels.packed_lstm_ok(lstm, x.to(torch.bfloat16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not kernels.packed_lstm_ok(lstm, x)
    assert not kernels.packed_lstm_ok(lstm, x)  # training: gradients flow through nn.LSTM


def test_eval_forward_follows_new_weights_through_the_cached_copies():
    """Evaluation keeps reordered LSTM weights and the Boom's scaled weights between calls; loading other
    weights in place must change the logits to exactly those of a model built with them."""
    cfg = tiny_config(d_ff=64, mem_len=20, attn="all")
    torch.manual_seed(1)
    a, b = SHARNN(cfg).eval(), SHARNN(cfg).eval()
    x = torch.randint(0, 256, (6, 2))
    with torch.no_grad():
        a(x)  # fills a's caches
        copy.deepcopy(a)  # kept beside the model: a deep copy (FlopCounterMode, export) does not copy them
        a.load_state_dict(b.state_dict())
        assert torch.equal(a(x)[0], b(x)[0])
        with torch.enable_grad():  # and the training path (no caches) agrees with the cached one
            a.eval()
            assert torch.equal(a(x)[0].detach(), b(x)[0])


def test_kept_value_gate_follows_autocast():
    """The value gate computed under bf16 autocast is bf16; a later fp32 evaluation must not reuse it."""
    cfg = tiny_config(d_ff=64, mem_len=20)
    torch.manual_seed(2)
    model = SHARNN(cfg).eval()
    with torch.no_grad():
        model.blocks[0].attn.v_gate.normal_()  # a gate whose bf16 rounding shows
        x = torch.randint(0, 256, (5, 2))
        want = copy.deepcopy(model)(x)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
        assert torch.equal(model(x)[0], want)


def test_weights_written_through_data_are_seen_after_train_or_eval():
    """DeepSpeed's ZeRO optimizers write the weights through .data, which bumps no version: what evaluation
    keeps must be dropped at model.train() / model.eval() (train.evaluation calls eval() every time)."""
    cfg = tiny_config(d_ff=64, mem_len=20, attn="all")
    torch.manual_seed(4)
    model, other = SHARNN(cfg).eval(), SHARNN(cfg).eval()
    x = torch.randint(0, 256, (6, 2))
    with torch.no_grad():
        model(x)  # keeps reordered LSTM weights, Boom weights, value gates
        for p, q in zip(model.parameters(), other.parameters()):
            p.data.copy_(q.data)  # as DeepSpeed's step: no version bump
        model.train()
        model.eval()
        assert torch.equal(model(x)[0], other(x)[0])


# ----------------------------------------------------------------------------- on a GPU (pytest -m gpu)
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_gpu
def test_written_attention_matches_sdpa_on_a_gpu():
    """CUDA's default attention against SDPA at a moderate shape (float32, TF32 off, dropout off): output and
    gradients; the memory gets none; under bf16 autocast the products run in bf16 and the softmax in float32,
    the result within bf16's rounding."""
    from torch.utils._python_dispatch import TorchDispatchMode

    T, B, C, M = 64, 4, 256, 192
    torch.manual_seed(0)
    q, segment = (torch.randn(T, B, C, device="cuda", requires_grad=True) for _ in range(2))
    memory = torch.randn(M, B, C, device="cuda", requires_grad=True)
    keys = torch.cat([memory, segment])
    mask = torch.cat([torch.ones(T, M, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()], 1)
    mask = mask.cuda()
    k = keys.transpose(0, 1)
    matmul_tf32, cudnn_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        want = F.scaled_dot_product_attention(q.transpose(0, 1), k, k, attn_mask=mask).transpose(0, 1)
        out = attend(q, keys, segment, 0.0)
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
        g = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, (q, segment), g, retain_graph=True),
                        torch.autograd.grad(want, (q, segment), g, retain_graph=True)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        out.backward(g)
        assert memory.grad is None
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_tf32, cudnn_tf32

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("bmm", "_softmax", "_softmax_backward_data"):
                self.dtypes.setdefault(name, set()).update(
                    a.dtype for a in args if isinstance(a, torch.Tensor))
            return func(*args, **(kwargs or {}))

    with Recorder() as recorder:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out16 = attend(q, torch.cat([memory.detach(), segment]), segment, 0.1)
        out16.float().sum().backward()
    assert recorder.dtypes["bmm"] == {torch.bfloat16}
    assert recorder.dtypes["_softmax"] == recorder.dtypes["_softmax_backward_data"] == {torch.float32}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        close = attend(q, keys.detach(), segment, 0.0)
    assert close.dtype == torch.bfloat16
    torch.testing.assert_close(close.float(), want.detach(), rtol=0.05, atol=0.05)


# ------------------------------------------------ a setting the environment names wrongly (issue 26 item 11)
def test_a_wrong_setting_in_the_environment_fails_at_the_first_forward_not_at_import(monkeypatch):
    problem = "$SHARNN_CPU_KERNELS='bogus' names no setting"
    monkeypatch.setitem(kernels._ENV_PROBLEMS, kernels.ENV_VAR, problem)
    model = SHARNN(tiny_config())
    with pytest.raises(kernels.SettingError, match="SHARNN_CPU_KERNELS='bogus'"):
        model(torch.randint(0, 256, (4, 1)))
    previous = kernels.set_cpu_kernels("fast")  # an explicit setting replaces the environment's
    assert kernels.settings_problem() is None and model(torch.randint(0, 256, (4, 1)))[0].shape == (4, 1, 256)
    kernels.set_cpu_kernels(previous)
