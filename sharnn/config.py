"""Model configuration: a typed dataclass and named sizes. No heavy imports here."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

AttnPlacement = Literal["penultimate", "all", "none"]

_checks_deferred = contextvars.ContextVar("model_config_checks_deferred", default=False)


@contextlib.contextmanager
def deferred_checks() -> Iterator[None]:
    """ModelConfigs made inside wait for an explicit `check()`. The trainer's flag parser (tyro) builds the
    nested ModelConfig first and would box its ValueError; train.config checks it with the rest instead, as
    one `error:` line naming `model.<field>`."""
    token = _checks_deferred.set(True)
    try:
        yield
    finally:
        _checks_deferred.reset(token)


@dataclass
class ModelConfig:
    """Architecture of a SHA-RNN. Defaults are the paper's single-head enwik8 model."""

    vocab_size: int = 256
    """Bytes: always 256 for byte-level models."""
    d_model: int = 1024
    """Embedding size; also each LSTM's hidden size (`ninp` / `emsize` in the reference)."""
    d_ff: int = 4096
    """Boom hidden size (`nhid` in the reference); its output is split into d_ff // d_model chunks."""
    n_layer: int = 4
    """Number of blocks (LSTM + optional attention + Boom)."""
    attn: AttnPlacement = "penultimate"
    """Which blocks attend: 'penultimate' (the paper's SHA-RNN), 'all', or 'none' (SHA-LSTM)."""
    mem_len: int = 5000
    """Attention memory limit M in positions: keys never exceed M (memory + current segment)."""
    dropout: float = 0.1
    """Dropout on the final hidden state before the output layer."""
    dropouth: float = 0.1
    """Dropout inside every block: LSTM output, attention q, v, weights and output, Boom."""
    dropouti: float = 0.1
    """Dropout on the embedding output."""

    def __post_init__(self) -> None:
        if not _checks_deferred.get():
            self.check()

    def check(self) -> None:
        """Raises ValueError naming the field and what it must be; normalises integral and real values."""
        # Types first: a config.json or YAML file may hold `mem_len: 512.9` or `d_model: "128"`.
        for name in ("vocab_size", "d_model", "d_ff", "n_layer", "mem_len"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            setattr(self, name, int(value))
        for name in ("dropout", "dropouth", "dropouti"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise ValueError(f"{name} must be a number, got {value!r}")
            setattr(self, name, float(value))
        if not isinstance(self.attn, str) or self.attn not in ("penultimate", "all", "none"):
            raise ValueError(f"attn must be 'penultimate', 'all' or 'none', got {self.attn!r}")
        for name in ("vocab_size", "d_model", "d_ff", "n_layer", "mem_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_ff < self.d_model:
            raise ValueError(f"d_ff ({self.d_ff}) must be >= d_model ({self.d_model}): Boom sums "
                             "d_ff // d_model chunks of size d_model")
        if self.attn == "penultimate" and self.n_layer < 2:
            raise ValueError("attn='penultimate' needs n_layer >= 2; use attn='all' for one block")
        for name in ("dropout", "dropouth", "dropouti"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def attn_layers(self) -> tuple[int, ...]:
        """Indices of the blocks that hold an attention head."""
        if self.attn == "all":
            return tuple(range(self.n_layer))
        if self.attn == "penultimate":
            return (self.n_layer - 2,)
        return ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def _paper() -> ModelConfig:
    return ModelConfig()


def _paper_all() -> ModelConfig:
    return dataclasses.replace(_paper(), attn="all")


def _lstm() -> ModelConfig:
    return dataclasses.replace(_paper(), attn="none")


def _small() -> ModelConfig:
    return ModelConfig(d_model=256, d_ff=1024, n_layer=4, mem_len=5000)


def _tiny() -> ModelConfig:
    return ModelConfig(d_model=128, d_ff=512, n_layer=2, mem_len=512, dropout=0.0, dropouth=0.05,
                       dropouti=0.0)


MODEL_PRESETS = {
    "paper": _paper,
    "paper-all": _paper_all,
    "lstm": _lstm,
    "small": _small,
    "tiny": _tiny,
}


def model_preset(name: str) -> ModelConfig:
    """A fresh ModelConfig for a named size."""
    try:
        return MODEL_PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(MODEL_PRESETS)}") from None
