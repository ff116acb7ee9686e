"""sharnn: the SHA-RNN byte-level language model (Merity 2019), trainable from one GPU to many nodes.

The package holds the model, its carried state, the LAMB optimizer and the byte data pipeline.
It never imports accelerate, deepspeed or the `train` package, so it is usable on its own.
"""

from sharnn.config import ModelConfig, model_preset
from sharnn.model import SHARNN
from sharnn.pretrained import load_model, save_model
from sharnn.state import CarryState

__version__ = "0.1.0"
__all__ = ["ModelConfig", "model_preset", "SHARNN", "CarryState", "load_model", "save_model", "__version__"]
