"""sharnn: the SHA-RNN byte-level language model (Merity 2019), trainable from one GPU to many nodes.

The package holds the model, its carried state, the LAMB optimizer and the byte data pipeline.
It never imports accelerate, deepspeed or the `train` package, so it is usable on its own.
Its names are imported when first asked for: `import sharnn` itself loads nothing (the console commands
install their interrupt handling before torch loads), `from sharnn import SHARNN` loads the model and torch,
and load_model/save_model the I/O layer (sharnn.io.pretrained: safetensors, the Hub's client).
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {"ModelConfig": "sharnn.config", "model_preset": "sharnn.config", "SHARNN": "sharnn.model",
            "CarryState": "sharnn.state", "load_model": "sharnn.io.pretrained",
            "save_model": "sharnn.io.pretrained"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sharnn' has no attribute {name!r}")


__all__ = [*_EXPORTS, "__version__"]
