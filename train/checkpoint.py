"""Checkpoints on top of accelerator.save_state / load_state, written atomically, pruned, resumable.

A checkpoint directory `checkpoints/step-00001200/` holds what accelerate writes (model, optimizer and
every rank's RNG; DeepSpeed shards under DeepSpeed) plus:
  model.safetensors         the weights (accelerate's own file; under DeepSpeed written by sharnn too)
  train_state.json          step, epoch, bytes seen, best validation bpc, loader position (rank-independent)
  carry_rank{r}.safetensors each rank's LSTM state and attention memory (per rank: each rank owns its streams)
  config.yaml, meta.json    the resolved config; format version, world size, library versions
Everything is written under `.tmp-step-...` and renamed once complete, so a crash never leaves a partial
checkpoint under a final name. `checkpoints/best.json` names the best checkpoint by validation bpc.
Checkpoints assume a filesystem shared by all nodes (as on clusters); the main process renames and prunes.
The names, completeness and the finding of checkpoints are `sharnn.rundir`'s (re-exported here).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

from sharnn import atomic, rundir
from sharnn.rundir import (
    FORMAT_VERSION,
    WEIGHTS_NAME,
    ModelError,
    best_checkpoint,
    checkpoints_root,
    complete_checkpoints,
    is_complete,
)
from sharnn.state import CarryState
from train import elastic

__all__ = ["TrainState", "save", "load", "resolve_resume", "complete_checkpoints", "best_checkpoint",
           "weights_file", "is_complete", "read_meta", "checkpoints_root", "FORMAT_VERSION", "WEIGHTS_NAME"]


@dataclasses.dataclass
class TrainState:
    """Rank-independent progress: what `--resume` needs besides weights, optimizer and RNG."""

    step: int = 0
    epoch: int = 0
    bytes_seen: int = 0
    best_val_bpc: float = math.inf
    best_step: int | None = None
    loader: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["best_val_bpc"] = None if math.isinf(self.best_val_bpc) else self.best_val_bpc
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        d = json.loads(text)
        d["best_val_bpc"] = math.inf if d["best_val_bpc"] is None else d["best_val_bpc"]
        return cls(**d)


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """'auto' -> the latest complete checkpoint of run_dir (None if there is none); a run directory ->
    its latest checkpoint; a checkpoint directory -> itself."""
    if resume is None:
        return None
    if resume == "auto":
        return rundir.latest_checkpoint(run_dir)
    path = Path(resume)
    if is_complete(path):
        return path
    if path.is_dir() and checkpoints_root(path).is_dir():
        found = rundir.latest_checkpoint(path)
        if found is not None:
            return found
        raise SystemExit(f"error: --resume {resume}: the run has no complete checkpoint yet; "
                         "start it afresh or use --resume auto")
    raise SystemExit(f"error: --resume {resume}: not a run directory or a checkpoint "
                     "(a checkpoint holds train_state.json); use --resume auto to continue --out")


def save(accelerator, model, run_dir: Path, state: TrainState, carry: CarryState, config_yaml: str,
         keep_last: int) -> Path:
    """Every rank calls this. Returns the final checkpoint directory."""
    final = rundir.checkpoint_dir(run_dir, state.step)
    tmp = rundir.tmp_checkpoint_dir(run_dir, state.step)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed stores weights in its own (pickled) format; every checkpoint also carries plain weights.
        weights = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            save_file({k: v.contiguous() for k, v in weights.items()}, tmp / WEIGHTS_NAME)
    carry_file = tmp / rundir.carry_name(accelerator.process_index)
    save_file(carry.to(torch.float32).to("cpu").to_tensors(), carry_file)
    accelerator.wait_for_everyone()  # save_state does not wait when automatic naming is off
    if accelerator.is_main_process:
        meta = {"format_version": FORMAT_VERSION, "world_size": accelerator.num_processes,
                "distributed_type": str(accelerator.distributed_type), "torch": torch.__version__}
        (tmp / rundir.META_NAME).write_text(json.dumps(meta, indent=1))
        (tmp / rundir.CKPT_CONFIG_NAME).write_text(config_yaml)
        (tmp / rundir.TRAIN_STATE_NAME).write_text(state.to_json())  # last: marks the checkpoint complete
        atomic.replace_dir(tmp, final)  # replaces a checkpoint of the same step (a resumed run's)
        if state.best_step is not None:
            rundir.write_best(run_dir, state.best_step, state.best_val_bpc)
        _prune(run_dir, keep_last, state.best_step)
    accelerator.wait_for_everyone()
    return final


def _prune(run_dir: Path, keep_last: int, best_step: int | None) -> None:
    complete = complete_checkpoints(run_dir)
    keep = {p.name for p in complete[-keep_last:]}
    if best_step is not None:
        keep.add(rundir.step_name(best_step))
    for p in complete:
        if p.name not in keep:
            shutil.rmtree(p)


def read_meta(ckpt: Path) -> dict:
    return json.loads((ckpt / rundir.META_NAME).read_text())


def load(accelerator, ckpt: Path, n_layer: int, batch_size: int,
         restart_streams: bool = False) -> tuple[TrainState, CarryState]:
    """Every rank calls this, after accelerator.prepare. Restores weights, optimizer, RNG and carry.

    The checkpoint may come from another number of ranks (train.elastic): with the same number of streams
    (ranks x batch_size) each rank takes its streams' carried state from the saved files; with another, only
    if `restart_streams` (fresh streams, empty state)."""
    meta = read_meta(ckpt)
    if meta["format_version"] != FORMAT_VERSION:
        raise SystemExit(f"error: {ckpt} has checkpoint format {meta['format_version']}; this sharnn reads "
                         f"format {FORMAT_VERSION}")
    state = TrainState.from_json((ckpt / rundir.TRAIN_STATE_NAME).read_text())
    saved_world, saved_batch = meta["world_size"], state.loader["batch_size"]
    world, rank = accelerator.num_processes, accelerator.process_index
    same_layout = (saved_world, saved_batch) == (world, batch_size)
    if not same_layout and saved_world != world and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise SystemExit(f"error: {ckpt} was written by {saved_world} processes, this DeepSpeed run has "
                         f"{world}: resuming on another number of ranks is supported under DDP and one "
                         "process (their checkpoints do not depend on the world size); under DeepSpeed "
                         f"resume with {saved_world} processes")
    same_streams = same_layout or elastic.check_layout(saved_world, saved_batch, world, batch_size,
                                                       restart_streams)
    accelerator.load_state(str(ckpt))
    # safetensors names devices "cpu" or "cuda:N"; accelerate's multi-process CPU device is "cpu:0".
    device = "cpu" if accelerator.device.type == "cpu" else str(accelerator.device)
    if same_layout:
        carry = CarryState.from_tensors(load_file(ckpt / rundir.carry_name(rank), device=device), n_layer)
    elif same_streams:
        carry = elastic.regroup_carry(ckpt, saved_world, saved_batch, rank, batch_size, n_layer, device)
        state.loader = state.loader | {"world_size": world, "batch_size": batch_size}
    else:
        carry = CarryState.empty(n_layer)
        state.loader = elastic.rescale_loader_state(state.loader, world, batch_size,
                                                    state.loader["split_bytes"])
    return state, carry


def weights_file(path: str | Path) -> Path:
    """model.safetensors of a checkpoint, of a run's best (else latest) checkpoint or of an exported model, or
    a .safetensors file (sharnn.rundir.weights_path); SystemExit with the problem and its fix otherwise."""
    try:
        return rundir.weights_path(path)
    except ModelError as e:
        raise SystemExit(f"error: {e}") from None
