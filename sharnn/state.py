"""State carried between segments: each block's LSTM (h, c) and each attention block's memory.

State lives outside the module: `SHARNN.forward` takes a `CarryState` and returns the next one, so
DDP/DeepSpeed wrappers, `state_dict()` and checkpoints never see it. Shapes (time-major):
  hidden[i] = (h, c), each (1, B, C)      memory[i] = (M_t, B, C), M_t <= mem_len
An entry is None when that block has no state yet (start of a stream) or no attention.

Generation carries a `DecodeState` instead: the same LSTM state, and each attention memory in a
`MemoryWindow`, a preallocated buffer that `SHARNN.step` writes each new position into.
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


class KeysBuffer:
    """One attention block's keys (memory, then the segment) in an append-only buffer, for the CPU attention
    in training and evaluation: `SHARNN.forward` would concatenate the carried memory (up to mem_len - T
    positions) with the segment's T keys every step, a (mem_len, B, C) copy (26 ms of a 0.6 s `small` step
    on 2 Zen 4 cores, bench/RESULTS.md); here the segment is written after the memory where the memory
    already lies, and the keys are a view.

    The buffer holds 2 x mem_len positions. A memory that ends exactly where the buffer's written part ends
    (the memory the previous call returned) is extended in place; anything else (a first segment, a state
    from elsewhere, a second call from the same older state, a full buffer: every mem_len / T calls) starts
    a new buffer with one copy, as the concatenation would. Written positions are never written again, so
    every memory and keys view handed out keeps its values; the buffer itself is only what the block holds
    (the states hold views of it).
    """

    def __init__(self, mem_len: int):
        self.mem_len = mem_len
        self.buf: Tensor | None = None
        self.used = 0  # positions written

    def keys(self, memory: Tensor, segment: Tensor) -> Tensor:
        """torch.cat([memory, segment]) (without gradient: the CPU attention takes the segment's gradient
        through its own argument) as a view of the buffer."""
        T, B, C = segment.shape
        segment = segment.detach()
        memory = memory.to(segment.dtype)
        K, buf = memory.shape[0], self.buf
        extend = buf is not None and self.used + T <= buf.shape[0] and self._ends_at_frontier(memory, segment)
        if not extend:
            buf = self.buf = segment.new_empty((max(2 * self.mem_len, K + T), B, C))
            buf[:K] = memory
            self.used = K
        start = self.used - K
        buf[self.used:self.used + T] = segment
        self.used += T
        return buf[start:self.used]

    def _ends_at_frontier(self, memory: Tensor, segment: Tensor) -> bool:
        buf = self.buf
        return (buf.dtype == memory.dtype and buf.device == memory.device
                and buf.shape[1:] == segment.shape[1:] and memory.numel() > 0 and memory.is_contiguous()
                and memory.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
                and memory[-1].data_ptr() == buf[self.used - 1].data_ptr())


class MemoryWindow:
    """One block's attention memory during generation: the last `mem_len` positions of B streams, taking one
    new position per step without copying the ones it holds.

    Every position is written twice into a (2 M, B, C) buffer (M = mem_len), at slot p % M and at
    p % M + M. The last K <= M positions then always lie in order in buf[e - K : e] (e = p % M + 1 + M): the
    keys that `SHARNN.forward` builds by concatenating memory and new position and cutting to M (same
    values, order, shape and strides), as a view. Softmax and the weighted sum would not mind another key
    order mathematically, but their floating-point sums would, and generation must reproduce the bytes of
    the straightforward path exactly.

    Streams may hold different numbers of positions (prompts of different lengths); their memories are
    aligned on the newest position, so all streams write the same slot each step.
    """

    def __init__(self, mem_len: int, memories: list[Tensor | None]):
        """memories[b]: stream b's memory so far, (L_b, 1, C) with its newest position last, or None."""
        self.mem_len = mem_len
        self.lengths = [0 if m is None else min(m.shape[0], mem_len) for m in memories]
        self.buf: Tensor | None = None
        self.end = max(self.lengths)  # the slot the next position goes to (< M once a position is pushed)
        held = [m for m in memories if m is not None]
        if held:
            self._allocate(len(memories), held[0])
            for b, (m, n) in enumerate(zip(memories, self.lengths)):
                if n:
                    for start in (self.end - n, self.end - n + mem_len):  # both copies
                        self.buf[start:start + n, b] = m[-n:, 0]
        self.end %= mem_len

    def _allocate(self, B: int, like: Tensor) -> None:
        # empty, not zeros: a slot is read only after it was written (160 MB to zero for 16 `small` streams)
        self.buf = torch.empty(2 * self.mem_len, B, like.shape[-1], dtype=like.dtype, device=like.device)

    def push(self, x: Tensor) -> list[tuple[slice, Tensor]]:
        """Append the new position x (1, B, C); return the keys to attend over, memory then x, as
        (streams, keys (K, streams, C)) for each run of streams that hold the same number K of positions."""
        if self.buf is None:
            self._allocate(x.shape[1], x)
        s, M = self.end, self.mem_len
        self.buf[s] = x[0]  # (B, C), cast to the buffer's dtype as forward casts the memory
        self.buf[s + M] = x[0]
        self.end = (s + 1) % M
        self.lengths = [min(n + 1, M) for n in self.lengths]
        stop = s + 1 + M
        runs, first = [], 0
        for b in range(1, len(self.lengths) + 1):
            if b == len(self.lengths) or self.lengths[b] != self.lengths[first]:
                n = self.lengths[first]
                runs.append((slice(first, b), self.buf[stop - n:stop, first:b]))
                first = b
        return runs

    def ordered(self) -> Tensor:
        """The memory as forward carries it, (K, B, C), newest last (a view; every stream holding K)."""
        if len(set(self.lengths)) != 1:
            raise ValueError(f"the streams hold memories of different lengths {self.lengths}")
        stop = (self.end - 1) % self.mem_len + 1 + self.mem_len
        return self.buf[stop - self.lengths[0]:stop]


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
