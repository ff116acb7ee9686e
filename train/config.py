"""Training configuration: typed dataclasses, named presets, YAML files and command-line overrides.

Resolution order: preset -> YAML file (--config) -> command-line flags (--field value, --model.field value).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import tyro
import yaml
from tyro.constructors import ConstructorRegistry, PrimitiveConstructorSpec, PrimitiveTypeInfo

from sharnn.config import ModelConfig, deferred_checks, model_preset
from sharnn.corpus.data import MIN_SEQ_LEN

Precision = Literal["fp32", "bf16", "fp16"]

VOCAB_SIZE = 256
"""A byte-level model: one input and output per byte value."""


class ConfigError(Exception):
    """A field value that cannot work; the message starts with the field's name and says the limit.

    Not a ValueError: tyro prints a ValueError raised while building the config in a box with the help text,
    the trainer prints this as one `error:` line."""


@dataclass
class TrainConfig:
    """One training run. Per-rank values say so; everything else is global."""

    data: str = ""
    """Prepared corpus directory (made by `sharnn-prepare`)."""
    skip_data_check: bool = False
    """Do not hash the splits against the corpus manifest at the start (about a second per GB): a corpus
    changed after sharnn-prepare wrote it then trains without a word. A warning says so."""
    out: str = "runs/sharnn"
    """Run directory: metrics.jsonl, tensorboard/, checkpoints/, config.yaml."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture. On resume it is taken from the checkpoint."""

    batch_size: int = 16
    """Streams per rank (micro-batch). The global batch is batch_size x world size x grad_accum."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    bptt: int = 1024
    """Segment length for truncated backpropagation through time (the maximum, when vary_bptt)."""
    vary_bptt: bool = True
    """Draw each segment's length as the reference does (bptt, or bptt/2 with p=0.05, plus N(0, 5))."""
    epochs: float = 32
    """Stop after this many passes over the training split (whichever of epochs / max_steps comes first)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: no step limit)."""

    optimizer: Literal["lamb", "adamw"] = "lamb"
    """'lamb' is the paper's minimum-trust LAMB; 'adamw' is torch's AdamW (works at every ZeRO stage)."""
    lr: float = 2e-3
    """Peak learning rate, before lr_scaling."""
    lr_scaling: Literal["none", "sqrt", "linear"] = "none"
    """How lr follows the global batch relative to lr_reference_batch: unchanged, x sqrt(ratio), x ratio."""
    lr_reference_batch: int = 16
    """The global batch at which lr was tuned (the paper: 16 streams on one GPU)."""
    warmup_steps: int = 800
    """Linear warmup from 0 over this many optimizer steps, then constant (the paper's schedule)."""
    cooldown_steps: int = 0
    """If > 0, decay linearly to 0 over the last cooldown_steps of max_steps."""
    weight_decay: float = 1.2e-6
    min_trust: float = 0.25
    """LAMB's minimum trust ratio."""
    clip: float = 0.25
    """Clip the global gradient norm to this (0: no clipping)."""
    state_reset_prob: float = 0.0
    """After each step, forget LSTM state and (independently) memory with this probability. 0: never, as the
    reference at 218d748 (its random reset is commented out)."""
    output_bias_init: Literal["zeros", "unigram"] = "zeros"
    """Output bias of random initial weights: zeros (the reference) or the log of the training split's
    add-one smoothed byte frequencies (bytes that never occur start near zero probability). Not with
    init_from, whose weights bring their own trained bias."""
    cpu_kernels: Literal["fast", "torch", "fast-masks", "fast-attention"] | None = None
    """On CPU, dropout and attention as sharnn.kernels' fast path, as torch's own ops (the CUDA code path), or
    one half of the fast path (see sharnn/kernels.py). None: sharnn.kernels' default ($SHARNN_CPU_KERNELS)."""

    precision: Precision = "fp32"
    """fp32, bf16 (autocast / DeepSpeed bf16) or fp16 (with loss scaling)."""
    seed: int = 5512

    eval_every: int = 1000
    """Validate every N optimizer steps (and at every epoch end). 0: only at epoch ends and the end, as the
    reference. A checkpoint is written at every new best validation bpc."""
    eval_streams: int = 16
    """Validation streams, independent of the world size (the paper: 16)."""
    test_streams: int = 8
    """Test streams (the paper: 8)."""
    eval_bptt: int | None = None
    """Evaluation segment length (None: bptt). Read it as `eval_len`."""
    eval_max_segments: int | None = None
    """Cap the validation segments per evaluation (None: the whole split). For quick runs only."""
    test_at_end: bool = True
    """Evaluate the best checkpoint on the test split at the end."""
    sample_bytes: int = 256
    """Bytes of generated text logged at each validation (0: none)."""
    attention_report: bool = True
    """At each validation, log what the attention head reads in a fixed validation window (weights image,
    mass by distance, entropy, most-attended bytes: train.evaluation.log_attention_report). Costs a few
    batch-1 forwards on the main process; nothing in the training step."""

    log_every: int = 10
    """Log train metrics every N optimizer steps."""
    report_to: str = "tensorboard"
    """Trackers, comma-separated accelerate names (tensorboard, wandb, mlflow, ...). TensorBoard is always
    written; W&B runs offline without network or API key (unless WANDB_MODE says otherwise)."""
    peak_flops: float | None = None
    """One device's peak FLOP/s for MFU (None: a table of known GPUs, else measured at start-up)."""
    progress_interval_s: float = 60
    """When stdout is not a terminal: seconds between plain progress lines (0: none)."""
    profile_steps: str | None = None
    """'A:B': a torch.profiler trace of optimizer steps A to B in RUN_DIR/profile/ (TensorBoard, Perfetto);
    B at most max_steps."""
    compile: bool = False
    """torch.compile the model (faster on GPUs; slower on CPUs: see the README)."""
    save_every: int = 1000
    """Write a checkpoint every N optimizer steps (0: only at the end / on signals)."""
    keep_last: int = 3
    """Checkpoints kept besides the best one (which is never pruned)."""
    init_from: str | None = None
    """Start from these weights only (a run directory's best checkpoint, a checkpoint, or a .safetensors
    file), with a fresh optimizer, schedule and data position: the paper's second stage."""
    resume: str | None = None
    """'auto' (latest checkpoint of --out, if any), a run directory, or a checkpoint directory."""
    restart_streams: bool = False
    """On resume with another number of streams (ranks x batch_size): cut the streams anew at the same point
    of the epoch with empty carried state, instead of refusing. Not needed when ranks x batch_size is kept:
    then the carried state is regrouped exactly."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """Non-finite gradient norm: stop with a message, or skip the step (DDP / single process only)."""
    timeout_s: int = 600
    """Seconds the process group (init, all-reduce) waits for a missing rank before failing. The launchers'
    own meeting is governed by `--rdzv_conf timeout=N` of accelerate launch."""

    def __post_init__(self) -> None:
        try:
            self._check()
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _check(self) -> None:
        """Every value that cannot work, whatever the corpus (train/preflight.py checks the corpus's sizes).
        Raises ValueError naming the field and its limit."""
        if isinstance(self.model, dict):
            self.model = ModelConfig.from_dict(self.model)
        try:
            self.model.check()
        except ValueError as e:
            raise ValueError(f"model.{e}") from None
        positive = ("batch_size", "grad_accum", "bptt", "eval_streams", "test_streams", "log_every",
                    "keep_last", "lr_reference_batch", "timeout_s")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.bptt < MIN_SEQ_LEN:
            raise ValueError(f"bptt must be >= {MIN_SEQ_LEN} (the shortest random segment), got {self.bptt}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be <= max_steps ({self.max_steps}): "
                             "the run would end before reaching the peak learning rate")
        for name in ("warmup_steps", "cooldown_steps", "eval_every", "save_every", "sample_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.cooldown_steps and self.max_steps is None:
            raise ValueError("cooldown_steps needs max_steps: the decay is placed at the end of the run")
        if self.max_steps is not None and self.cooldown_steps > self.max_steps:
            raise ValueError(f"cooldown_steps must be <= max_steps ({self.max_steps}), got "
                             f"{self.cooldown_steps}")
        for name, meaning in (("eval_bptt", "bptt"), ("eval_max_segments", "the whole split")):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None (None: {meaning}), got {getattr(self, name)}")
        if not self.epochs > 0 or (math.isinf(self.epochs) and self.max_steps is None):
            raise ValueError(f"epochs must be > 0 (and finite unless max_steps is set), got {self.epochs}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        for name in ("min_trust", "clip", "weight_decay"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"seed must be in [0, 2**31), got {self.seed}: numpy's global seed takes 32 "
                             "bits and each rank adds its index")
        if self.model.vocab_size != VOCAB_SIZE:
            raise ValueError(f"model.vocab_size must be {VOCAB_SIZE} (sharnn trains on bytes), got "
                             f"{self.model.vocab_size}")
        if not 0.0 <= self.state_reset_prob < 1.0:
            raise ValueError(f"state_reset_prob must be in [0, 1), got {self.state_reset_prob}")
        if not self.progress_interval_s >= 0:
            raise ValueError(f"progress_interval_s must be >= 0, got {self.progress_interval_s}")
        if self.peak_flops is not None and not (math.isfinite(self.peak_flops) and self.peak_flops > 0):
            raise ValueError(f"peak_flops must be > 0 (FLOP/s, e.g. 312e12), got {self.peak_flops}")
        if self.profile_steps is not None:
            last = profile_range(self.profile_steps)[1]
            if self.max_steps is not None and last > self.max_steps:
                raise ValueError(f"profile_steps {self.profile_steps} ends after max_steps "
                                 f"({self.max_steps}): the run would stop before the profile ends; need "
                                 "B <= max_steps")
        if self.init_from is not None and self.output_bias_init != "zeros":
            raise ValueError(f"output_bias_init {self.output_bias_init} sets the output bias of random "
                             "weights, but init_from loads trained weights with their own bias: give one of "
                             "them")
        for name in TEXT_FIELDS:
            check_utf8(name, getattr(self, name))

    @property
    def eval_len(self) -> int:
        """The segment length of validation and test (and the attention report): `eval_segment_len`."""
        return eval_segment_len(self.eval_bptt, self.bptt)

    def global_batch(self, world_size: int) -> int:
        return self.batch_size * world_size * self.grad_accum

    def effective_lr(self, world_size: int) -> float:
        """The peak lr after the explicit batch scaling rule."""
        ratio = self.global_batch(world_size) / self.lr_reference_batch
        return self.lr * {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[self.lr_scaling]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


TEXT_FIELDS = ("data", "out", "init_from", "resume", "report_to", "profile_steps")
"""String fields that the run records (config.yaml, TensorBoard's hparams, W&B) write as UTF-8."""


def check_utf8(name: str, value: str | None) -> None:
    """A path given as bytes that are not UTF-8 reaches Python with surrogate escapes, which no UTF-8 record
    can hold: TensorBoard would fail after the run directory is written, so such a value is refused here."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} {os.fsencode(value)!r} is not UTF-8 text, which the run's records "
                         "(config.yaml, TensorBoard) need: choose a name in UTF-8") from None


def eval_segment_len(eval_bptt: int | None, bptt: int) -> int:
    """The segment length a model is scored in: eval_bptt when set, else the training bptt. The one place
    this fallback is made (TrainConfig.eval_len; sharnn-eval on a run's saved config)."""
    return eval_bptt or bptt


def lr_at(step: int, peak_lr: float, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, constant, optional cooldown."""
    lr = peak_lr * min(step + 1, cfg.warmup_steps) / cfg.warmup_steps if cfg.warmup_steps else peak_lr
    if cfg.cooldown_steps and cfg.max_steps is not None:
        left = cfg.max_steps - step
        lr *= min(1.0, left / cfg.cooldown_steps)
    return lr


def profile_range(spec: str) -> tuple[int, int]:
    """--profile_steps 'A:B' -> (A, B): optimizer steps A to B inclusive, 1 <= A <= B."""
    try:
        first, last = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"profile_steps must be A:B (optimizer steps, e.g. 20:25), got {spec!r}") from None
    if not 1 <= first <= last:
        raise ValueError(f"profile_steps {spec!r}: need 1 <= A <= B")
    return first, last


# ----------------------------------------------------------------------------------------------- presets
def paper() -> TrainConfig:
    """The author's single-GPU enwik8 recipe for the single-head SHA-RNN (Merity 2019; Smerity/sha-rnn at
    218d748, README's first command): validation at epoch ends only, on min(100, batch) streams."""
    return TrainConfig(model=model_preset("paper"), batch_size=16, bptt=1024, epochs=32, lr=2e-3,
                       warmup_steps=800, weight_decay=1.2e-6, min_trust=0.25, clip=0.25, seed=5512,
                       precision="bf16", eval_every=0, eval_streams=16, test_streams=8)


def paper_stage2() -> TrainConfig:
    """The paper's second stage (the README's second command): from stage 1's best weights, lr 1e-3, seed
    125, 5 epochs; its `--warmup 800` with a step count that restarts ramps the lr up again."""
    return dataclasses.replace(paper(), lr=1e-3, seed=125, epochs=5, warmup_steps=800)


def paper_all() -> TrainConfig:
    """Attention in every block; batch 8 (as the paper, for memory), so validation on min(100, 8) streams."""
    return dataclasses.replace(paper(), model=model_preset("paper-all"), batch_size=8, eval_streams=8)


def lstm() -> TrainConfig:
    """The SHA-LSTM baseline: no attention."""
    return dataclasses.replace(paper(), model=model_preset("lstm"))


def small() -> TrainConfig:
    """Between tiny and paper: seconds per step on a CPU; used by benchmarks."""
    return dataclasses.replace(paper(), model=model_preset("small"), bptt=128, precision="fp32",
                               eval_every=200, save_every=200, warmup_steps=100)


def tiny() -> TrainConfig:
    """Minutes on a 2-core CPU: the README demo and the tests."""
    return TrainConfig(model=model_preset("tiny"), batch_size=8, bptt=64, epochs=1, max_steps=900,
                       lr=3e-3, warmup_steps=20, eval_every=150, eval_streams=8, test_streams=4,
                       eval_max_segments=40, save_every=300, log_every=10, precision="fp32", seed=1234,
                       sample_bytes=160)


PRESETS = {"paper": paper, "paper-stage2": paper_stage2, "paper-all": paper_all, "lstm": lstm,
           "small": small, "tiny": tiny}


def preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise SystemExit(f"error: unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None


# ------------------------------------------------------------------------------------------ command line
def _yaml_text(value) -> str:
    """`value` as the YAML file spells it (true, 'no', 2.7), for messages."""
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def _flag_spec(hint) -> PrimitiveConstructorSpec | None:
    """The converter tyro's flag parser uses for a field of type `hint` (None for a type it cannot parse)."""
    spec = ConstructorRegistry.get_primitive_spec(PrimitiveTypeInfo.make(hint, set()))
    return spec if isinstance(spec, PrimitiveConstructorSpec) else None


def yaml_to_args(values: dict, source: str, cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """The flags that set what the YAML mapping `values` sets, so that a YAML value is typed exactly as the
    same value given as a flag: each goes through the converter of that flag. A value the flag would refuse
    (`batch_size: true`, `batch_size: 2.7`, `vary_bptt: "no"`, `model: 5`) is an error naming the field and
    `source`; `lr: 1e-3`, a string to PyYAML, is the number the flag makes of it."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SystemExit(f"error: {source}: unknown fields {[prefix + name for name in unknown]}; known: "
                         f"{sorted(known)}")
    args = []
    for name, value in values.items():
        field_name, hint = prefix + name, hints[name]
        if dataclasses.is_dataclass(hint):
            if value is None:  # `model:` with nothing under it
                continue
            if not isinstance(value, dict):
                raise SystemExit(f"error: {source}: {field_name} must be a mapping of its fields "
                                 f"({', '.join(f.name for f in dataclasses.fields(hint))}), got "
                                 f"{_yaml_text(value)}")
            args += yaml_to_args(value, source, hint, field_name + ".")
            continue
        spec = _flag_spec(hint)
        many = isinstance(value, list)
        texts = [_flag_text(v) for v in (value if many else [value])]
        if spec is None:  # tyro refuses the type itself when it builds the parser
            args += [f"--{field_name}", *texts]
            continue
        kind = "true or false" if hint is bool else spec.metavar
        refused = (f"error: {source}: {field_name}: {_yaml_text(value)} is not a value --{field_name} takes "
                   f"({kind})")
        if many != (spec.nargs != 1) or None in texts:
            raise SystemExit(refused)
        if spec.choices is not None and any(text not in spec.choices for text in texts):
            raise SystemExit(refused)
        try:
            parsed = spec.instance_from_str(texts)
        except (ValueError, TypeError):
            raise SystemExit(refused) from None
        if hint is bool:  # tyro makes a bool field a switch: --name / --no_name
            args.append(f"--{prefix}{'' if parsed else 'no_'}{name}")
        elif many:
            args += [f"--{field_name}", *texts]
        else:
            args.append(f"--{field_name}={texts[0]}")  # '=': a value that starts with '-' is not a flag
    return args


def _flag_text(value) -> str | None:
    """A YAML scalar as the text typed after its flag (None for a mapping or list: not one value)."""
    if isinstance(value, (dict, list)):
        return None
    return "None" if value is None else str(value)  # str(True) == "True", str(0.1) == "0.1"


def _field_of(flag: str) -> str:
    """The field a flag sets: `--model.mem_len=5` -> model.mem_len, `--no-vary-bptt` -> vary_bptt."""
    *outer, last = flag[2:].split("=", 1)[0].replace("-", "_").split(".")
    return ".".join([*outer, last.removeprefix("no_")])


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """Returns the resolved config and the flags that are not config fields (preset, config, dry_run).

    The YAML file's values become flags placed before the command line's, so a flag given on the command line
    wins and both are parsed by the same parser; the config is built and checked once, from all of them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="tiny", help=f"named config: {', '.join(PRESETS)}")
    pre.add_argument("--config", type=Path, help="YAML file of field values applied on top of the preset")
    pre.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                     help="print the resolved config, world size, global batch and parameter count; exit")
    flags, rest = pre.parse_known_args(argv)
    base = preset(flags.preset)
    from_yaml = []
    if flags.config is not None:
        if not flags.config.is_file():
            raise SystemExit(f"error: --config {flags.config}: no such file")
        try:
            overrides = yaml.safe_load(flags.config.read_text()) or {}
        except yaml.YAMLError as e:
            raise SystemExit(f"error: --config {flags.config}: not valid YAML: {e}") from None
        if not isinstance(overrides, dict):
            raise SystemExit(f"error: --config {flags.config}: expected a mapping of field: value")
        from_yaml = yaml_to_args(overrides, str(flags.config))
    explicit = {_field_of(arg) for arg in from_yaml + rest if arg.startswith("--")}
    launcher = launcher_precision()
    if launcher is not None and "precision" not in explicit:  # the launch's --mixed_precision over the preset
        from_yaml = ["--precision", launcher, *from_yaml]
    try:
        with deferred_checks():  # the model's values are checked with the rest, as one error: line
            cfg = tyro.cli(TrainConfig, default=base, args=from_yaml + rest, use_underscores=True,
                           prog="accelerate launch -m train",
                           description="Train SHA-RNN. Flags override --preset, then --config (YAML).")
    except ConfigError as e:
        set_by_yaml = {_field_of(arg) for arg in from_yaml if arg.startswith("--")}
        set_by_flag = {_field_of(arg) for arg in rest if arg.startswith("--")}
        named = str(e).split(" ", 1)[0]  # a ConfigError starts with the field's name
        where = f"{flags.config}: " if named in set_by_yaml - set_by_flag else ""
        raise SystemExit(f"error: {where}{e}") from None
    if launcher is not None and cfg.precision != launcher:
        raise SystemExit(f"error: the launcher asks for mixed precision {launcher} (accelerate launch "
                         f"--mixed_precision, or its config's mixed_precision) but --precision is "
                         f"{cfg.precision}: give one of them, or the same value to both")
    return cfg, flags


def launcher_precision() -> str | None:
    """The precision `accelerate launch --mixed_precision bf16|fp16` (or its config file's mixed_precision)
    asks for, from the ACCELERATE_MIXED_PRECISION it gives the processes; None for "no" or no launcher. A run
    takes it when --precision is not given (flag or YAML), and refuses one that disagrees: the trainer builds
    its own Accelerator from --precision, which would otherwise ignore the launcher's value."""
    value = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    if value in ("", "no", "fp32"):
        return None
    if value not in ("bf16", "fp16"):
        raise SystemExit(f"error: the launcher asks for mixed precision {value!r} "
                         "(ACCELERATE_MIXED_PRECISION); sharnn trains in fp32, bf16 or fp16: launch with "
                         "--mixed_precision no|bf16|fp16")
    return value


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
