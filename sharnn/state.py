"""State carried between segments: each block's LSTM (h, c) and each attention block's memory.

State lives outside the module: `SHARNN.forward` takes a `CarryState` and returns the next one, so
DDP/DeepSpeed wrappers, `state_dict()` and checkpoints never see it. Shapes (time-major):
  hidden[i] = (h, c), each (1, B, C)      memory[i] = (M_t, B, C), M_t <= mem_len
An entry is None when that block has no state yet (start of a stream) or no attention.

Generation carries a `DecodeState` instead: the same LSTM state, and each attention memory in a
`MemoryWindow`, the buffer that `SHARNN.step` writes each new position into; `SHARNN.forward` builds its
keys over the memory with a MemoryWindow too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LSTMState = tuple[Tensor, Tensor]


@dataclass
class CarryState:
    hidden: list[LSTMState | None]
    memory: list[Tensor | None]

    @classmethod
    def empty(cls, n_layer: int) -> "CarryState":
        """The state at the start of every stream: nothing carried."""
        return cls(hidden=[None] * n_layer, memory=[None] * n_layer)

    @property
    def n_layer(self) -> int:
        return len(self.hidden)

    @property
    def memory_len(self) -> int:
        """Positions held in the attention memory (the same for every attention block)."""
        return max((m.shape[0] for m in self.memory if m is not None), default=0)

    def detach(self) -> "CarryState":
        """Cut the autograd graph at a truncated-BPTT boundary, keeping the values."""
        return self._map(lambda t: t.detach())

    def reset(self) -> "CarryState":
        """Forget everything: every stream starts afresh (epoch start, random state reset)."""
        return CarryState.empty(self.n_layer)

    def to(self, *args, **kwargs) -> "CarryState":
        """Move or cast every tensor, like `Tensor.to`."""
        return self._map(lambda t: t.to(*args, **kwargs))

    def _map(self, fn) -> "CarryState":
        hidden = [None if hc is None else (fn(hc[0]), fn(hc[1])) for hc in self.hidden]
        memory = [None if m is None else fn(m) for m in self.memory]
        return CarryState(hidden=hidden, memory=memory)

    # Flat tensor dicts, for safetensors checkpoints (one file per rank).
    def to_tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for i, hc in enumerate(self.hidden):
            if hc is not None:
                out[f"hidden.{i}.h"], out[f"hidden.{i}.c"] = hc[0].contiguous(), hc[1].contiguous()
        for i, m in enumerate(self.memory):
            if m is not None:
                out[f"memory.{i}"] = m.contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], n_layer: int) -> "CarryState":
        state = cls.empty(n_layer)
        for i in range(n_layer):
            if f"hidden.{i}.h" in tensors:
                state.hidden[i] = (tensors[f"hidden.{i}.h"], tensors[f"hidden.{i}.c"])
            if f"memory.{i}" in tensors:
                state.memory[i] = tensors[f"memory.{i}"]
        extra = {k for k in tensors if not k.startswith(("hidden.", "memory."))}
        if extra or any(int(k.split(".")[1]) >= n_layer for k in tensors):
            raise ValueError(f"carried state does not fit a {n_layer}-block model: keys {sorted(tensors)}")
        return state


def batch_size_of(state: CarryState) -> int | None:
    """B of the carried tensors, or None if nothing is carried."""
    for hc in state.hidden:
        if hc is not None:
            return hc[0].shape[1]
    for m in state.memory:
        if m is not None:
            return m.shape[1]
    return None


class MemoryWindow:
    """An attention block's memory and new keys side by side in one buffer, so that the keys the attention
    reads (the memory, then the new positions) are a view, never a concatenation: one mechanism for
    training, evaluation (`extend`, T new positions per call) and generation (`push`, one per call).

    Concatenating copies the whole memory for every call: (mem_len, B, C) per segment in training and
    evaluation (a 5000 x 16 x 256 copy for `small`), per byte in generation. Here new positions are written
    after the last written one in an append-only buffer of 2 x mem_len positions, and the keys handed out are
    `buf[used - K : used]`: the values, order, shape and strides of the concatenation (the floating-point
    sums of softmax and the weighted sum depend on them; generation must reproduce forward's bytes exactly).
    A position once written is never written again, so every memory and keys view handed out keeps its
    values; a full buffer is replaced by a new one with one copy of the positions still needed (every
    mem_len / T calls).

    `extend` (forward) takes the memory as the carried state holds it: a memory that ends where the buffer's
    written part ends (the memory the previous call returned, cut) is extended in place; anything else (a
    stream's first memory, a state from elsewhere, a second call from an older state) starts a new buffer
    with one copy, as the concatenation would. Gradients do not flow through the buffer: the attentions that
    read it take the segment's own keys as an argument of their own (sharnn.kernels.attend_cpu, attend).

    In generation the streams may hold different numbers of positions (prompts of different lengths): their
    memories are aligned on the newest position, so all streams write the same row each step.
    """

    def __init__(self, mem_len: int, memories: list[Tensor | None] = ()):
        """memories[b]: stream b's memory so far, (L_b, 1, C) with its newest position last, or None (for
        generation; a window for `extend` starts empty)."""
        self.mem_len = mem_len
        self.lengths = [0 if m is None else min(m.shape[0], mem_len) for m in memories]
        self.buf: Tensor | None = None
        self.rows = 2 * mem_len  # the next buffer's size
        self.used = max(self.lengths, default=0)  # rows written
        held = [m for m in memories if m is not None]
        if held:
            self._allocate(len(memories), held[0])
            for b, (m, n) in enumerate(zip(memories, self.lengths)):
                if n:
                    self.buf[self.used - n:self.used, b] = m[-n:, 0]

    def _allocate(self, B: int, like: Tensor) -> None:
        # empty, not zeros: a row is read only after it was written (160 MB to zero for 16 `small` streams)
        self.buf = torch.empty(self.rows, B, like.shape[-1], dtype=like.dtype, device=like.device)

    def extend(self, memory: Tensor, new: Tensor) -> Tensor:
        """torch.cat([memory, new]) as a view of the buffer, for `SHARNN.forward`: memory (K, B, C), new
        (T, B, C), K + T <= mem_len. Without gradient (see the class docstring)."""
        T, B, _ = new.shape
        new = new.detach()
        memory = memory.to(new.dtype)
        K = memory.shape[0]
        room = self.buf is not None and self.used + T <= self.buf.shape[0]
        if not (room and self._at_frontier(memory, new)):
            self.rows = max(2 * self.mem_len, K + T)
            self._allocate(B, new)
            self.buf[:K] = memory
            self.used = K
        self.buf[self.used:self.used + T] = new
        self.used += T
        return self.buf[self.used - K - T:self.used]

    def _at_frontier(self, memory: Tensor, new: Tensor) -> bool:
        """Whether `memory` is the buffer's last written positions (itself a view of them)."""
        buf = self.buf
        return (buf.dtype == memory.dtype and buf.device == memory.device
                and buf.shape[1:] == new.shape[1:] and memory.numel() > 0 and memory.is_contiguous()
                and memory.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
                and memory[-1].data_ptr() == buf[self.used - 1].data_ptr())

    def push(self, x: Tensor) -> list[tuple[slice, Tensor]]:
        """Append the new position x (1, B, C) for generation; return the keys to attend over, memory then x,
        as (streams, keys (K, streams, C)) for each run of streams that hold the same number K of
        positions."""
        if self.buf is None:
            self._allocate(x.shape[1], x)
        elif self.used == self.buf.shape[0]:  # full: a new buffer with the positions the next keys need
            keep = min(max(self.lengths), self.mem_len - 1)
            old = self.buf
            self._allocate(old.shape[1], old)
            self.buf[:keep] = old[self.used - keep:self.used]
            self.used = keep
        self.buf[self.used] = x[0]  # (B, C), cast to the buffer's dtype as forward casts the memory
        self.used += 1
        self.lengths = [min(n + 1, self.mem_len) for n in self.lengths]
        runs, first = [], 0
        for b in range(1, len(self.lengths) + 1):
            if b == len(self.lengths) or self.lengths[b] != self.lengths[first]:
                n = self.lengths[first]
                runs.append((slice(first, b), self.buf[self.used - n:self.used, first:b]))
                first = b
        return runs

    def ordered(self) -> Tensor:
        """The memory as forward carries it, (K, B, C), newest last (a view; every stream holding K)."""
        if len(set(self.lengths)) != 1:
            raise ValueError(f"the streams hold memories of different lengths {self.lengths}")
        return self.buf[self.used - self.lengths[0]:self.used]


@dataclass
class DecodeState:
    """What generation carries for B streams, advanced in place by `SHARNN.step`: per block the LSTM
    (h, c), each (1, B, C), and the attention memory as a MemoryWindow (None in blocks without attention)."""

    hidden: list[LSTMState | None]
    memory: list[MemoryWindow | None]

    @classmethod
    def from_carry(cls, streams: list[CarryState], mem_len: int, attn_layers: tuple[int, ...]
                   ) -> "DecodeState":
        """Streams side by side: streams[b] is a one-stream CarryState, e.g. what forward returned after
        reading stream b's prompt (the same object may stand for several streams)."""
        if any(batch_size_of(s) not in (None, 1) for s in streams):
            raise ValueError("DecodeState.from_carry takes one CarryState per stream (batch size 1)")
        n_layer = streams[0].n_layer
        hidden: list[LSTMState | None] = []
        for i in range(n_layer):
            held = [s.hidden[i] for s in streams]
            if any(hc is None for hc in held):
                if not all(hc is None for hc in held):
                    raise ValueError(f"block {i}: some streams carry an LSTM state and some do not")
                hidden.append(None)
            else:
                hidden.append(tuple(torch.cat([hc[j] for hc in held], dim=1) for j in (0, 1)))
        memory = [MemoryWindow(mem_len, [s.memory[i] for s in streams]) if i in attn_layers else None
                  for i in range(n_layer)]
        return cls(hidden=hidden, memory=memory)

    def to_carry(self) -> CarryState:
        """The CarryState that forward would have returned (memories as views of the windows)."""
        return CarryState(hidden=list(self.hidden),
                          memory=[None if w is None or w.buf is None else w.ordered() for w in self.memory])


__all__ = ["CarryState", "DecodeState", "LSTMState", "MemoryWindow", "batch_size_of"]
