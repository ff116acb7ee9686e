"""Load and save trained SHA-RNN models with sharnn alone (no accelerate, no DeepSpeed, no `train`).

`load_model(path)` accepts any of three kinds of directory, or the id of a model repo on the Hugging Face Hub:

    exported model   model.safetensors + config.json (the ModelConfig's fields): what `sharnn-export` and
                     `sharnn-import` write, and `save_model` below
    checkpoint       RUN/checkpoints/step-00001200/: model.safetensors + config.yaml (the full TrainConfig;
                     its `model:` key is the ModelConfig) + train_state.json (written last: marks it complete)
    run directory    RUN/ with checkpoints/: its best checkpoint (checkpoints/best.json), else its latest
                     complete one
    Hub repo id      "owner/name" or "owner/name@revision" that is no local path: an exported model on the
                     Hub, downloaded into the Hub's cache (sharnn.io.hub; HF_HUB_OFFLINE is respected)

    from sharnn.io.pretrained import load_model
    model = load_model("runs/paper")                 # eval mode, on the CPU
    logits, _, state = model(x)                      # x: (T, B) int64 bytes

Anything else is a `ModelError` whose message names the problem and the fix. The layout and its resolution
are `sharnn.io.rundir`'s. Outputs are written to a temporary directory beside the target and renamed into
place
(`sharnn.io.atomic.build_dir`), so a failure never leaves a half-written model.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelHubMixin
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from sharnn.config import ModelConfig
from sharnn.io import atomic, hub, rundir
from sharnn.io.rundir import EXPORT_FILES, ModelError
from sharnn.model import SHARNN

# The layout's names (sharnn.io.rundir), under the names this module has always given them.
WEIGHTS_NAME = rundir.WEIGHTS_NAME
CONFIG_NAME = rundir.EXPORT_CONFIG_NAME
FORMAT_NAME = rundir.EXPORT_FORMAT_NAME
FORMAT_VERSION = rundir.EXPORT_FORMAT_VERSION


@dataclass
class ModelSource:
    """Where a model's weights and architecture are, as found by `find_model` (nothing loaded yet)."""

    kind: str
    """'exported' (model.safetensors + config.json) or 'checkpoint' (a training checkpoint directory)."""
    path: Path
    """The directory holding the weights: the exported model or the checkpoint (a run resolves to one)."""
    config: ModelConfig
    """The architecture, from config.json or from the checkpoint's config.yaml `model:` section."""
    train_config: dict | None = None
    """The checkpoint's full training config as saved (None for exported models)."""
    step: int | None = None
    """The checkpoint's optimizer step (None for exported models)."""
    repo_id: str | None = None
    """The Hub repo (owner/name[@revision]) it was downloaded from; `path` is then its cached snapshot."""

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_NAME

    def inputs(self) -> list[tuple[str, Path]]:
        """What reading this model reads, as sharnn.io.atomic.check_output's `inputs` (no output may be, hold
        or
        lie in them): the directory of its weights and, for a checkpoint in a run, the run directory."""
        found = [("model", self.path)]
        if self.kind == "checkpoint" and self.path.parent.name == rundir.CHECKPOINTS_DIR:
            found.append(("model's run directory", self.path.parent.parent))
        return found

    def describe(self) -> str:
        where = f"{self.repo_id} on the Hub" if self.repo_id else str(self.path)
        return f"{where} ({self.kind}{'' if self.step is None else f', step {self.step}'})"


# ---------------------------------------------------------------------------------------------- finding
def _read_checkpoint_config(ckpt: Path) -> tuple[ModelConfig, dict]:
    import yaml  # PyYAML is a dependency of sharnn; imported here because only checkpoints need it

    path = ckpt / rundir.CKPT_CONFIG_NAME
    if not path.is_file():
        raise ModelError(f"checkpoint {ckpt} has no {rundir.CKPT_CONFIG_NAME}, so its architecture is "
                         "unknown; the checkpoint is damaged: use another one")
    try:
        train_config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ModelError(f"cannot read {path} ({e}); the checkpoint is damaged: use another one") from None
    if not isinstance(train_config, dict) or not isinstance(train_config.get("model"), dict):
        raise ModelError(f"{path} has no `model:` section (the ModelConfig); the checkpoint is damaged or "
                         "was not written by sharnn")
    return _model_config(train_config["model"], path), train_config


def _model_config(fields: dict, where: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise ModelError(f"{where} is not a valid sharnn model config: {e}") from None


def find_model(path: str | Path) -> ModelSource:
    """Resolve an exported model, a checkpoint or a run directory (or the model.safetensors inside one), or a
    Hub repo id (a str `owner/name[@revision]` that is no local path: downloaded, see sharnn.io.hub)."""
    repo = hub.parse_repo_id(path)
    if repo is not None:
        snapshot = hub.download(*repo)
        source = find_model(snapshot)
        source.repo_id = path
        return source
    found = rundir.locate(path)
    path = found.path
    if found.kind == "exported":
        try:
            fields = json.loads((path / CONFIG_NAME).read_text())
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot read {path / CONFIG_NAME} ({e}); re-export the model") from None
        if not isinstance(fields, dict):
            raise ModelError(f"{path / CONFIG_NAME} is not a sharnn model config (expected a JSON object)")
        return ModelSource("exported", path, _model_config(fields, path / CONFIG_NAME))
    config, train_config = _read_checkpoint_config(path)
    return ModelSource("checkpoint", path, config, train_config, rundir.checkpoint_step(path))


# ---------------------------------------------------------------------------------------------- loading
def read_state_dict(source: ModelSource) -> dict[str, Tensor]:
    """The weights of a found model, as saved (dtype unchanged), on the CPU."""
    weights = source.weights_path
    if not weights.is_file():
        hint = ""
        if (source.path / "latest").is_file() or any(source.path.glob("*/mp_rank_*_model_states.pt")):
            hint = (f"; it is a DeepSpeed checkpoint: `sharnn-export {source.path} --out DIR` consolidates "
                    "its ZeRO shards into a loadable model")
        raise ModelError(f"{source.kind} {source.path} holds no {WEIGHTS_NAME}{hint}")
    try:
        return load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"cannot read {weights} ({e}); the file is damaged or not a safetensors file") \
            from None


def _first(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


MISMATCH_HINT = ("the config and the weights come from different models; export the checkpoint again or fix "
                 "the config")
ARCH_FIELDS = ("vocab_size", "d_model", "d_ff", "n_layer", "attn")
"""The ModelConfig fields that shape the weights (the others, dropout and mem_len, hold no tensor)."""


def weights_architecture(state_dict: dict[str, Tensor]) -> dict:
    """The ARCH_FIELDS that a sharnn state dict's own tensors say (those it says nothing about are left out):
    sizes from the embedding and the first Boom, the block count, the attention placement from which blocks
    hold an attention head."""
    found: dict = {}
    if (embed := state_dict.get("embed.weight")) is not None and embed.dim() == 2:
        found["vocab_size"], found["d_model"] = int(embed.shape[0]), int(embed.shape[1])
    if (boom := state_dict.get("blocks.0.boom.proj.weight")) is not None and boom.dim() == 2:
        found["d_ff"] = int(boom.shape[0])
    parts = [k.split(".") for k in state_dict if k.startswith("blocks.")]
    blocks = {int(p[1]) for p in parts if p[1].isdigit()}
    if blocks and blocks == set(range(len(blocks))):
        n = found["n_layer"] = len(blocks)
        with_attn = [i for i in range(n) if f"blocks.{i}.attn.query.weight" in state_dict]
        placement = {(): "none", tuple(range(n)): "all", (n - 2,): "penultimate"}.get(tuple(with_attn))
        if placement is not None:
            found["attn"] = placement
    return found


def architecture_flags(config: ModelConfig, state_dict: dict[str, Tensor], prefix: str = "--model.") -> str:
    """The flags that give `config` the architecture of `state_dict` ("--model.d_model 64 --model.n_layer 3"),
    or "" when the weights' own tensors show no ARCH_FIELDS value that differs from the config's."""
    have = weights_architecture(state_dict)
    return " ".join(f"{prefix}{k} {v}" for k, v in have.items() if getattr(config, k) != v)


def check_state_dict(config: ModelConfig, state_dict: dict[str, Tensor], where: str = "the weights",
                     hint: str = MISMATCH_HINT, flags: str | None = None) -> None:
    """Raise a ModelError naming every tensor that the config's model lacks, needs, or shapes differently,
    and the architecture fields on which the weights and the config differ. With `flags` (the prefix of the
    caller's model options, e.g. "--model."), the hint is the options that make the config fit the weights."""
    with torch.device("meta"):  # shapes only: allocates nothing, even at the paper's size
        expected = {k: tuple(v.shape) for k, v in SHARNN(config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}

    def ordered(keys):  # top-level tensors (embed.weight, out_bias) first: they name the sizes
        return sorted(keys, key=lambda k: (k.count("."), k))

    missing = ordered(set(expected) - set(got))
    unexpected = ordered(set(got) - set(expected))
    shapes = [f"{k} {got[k]} (config wants {expected[k]})" for k in ordered(set(got) & set(expected))
              if got[k] != expected[k]]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"tensors the config needs but the weights lack: {_first(missing)}")
        if unexpected:
            problems.append(f"tensors the config has no place for: {_first(unexpected)}")
        if shapes:
            problems.append(f"shape mismatches: {_first(shapes)}")
        arch = {k: getattr(config, k) for k in ARCH_FIELDS}
        have = weights_architecture(state_dict)
        differ = ", ".join(f"{k}={v} (the config: {arch[k]})" for k, v in have.items() if arch[k] != v)
        if differ and flags is not None:
            fix = architecture_flags(config, state_dict, flags)
            hint = f"give the model the weights' architecture: {fix}"
        raise ModelError(f"the model config does not match {where}: "
                         + (f"the weights are {differ}; " if differ else "") + "; ".join(problems)
                         + f". The config says {arch}: {hint}")


def build_model(config: ModelConfig, state_dict: dict[str, Tensor], device: str | torch.device = "cpu",
                where: str = "the weights") -> SHARNN:
    """A SHARNN of `config` holding `state_dict` (checked first), in eval mode, fp32 parameters."""
    check_state_dict(config, state_dict, where)
    model = SHARNN(config)
    model.load_state_dict(state_dict)  # copies (and casts bf16/fp16 weights) into the fp32 parameters
    return model.to(device).eval()


def load_model(path: str | Path | ModelSource, device: str | torch.device = "cpu",
               mem_len: int | None = None) -> SHARNN:
    """Load a trained SHA-RNN (exported model, checkpoint or run directory) in eval mode.

    `mem_len` replaces the attention memory length the model was trained with: it is not a weight, and the
    paper notes that attention extends to longer contexts cheaply.
    """
    source = path if isinstance(path, ModelSource) else find_model(path)
    config = source.config if mem_len is None else dataclasses.replace(source.config, mem_len=mem_len)
    return build_model(config, read_state_dict(source), device, where=str(source.weights_path))


# ----------------------------------------------------------------------------------------------- saving
def write_dir_atomic(out: str | Path, write: Callable[[Path], None], overwrite: bool = False,
                     allowed: tuple[str, ...] = EXPORT_FILES, need: int | None = None) -> Path:
    """Call write(tmp_dir), then rename tmp_dir to `out` (sharnn.io.atomic.build_dir). A failure leaves `out`
    as
    it was.

    An existing non-empty `out` is replaced only with overwrite=True and only if it holds nothing but
    `allowed` files (never a directory of other things). `need`: about the bytes it will hold; less free on
    the disk is refused before writing, and a disk that fills anyway is a ModelError naming it.
    """
    out = Path(out)
    check_output_dir(out, overwrite, allowed)
    try:
        if need is not None:
            atomic.require_space(out.absolute().parent, need, "the exported model")
        with atomic.build_dir(out, need) as tmp:
            write(tmp)
    except atomic.DiskFull as e:
        raise ModelError(str(e)) from None
    return out


def check_output_dir(out: str | Path, overwrite: bool, allowed: tuple[str, ...] = EXPORT_FILES) -> None:
    """Refuse an output that exists (unless overwrite and it holds only `allowed` files) or is a file."""
    out = Path(out)
    if not out.exists():
        return _check_output_place(out, allowed)
    if not out.is_dir():
        raise ModelError(f"--out {out} is a file; choose a directory path")
    present = sorted(p.name for p in out.iterdir())
    if not present:
        return _check_output_place(out, allowed)
    if not overwrite:
        raise ModelError(f"--out {out} already exists and is not empty; choose another directory or pass "
                         "--overwrite to replace the model in it")
    foreign = [name for name in present if name not in allowed]
    if foreign:
        raise ModelError(f"--out {out} holds files that are not part of an exported model "
                         f"({_first(foreign)}); refusing to replace it: choose another directory")
    _check_output_place(out, allowed)


def _check_output_place(out: Path, allowed: tuple[str, ...]) -> None:
    """The rule every command's output follows (sharnn.io.atomic.check_output): never a symbolic link, a mount
    point, the current or home directory or one holding them."""
    try:
        atomic.check_output(out, "--out", kind="dir", what="exported model",
                            is_ours=atomic.holds_only(allowed))
    except atomic.OutputRefused as e:
        raise ModelError(str(e)) from None


def write_export_files(directory: Path, state_dict: dict[str, Tensor], config: ModelConfig,
                       metadata: dict[str, str] | None = None) -> None:
    """Write model.safetensors (with the format marker in its metadata) and config.json (the ModelConfig's
    fields) into an existing `directory`: the files of an exported model, not atomic by themselves."""
    from sharnn import __version__

    meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "sharnn_version": __version__}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}, directory / WEIGHTS_NAME,
              metadata=meta)
    (directory / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=1) + "\n")


def save_state_dict(state_dict: dict[str, Tensor], config: ModelConfig, out: str | Path,
                    overwrite: bool = False, metadata: dict[str, str] | None = None,
                    extra: Callable[[Path], None] | None = None, card=None) -> Path:
    """Write an exported model (model.safetensors + config.json) atomically; checked against `config` first.

    `metadata` goes into the safetensors header (strings); `card` (a huggingface_hub ModelCard, see
    `sharnn.io.hub.model_card`) is written as README.md; `extra(tmp_dir)` may add files (e.g. model.onnx)
    before the directory is renamed into place.
    """
    check_state_dict(config, state_dict)

    def write(tmp: Path) -> None:
        write_export_files(tmp, state_dict, config, metadata)
        if card is not None:
            card.save(tmp / hub.CARD_NAME)
        if extra is not None:
            extra(tmp)
        atomic.apply_umask(tmp)  # safetensors writes its file 0600

    need = sum(v.numel() * v.element_size() for v in state_dict.values())  # the weights: most of it
    return write_dir_atomic(out, write, overwrite, need=need)


def save_model(model: SHARNN, out: str | Path, overwrite: bool = False,
               metadata: dict[str, str] | None = None) -> Path:
    """Write `model` as an exported model directory that `load_model(out)` loads with one call."""
    return save_state_dict(model.state_dict(), model.cfg, out, overwrite, metadata)


__all__ = ["ModelError", "ModelSource", "find_model", "read_state_dict", "check_state_dict", "build_model",
           "load_model", "save_model", "save_state_dict", "write_export_files", "write_dir_atomic",
           "check_output_dir", "WEIGHTS_NAME", "CONFIG_NAME"]


# ------------------------------------------------------------------------- huggingface_hub's model mixin
class HubModel(ModelHubMixin, library_name=hub.LIBRARY_NAME, tags=list(hub.TAGS),
               paper_url=hub.PAPER_URL):
    """huggingface_hub's model mixin around a SHARNN, in sharnn's own file format (SHARNN.from_pretrained,
    .save_pretrained and .push_to_hub call it): `save_pretrained` / `push_to_hub` write an exported model
    (save_model's files and README.md), and `from_pretrained` is `load_model` on the directory or the
    downloaded snapshot."""

    def __init__(self, model: SHARNN | None = None):
        self.model = model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> SHARNN:
        """A model from an exported model directory (or checkpoint, or run directory) or a Hub repo id
        (`owner/name`, optionally `@revision`); in eval mode. Keyword arguments as huggingface_hub's
        (revision, cache_dir, force_download, token, local_files_only) and map_location (a device)."""
        path = pretrained_model_name_or_path
        parsed = hub.parse_repo_id(path)
        if parsed is None:  # a local path: found (or refused) as load_model does
            found = rundir.locate(path)
            if found.kind != "exported":  # a checkpoint has no config.json for the mixin to read
                        return load_model(found.path, device=kwargs.get("map_location", "cpu"))
            path = found.path
        else:
            path, revision = parsed
            kwargs["revision"] = kwargs.get("revision") or revision
        with hub.reading_repo(str(path), kwargs.get("revision")):
            return super().from_pretrained(path, **kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir, force_download: bool,
                         local_files_only: bool, token, map_location: str = "cpu", config: dict | None = None
                         ) -> SHARNN:
        del config  # load_model reads config.json itself, with sharnn's checks
        path = Path(model_id)
        if not path.is_dir():
            path = hub.download(model_id, revision, cache_dir=cache_dir, force_download=force_download,
                            token=token, local_files_only=local_files_only)
        return load_model(path, device=map_location)

    def _save_pretrained(self, save_directory: Path) -> None:
        write_export_files(save_directory, self.model.state_dict(), self.model.cfg)

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """The sharnn model card; keyword arguments as `model_card`'s (provenance, repo_id, license)."""
        return hub.model_card(self.model.cfg, self.model.num_params(), **kwargs)
