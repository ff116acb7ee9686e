"""sharnn: the SHA-RNN byte-level language model (Merity 2019), trainable from one GPU to many nodes.

The package holds the model, its carried state, the LAMB optimizer and the byte data pipeline.
It never imports accelerate, deepspeed or the `train` package, so it is usable on its own.
"""

from sharnn.config import ModelConfig, model_preset
from sharnn.model import SHARNN
from sharnn.state import CarryState

__version__ = "0.1.0"


def __getattr__(name: str):
    """load_model and save_model live in the I/O layer (sharnn.io.pretrained: safetensors, the Hub's client);
    it is imported the first time one of them is asked for, so `import sharnn` loads the model alone."""
    if name in ("load_model", "save_model"):
        from sharnn.io import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'sharnn' has no attribute {name!r}")


__all__ = ["ModelConfig", "model_preset", "SHARNN", "CarryState", "load_model", "save_model", "__version__"]
