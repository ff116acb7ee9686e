"""Model behaviour beyond the fixture: sizes, causality, carried state, init."""

import functools

import pytest
import torch

from sharnn import SHARNN, CarryState, ModelConfig, model_preset
from tests.helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: a second thread only waits

# This module's model: 3 blocks, all with attention, a 64-position memory, no dropout.
tiny = functools.partial(tiny_config, d_ff=64, n_layer=3, attn="all", mem_len=64, dropout=0.0, dropouth=0.0,
                         dropouti=0.0)


def make(cfg, seed=0):
    torch.manual_seed(seed)
    m = SHARNN(cfg)
    # Non-zero gates so attention matters (the reference initialises them to 0).
    with torch.no_grad():
        for b in m.blocks:
            if b.attn is not None:
                for g in (b.attn.q_gate, b.attn.k_gate, b.attn.v_gate):
                    g.normal_(0, 1)
    return m.eval()


# Reference parameter counts at the paper's sizes (README.md, "The model"). sharnn holds no unused
# parameter: the reference's lnout, qkvs, r_gate and the attention LayerNorms of plain blocks are left out.
@pytest.mark.parametrize("preset,ours,reference_full", [
    ("paper", 53_825_792, 53_850_368),
    ("paper-all", 63_299_840, 63_324_416),
])
def test_parameter_counts_match_reference(preset, ours, reference_full):
    cfg = model_preset(preset)
    with torch.device("meta"):
        model = SHARNN(cfg)
    assert model.num_params() == ours
    d, n_attn, n = cfg.d_model, len(cfg.attn_layers), cfg.n_layer
    unused = n * 2 * d + (n - n_attn) * 4 * d + n_attn * 4 * d  # lnout; lnmem+lnmid; qkvs (3d) + r_gate (d)
    assert ours + unused == reference_full


@pytest.mark.parametrize("attn", ["penultimate", "all", "none"])
def test_attention_placement(attn):
    model = SHARNN(tiny(attn=attn))
    has = [b.attn is not None for b in model.blocks]
    assert has == {"penultimate": [False, True, False], "all": [True] * 3, "none": [False] * 3}[attn]


def test_causal_with_memory():
    """Changing future bytes never changes earlier outputs, with memory carried from a previous segment."""
    model = make(tiny())
    torch.manual_seed(1)
    prev = torch.randint(0, 256, (12, 2))
    x = torch.randint(0, 256, (10, 2))
    with torch.no_grad():
        _, _, state = model(prev)
        a, _, _ = model(x, state)
        x2 = x.clone()
        x2[6:] = torch.randint(0, 256, (4, 2))
        b, _, _ = model(x2, state)
    torch.testing.assert_close(a[:6], b[:6], atol=0, rtol=0)
    assert (a[6:] - b[6:]).abs().max() > 1e-3


@pytest.mark.parametrize("attn", ["penultimate", "all", "none"])
def test_one_segment_of_2T_equals_two_of_T(attn):
    model = make(tiny(attn=attn))
    torch.manual_seed(2)
    x = torch.randint(0, 256, (20, 3))
    with torch.no_grad():
        whole, _, s_whole = model(x)
        first, _, s = model(x[:10])
        second, _, s2 = model(x[10:], s)
    torch.testing.assert_close(torch.cat([first, second]), whole, atol=1e-5, rtol=1e-5)
    for (h1, c1), (h2, c2) in zip(s_whole.hidden, s2.hidden):
        torch.testing.assert_close(h1, h2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c1, c2, atol=1e-5, rtol=1e-5)


def test_memory_truncation_limits_context():
    """With mem_len M, keys never exceed M: a byte more than M - T positions back is out of reach."""
    model = make(tiny(mem_len=8, attn="all"))
    torch.manual_seed(3)
    x = torch.randint(0, 256, (4, 1))
    with torch.no_grad():
        _, _, s = model(torch.randint(0, 256, (30, 1)))
        assert s.memory_len == 8
        # Memory positions older than M - T are cut before the forward pass: changing them changes nothing
        # through attention. Zero the LSTM state so only memory carries information.
        s = CarryState(hidden=[None] * 3, memory=s.memory)
        ref, _, _ = model(x, s)
        old = CarryState(hidden=s.hidden, memory=[m.clone() for m in s.memory])
        for m in old.memory:
            m[: 8 - 4] += 1.0  # positions that the M - T cut drops
        same, _, _ = model(x, old)
        recent = CarryState(hidden=s.hidden, memory=[m.clone() for m in s.memory])
        for m in recent.memory:
            m[-1] += 1.0
        moved, _, _ = model(x, recent)
    torch.testing.assert_close(same, ref, atol=0, rtol=0)
    assert (moved - ref).abs().max() > 1e-4


def test_segment_as_long_as_memory_starts_with_empty_memory():
    """T == M: the reference's m[-(M-T):] would keep all memory; sharnn treats M - T <= 0 as empty."""
    model = make(tiny(mem_len=6))
    torch.manual_seed(4)
    x = torch.randint(0, 256, (6, 2))
    with torch.no_grad():
        _, _, s = model(torch.randint(0, 256, (6, 2)))
        without_lstm = CarryState(hidden=[None] * 3, memory=s.memory)
        a, _, s2 = model(x, without_lstm)
        b, _, _ = model(x, None)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert s2.memory_len == 6


def test_loss_is_mean_cross_entropy():
    model = make(tiny())
    x, y = torch.randint(0, 256, (5, 2)), torch.randint(0, 256, (5, 2))
    logits, loss, _ = model(x, targets=y)
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
    torch.testing.assert_close(loss, want)


def test_init_as_reference():
    cfg = tiny_config(d_model=64, d_ff=256, attn="all", mem_len=10)
    torch.manual_seed(0)
    model = SHARNN(cfg)
    std = 0.1 / 64 ** 0.5
    assert abs(model.embed.weight.std().item() - std) < 0.1 * std
    assert abs(model.blocks[0].boom.proj.weight.std().item() - std) < 0.1 * std
    assert torch.all(model.blocks[0].boom.proj.bias == 0)
    for name, p in model.named_parameters():
        if ".ln_" in name or "query_ln" in name:
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
    assert torch.all(model.blocks[0].attn.q_gate == 0)
    # The LSTM keeps torch's default U(-1/sqrt(d), 1/sqrt(d)) init, far wider than 0.1/sqrt(d).
    assert model.blocks[0].lstm.weight_hh_l0.abs().max() > 5 * std


def test_state_detach_reset_and_tensor_round_trip():
    model = make(tiny())
    x = torch.randint(0, 256, (5, 2))
    _, _, s = model(x)
    assert s.hidden[0][0].requires_grad
    d = s.detach()
    assert not d.hidden[0][0].requires_grad and not d.memory[0].requires_grad
    torch.testing.assert_close(d.hidden[0][0], s.hidden[0][0])
    r = s.reset()
    assert r.hidden == [None] * 3 and r.memory == [None] * 3 and r.memory_len == 0
    back = CarryState.from_tensors(d.to_tensors(), n_layer=3)
    for a, b in zip(back.hidden, d.hidden):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="2-block"):
        CarryState.from_tensors(d.to_tensors(), n_layer=2)


def test_config_validation():
    with pytest.raises(ValueError, match="attn"):
        ModelConfig(attn="middle")
    with pytest.raises(ValueError, match="d_ff"):
        ModelConfig(d_model=64, d_ff=32)
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(dropout=1.5)


def test_bf16_autocast_and_pure_bf16_forward_track_fp32():
    model = make(tiny())
    x = torch.randint(0, 256, (5, 2))
    with torch.no_grad():
        ref, _, ref_state = model(x)
        ref2, _, _ = model(x, ref_state)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, _, s = model(x)
            logits2, _, _ = model(x, s)  # carried state is bf16 now
        # Pure bf16 weights (as DeepSpeed bf16 runs them) with fp32 carried state must also work.
        m16 = make(tiny()).to(torch.bfloat16)
        _, _, s16 = m16(x)
        out, _, _ = m16(x, s16.to(torch.float32))
    assert out.dtype == torch.bfloat16
    # Within a few bf16 roundings (2^-8 relative) of the logits' scale: observed 1.4-2.4 on a Xeon with
    # avx512_bf16/AMX, 4.2 on an AMD EPYC without avx512 (another bf16 kernel path); a forward that drops
    # the carried state misses by about 300.
    bf16_eps = 2.0 ** -8
    for got, want in ((logits, ref), (logits2, ref2), (out, ref2)):
        assert (got.float() - want).abs().max() / want.abs().max() < 10 * bf16_eps


# --------------------------------------------- the attention's keys over the memory without a concatenation
def _cat_keys(self, memory, new):
    return torch.cat([memory.to(new.dtype), new.detach()])


def _train_segments(model, lengths, seed=0):
    """Losses, gradients and carried memories over segments of `lengths`, the state carried and detached."""
    torch.manual_seed(seed)
    data = torch.randint(0, 256, (sum(lengths) + 1, 3))
    state, out, start = None, [], 0
    for T in lengths:
        torch.manual_seed(seed + start)  # the same dropout masks for both runs
        _, loss, state = model(data[start:start + T], state, targets=data[start + 1:start + T + 1])
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        state = state.detach()
        out.append((loss.detach(), grads, [None if m is None else m.clone() for m in state.memory]))
        start += T
    return out


@pytest.mark.parametrize("attn", ["penultimate", "all"])
def test_memory_window_trains_bit_for_bit_as_the_concatenation(attn, monkeypatch):
    """Memory 20, segments of 3-9 positions: the buffer (40 positions) is extended in place and refilled
    several times; losses, gradients and carried memories equal those of torch.cat's keys exactly."""
    cfg = tiny_config(d_ff=64, mem_len=20, attn=attn)
    lengths = [7, 9, 3, 8, 8, 5, 9, 7, 6, 4, 9]
    torch.manual_seed(3)
    model = SHARNN(cfg).train()
    got = _train_segments(model, lengths)
    monkeypatch.setattr("sharnn.state.MemoryWindow.extend", _cat_keys)
    want = _train_segments(model, lengths)
    for (loss, grads, mems), (loss_w, grads_w, mems_w) in zip(got, want):
        assert torch.equal(loss, loss_w)
        assert all(torch.equal(g, w) for g, w in zip(grads, grads_w))
        assert all((m is None and w is None) or torch.equal(m, w) for m, w in zip(mems, mems_w))


def test_memory_window_extends_in_place_and_never_rewrites_what_it_handed_out():
    from sharnn.state import MemoryWindow

    buffer = MemoryWindow(mem_len=10)
    seg = [torch.full((4, 2, 3), float(i)) for i in range(6)]
    first = buffer.extend(torch.full((2, 2, 3), -1.0), seg[0])  # a memory from elsewhere: a new buffer
    buf = buffer.buf
    assert buf.shape[0] == 20 and first.data_ptr() == buf.data_ptr()
    memory = first[-6:]  # what forward keeps for the next segment of 4 (mem_len - T)
    second = buffer.extend(memory, seg[1])  # ends where the buffer's written part ends: extended in place
    assert buffer.buf is buf and torch.equal(second, torch.cat([memory, seg[1]]))
    snapshot = second.clone()
    again = buffer.extend(memory, seg[2])  # the same older state once more: not at the frontier, a new buffer
    assert buffer.buf is not buf and torch.equal(again, torch.cat([memory, seg[2]]))
    assert torch.equal(second, snapshot)  # the first continuation's keys were not overwritten
    m = again[-6:]
    for s in seg[3:]:  # 10 of 20 positions used: two more in place, then the buffer is full and renewed
        before = buffer.buf
        k = buffer.extend(m, s)
        assert torch.equal(k, torch.cat([m, s]))
        m = k[-6:]
    assert buffer.buf is not before


# ------------------------------------------ what eval mode keeps (docs/caching.md: sharnn.kernels.kept)
def _kept(model):
    from sharnn.kernels import _KEPT

    return {name for module in model.modules() for name in _KEPT.get(module, {})}


def test_eval_mode_keeps_gradient_free_results_and_training_mode_nothing():
    model = make(tiny(n_layer=2, attn="penultimate"))  # eval mode
    x = torch.randint(0, 256, (6, 2))
    with torch.no_grad():
        model(x)
        assert _kept(model) == {"packed", "scaled", "value_gate None"}
        model.train()  # forgets
        assert not _kept(model)
        model(x)  # training mode without gradient: built at every call, nothing kept
        assert not _kept(model)
        model.eval()
        model(x)
        assert _kept(model)
        model.eval()  # eval() forgets too: every evaluation starts from the current weights
        assert not _kept(model)


def test_weights_loaded_or_cast_in_eval_mode_are_seen():
    """What eval mode keeps is dropped when weights are loaded (through the model or a wrapper) and when the
    model is moved or cast: nothing else checks the weights."""
    cfg = tiny(n_layer=2, attn="penultimate")
    a, b = make(cfg, seed=1), make(cfg, seed=2)
    x = torch.randint(0, 256, (6, 2))
    with torch.no_grad():
        a(x)
        wrapper = torch.nn.ModuleDict({"model": a})  # as DDP or DeepSpeed's engine hold it
        wrapper.load_state_dict({f"model.{k}": v for k, v in b.state_dict().items()})
        assert torch.equal(a(x)[0], b(x)[0])
        a.to(torch.float64)  # the kept float32 Boom weights and value gate would not fit
        assert torch.equal(a(x)[0], b.to(torch.float64)(x)[0])
