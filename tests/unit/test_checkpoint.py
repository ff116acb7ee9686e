"""train.checkpoint.inspect on its own: a checkpoint written in this process by checkpoint.save (a tiny model
on a one-process CPU Accelerator), read back, then damaged one file at a time: each damage is refused with
the file named before anything is loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from sharnn import SHARNN, CarryState
from sharnn.io import rundir
from tests.helpers import tiny_config
from train import checkpoint
from train.config import TrainConfig, dump_yaml

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """checkpoints/step-00000003 of a run directory: weights, optimizer, random states, carried state,
    config.yaml, meta.json, train_state.json."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = TrainConfig(model=tiny_config(), batch_size=2, data="corpus")
    torch.manual_seed(0)
    model = SHARNN(cfg.model)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    x = torch.randint(0, 256, (8, 2))
    _, loss, carry = model(x, CarryState.empty(2), targets=x)
    loss.backward()
    optimizer.step()  # an optimizer state to save
    state = checkpoint.TrainState(step=3, epoch=1, bytes_seen=48, best_val_bpc=7.5, best_step=3,
                                  loader={"batch_size": 2, "world_size": 1, "offset": 16, "step_in_epoch": 2})
    run_dir = tmp_path_factory.mktemp("run")
    ckpt = checkpoint.save(accelerator, model, run_dir, state, carry.detach(), dump_yaml(cfg), keep_last=2)
    AcceleratorState._reset_state(reset_partial_state=True)
    return ckpt


def damaged(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / saved.name))


def test_a_complete_checkpoint_is_read_back(saved):
    assert saved.name == rundir.step_name(3) and rundir.is_complete(saved)
    found = checkpoint.inspect(saved)
    assert found.path == saved
    assert found.meta["world_size"] == 1 and found.meta["format_version"] == checkpoint.FORMAT_VERSION
    assert (found.state.step, found.state.epoch, found.state.bytes_seen) == (3, 1, 48)
    assert found.state.best_val_bpc == 7.5 and found.state.best_step == 3
    assert found.state.loader["offset"] == 16 and found.state.loader["batch_size"] == 2
    assert found.train_config["batch_size"] == 2 and found.train_config["model"]["d_model"] == 16
    assert found.train_config["data"] == "corpus"


def remove(path: Path) -> None:
    path.unlink()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path) -> None:
    path.write_bytes(b"not what was written")


@pytest.mark.parametrize("name,damage,fragments", [
    ("meta.json", garbage, ["meta.json is unreadable", "The checkpoint is damaged", "--init_from"]),
    ("train_state.json", garbage, ["train_state.json is unreadable"]),
    ("model.safetensors", remove, ["model.safetensors is missing"]),
    ("model.safetensors", truncate, ["model.safetensors is unreadable"]),
    ("carry_rank0.safetensors", remove, ["carry_rank0.safetensors is missing"]),
    ("carry_rank0.safetensors", truncate, ["carry_rank0.safetensors is unreadable"]),
    ("random_states_0.pkl", remove, ["random_states_0.pkl (rank 0's random number generator states) is "
                                     "missing"]),
    ("random_states_0.pkl", garbage, ["random_states_0.pkl (rank 0's random number generator states) is "
                                      "unreadable"]),
    ("optimizer.bin", remove, ["optimizer.bin is missing"]),
    ("optimizer.bin", garbage, ["optimizer.bin is not a file torch.save wrote"]),
], ids=lambda v: getattr(v, "__name__", None) if callable(v) else None)
def test_a_damaged_file_is_refused_by_name(name, damage, fragments, saved, tmp_path):
    ckpt = damaged(saved, tmp_path)
    damage(ckpt / name)
    with pytest.raises(SystemExit) as refused:
        checkpoint.inspect(ckpt)
    message = str(refused.value)
    assert message.startswith(f"error: cannot resume from {ckpt}: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_a_rank_the_checkpoint_does_not_hold_is_refused(saved, tmp_path):
    """meta.json says 2 ranks wrote it; rank 1's carried state is not there."""
    ckpt = damaged(saved, tmp_path)
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps(meta | {"world_size": 2}))
    with pytest.raises(SystemExit, match="carry_rank1.safetensors is missing"):
        checkpoint.inspect(ckpt)


def test_another_checkpoint_format_is_named(saved, tmp_path):
    ckpt = damaged(saved, tmp_path)
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps(meta | {"format_version": 999}))
    with pytest.raises(SystemExit, match=f"has checkpoint format 999; this sharnn reads format "
                                         f"{checkpoint.FORMAT_VERSION}"):
        checkpoint.inspect(ckpt)


def test_only_the_random_states_of_the_ranks_asked_for_are_read(saved, tmp_path):
    """A resuming rank reads its own random states (load passes rng_ranks=[its index]): a rank the checkpoint
    did not have (an elastic resume on more ranks) reads none."""
    ckpt = damaged(saved, tmp_path)
    (ckpt / "random_states_0.pkl").unlink()
    assert checkpoint.inspect(ckpt, rng_ranks=[1]).state.step == 3
    with pytest.raises(SystemExit, match="random_states_0.pkl"):
        checkpoint.inspect(ckpt, rng_ranks=[0])
