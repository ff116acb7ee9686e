"""What a run starts from: the model (fresh, from --init_from weights, or the checkpoint's architecture) and
the optimizer."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate.utils import set_seed
from safetensors.torch import load_file

from sharnn import SHARNN, ModelConfig
from sharnn.corpus.data import ByteSplit
from sharnn.io import hub
from sharnn.io.pretrained import check_state_dict
from sharnn.io.rundir import WEIGHTS_NAME, ModelError
from sharnn.optim import LAMB
from train import checkpoint
from train.config import TrainConfig


def model_config_for_resume(cfg: TrainConfig, ckpt: Path) -> ModelConfig:
    """On resume the architecture comes from the checkpoint, whatever the flags say."""
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())["model"]
    if saved != cfg.model.to_dict():
        print(f"resume: using the checkpoint's model config {saved}", file=sys.stderr)
    return ModelConfig.from_dict(saved)


def build_model(cfg: TrainConfig, train_split: ByteSplit, fresh: bool, rank: int = 0) -> tuple[SHARNN, str]:
    """The model and a line saying where its weights come from. `fresh`: not resuming a checkpoint (whose
    weights are loaded later, with the optimizer).

    Every rank draws the same initial weights from `cfg.seed`; then each rank > 0 starts its own random stream
    (its dropout masks) from `cfg.seed + rank`, while rank 0 continues as a single process does. Nothing may
    count on a wrapper to broadcast rank 0's weights: DeepSpeed's 16-bit engines build their fp32 masters from
    each rank's own module (train.distributed.prepare keeps them so), and nothing re-syncs them later."""
    set_seed(cfg.seed)
    built = _build_model(cfg, train_split, fresh)
    if rank:
        set_seed(cfg.seed + rank)
    return built


def _build_model(cfg: TrainConfig, train_split: ByteSplit, fresh: bool) -> tuple[SHARNN, str]:
    model = SHARNN(cfg.model)
    if not fresh:
        return model, "weights: from the checkpoint"
    if cfg.init_from:  # weights only: a new optimizer, schedule and data position (the paper's second stage)
        weights = init_weights_file(cfg.init_from)
        state = load_file(weights)
        try:
            check_state_dict(cfg.model, state, where=f"--init_from {cfg.init_from} ({weights})",
                             flags="--model.")
        except ModelError as e:
            raise SystemExit(f"error: {e}") from None
        model.load_state_dict(state)
        return model, f"initialised weights from {weights}"
    if cfg.output_bias_init == "unigram":
        with torch.no_grad():
            model.out_bias.copy_(unigram_log_probs(train_split.byte_counts()))
        return model, "weights: random, output bias from the training split's byte frequencies"
    return model, "weights: random (the reference's initialisation)"


def init_weights_file(init_from: str) -> Path:
    """The weights --init_from names: a run's best checkpoint, a checkpoint, an exported model, a .safetensors
    file, or a Hub repo id (owner/name[@revision], downloaded into the Hub's cache; see sharnn.io.hub)."""
    repo = hub.parse_repo_id(init_from)
    if repo is None:
        return checkpoint.weights_file(init_from)
    try:
        return hub.download(*repo) / WEIGHTS_NAME
    except ModelError as e:
        raise SystemExit(f"error: --init_from: {e}") from None


def unigram_log_probs(counts: np.ndarray) -> torch.Tensor:
    """log of add-one smoothed frequencies: a softmax over them gives each byte its share of the split, and
    a byte that never occurs 1 / (N + 256)."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    return torch.log((counts + 1) / (counts.sum() + len(counts))).float()


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    # The reference applies weight decay to every parameter (LAMB(params, weight_decay=wdecay)).
    if cfg.optimizer == "lamb":
        return LAMB(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, min_trust=cfg.min_trust)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, eps=1e-6)
