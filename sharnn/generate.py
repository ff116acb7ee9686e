"""Sampling bytes from a SHA-RNN with its state carried, so each new byte costs one step."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from sharnn.state import CarryState


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering of (..., V) logits. temperature 0: greedy."""
    if temperature == 0:
        out = torch.full_like(logits, float("-inf"))
        return out.scatter(-1, logits.argmax(-1, keepdim=True), 0.0)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the mass before it already reaches top_p (the first token always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def stream_bytes(model, prompt: bytes, n_bytes: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, generator: torch.Generator | None = None,
                 state: CarryState | None = None) -> Iterator[int]:
    """Yield n_bytes sampled bytes, one at a time, after reading `prompt` (at least one byte)."""
    if not prompt:
        raise ValueError("the prompt must hold at least one byte")
    device = next(model.parameters()).device
    x = torch.tensor(list(prompt), dtype=torch.long, device=device).view(-1, 1)  # (T, 1)
    for _ in range(n_bytes):
        logits, _, state = model(x, state)
        probs = filter_logits(logits[-1, 0].float(), temperature, top_k, top_p).softmax(-1)
        nxt = torch.multinomial(probs, 1, generator=generator)
        yield int(nxt)
        x = nxt.view(1, 1)


def generate(model, prompt: bytes, n_bytes: int, **kwargs) -> bytes:
    """All of `stream_bytes` at once. Evaluates in eval mode and restores the model's mode."""
    was_training = model.training
    model.eval()
    try:
        return bytes(stream_bytes(model, prompt, n_bytes, **kwargs))
    finally:
        model.train(was_training)
