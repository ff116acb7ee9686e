"""Analytic model FLOPs per byte of SHA-RNN, counting matrix products (2 FLOPs per multiply-add).

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
    """One forward call on a (bptt, batch) segment."""
    return forward_flops_per_byte(cfg, n_keys) * bptt * batch + _per_call(cfg)


def train_flops(cfg: ModelConfig, bptt: int, batch: int, n_keys: float) -> float:
    """One forward and backward on a (bptt, batch) segment. The per-byte count less, per block, the
    gradient of the first step's recurrent product with respect to the carried LSTM state (no gradient)."""
    carried = cfg.n_layer * 2 * batch * cfg.d_model * 4 * cfg.d_model
    return train_flops_per_byte(cfg, n_keys, bptt) * bptt * batch + 3 * _per_call(cfg) - carried


def steady_keys(cfg: ModelConfig, bptt: int) -> int:
    """Keys per position once the memory is full: the memory is cut to M - T (nothing when T >= M) before
    the T positions of the segment join it."""
    return max(cfg.mem_len, bptt)
