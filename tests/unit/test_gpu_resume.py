"""Resuming where another number of GPUs is visible (CPU stand-ins for torch.cuda): accelerate saves the
random state of every visible GPU and restores them all with torch.cuda.set_rng_state_all, which fails
with fewer devices (a requeue onto a smaller node, CUDA_VISIBLE_DEVICES=0). Only the rank's own
GPU's state matters."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sharnn.io import rundir


class FewerGPUs:
    """torch.cuda as seen on a node with `visible` GPUs after CUDA has started: setting the state of a device
    that is not there raises IndexError (torch.cuda.default_generators[idx]), as the real call does."""

    def __init__(self, monkeypatch, visible: int, current: int = 0):
        self.visible, self.set = visible, {}

        def set_rng_state(state, device="cuda"):
            index = device if isinstance(device, int) else torch.device(device).index or 0
            if index >= visible:
                raise IndexError("tuple index out of range")
            self.set[index] = state

        for module in (torch.cuda, torch.cuda.random):
            monkeypatch.setattr(module, "set_rng_state", set_rng_state)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current)


def write_rng_states(ckpt, rank: int, n_gpus: int, trained_on: int | None) -> list[torch.Tensor]:
    """rank's random_states_{rank}.pkl as accelerate writes it on a node with n_gpus GPUs, and its carry file
    (with the index of the GPU it trained on, as sharnn writes it, or without, as older sharnn did)."""
    from accelerate.utils.constants import RNG_STATE_NAME

    cuda = [torch.full((16,), i, dtype=torch.uint8) for i in range(n_gpus)]
    torch.save({"random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
                "torch_manual_seed": torch.get_rng_state(), "torch_cuda_manual_seed": cuda},
               ckpt / f"{RNG_STATE_NAME}_{rank}.pkl")
    meta = None if trained_on is None else {"cuda_rng_device": str(trained_on)}
    save_file({"x": torch.zeros(1)}, ckpt / rundir.carry_name(rank), metadata=meta)
    return cuda


def test_a_checkpoint_of_8_gpus_resumes_where_one_is_visible(tmp_path, monkeypatch):
    """Before: set_rng_state_all met device 1 of 1 and the checkpoint was called damaged."""
    from train.checkpoint import _check_rng_states

    saved = write_rng_states(tmp_path, rank=5, n_gpus=8, trained_on=5)
    gpus = FewerGPUs(monkeypatch, visible=1)
    _check_rng_states(tmp_path, 5)
    assert list(gpus.set) == [0] and torch.equal(gpus.set[0], saved[5])  # rank 5's own GPU's state, on GPU 0


@pytest.mark.parametrize("trained_on,current,want", [(3, 1, 3), (None, 1, 1), (None, 9, None)])
def test_the_rank_s_own_gpu_state_is_chosen(tmp_path, trained_on, current, want):
    from train.checkpoint import own_cuda_rng_state

    saved = write_rng_states(tmp_path, rank=0, n_gpus=4, trained_on=trained_on)
    state = own_cuda_rng_state(tmp_path, 0, saved, current)
    assert (state is None) if want is None else torch.equal(state, saved[want])
