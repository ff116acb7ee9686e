"""sharnn.attention_report: the captured weights are the ones the model uses, capturing changes nothing and
leaves
nothing behind, the report's numbers, the trainer's TensorBoard records (read back with TensorBoard's reader
from the shared tiny run) and `sharnn-eval --attention_report` (its PNGs and JSON read back)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sharnn import SHARNN, attention_report, kernels
from tests.helpers import exits_with, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = (b"The single head reads the memory. The single head reads the segment. " * 8)[:500]


def small_model(**overrides) -> SHARNN:
    torch.manual_seed(0)
    return SHARNN(tiny_config(**({"d_ff": 64, "mem_len": 40, "attn": "all", "dropout": 0.1, "dropouth": 0.1,
                                  "dropouti": 0.1} | overrides)))


def attention_io(model: SHARNN):
    """Forward hooks (the test's own) that keep every attention module's inputs and output."""
    seen, handles = {}, []
    for i, block in enumerate(model.blocks):
        if block.attn is not None:
            handles.append(block.attn.register_forward_hook(
                lambda m, inputs, output, i=i: seen.__setitem__(i, (inputs, output))))
    return seen, handles


@pytest.mark.parametrize("cpu_kernels", ["fast", "torch"])
def test_captured_weights_are_the_ones_the_model_uses(cpu_kernels):
    """weights @ keys * v_gate reproduces each attention module's output, with a memory, on both CPU paths
    (the written-out attention and torch's SDPA)."""
    previous = kernels.set_cpu_kernels(cpu_kernels)
    try:
        model = small_model().eval()
        x = torch.randint(0, 256, (12, 2))
        with torch.no_grad():
            _, _, state = model(x)
            seen, handles = attention_io(model)
            with attention_report.capture_attention(model, row=1) as captured:
                model(x[:7], state)
            for h in handles:
                h.remove()
    finally:
        kernels.set_cpu_kernels(previous)
    assert sorted(captured) == [0, 1]
    for i, weights in captured.items():
        (h, keys, _), out = seen[i]
        assert weights.shape == (7, 12 + 7) and keys.shape[0] == 19
        attn = model.blocks[i].attn
        v_gate = attn.v_overparam(torch.sigmoid(attn.v_gate)).detach()
        rebuilt = (weights @ keys[:, 1]) * v_gate  # (T, C)
        torch.testing.assert_close(rebuilt, out[:, 1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weights.sum(-1), torch.ones(7))
        future = torch.from_numpy(attention_report.distances(7, 12) < 0)
        assert (weights[future] == 0).all() and (weights[~future] > 0).all()


def test_capture_changes_nothing_and_leaves_no_hook():
    model = small_model().eval()
    x = torch.randint(0, 256, (10, 2))
    with torch.no_grad():
        plain, _, _ = model(x)
        with attention_report.capture_attention(model) as captured:
            with_capture, _, _ = model(x)
    torch.testing.assert_close(with_capture, plain, rtol=0, atol=1e-6)
    assert captured
    attn_modules = [b.attn for b in model.blocks if b.attn is not None]
    assert all(not m._forward_hooks for m in attn_modules)  # outside the block: the plain code path
    with pytest.raises(RuntimeError), attention_report.capture_attention(model):
        raise RuntimeError("a failed forward")
    assert all(not m._forward_hooks for m in attn_modules)


def test_capture_under_autocast_stays_float32():
    model = small_model().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with attention_report.capture_attention(model) as captured:
            model(torch.randint(0, 256, (8, 1)))
    for weights in captured.values():
        assert weights.dtype == torch.float32
        torch.testing.assert_close(weights.sum(-1), torch.ones(8), rtol=0, atol=1e-6)


def test_window_follows_a_warmed_memory():
    model = small_model(mem_len=40).train()
    window = attention_report.read_window(model, TEXT, bptt=16)
    # ceil((40 - 16) / 16) = 2 segments warm the memory; the window is the third: bytes 32..47
    assert (window.start, window.segment_len, window.n_memory) == (32, 16, 24)
    assert window.key_bytes == TEXT[8:48]
    assert model.training  # put back as it was
    assert sorted(window.weights) == [0, 1] and window.weights[0].shape == (16, 40)
    # The same weights as a plain forward over the same segments (the capture is read-only, dropout off)
    model.eval()
    with torch.no_grad():
        state = None
        for start in (0, 16):
            _, _, state = model(torch.tensor(list(TEXT[start:start + 16]))[:, None], state)
        with attention_report.capture_attention(model) as captured:
            model(torch.tensor(list(TEXT[32:48]))[:, None], state)
    np.testing.assert_array_equal(window.weights[1], captured[1].numpy())
    # A text too short for a full memory: its last whole segment; shorter than bptt: all of it
    assert attention_report.window_start(40, 16, 40) == (16, 16)
    assert attention_report.window_start(10, 16, 40) == (0, 10)
    with pytest.raises(ValueError, match="empty"):
        attention_report.window_start(0, 16, 40)
    with pytest.raises(ValueError, match="no attention block"):
        attention_report.read_window(small_model(attn="none"), TEXT, 16)


def window_of(weights: np.ndarray, n_memory: int) -> attention_report.AttentionWindow:
    T, K = weights.shape
    return attention_report.AttentionWindow(weights={1: weights.astype(np.float32)}, key_bytes=TEXT[:K],
                                     n_memory=n_memory, start=100)


def test_numbers_of_known_distributions():
    T, M = 8, 24
    d = attention_report.distances(T, M)
    # Uniform over the visible keys: the entropy is log2 of their number, mass spread by distance
    uniform = np.where(d >= 0, 1.0, 0.0)
    uniform /= uniform.sum(-1, keepdims=True)
    layer = attention_report.summarize(window_of(uniform, M)).layers[1]
    want = np.mean([math.log2(M + t + 1) for t in range(T)])
    assert math.isclose(layer["entropy_bits"], want, rel_tol=1e-5)
    assert math.isclose(layer["uniform_entropy_bits"], want, rel_tol=1e-9)
    assert math.isclose(sum(b["mass"] for b in layer["distance_bins"]), 1.0, rel_tol=1e-6)
    for b in layer["distance_bins"]:  # the reference: a head that attends evenly
        assert b["mass"] == pytest.approx(b["uniform_mass"], rel=1e-5)
    # Everything on the byte 5 back: entropy 0, all mass in the 4-7 bin, mean distance 5, top key 5 back
    five_back = (d == 5).astype(float)
    report = attention_report.summarize(window_of(five_back, M))
    layer = report.layers[1]
    assert report.entropy_bits == pytest.approx(0.0, abs=1e-6)
    bins = {(b["from"], b["to"]): b["mass"] for b in layer["distance_bins"]}
    assert list(bins) == [(0, 0), (1, 1), (2, 3), (4, 7), (8, 15), (16, 31)]  # up to K - 1 = 31
    assert bins[(4, 7)] == pytest.approx(1.0) and sum(bins.values()) == pytest.approx(1.0)
    assert layer["mean_distance"] == pytest.approx(5.0)
    assert layer["memory_mass"] == pytest.approx(5 / 8)  # queries 0..4 read the memory, 5..7 the segment
    upper, mass, stats = attention_report.distance_histogram(window_of(five_back, M), 1)
    assert list(upper) == [0, 1, 3, 7, 15, 31] and stats["sum"] == pytest.approx(5.0)
    assert stats["sum_squares"] == pytest.approx(25.0)
    # The text marks, for each shown query, the byte 5 back in brackets within its context
    text = attention_report.marked_text(window_of(five_back, M), report)
    q = layer["queries"][-1]
    t = M + q["query"]
    assert q["top"][0]["distance"] == 5 and q["top"][0]["weight"] == pytest.approx(1.0)
    shown, read = attention_report.show(TEXT[t - 5 - 12:t - 5]), attention_report.printable(TEXT[t - 5])
    assert f"`{shown}[{read}]" in text
    assert "1.000 at 5 bytes back" in text


def test_weights_image_is_log_scaled_and_small():
    w = np.full((4, 3000), 1 / 3000, dtype=np.float32)
    w[:, 2000:] = 0.0  # a masked future
    w[0, 0] = 1.0
    rgb = attention_report.weights_rgb(w, max_keys=1000)
    assert rgb.shape == (4, 1000, 3) and rgb.dtype == np.uint8  # keys averaged in groups of 3
    assert (rgb[:, 700:] == 0).all()  # the masked future is black
    assert rgb[0, 0].sum() > rgb[1, 0].sum()  # more weight, brighter (viridis: yellow at 1)


def test_eval_attention_report_bad_input(random_model, tmp_path):
    from sharnn.io.pretrained import save_model
    from train.eval_command import main

    model, out = str(random_model), tmp_path / "report"
    empty, text = tmp_path / "empty.txt", tmp_path / "text.txt"
    empty.write_bytes(b"")
    text.write_bytes(TEXT)
    report = ["--attention_report", str(out)]
    exits_with(main, [model, *report], "--text FILE or --data CORPUS")
    exits_with(main, [model, *report, "--text", str(tmp_path / "missing")], "--text", "cannot read")
    exits_with(main, [model, *report, "--text", str(empty)], "is empty")
    exits_with(main, [model, *report, "--text", str(text), "--mem_len", "8", "16"], "one --mem_len")
    save_model(small_model(attn="none"), tmp_path / "lstm")
    exits_with(main, [str(tmp_path / "lstm"), *report, "--text", str(text)], "no attention block")
    exits_with(main, [model], "--data is required")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report")]  # nothing half-written
