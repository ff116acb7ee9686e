"""The layout of a run directory, its checkpoints and an exported model: names, completeness, resolution.

    RUN/                              a training run (`sharnn-train --out RUN`)
      .lock                           while a trainer runs: its lock and who holds it (sharnn/io/runlock.py)
      checkpoints/
        step-00001200/                one checkpoint (zero-padded optimizer step)
          model.safetensors           the weights
          train_state.json            step, epoch, bytes seen, best bpc, loader position; written last: a
                                      checkpoint is complete once it holds this file
          carry_rank{r}.safetensors   rank r's LSTM state and attention memory
          config.yaml, meta.json      the resolved TrainConfig (`model:` is the ModelConfig); format version,
                                      world size, library versions
          ...                         what accelerate / DeepSpeed write (optimizer, RNG states, shards)
        .tmp-step-00001300/           a checkpoint being written (renamed to step-00001300/ when complete)
        best.json                     {"step", "dir", "val_bpc"} of the best checkpoint by validation bpc
    MODEL/                            an exported model (`sharnn-export`, `sharnn-import`, `save_model`)
      model.safetensors, config.json  the weights and the ModelConfig's fields
      README.md                       the model card (sharnn-export; sharnn.io.hub)

Training writes checkpoints (train/checkpoint.py); everything that reads them (resume, --init_from,
`sharnn.io.pretrained.load_model`, sharnn-eval, sharnn-export, sharnn-generate) finds them through this
module.
A checkpoint is listed only when complete and never by its name alone: the order is the step recorded in its
train_state.json. Resolution (`locate`, `weights_path`):

    exported model   MODEL/ (or a file in it)                        -> MODEL/
    checkpoint       RUN/checkpoints/step-N/ (or a file in it)       -> itself
    run directory    RUN/                                            -> its best checkpoint, else its latest
    weights file     any .safetensors file (`weights_path` only)     -> itself

Anything else is a `ModelError` whose message names the problem and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sharnn.io import atomic

CHECKPOINTS_DIR = "checkpoints"
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
"""A checkpoint directory being written is named `.tmp-step-N`; hidden, never listed."""
TRAIN_STATE_NAME = "train_state.json"
"""Written last into a checkpoint: its presence marks the checkpoint complete."""
WEIGHTS_NAME = "model.safetensors"
CKPT_CONFIG_NAME = "config.yaml"
META_NAME = "meta.json"
BEST_NAME = "best.json"
LOCK_NAME = ".lock"
"""In a run directory while a trainer runs on it: flock'ed, naming its holder (sharnn/io/runlock.py)."""
FORMAT_VERSION = 1
"""Checkpoint format version, recorded in meta.json."""
EXPORT_CONFIG_NAME = "config.json"
EXPORT_FORMAT_NAME = "sharnn-model"
EXPORT_FORMAT_VERSION = 1
"""Exported model format, recorded in model.safetensors' metadata."""
EXPORT_FILES = (WEIGHTS_NAME, EXPORT_CONFIG_NAME, "README.md", "model.onnx", "model.onnx.data")
"""Files an exported model directory may hold; --overwrite replaces a directory holding nothing else."""

WHAT_LOADS = ("an exported model (model.safetensors + config.json, from sharnn-export or sharnn-import), "
              "a checkpoint (RUN/checkpoints/step-N/ with train_state.json) or a run directory "
              "(with checkpoints/)")


class ModelError(ValueError):
    """A path holds no usable sharnn model, or an output cannot be written; the message says the fix."""


# ------------------------------------------------------------------------------------------------ names
def step_name(step: int) -> str:
    """`step-00001200`: the directory name of the checkpoint at optimizer step `step`."""
    return f"{STEP_PREFIX}{step:08d}"


def carry_name(rank: int) -> str:
    """The file holding rank `rank`'s carried state in a checkpoint."""
    return f"carry_rank{rank}.safetensors"


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """Where the complete checkpoint of step `step` lives."""
    return checkpoints_root(run_dir) / step_name(step)


def tmp_checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of step `step` is written before it is renamed to `checkpoint_dir`."""
    return checkpoints_root(run_dir) / f"{TMP_PREFIX}{step_name(step)}"


# ------------------------------------------------------------------------------------------ checkpoints
def is_complete(ckpt: str | Path) -> bool:
    """A checkpoint that was renamed into place: it holds train_state.json and has no hidden (.tmp-) name."""
    ckpt = Path(ckpt)
    return (ckpt / TRAIN_STATE_NAME).is_file() and not ckpt.name.startswith(".")


def checkpoint_step(ckpt: str | Path) -> int:
    """The optimizer step recorded in a checkpoint's train_state.json."""
    ckpt = Path(ckpt)
    try:
        return int(json.loads((ckpt / TRAIN_STATE_NAME).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"checkpoint {ckpt}: cannot read the step from {TRAIN_STATE_NAME} ({e}); the "
                         "checkpoint is damaged: use another one") from None


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (by the step recorded inside, not by the name)."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest recorded step, or None."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint best.json names (None when the run has no best.json: it never validated).

    A best.json that cannot be read, or that names a checkpoint which is not complete, is a `ModelError`:
    taking the latest checkpoint instead would silently give another model than the best."""
    pointer = checkpoints_root(run_dir) / BEST_NAME
    if not pointer.exists():
        return None
    fix = (f"give a checkpoint directory ({checkpoints_root(run_dir)}/step-N) instead of the run directory, "
           "or delete best.json to use the latest checkpoint")
    try:
        name = json.loads(pointer.read_text())["dir"]
        if not isinstance(name, str) or not name.startswith(STEP_PREFIX) or "/" in name:
            raise ValueError(f"'dir' is {name!r}, not a checkpoint name")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{pointer} is unreadable ({type(e).__name__}: {e}), so the run's best checkpoint "
                         f"is unknown; {fix}") from None
    path = checkpoints_root(run_dir) / name
    if not is_complete(path):
        raise ModelError(f"{pointer} names {name}, which is not a complete checkpoint (missing, or without "
                         f"{TRAIN_STATE_NAME}); {fix}")
    return path


def write_best(run_dir: str | Path, step: int, val_bpc: float) -> None:
    """Point best.json at the checkpoint of `step` (atomically)."""
    atomic.write_text(checkpoints_root(run_dir) / BEST_NAME,
                      json.dumps({"step": step, "dir": step_name(step), "val_bpc": val_bpc}))


def run_checkpoint(run_dir: str | Path) -> Path:
    """The best complete checkpoint of a run (best.json), else its latest complete one."""
    run_dir = Path(run_dir)
    found = best_checkpoint(run_dir) or latest_checkpoint(run_dir)
    if found is None:
        root = checkpoints_root(run_dir)
        partial = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise ModelError(f"run {run_dir} has no complete checkpoint yet"
                         + (f" (only incomplete ones: {', '.join(partial)})" if partial else "")
                         + "; let the run write one (--save_every) or resume it with --resume auto")
    return found


def looks_like_checkpoint(path: str | Path) -> bool:
    """A directory train/checkpoint.py writes (or was writing when it stopped), complete or not."""
    path = Path(path)
    # not config.yaml alone: a run directory holds one from its start
    markers = (META_NAME, "optimizer.bin", "random_states_0.pkl", carry_name(0), "latest")
    return path.name.startswith((TMP_PREFIX + STEP_PREFIX, STEP_PREFIX)) or any((path / m).exists()
                                                                                 for m in markers)


def unrenamed_checkpoint(path: Path) -> str:
    """The problem and the fix for a `.tmp-step-N` directory that holds train_state.json."""
    final = path.with_name(path.name[len(TMP_PREFIX):])
    return (f"{path} is a checkpoint under its temporary name: it holds {TRAIN_STATE_NAME}, which is written "
            "last, but the run stopped before renaming it (or is renaming it now). If no run is writing it, "
            f"rename it to use it: mv {path} {final}")


# ------------------------------------------------------------------------------------------- resolution
@dataclass(frozen=True)
class Located:
    """A model directory found by `locate`."""

    kind: str
    """'exported' (model.safetensors + config.json) or 'checkpoint' (a complete training checkpoint)."""
    path: Path
    """The exported model's or the checkpoint's directory (a run directory resolves to one checkpoint)."""

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_NAME


def locate(path: str | Path) -> Located:
    """Resolve an exported model, a checkpoint or a run directory (or a file inside the first two)."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path} does not exist; give {WHAT_LOADS}")
    if path.is_file():
        if path.name in (WEIGHTS_NAME, EXPORT_CONFIG_NAME, CKPT_CONFIG_NAME):
            path = path.parent
        elif path.suffix == ".safetensors":
            raise ModelError(f"{path} is a bare weights file: its architecture is unknown. If it is in the "
                             f"reference code's naming, convert it with `sharnn-import {path} --out DIR`; if "
                             f"it holds sharnn weights, put the {EXPORT_CONFIG_NAME} of their ModelConfig "
                             f"beside it as {WEIGHTS_NAME}")
        else:
            raise ModelError(f"{path} is a file, not a sharnn model; give {WHAT_LOADS}. A checkpoint of the "
                             f"reference code (Smerity/sha-rnn) is converted with `sharnn-import {path} "
                             "--out DIR`")
    if (path / EXPORT_CONFIG_NAME).is_file():
        if not (path / WEIGHTS_NAME).is_file():
            raise ModelError(f"exported model {path} is incomplete: it has {EXPORT_CONFIG_NAME} but no "
                             f"{WEIGHTS_NAME}; export it again with sharnn-export")
        return Located("exported", path)
    if is_complete(path):
        return Located("checkpoint", path)
    if checkpoints_root(path).is_dir():
        return locate(run_checkpoint(path))
    if path.name.startswith(TMP_PREFIX) and (path / TRAIN_STATE_NAME).is_file():
        raise ModelError(unrenamed_checkpoint(path))
    if looks_like_checkpoint(path):
        raise ModelError(f"{path} is an incomplete checkpoint (no {TRAIN_STATE_NAME}: it was still being "
                         "written when the run stopped); use a complete checkpoint, or give the run "
                         "directory to take its best complete one")
    if (path / WEIGHTS_NAME).is_file():
        raise ModelError(f"{path} holds {WEIGHTS_NAME} but no {EXPORT_CONFIG_NAME}, so its architecture is "
                         f"unknown; export the model again (sharnn-export) or write its ModelConfig as "
                         f"{EXPORT_CONFIG_NAME}")
    hint = ""
    if (path / "manifest.json").is_file():
        hint = " (it looks like a prepared corpus: pass it with --data)"
    elif (path / BEST_NAME).is_file() or any(path.glob(STEP_PREFIX + "*")):
        hint = (f" (it is a run's checkpoints folder: give the run directory {path.parent}, or one "
                "checkpoint in it)")
    elif (path / CKPT_CONFIG_NAME).is_file():
        hint = (f" (it holds a run's {CKPT_CONFIG_NAME} but no {CHECKPOINTS_DIR}/ and no weights: a run that "
                "has saved no checkpoint yet, or a folder holding only a config; let the run save one "
                "(--save_every) and give the run)")
    raise ModelError(f"{path} is not a sharnn model{hint}; give {WHAT_LOADS}")


def weights_path(path: str | Path) -> Path:
    """The weights file of a .safetensors file (itself), an exported model, a checkpoint or a run directory
    (its best checkpoint, else its latest), for callers that know the architecture already."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return path
    found = locate(path)
    if not found.weights_path.is_file():
        raise ModelError(f"{found.kind} {found.path} holds no {WEIGHTS_NAME}")
    return found.weights_path
