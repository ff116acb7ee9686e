"""Checkpoints on top of accelerator.save_state / load_state, written atomically, pruned, resumable.

A checkpoint directory `checkpoints/step-00001200/` holds what accelerate writes (model, optimizer and
every rank's RNG; DeepSpeed shards under DeepSpeed) plus:
  model.safetensors         the weights (accelerate's own file; under DeepSpeed written by sharnn too)
  train_state.json          step, epoch, bytes seen, best validation bpc, loader position (rank-independent)
  carry_rank{r}.safetensors each rank's LSTM state and attention memory (per rank: every rank owns its streams)
  config.yaml, meta.json    the resolved config; format version, world size, library versions
Everything is written under `.tmp-step-...` and renamed once complete, so a crash never leaves a partial
checkpoint under a final name. `checkpoints/best.json` names the best checkpoint by validation bpc.
Checkpoints assume a filesystem shared by all nodes (as on clusters); the main process renames and prunes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

from sharnn.state import CarryState

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"  # what accelerate writes for DDP / one process; written by us under DeepSpeed


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


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def is_complete(ckpt: Path) -> bool:
    return (ckpt / "train_state.json").is_file() and not ckpt.name.startswith(".")


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (by the step recorded inside, not by the name)."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: TrainState.from_json((p / "train_state.json").read_text()).step)


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """'auto' -> the latest complete checkpoint of run_dir (None if there is none); a run directory ->
    its latest checkpoint; a checkpoint directory -> itself."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if is_complete(path):
        return path
    if path.is_dir() and checkpoints_root(path).is_dir():
        found = complete_checkpoints(path)
        if found:
            return found[-1]
        raise SystemExit(f"error: --resume {resume}: the run has no complete checkpoint yet; "
                         "start it afresh or use --resume auto")
    raise SystemExit(f"error: --resume {resume}: not a run directory or a checkpoint "
                     "(a checkpoint holds train_state.json); use --resume auto to continue --out")


def save(accelerator, model, run_dir: Path, state: TrainState, carry: CarryState, config_yaml: str,
         keep_last: int) -> Path:
    """Every rank calls this. Returns the final checkpoint directory."""
    root = checkpoints_root(run_dir)
    final = root / f"step-{state.step:08d}"
    tmp = root / f".tmp-step-{state.step:08d}"
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
    save_file(carry.to(torch.float32).to("cpu").to_tensors(), tmp / f"carry_rank{accelerator.process_index}.safetensors")
    accelerator.wait_for_everyone()  # save_state does not wait when automatic naming is off
    if accelerator.is_main_process:
        meta = {"format_version": FORMAT_VERSION, "world_size": accelerator.num_processes,
                "distributed_type": str(accelerator.distributed_type), "torch": torch.__version__}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / "train_state.json").write_text(state.to_json())  # last: marks the checkpoint complete
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if state.best_step is not None:
            _write_atomic(root / "best.json", json.dumps({"step": state.best_step,
                                                           "dir": f"step-{state.best_step:08d}",
                                                           "val_bpc": state.best_val_bpc}))
        _prune(run_dir, keep_last, state.best_step)
    accelerator.wait_for_everyone()
    return final


def _prune(run_dir: Path, keep_last: int, best_step: int | None) -> None:
    complete = complete_checkpoints(run_dir)
    keep = {p.name for p in complete[-keep_last:]}
    if best_step is not None:
        keep.add(f"step-{best_step:08d}")
    for p in complete:
        if p.name not in keep:
            shutil.rmtree(p)


def best_checkpoint(run_dir: Path) -> Path | None:
    pointer = checkpoints_root(run_dir) / "best.json"
    if not pointer.is_file():
        return None
    path = checkpoints_root(run_dir) / json.loads(pointer.read_text())["dir"]
    return path if is_complete(path) else None


def read_meta(ckpt: Path) -> dict:
    return json.loads((ckpt / "meta.json").read_text())


def load(accelerator, ckpt: Path, n_layer: int) -> tuple[TrainState, CarryState]:
    """Every rank calls this, after accelerator.prepare. Restores weights, optimizer, RNG and carry."""
    meta = read_meta(ckpt)
    if meta["format_version"] != FORMAT_VERSION:
        raise SystemExit(f"error: {ckpt} has checkpoint format {meta['format_version']}; this sharnn reads "
                         f"format {FORMAT_VERSION}")
    if meta["world_size"] != accelerator.num_processes:
        raise SystemExit(f"error: {ckpt} was written by {meta['world_size']} processes, this run has "
                         f"{accelerator.num_processes}: every rank owns its own streams and carried state, "
                         "so resume with the same world size (or start a new run from the exported weights)")
    accelerator.load_state(str(ckpt))
    carry_file = ckpt / f"carry_rank{accelerator.process_index}.safetensors"
    # safetensors names devices "cpu" or "cuda:N"; accelerate's multi-process CPU device is "cpu:0".
    device = "cpu" if accelerator.device.type == "cpu" else str(accelerator.device)
    carry = CarryState.from_tensors(load_file(carry_file, device=device), n_layer)
    return TrainState.from_json((ckpt / "train_state.json").read_text()), carry


def weights_file(path: str | Path) -> Path:
    """model.safetensors of a checkpoint, of a run's best (else latest) checkpoint, or a .safetensors file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return path
    if is_complete(path):
        ckpt = path
    else:
        ckpt = best_checkpoint(path) or (complete_checkpoints(path) or [None])[-1]
        if ckpt is None:
            raise SystemExit(f"error: {path}: not a .safetensors file, a checkpoint or a run directory with a "
                             "complete checkpoint")
    if not (ckpt / WEIGHTS_NAME).is_file():
        raise SystemExit(f"error: {ckpt} holds no {WEIGHTS_NAME}")
    return ckpt / WEIGHTS_NAME
