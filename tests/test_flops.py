"""The analytic FLOP formula of bench/flops.py against torch's FlopCounterMode.

FlopCounterMode counts neither nn.LSTM's fused kernel nor CPU attention kernels, so the model runs here with
both decomposed into the matrix products they perform (same weights, same function): the counter then
sees every product, and the formula must match its count exactly.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench.flops import forward_flops, steady_keys
from sharnn import ModelConfig, SHARNN


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
        l = self.lstm
        h, c = (torch.zeros(1, B, C), torch.zeros(1, B, C)) if hidden is None else hidden
        h, c = h[0], c[0]
        gates_x = F.linear(x, l.weight_ih_l0, l.bias_ih_l0)  # (T, B, 4C)
        out = []
        for t in range(T):
            i, f, g, o = (gates_x[t] + F.linear(h, l.weight_hh_l0, l.bias_hh_l0)).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            out.append(h)
        return torch.stack(out), (h[None], c[None])


def matmul_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, **kwargs):
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("attn", ["penultimate", "all", "none"])
def test_formula_matches_flop_counter(attn, monkeypatch):
    cfg = ModelConfig(d_model=32, d_ff=128, n_layer=3, attn=attn, mem_len=24, dropout=0, dropouth=0, dropouti=0)
    torch.manual_seed(0)
    model = SHARNN(cfg).eval()
    T, B = 8, 3
    x = torch.randint(0, 256, (T, B))
    with torch.no_grad():
        _, _, state = model(torch.randint(0, 256, (40, B)))  # fill the memory
        want_logits, _, _ = model(x, state)
        for block in model.blocks:
            block.lstm = MatmulLSTM(block.lstm)
        monkeypatch.setattr(F, "scaled_dot_product_attention", matmul_sdpa)
        with FlopCounterMode(display=False) as counter:
            logits, _, _ = model(x, state)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)  # the decomposition is the model
    assert counter.get_total_flops() == forward_flops(cfg, T, B, steady_keys(cfg, T))
