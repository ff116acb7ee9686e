"""train.elastic on its own, without processes: a checkpoint's per-rank carried state regrouped for another
number of ranks that keeps the streams, the layouts accepted and refused, the loader position for fresh
streams."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sharnn import CarryState
from sharnn.io import rundir
from train.elastic import check_layout, layouts_keeping, regroup_carry, rescale_loader_state

N_LAYER, M, C = 2, 5, 3


def stream_state(streams: list[int]) -> CarryState:
    """A carried state whose every value names its global stream and tensor (hidden of block 0, memory of
    block 1, as a model with attention in block 1 only carries)."""
    s = torch.tensor(streams, dtype=torch.float32)
    h = s.view(1, -1, 1).expand(1, len(streams), C).clone()
    memory = (1000 + s).view(1, -1, 1).expand(M, len(streams), C).clone()
    return CarryState(hidden=[(h, h + 0.5), None], memory=[None, memory])


def write_checkpoint(path, world: int, batch: int):
    """The carry files a run of `world` ranks x `batch` streams writes: rank r holds streams r*batch ...."""
    path.mkdir(exist_ok=True)
    for r in range(world):
        state = stream_state(list(range(r * batch, (r + 1) * batch)))
        save_file(state.to_tensors(), path / rundir.carry_name(r))
    return path


def streams_of(state: CarryState) -> list[int]:
    """The global streams a state holds, read back from every tensor (all must agree)."""
    h, c = state.hidden[0]
    memory = state.memory[1]
    streams = h[0, :, 0].tolist()
    assert c[0, :, 0].tolist() == [s + 0.5 for s in streams]
    assert all((memory[:, i, :] == 1000 + s).all() for i, s in enumerate(streams))
    assert h.shape == (1, len(streams), C) and memory.shape == (M, len(streams), C)
    assert state.hidden[1] is None and state.memory[0] is None
    return [int(s) for s in streams]


@pytest.mark.parametrize("saved,new", [((2, 3), (3, 2)), ((2, 3), (1, 6)), ((3, 2), (2, 3)), ((1, 6), (6, 1)),
                                       ((2, 3), (2, 3))])
def test_each_rank_gets_its_streams_carried_state(saved, new, tmp_path):
    (saved_world, saved_batch), (world, batch) = saved, new
    ckpt = write_checkpoint(tmp_path / "ckpt", saved_world, saved_batch)
    got = [streams_of(regroup_carry(ckpt, saved_world, saved_batch, rank, batch, N_LAYER, "cpu"))
           for rank in range(world)]
    assert got == [list(range(r * batch, (r + 1) * batch)) for r in range(world)]


def test_a_rank_whose_streams_span_two_saved_files(tmp_path):
    """Rank 1 of 3 x 2 holds streams 2 and 3: the last of saved rank 0's and the first of saved rank 1's."""
    ckpt = write_checkpoint(tmp_path / "ckpt", 2, 3)
    assert streams_of(regroup_carry(ckpt, 2, 3, 1, 2, N_LAYER, "cpu")) == [2, 3]


def test_layouts_that_keep_the_streams_are_accepted_others_refused_or_restarted():
    assert check_layout(2, 4, 4, 2, restart_streams=False) is True
    assert check_layout(2, 4, 1, 8, restart_streams=False) is True
    assert check_layout(2, 4, 3, 4, restart_streams=True) is False  # fresh streams, empty state
    with pytest.raises(SystemExit) as refused:
        check_layout(2, 4, 3, 4, restart_streams=False)
    message = str(refused.value)
    assert "holds 8 streams (2 ranks x batch_size 4)" in message and "this run has 12 (3 x 4)" in message
    assert "1 x 8, 2 x 4, 4 x 2, 8 x 1" in message and "--restart_streams" in message
    assert layouts_keeping(6) == "1 x 6, 2 x 3, 3 x 2, 6 x 1"


def test_fresh_streams_start_at_the_same_fraction_of_the_epoch():
    state = {"world_size": 2, "batch_size": 4, "offset": 250, "step_in_epoch": 9, "split_bytes": 8000,
             "epoch": 3}
    # 8 streams of 1000 bytes, a quarter through -> 4 streams of 2000 bytes, a quarter through
    moved = rescale_loader_state(state, 1, 4, 8000)
    assert moved == state | {"world_size": 1, "batch_size": 4, "offset": 500}
    # 16 streams of 500 bytes
    assert rescale_loader_state(state, 4, 4, 8000)["offset"] == 125
    # never past the last segment's start
    assert rescale_loader_state(state | {"offset": 998}, 8, 4, 8000)["offset"] == 250 - 3
    # at the epoch's start it stays there
    assert rescale_loader_state(state | {"offset": 0, "step_in_epoch": 0}, 1, 4, 8000)["step_in_epoch"] == 0
