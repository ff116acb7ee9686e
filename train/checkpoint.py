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
The names, completeness and the finding of checkpoints are `sharnn.io.rundir`'s (re-exported here).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import DistributedType
from accelerate.utils import load as accelerate_load
from accelerate.utils.constants import RNG_STATE_NAME
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from sharnn.io import atomic, rundir
from sharnn.io.pretrained import find_model
from sharnn.io.rundir import (
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
from train.distributed import fp32_state_dict

__all__ = ["TrainState", "Resumable", "inspect", "check_same_corpus", "save", "load", "resolve_resume",
           "complete_checkpoints", "best_checkpoint",
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
    corpus: dict | None = None
    """The corpus trained on: its manifest's {split: {"n_bytes", "sha256"}}
    (sharnn.corpus.data.corpus_record).
    None in checkpoints written before sharnn recorded it."""

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["best_val_bpc"] = None if math.isinf(self.best_val_bpc) else self.best_val_bpc
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        """Parse train_state.json; ValueError saying what is wrong if it is not one."""
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        if set(d) - known or not {"step", "loader"} <= set(d):
            raise ValueError(f"keys {sorted(d)}, expected {sorted(known)}")
        for name in ("step", "epoch", "bytes_seen"):
            if not isinstance(d.get(name, 0), int) or d.get(name, 0) < 0:
                raise ValueError(f"{name} is {d[name]!r}, not a count")
        if not isinstance(d["loader"], dict) or not isinstance(d.get("corpus") or {}, dict):
            raise ValueError("loader and corpus must be JSON objects")
        best = d.get("best_val_bpc")
        if best is not None and not isinstance(best, (int, float)):
            raise ValueError(f"best_val_bpc is {best!r}, not a number")
        d["best_val_bpc"] = math.inf if best is None else best
        return cls(**d)


@dataclasses.dataclass
class Resumable:
    """A checkpoint whose files were found readable by `inspect` (nothing loaded into a model yet)."""

    path: Path
    meta: dict
    """meta.json: format version, world size, distributed type."""
    state: TrainState
    """train_state.json."""
    train_config: dict
    """config.yaml: the TrainConfig the checkpoint was written with (`model:` is its ModelConfig)."""


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """'auto' -> the latest complete checkpoint of run_dir (None if there is none); a run directory ->
    its latest checkpoint; a checkpoint directory -> itself."""
    if resume is None:
        return None
    try:
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
    except ModelError as e:  # a checkpoint whose train_state.json cannot be read
        raise SystemExit(f"error: --resume {resume}: {e}") from None
    if path.name.startswith(rundir.TMP_PREFIX) and (path / rundir.TRAIN_STATE_NAME).is_file():
        raise SystemExit(f"error: --resume {resume}: {rundir.unrenamed_checkpoint(path)}")
    raise SystemExit(f"error: --resume {resume}: not a run directory or a checkpoint "
                     "(a checkpoint holds train_state.json); use --resume auto to continue --out")


def save(accelerator, model, run_dir: Path, state: TrainState, carry: CarryState, config_yaml: str,
         keep_last: int) -> Path:
    """Every rank calls this. Returns the final checkpoint directory.

    A full disk, on any rank (`sharnn.io.atomic.out_of_space`), or less free space than the latest checkpoint
    took: every rank stops with SystemExit, the main process with one line naming the disk and the space
    needed; the incomplete checkpoint is removed and the complete ones are left as they were (the run
    continues with --resume auto once there is space). The ranks agree through an all-reduce at each of the
    save's synchronisation points (a rank whose DeepSpeed engine fails inside its own collectives cannot
    be reached this way)."""
    final = rundir.checkpoint_dir(run_dir, state.step)
    tmp = rundir.tmp_checkpoint_dir(run_dir, state.step)
    main = accelerator.is_main_process
    need = _latest_size(run_dir) if main else None  # what the next checkpoint takes
    full: BaseException | str | None = None
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            if need is not None and atomic.free_bytes(tmp) < need:
                full = "checked before writing"
        except OSError as e:
            if not atomic.out_of_space(e, run_dir):
                raise
            full = e
    _stop_if_full(accelerator, full, tmp, run_dir, state.step, need)
    try:
        accelerator.save_state(str(tmp))
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            # DeepSpeed stores weights in its own (pickled) format; every checkpoint also carries plain
            # weights.
            weights = fp32_state_dict(accelerator, model)  # fp16/bf16: the fp32 masters, gathered
            if main:
                save_file({k: v.contiguous() for k, v in weights.items()}, tmp / WEIGHTS_NAME)
        carry_file = tmp / rundir.carry_name(accelerator.process_index)
        on_gpu = accelerator.device.type == "cuda"  # which GPU's random state is this rank's
        save_file(carry.to(torch.float32).to("cpu").to_tensors(), carry_file,
                  metadata={"cuda_rng_device": str(torch.cuda.current_device())} if on_gpu else None)
    except Exception as e:  # torch's writer on a full disk: RuntimeError 'unexpected pos'; safetensors' own
        if not atomic.out_of_space(e, tmp):
            raise
        full = e
    # also the wait save_state does not do when automatic naming is off
    _stop_if_full(accelerator, full, tmp, run_dir, state.step, need)
    if main:
        try:
            meta = {"format_version": FORMAT_VERSION, "world_size": accelerator.num_processes,
                    "distributed_type": str(accelerator.distributed_type), "torch": torch.__version__}
            (tmp / rundir.META_NAME).write_text(json.dumps(meta, indent=1))
            (tmp / rundir.CKPT_CONFIG_NAME).write_text(config_yaml)
            (tmp / rundir.TRAIN_STATE_NAME).write_text(state.to_json())  # last: marks the checkpoint complete
            atomic.replace_dir(tmp, final)  # replaces a checkpoint of the same step (a resumed run's)
            if state.best_step is not None:
                rundir.write_best(run_dir, state.best_step, state.best_val_bpc)
            _prune(run_dir, keep_last, state.best_step)
        except OSError as e:
            if not atomic.out_of_space(e, run_dir):
                raise
            full = e
    _stop_if_full(accelerator, full, tmp, run_dir, state.step, need)
    return final


def _latest_size(run_dir: Path) -> int | None:
    """Bytes of the latest complete checkpoint (None without one)."""
    try:
        latest = rundir.latest_checkpoint(run_dir)
    except ModelError:  # an unreadable train_state.json: no estimate
        return None
    return atomic.tree_bytes(latest) if latest is not None else None


def _any_rank(accelerator, flag: bool) -> bool:
    """Whether `flag` is set on any rank (an all-reduce: every rank calls it at the same point)."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "max").item() > 0


def _stop_if_full(accelerator, full: BaseException | str | None, tmp: Path, run_dir: Path, step: int,
                  need: int | None) -> None:
    """Every rank: if any rank ran out of space, the main process removes the incomplete checkpoint and
    every rank stops (the main process's SystemExit names the disk, the space needed and the checkpoint
    to continue from)."""
    if not _any_rank(accelerator, full is not None):
        return
    message = None
    if accelerator.is_main_process:
        written = atomic.tree_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        error = atomic.disk_full(checkpoints_root(run_dir), need=need, written=written,
                                 what=f"checkpoint step {step}")
        try:
            last = rundir.latest_checkpoint(run_dir)
        except ModelError:
            last = None
        kept = (f"the last complete checkpoint, {last}, is intact: free space and continue with --resume auto"
                if last is not None else "no checkpoint of this run is complete yet")
        message = f"error: {error} ({kept})"
    accelerator.wait_for_everyone()  # the incomplete checkpoint is gone before any rank exits
    raise SystemExit(message if message is not None else 1)


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


def _damaged(ckpt: Path, name: str, problem: str) -> SystemExit:
    return SystemExit(f"error: cannot resume from {ckpt}: {name} {problem}. The checkpoint is damaged: "
                      "resume from another checkpoint (--resume RUN/checkpoints/step-N), or start a new run "
                      f"from its weights alone with --init_from {ckpt}")


def _short(e: BaseException) -> str:
    """`Type: first line of the message`."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def inspect(ckpt: Path, rng_ranks: Sequence[int] | None = None) -> Resumable:
    """Check, before anything is started or written, that the files a resume reads are there and readable:
    meta.json, train_state.json, config.yaml, model.safetensors, every rank's carried state, the random
    number generator states of `rng_ranks` (None: of every rank the checkpoint had) and the optimizer state.
    SystemExit naming the file otherwise. Every rank checks every file, so all ranks stop alike."""
    try:
        meta = read_meta(ckpt)
        world = meta.get("world_size") if isinstance(meta, dict) else None
        if not isinstance(world, int) or world < 1:
            raise ValueError(f"world_size is {world!r}")
    except (OSError, ValueError) as e:
        raise _damaged(ckpt, rundir.META_NAME, f"is unreadable ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise SystemExit(f"error: {ckpt} has checkpoint format {meta.get('format_version')!r}; this sharnn "
                         f"reads format {FORMAT_VERSION}")
    try:
        state = TrainState.from_json((ckpt / rundir.TRAIN_STATE_NAME).read_text())
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
        raise _damaged(ckpt, rundir.TRAIN_STATE_NAME, f"is unreadable ({e})") from None
    try:
        source = find_model(ckpt)  # reads and checks config.yaml's model section
    except ModelError as e:
        raise SystemExit(f"error: cannot resume: {e}") from None
    for name in [WEIGHTS_NAME] + [rundir.carry_name(r) for r in range(meta["world_size"])]:
        try:
            with safe_open(str(ckpt / name), framework="pt"):
                pass  # opening reads the header and checks that the file holds all the data it lists
        except FileNotFoundError:
            raise _damaged(ckpt, name, "is missing") from None
        except (SafetensorError, OSError) as e:
            raise _damaged(ckpt, name, f"is unreadable ({e})") from None
    for rank in range(meta["world_size"]) if rng_ranks is None else rng_ranks:
        if rank < meta["world_size"]:  # a rank the checkpoint had: its random states must come back exactly
            _check_rng_states(ckpt, rank)
    if "DEEPSPEED" not in str(meta.get("distributed_type", "")):
        optimizer = ckpt / "optimizer.bin"
        if not optimizer.is_file():
            raise _damaged(ckpt, optimizer.name, "is missing")
        if not zipfile.is_zipfile(optimizer):  # torch.save's format is a zip archive
            raise _damaged(ckpt, optimizer.name, "is not a file torch.save wrote (truncated or overwritten)")
    return Resumable(ckpt, meta, state, source.train_config)


def _check_rng_states(ckpt: Path, rank: int) -> None:
    """Load rank `rank`'s random states as accelerate's load_state does and apply them. Accelerate swallows
    any failure here (it logs "Could not load random states" at INFO level) and the run would go on with
    other random numbers than the uninterrupted one; this makes it an error instead."""
    path = ckpt / f"{RNG_STATE_NAME}_{rank}.pkl"
    if not path.is_file():
        raise _damaged(ckpt, path.name, f"(rank {rank}'s random number generator states) is missing")
    try:
        states = accelerate_load(path)  # weights_only, with accelerate's allowed numpy globals
        random.setstate(states["random_state"])
        np.random.set_state(states["numpy_random_seed"])
        torch.set_rng_state(states["torch_manual_seed"])
        if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
            index = torch.cuda.current_device()
            if (state := own_cuda_rng_state(ckpt, rank, states["torch_cuda_manual_seed"], index)) is not None:
                torch.cuda.set_rng_state(state, index)
    except Exception as e:  # what accelerate would swallow: any failure to read or apply them
        raise _damaged(ckpt, path.name, f"(rank {rank}'s random number generator states) is unreadable "
                       f"({_short(e)}); without it the "
                       "resumed run would not draw the random numbers of the uninterrupted one") from None


def own_cuda_rng_state(ckpt: Path, rank: int, saved: Sequence[torch.Tensor], device_index: int
                       ) -> torch.Tensor | None:
    """Rank `rank`'s own GPU random state in checkpoint `ckpt`. accelerate saves the states of every visible
    GPU (8 on an 8-GPU node) and restores them all with torch.cuda.set_rng_state_all, which fails where
    fewer GPUs are visible (a requeue onto a smaller node, CUDA_VISIBLE_DEVICES=0): only the state of the GPU
    the rank trained on matters. Its index is recorded in the rank's carry file (`cuda_rng_device`); for a
    checkpoint without it, the state of the GPU with this rank's current index, or None."""
    index = device_index
    try:
        with safe_open(str(ckpt / rundir.carry_name(rank)), framework="pt") as f:
            index = int((f.metadata() or {}).get("cuda_rng_device", device_index))
    except (SafetensorError, OSError, ValueError):
        pass
    return saved[index] if 0 <= index < len(saved) else None


def check_same_corpus(resumable: Resumable, corpus: dict, data: str) -> str | None:
    """Refuse to resume on another corpus than the checkpoint's (SystemExit saying which split differs and
    how); a warning line for a checkpoint that predates the record, else None."""
    saved = resumable.state.corpus
    if saved is None:
        return (f"warning: {resumable.path} records no corpus hashes (written by an older sharnn): cannot "
                f"check that --data {data} is the corpus it was trained on")
    differ = []
    for split in sorted(set(saved) & set(corpus)):
        was, now = saved[split], corpus[split]
        if was != now:
            differ.append(f"{split}: checkpoint {was.get('n_bytes', 0):,} bytes sha256 {was.get('sha256')}, "
                          f"--data {now['n_bytes']:,} bytes sha256 {now['sha256']}")
    if differ:
        trained_on = resumable.train_config.get("data")
        raise SystemExit(f"error: --data {data} is not the corpus {resumable.path} was trained on ("
                         + "; ".join(differ) + f"). Resume with the run's own corpus (its config.yaml says "
                         f"data: {trained_on}), or start a new run on this corpus with --init_from "
                         f"{resumable.path}")
    return None


def load(accelerator, ckpt: Path, n_layer: int, batch_size: int,
         restart_streams: bool = False) -> tuple[TrainState, CarryState]:
    """Every rank calls this, after accelerator.prepare (and `inspect`). Restores weights, optimizer, RNG
    and carry.

    The checkpoint may come from another number of ranks (train.elastic): with the same number of streams
    (ranks x batch_size) each rank takes its streams' carried state from the saved files; with another, only
    if `restart_streams` (fresh streams, empty state)."""
    resumable = inspect(ckpt, rng_ranks=[accelerator.process_index])
    meta, state = resumable.meta, resumable.state
    if not isinstance(state.loader.get("batch_size"), int):
        raise _damaged(ckpt, rundir.TRAIN_STATE_NAME, "has no loader batch_size")
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
    try:
        accelerator.load_state(str(ckpt))
    except Exception as e:  # the files were readable (`inspect`); their contents do not fit this model
        raise SystemExit(f"error: cannot resume from {ckpt}: accelerate could not load its model or "
                         f"optimizer state ({_short(e)}). The checkpoint is damaged or from another model: "
                         "resume from another checkpoint, or start a new run from its weights alone with "
                         f"--init_from {ckpt}") from None
    if accelerator.device.type == "cuda":  # accelerate's set_rng_state_all may have failed, silently
        states = accelerate_load(ckpt / f"{RNG_STATE_NAME}_{rank}.pkl").get("torch_cuda_manual_seed", [])
        if (state := own_cuda_rng_state(ckpt, rank, states, accelerator.device.index)) is not None:
            torch.cuda.set_rng_state(state, accelerator.device)
    # safetensors names devices "cpu" or "cuda:N"; accelerate's multi-process CPU device is "cpu:0".
    device = "cpu" if accelerator.device.type == "cpu" else str(accelerator.device)
    try:
        if same_layout:
            carry = CarryState.from_tensors(load_file(ckpt / rundir.carry_name(rank), device=device), n_layer)
        elif same_streams:
            carry = elastic.regroup_carry(ckpt, saved_world, saved_batch, rank, batch_size, n_layer, device)
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as e:
        raise _damaged(ckpt, "the carried state (carry_rank*.safetensors)",
                       f"does not fit the model ({_short(e)})") from None
    if same_streams and not same_layout:
        state.loader = state.loader | {"world_size": world, "batch_size": batch_size}
    if not same_streams:
        carry = CarryState.empty(n_layer)
        state.loader = elastic.rescale_loader_state(state.loader, world, batch_size,
                                                    state.loader["split_bytes"])
    return state, carry


def weights_file(path: str | Path) -> Path:
    """model.safetensors of a checkpoint, of a run's best (else latest) checkpoint or of an exported model, or
    a .safetensors file (sharnn.io.rundir.weights_path); SystemExit with the problem and its fix otherwise."""
    try:
        weights = rundir.weights_path(path)
    except ModelError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        with safe_open(str(weights), framework="pt"):
            pass  # reads the header; checks the file holds all the data it lists
    except (SafetensorError, OSError) as e:
        raise SystemExit(f"error: cannot read the weights {weights} ({_short(e)}): it is not a safetensors "
                         "file, or it is damaged; give a run, a checkpoint, an exported model or the "
                         "model.safetensors of one") from None
    return weights
