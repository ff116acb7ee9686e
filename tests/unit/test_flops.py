"""The analytic FLOP formula of train/flops.py against torch's FlopCounterMode.

FlopCounterMode does not count nn.LSTM's fused kernel, so the LSTMs run here decomposed into the matrix
products they perform (same weights, same function). The attention runs as on every CPU: sharnn.kernels'
batched products, forward and custom backward. The counter then sees every product, and the formula must
match its count exactly, for a forward and for a training step (forward and backward).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sharnn import SHARNN, ModelConfig
from tests.helpers import tiny_config
from train.flops import forward_flops, steady_keys, train_flops


class MatmulLSTM(torch.nn.Module):
    """nn.LSTM's function written as its products: one input projection for the segment, one recurrent
    product per step."""

    def __init__(self, lstm: torch.nn.LSTM):
        super().__init__()
        self.lstm = lstm

    @property
    def weight_ih_l0(self):  # the block reads the LSTM's dtype from it
        return self.lstm.weight_ih_l0

    def forward(self, x, hidden=None):
        T, B, C = x.shape
        lstm = self.lstm
        h, c = (torch.zeros(1, B, C), torch.zeros(1, B, C)) if hidden is None else hidden
        h, c = h[0], c[0]
        gates_x = F.linear(x, lstm.weight_ih_l0, lstm.bias_ih_l0)  # (T, B, 4C)
        out = []
        for t in range(T):
            i, f, g, o = (gates_x[t] + F.linear(h, lstm.weight_hh_l0, lstm.bias_hh_l0)).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            out.append(h)
        return torch.stack(out), (h[None], c[None])


def decomposed(cfg: ModelConfig, B: int, train: bool):
    """A model with full memory (as in steady training), its LSTMs decomposed; and its undecomposed twin."""
    torch.manual_seed(0)
    model = SHARNN(cfg).train(train)
    with torch.no_grad():
        _, _, state = model(torch.randint(0, 256, (40, B)))  # fill the memory
    twin = copy.deepcopy(model)
    for block in model.blocks:
        block.lstm = MatmulLSTM(block.lstm)
    return model, twin, state


@pytest.mark.parametrize("attn", ["penultimate", "all", "none"])
def test_formula_matches_flop_counter(attn):
    cfg = tiny_config(d_model=32, d_ff=128, n_layer=3, attn=attn, mem_len=24, dropout=0, dropouth=0,
                      dropouti=0)
    T, B = 8, 3
    model, twin, state = decomposed(cfg, B, train=False)
    x = torch.randint(0, 256, (T, B))
    with torch.no_grad():
        want_logits, _, _ = twin(x, state)
        with FlopCounterMode(display=False) as counter:
            logits, _, _ = model(x, state)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)  # the decomposition is the model
    assert counter.get_total_flops() == forward_flops(cfg, T, B, steady_keys(cfg, T))


@pytest.mark.parametrize("attn", ["penultimate", "all", "none"])
def test_training_formula_matches_flop_counter(attn):
    """Forward and backward: the backward skips the memory's gradient (it is carried state)."""
    cfg = tiny_config(d_model=32, d_ff=128, n_layer=3, attn=attn, mem_len=24, dropout=0.1, dropouth=0.1,
                      dropouti=0.1)
    T, B = 8, 3
    model, _, state = decomposed(cfg, B, train=True)
    x, y = torch.randint(0, 256, (T, B)), torch.randint(0, 256, (T, B))
    with FlopCounterMode(display=False) as counter:
        _, loss, _ = model(x, state, targets=y)
        loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert counter.get_total_flops() == train_flops(cfg, T, B, steady_keys(cfg, T))
