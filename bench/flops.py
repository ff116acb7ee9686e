"""Analytic model FLOPs per byte of SHA-RNN, counting matrix products (2 FLOPs per multiply-add).

Per byte (one position of one stream), forward:
    LSTM, per block:        2 * (d * 4d) input projection + 2 * (d * 4d) recurrent projection = 16 d^2
    Boom, per block:        2 * d * d_ff
    attention, per block:   query Linear 2 d^2, scores q.k over K keys 2 K d, mixing weights.v 2 K d
    output layer:           2 * d * V
K is the number of keys a position is scored against: memory + segment length (the full causal
rectangle is computed, masked entries included, as every dense kernel does). Backward costs twice the
forward (one product for each operand's gradient): training = 3 x forward. Element-wise work (gates,
LayerNorm, GELU, softmax) is left out, as is customary for MFU.
"""

from __future__ import annotations

from sharnn.config import ModelConfig


def forward_flops_per_byte(cfg: ModelConfig, n_keys: float) -> float:
    d, n_attn = cfg.d_model, len(cfg.attn_layers)
    lstm = 16 * d * d * cfg.n_layer
    boom = 2 * d * cfg.d_ff * cfg.n_layer
    attn = n_attn * (2 * d * d + 4 * n_keys * d)
    out = 2 * d * cfg.vocab_size
    return float(lstm + boom + attn + out)


def forward_flops(cfg: ModelConfig, seg_len: int, batch: int, n_keys: float) -> float:
    """One forward call on a (seg_len, batch) segment: per-byte work plus the value gate's Overparam
    (a Linear d -> 2d applied once per call to the gate vector)."""
    per_call = len(cfg.attn_layers) * 2 * cfg.d_model * 2 * cfg.d_model
    return forward_flops_per_byte(cfg, n_keys) * seg_len * batch + per_call


def train_flops_per_byte(cfg: ModelConfig, n_keys: float) -> float:
    return 3.0 * forward_flops_per_byte(cfg, n_keys)


def steady_keys(cfg: ModelConfig, seg_len: int) -> int:
    """Keys per position once the memory is full: the memory is cut to M - T (nothing when T >= M) before
    the T positions of the segment join it."""
    return max(cfg.mem_len, seg_len)
