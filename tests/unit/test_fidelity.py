"""The definition of "faithful": reproduce the reference implementation's logits from its weights.

tests/fixtures/sharnn_reference.safetensors holds weights in the reference's naming and the logits the
author's code computed over four consecutive segments with LSTM state and attention memory carried,
the memory limit scaled down to 40 so that truncation is exercised (the file's metadata, `info`, holds the
configuration).
"""

import json

import pytest
import torch
from safetensors.torch import load_file, safe_open

from sharnn import SHARNN
from sharnn.convert import infer_config, load_reference
from tests.helpers import FIXTURES

FIXTURE = FIXTURES / "sharnn_reference.safetensors"


def fixture(variant: str):
    tensors = load_file(FIXTURE)
    with safe_open(FIXTURE, "pt") as f:
        info = json.loads(f.metadata()["info"])
    weights = {k[len(f"{variant}.weights."):]: v for k, v in tensors.items()
               if k.startswith(f"{variant}.weights.")}
    expected = {k[len(f"{variant}.expected."):]: v for k, v in tensors.items()
                if k.startswith(f"{variant}.expected.")}
    return info, weights, expected, tensors["tokens"]


def run_segments(model, tokens, lengths, carry=True):
    state, start, out = None, 0, []
    for T in lengths:
        x, y = tokens[start:start + T], tokens[start + 1:start + T + 1]
        logits, loss, new_state = model(x, state if carry else None, targets=y)
        out.append((logits, loss, new_state))
        state, start = new_state, start + T
    return out


@pytest.mark.parametrize("variant", ["penultimate", "all"])
def test_logits_match_reference(variant):
    info, weights, expected, tokens = fixture(variant)
    cfg = infer_config(weights, mem_len=info["max_positions"])
    assert cfg.attn == variant and cfg.d_model == info["ninp"] and cfg.d_ff == info["nhid"]
    model = SHARNN(cfg)
    load_reference(model, weights)
    model.eval()
    with torch.no_grad():
        results = run_segments(model, tokens.long(), info["segments"])
    for i, (logits, loss, state) in enumerate(results):
        want = expected[f"seg{i}.logits"]
        assert logits.shape == want.shape
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=0)
        torch.testing.assert_close(loss.reshape(1), expected[f"seg{i}.loss"], atol=1e-5, rtol=0)
        assert state.memory_len == int(expected[f"seg{i}.memory_len"])


@pytest.mark.parametrize("variant", ["penultimate", "all"])
def test_without_carried_memory_the_logits_differ(variant):
    """Guards the fixture test itself: dropping carried state must miss the reference by far."""
    info, weights, expected, tokens = fixture(variant)
    model = SHARNN(infer_config(weights, mem_len=info["max_positions"]))
    load_reference(model, weights)
    model.eval()
    with torch.no_grad():
        results = run_segments(model, tokens.long(), info["segments"], carry=False)
    worst = (results[1][0] - expected["seg1.logits"]).abs().max().item()
    assert worst > 0.1


def test_converter_rejects_foreign_state_dict():
    with pytest.raises(ValueError, match="encoder.weight"):
        infer_config({"foo": torch.zeros(1)})
    _, weights, _, _ = fixture("penultimate")
    weights = dict(weights, **{"blocks.0.mystery.weight": torch.zeros(3)})
    model = SHARNN(infer_config(weights, mem_len=40))
    with pytest.raises(ValueError, match="mystery"):
        load_reference(model, weights)


def test_converter_rejects_missing_tensor():
    _, weights, _, _ = fixture("penultimate")
    del weights["blocks.1.rnn.weight_hh_l0"]
    model = SHARNN(infer_config(weights, mem_len=40))
    with pytest.raises(ValueError, match="missing"):
        load_reference(model, weights)
