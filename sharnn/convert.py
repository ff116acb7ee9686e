"""Bring state dicts in the reference's naming (Smerity/sha-rnn model.py) into `SHARNN`.

Reference -> sharnn names (per block i):
    encoder.weight -> embed.weight (the reference ties decoder.weight to it)    decoder.bias -> out_bias
    lnstart/lnmem/lnmid/lnff/lnxff -> ln_start/ln_mem/ln_mid/ln_ff/ln_xff      rnn.* -> lstm.*
    ff.linear1 -> boom.proj      attn.qs/ks/vs -> attn.q_gate/k_gate/v_gate (1x1xd -> d)
    attn.q -> attn.query         attn.qln -> attn.query_ln                       attn.vq.l1 -> attn.v_overparam.proj
Ignored (held by the reference, never read by its forward): lnout, attn.qkvs, attn.r_gate, and
lnmem/lnmid of blocks without attention.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from sharnn.config import ModelConfig

_BLOCK_RENAMES = {
    "lnstart": "ln_start", "lnmem": "ln_mem", "lnmid": "ln_mid", "lnff": "ln_ff", "lnxff": "ln_xff",
    "rnn": "lstm", "ff.linear1": "boom.proj",
    "attn.qs": "attn.q_gate", "attn.ks": "attn.k_gate", "attn.vs": "attn.v_gate",
    "attn.qln": "attn.query_ln", "attn.q": "attn.query", "attn.vq.l1": "attn.v_overparam.proj",
}
UNUSED_IN_REFERENCE = ("lnout", "attn.qkvs", "attn.r_gate")


def infer_config(ref: dict[str, Tensor], mem_len: int = 5000) -> ModelConfig:
    """Read the architecture off a reference state dict (sizes, blocks, attention placement)."""
    if "encoder.weight" not in ref:
        raise ValueError("not a SHA-RNN reference state dict: no 'encoder.weight' key")
    vocab, d = ref["encoder.weight"].shape
    blocks = sorted({int(m.group(1)) for k in ref if (m := re.match(r"blocks\.(\d+)\.", k))})
    n_layer = len(blocks)
    d_ff = ref["blocks.0.ff.linear1.weight"].shape[0]
    with_attn = tuple(i for i in blocks if f"blocks.{i}.attn.q.weight" in ref)
    if with_attn == tuple(range(n_layer)):
        attn = "all"
    elif with_attn == (n_layer - 2,):
        attn = "penultimate"
    elif not with_attn:
        attn = "none"
    else:
        raise ValueError(f"attention in blocks {with_attn} is not a placement sharnn knows "
                         "('penultimate', 'all', 'none')")
    return ModelConfig(vocab_size=vocab, d_model=d, d_ff=d_ff, n_layer=n_layer, attn=attn, mem_len=mem_len)


def from_reference(ref: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """A sharnn state dict from a reference one; unused reference tensors are dropped."""
    out: dict[str, Tensor] = {}
    for key, value in ref.items():
        if key == "encoder.weight":
            out["embed.weight"] = value
        elif key == "decoder.bias":
            out["out_bias"] = value
        elif key == "decoder.weight":
            if not torch.equal(value, ref["encoder.weight"]):
                raise ValueError("decoder.weight differs from encoder.weight: sharnn ties them, "
                                 "so an untied reference model cannot be converted")
        else:
            m = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias|weight_ih_l0|weight_hh_l0|bias_ih_l0|bias_hh_l0)$", key)
            gate = re.match(r"blocks\.(\d+)\.(attn\.(?:qs|ks|vs|qkvs|r_gate))$", key)
            if gate:
                i, name, leaf = gate.group(1), gate.group(2), None
            elif m:
                i, name, leaf = m.groups()
            else:
                raise ValueError(f"unexpected key {key!r} in the reference state dict")
            if name in UNUSED_IN_REFERENCE:
                continue
            if name in ("lnmem", "lnmid") and int(i) not in cfg.attn_layers:
                continue
            if name not in _BLOCK_RENAMES:
                raise ValueError(f"unexpected key {key!r} in the reference state dict")
            new = f"blocks.{i}.{_BLOCK_RENAMES[name]}"
            out[new if leaf is None else f"{new}.{leaf}"] = value.reshape(-1) if leaf is None else value
    return out


def load_reference(model: torch.nn.Module, ref: dict[str, Tensor]) -> None:
    """Load a reference state dict into `model`, strictly: every tensor the model holds must be given."""
    converted = from_reference(ref, model.cfg)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(f"reference state dict does not fit this model: missing {missing}, "
                         f"unexpected {unexpected}")
