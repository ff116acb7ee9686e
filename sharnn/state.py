"""State carried between segments: each block's LSTM (h, c) and each attention block's memory.

State lives outside the module: `SHARNN.forward` takes a `CarryState` and returns the next one, so
DDP/DeepSpeed wrappers, `state_dict()` and checkpoints never see it. Shapes (time-major):
  hidden[i] = (h, c), each (1, B, C)      memory[i] = (M_t, B, C), M_t <= mem_len
An entry is None when that block has no state yet (start of a stream) or no attention.
"""

from __future__ import annotations

from dataclasses import dataclass

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


__all__ = ["CarryState", "LSTMState", "batch_size_of"]
