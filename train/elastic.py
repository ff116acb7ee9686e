"""Resuming on another number of ranks (preempted cluster jobs come back on what is free).

A checkpoint written by W ranks x B streams holds each rank's carried state for streams r*B .. r*B+B-1 of the
S = W*B streams of the training split. When the new launch keeps S (W' x B' = W x B), the streams are the same
byte ranges, and their cursor is one number shared by every rank: each new rank reads its streams' rows out
of the saved per-rank files, and the run continues the same streams with the same carried state. Any other
change of S would cut the streams elsewhere; that is refused unless `--restart_streams` asks for fresh
streams at the same point of the epoch (with empty state).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from sharnn.io import rundir
from sharnn.state import CarryState


def layouts_keeping(n_streams: int) -> str:
    """'1 x 16, 2 x 8, 4 x 4, ...': the (ranks x batch_size) that keep n_streams streams."""
    return ", ".join(f"{w} x {n_streams // w}" for w in range(1, n_streams + 1) if n_streams % w == 0)


def check_layout(saved_world: int, saved_batch: int, world: int, batch: int, restart_streams: bool) -> bool:
    """Whether the carried state can be regrouped (True), or the streams start afresh (False); SystemExit
    naming the valid layouts otherwise."""
    if saved_world * saved_batch == world * batch:
        return True
    if restart_streams:
        return False
    raise SystemExit(
        f"error: the checkpoint holds {saved_world * saved_batch} streams ({saved_world} ranks x batch_size "
        f"{saved_batch}); this run has {world * batch} ({world} x {batch}). To continue the same streams "
        "with their carried state, resume with ranks x --batch_size in: "
        f"{layouts_keeping(saved_world * saved_batch)}. Or pass --restart_streams to cut the streams anew at "
        "the same point of the epoch, with empty carried state (the loss rises for a while as the state "
        "fills again).")


def regroup_carry(ckpt: Path, saved_world: int, saved_batch: int, rank: int, batch: int, n_layer: int,
                  device: str) -> CarryState:
    """This rank's carried state (global streams rank*batch .. rank*batch+batch-1) from the saved files."""
    lo, hi = rank * batch, (rank + 1) * batch
    pieces: dict[str, list[torch.Tensor]] = {}
    for r in range(saved_world):
        first, last = max(lo, r * saved_batch), min(hi, (r + 1) * saved_batch)
        if first >= last:
            continue
        with safe_open(str(ckpt / rundir.carry_name(r)), framework="pt", device=device) as f:
            for key in f.keys():  # hidden.i.h / hidden.i.c: (1, B, C); memory.i: (M, B, C)
                rows = f.get_slice(key)[:, first - r * saved_batch:last - r * saved_batch]
                pieces.setdefault(key, []).append(rows)
    return CarryState.from_tensors({k: torch.cat(v, dim=1) for k, v in pieces.items()}, n_layer)


def rescale_loader_state(state: dict, world: int, batch: int, split_bytes: int) -> dict:
    """The loader position for fresh streams of the new layout at the same fraction of the epoch."""
    old_len = split_bytes // (state["world_size"] * state["batch_size"])
    new_len = split_bytes // (world * batch)
    offset = min(round(state["offset"] * new_len / old_len), max(new_len - 3, 0))
    step = state["step_in_epoch"] if offset > 0 else 0
    return state | {"world_size": world, "batch_size": batch, "offset": offset, "step_in_epoch": step}
