"""The trainer: `main` = `start` (everything before step 1), `train` (the loop), `finish` (the end).

    run = start(cfg, lock)   check the run directory, the checkpoint, the trackers and the corpus; build, wrap
                             and resume the model; write nothing until every check has passed
    train(run)               for each step: lr, train_step, log, validate, stop?, save
    finish(run)              validate and save what the loop did not, test the best checkpoint, summary.json

`Run` holds what the three share; `validate(run)` and `save(run)` are the loop's two named actions. Each rank
owns its own contiguous byte streams (sharnn.corpus.data.StreamLoader) and carries its own LSTM state and
attention
memory from step to step (train.step.train_step); the loader is NOT passed through accelerator.prepare, which
would deal consecutive batches to different ranks and break the carried state. The parts live in files named
for what they are: distributed.py (Accelerator, DeepSpeed, signals), build.py (model, optimizer), step.py
(one optimizer step), evaluation.py, checkpoint.py, log.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

import sharnn
from sharnn import SHARNN, CarryState, kernels
from sharnn.corpus.data import ByteSplit, CorpusChanged, CorpusError, StreamLoader, corpus_record, open_split
from sharnn.io import atomic
from sharnn.io.rundir import ModelError
from sharnn.io.runlock import RunLock
from train import checkpoint
from train.build import build_model, build_optimizer, model_config_for_resume
from train.config import TrainConfig, dump_yaml, lr_at, parse_args, profile_range
from train.distributed import (
    StopSignal,
    build_accelerator,
    check_optimizer_sees_tensors,
    check_precision,
    check_same_weights,
    fill_deepspeed_config,
    is_deepspeed,
    prepare,
    unwrap_optimizer,
)
from train.evaluation import evaluate, log_attention_report, sample_text
from train.flops import device_peak_flops
from train.log import (
    NullLogger,
    RunLogger,
    StepProfiler,
    TrainMeter,
    build_trackers,
    finite_or_none,
    git_sha,
)
from train.preflight import check_against_corpus
from train.progress import Progress, estimate_total_steps, expected_segment_len
from train.step import NonFiniteGuard, train_step


def main(argv: list[str] | None = None) -> int:
    """`sharnn-train`, `accelerate launch -m train`: returns the exit code; a failure is one `error:` line."""
    cfg, flags = parse_args(argv)
    if flags.dry_run:
        return dry_run(cfg)
    with RunLock() as lock:  # one trainer per run directory (sharnn/io/runlock.py), released however it ends
        run = start(cfg, lock)
        train(run)
        finish(run)
    return 0


@dataclass
class Splits:
    """The corpus splits a run reads, opened and checked against its manifest."""

    train: ByteSplit
    valid: ByteSplit
    test: ByteSplit | None
    """None without --test_at_end."""
    record: dict
    """The corpus's sizes and hashes (sharnn.corpus.data.corpus_record), kept in every checkpoint."""


@dataclass
class Run:
    """What a run holds from `start` to `finish`: `train`, `validate` and `save` read and update it."""

    cfg: TrainConfig
    accelerator: Accelerator
    model: torch.nn.Module
    """As prepared: wrapped by DDP or DeepSpeed when distributed (what steps)."""
    raw_model: SHARNN
    """The model inside the wrapper (what evaluates and samples)."""
    optimizer: torch.optim.Optimizer
    loader: StreamLoader
    splits: Splits
    ts: checkpoint.TrainState
    carry: CarryState
    """This rank's LSTM state and attention memory, carried from step to step."""
    peak_lr: float
    logger: RunLogger | NullLogger
    stop: StopSignal
    meter: TrainMeter
    guard: NonFiniteGuard
    progress: Progress
    profiler: StepProfiler
    val_bpc: float = math.nan
    """The latest validation bpc."""
    last_val_step: int | None = None
    saved_step: int | None = None
    exit_reason: str = "finished"

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out)

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


# ------------------------------------------------------------------------------------------------- start
def start(cfg: TrainConfig, lock: RunLock) -> Run:
    """Everything before step 1. Every check that can fail (the run directory, the checkpoint, the trackers,
    the corpus and its sizes, the ranks' weights) runs before anything is written, so a failed start leaves
    --out as it was. Every rank runs this."""
    accelerator, ckpt, resumable = open_run(cfg, lock)
    say, device, world = accelerator.print, accelerator.device, accelerator.num_processes
    peak_lr = cfg.effective_lr(world)
    say(check_precision(cfg.precision, device, deepspeed=is_deepspeed(accelerator)))
    splits = open_splits(cfg, world, say)
    if resumable is not None and (warn := checkpoint.check_same_corpus(resumable, splits.record, cfg.data)):
        say(warn)
    loader = StreamLoader(splits.train, cfg.batch_size, cfg.bptt, accelerator.process_index, world, cfg.seed,
                          vary_bptt=cfg.vary_bptt)
    model, raw_model, optimizer = build_and_wrap(cfg, accelerator, splits.train, ckpt, peak_lr)
    ts, carry = checkpoint.TrainState(), CarryState.empty(cfg.model.n_layer)
    if ckpt is not None:
        ts, carry = resume(cfg, accelerator, ckpt, loader)
    if world > 1:
        say(check_same_weights(model, "at start"))
    ts.corpus = splits.record  # checked equal above; an older checkpoint's run records it from now on
    warn_if_profile_past_end(cfg, ts.step, loader, say)

    # The start has succeeded: from here on the run directory is written.
    run_dir = Path(cfg.out)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(run_dir / "config.yaml", dump_yaml(cfg))
    logger = (RunLogger if accelerator.is_main_process else NullLogger)(accelerator, run_dir, cfg.to_dict(),
                                                                        ts.step)
    say(f"sharnn {sharnn.__version__} ({git_sha()}), torch {torch.__version__}, world size {world} "
        f"({accelerator.distributed_type}), global batch {cfg.global_batch(world)}, lr {peak_lr:g}, "
        f"parameters: {raw_model.num_params()}")
    peak_flops, peak_source = device_peak_flops(device, cfg.precision, cfg.peak_flops)
    say(f"MFU against {peak_flops / 1e9:,.1f} GFLOP/s per device ({peak_source})")
    return Run(cfg, accelerator, model, raw_model, optimizer, loader, splits, ts, carry, peak_lr, logger,
               stop=StopSignal(),
               meter=TrainMeter(world, cfg.grad_accum, device, cfg.model, cfg.batch_size, peak_flops),
               guard=NonFiniteGuard(device),  # --on_nonfinite stop, checked at log intervals and saves
               progress=Progress(loader, cfg.epochs, cfg.max_steps, cfg.grad_accum, ts.step,
                                 enabled=accelerator.is_main_process, interval_s=cfg.progress_interval_s),
               profiler=StepProfiler(cfg.profile_steps, ts.step, run_dir, accelerator.process_index))


def open_run(cfg: TrainConfig, lock: RunLock | None):
    """The run directory checked and locked, the checkpoint to resume (whose architecture replaces
    `cfg.model`) checked readable, the trackers and the Accelerator. Returns (accelerator, checkpoint or None,
    what checkpoint.inspect found or None). `lock` None: the dry run, which neither locks nor refuses an
    earlier run. Writes nothing but the lock."""
    run_dir = Path(cfg.out)
    if problem := atomic.cannot_write_into(run_dir):
        raise SystemExit(f"error: --out {run_dir}: cannot write the run there ({problem}); choose another "
                         "--out")
    if lock is not None:
        lock.acquire(run_dir)  # global rank 0, before anything reads the run directory
    ckpt = checkpoint.resolve_resume(cfg.resume, run_dir)
    resumable = checkpoint.inspect(ckpt) if ckpt is not None else None  # the files are there and readable
    if ckpt is not None:
        cfg.model = model_config_for_resume(cfg, ckpt)
    elif lock is not None:
        refuse_earlier_run(run_dir, cfg.resume)
    accelerator = build_accelerator(cfg.precision, cfg.timeout_s, cfg.grad_accum, cfg.out,
                                    build_trackers(cfg.report_to, run_dir, resuming=ckpt is not None))
    if is_deepspeed(accelerator):
        fill_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, batch_size=cfg.batch_size,
                              grad_accum=cfg.grad_accum, world_size=accelerator.num_processes, clip=cfg.clip,
                              precision=cfg.precision, optimizer=cfg.optimizer)
    if cfg.cpu_kernels is not None:
        kernels.set_cpu_kernels(cfg.cpu_kernels)  # the flag replaces $SHARNN_CPU_KERNELS
    if problem := kernels.settings_problem():
        raise SystemExit(f"error: {problem}")
    return accelerator, ckpt, resumable


def open_splits(cfg: TrainConfig, world: int, say) -> Splits:
    """The splits the run reads, each hashed against the manifest (unless --skip_data_check) and their sizes
    checked against `cfg` (train/preflight.py). Every rank hashes the splits it reads (about a second per
    GB): all fail alike, none waits."""
    verify = not cfg.skip_data_check
    try:
        train_split, valid_split = (open_split(cfg.data, name, verify=verify) for name in ("train", "valid"))
        test_split = open_split(cfg.data, "test", verify=verify) if cfg.test_at_end else None
        record = corpus_record(cfg.data)
    except CorpusError as e:
        hint = " (or pass --skip_data_check to use it as it is)" if isinstance(e, CorpusChanged) else ""
        raise SystemExit(f"error: --data: {e}{hint}") from None
    check_against_corpus(cfg, world, train_split, valid_split, test_split)
    if cfg.skip_data_check:
        say(f"WARNING: --skip_data_check: the splits of {cfg.data} were not checked against its manifest; "
            "a corpus changed since sharnn-prepare wrote it trains without a word")
    return Splits(train_split, valid_split, test_split, record)


def build_and_wrap(cfg: TrainConfig, accelerator, train_split: ByteSplit, ckpt: Path | None, peak_lr: float):
    """(model as prepared, the SHARNN inside it, optimizer). A resumed run's weights are loaded later."""
    model, origin = build_model(cfg, train_split, fresh=ckpt is None, rank=accelerator.process_index)
    accelerator.print(origin)
    if cfg.compile:
        if accelerator.device.type == "cpu":
            accelerator.print("warning: --compile on a CPU: minutes of compiling, and no faster than eager "
                              "here (bench/RESULTS.md); it pays off on GPUs")
        model.compile()  # in place: forward compiled, state_dict keys unchanged (no _orig_mod. prefix)
    optimizer = build_optimizer(model, cfg, lr=lr_at(0, peak_lr, cfg))
    model, optimizer = prepare(accelerator, model, optimizer)  # DeepSpeed: undoes its initial step
    raw_model = accelerator.unwrap_model(model)
    if cfg.optimizer == "lamb":
        check_optimizer_sees_tensors(optimizer, raw_model)
    return model, raw_model, optimizer


def resume(cfg: TrainConfig, accelerator, ckpt: Path, loader: StreamLoader):
    """(TrainState, carried state) from `ckpt`, with the weights, optimizer and random states loaded into the
    prepared model and the loader's position restored."""
    ts, carry = checkpoint.load(accelerator, ckpt, cfg.model.n_layer, cfg.batch_size, cfg.restart_streams)
    try:
        loader.load_state_dict(ts.loader)
    except ValueError as e:
        raise SystemExit(f"error: --resume {ckpt}: {e}") from None
    accelerator.print(f"resumed from {ckpt} at step {ts.step}")
    return ts, carry


def warn_if_profile_past_end(cfg: TrainConfig, step: int, loader: StreamLoader, say) -> None:
    """--profile_steps beyond max_steps is refused by TrainConfig; an epoch-bounded run's end is known only
    from the loader (an estimate with --vary_bptt), so a profile that starts after it is a warning."""
    if cfg.profile_steps is None:
        return
    first, last = profile_range(cfg.profile_steps)
    end = estimate_total_steps(step, loader, cfg.epochs, cfg.max_steps, expected_segment_len(loader),
                               cfg.grad_accum)
    if first > end:
        say(f"WARNING: --profile_steps {cfg.profile_steps}: the run is expected to end at step {end} "
            f"(--epochs {cfg.epochs:g}), before the first profiled step: no profile will be written")
    elif last > end:
        say(f"WARNING: --profile_steps {cfg.profile_steps}: the run is expected to end at step {end} "
            f"(--epochs {cfg.epochs:g}): the profile will stop there")


RUN_RECORDS = ("metrics.jsonl", "summary.json")
"""What a run writes besides checkpoints that a fresh start in the same directory would replace."""


def refuse_earlier_run(run_dir: Path, resume: str | None) -> None:
    """A fresh start must not replace an earlier run's checkpoints or records. `--resume auto` on a run
    that stopped before its first checkpoint starts it again (its records are of steps to be run again)."""
    try:
        has_checkpoints = bool(checkpoint.complete_checkpoints(run_dir))
    except ModelError:  # a checkpoint whose train_state.json is unreadable is still a checkpoint
        has_checkpoints = True
    if has_checkpoints and resume != "auto":
        raise SystemExit(f"error: --out {run_dir} already holds a run with checkpoints; continue it with "
                         "--resume auto, or choose a new --out")
    records = [name for name in RUN_RECORDS if (run_dir / name).exists()]
    if records and not (resume == "auto" and "summary.json" not in records):
        raise SystemExit(f"error: --out {run_dir} holds the records of an earlier run ({', '.join(records)}) "
                         "but no checkpoint to continue from; a new run there would replace them. Choose a "
                         "new --out, or delete them to start over in it")


def dry_run(cfg: TrainConfig) -> int:
    """--dry_run: the resolved config (a resumed checkpoint's architecture), world size, global batch, lr
    and parameter count, after the checks that write nothing."""
    accelerator, _, _ = open_run(cfg, lock=None)
    world, say = accelerator.num_processes, accelerator.print
    say(dump_yaml(cfg), end="")
    say(f"world size: {world} ({accelerator.distributed_type})")
    say(f"global batch: {cfg.global_batch(world)} streams ({cfg.batch_size} per rank x {world} ranks x "
        f"{cfg.grad_accum} accumulation)")
    say(f"lr: {cfg.effective_lr(world):g} (lr_scaling={cfg.lr_scaling}, reference batch "
        f"{cfg.lr_reference_batch})")
    say(f"parameters: {sharnn.SHARNN(cfg.model).num_params()}")
    accelerator.end_training()
    return 0


# ------------------------------------------------------------------------------------------------- train
def train(run: Run) -> None:
    """One optimizer step per iteration until the step or epoch limit, or a signal: the only place that
    decides when to validate, save and stop."""
    cfg, ts = run.cfg, run.ts
    run.model.train()
    while not finished(cfg, ts, run.loader):
        lr = lr_at(ts.step, run.peak_lr, cfg)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        out, run.carry = train_step(run.accelerator, run.model, run.optimizer, run.loader, run.carry, cfg,
                                    ts.step + 1, run.guard)
        ts.step, ts.epoch, ts.bytes_seen = ts.step + 1, out.epoch, ts.bytes_seen + out.bytes * run.world
        run.meter.add(out)
        metrics = log_interval(run, lr) if ts.step % cfg.log_every == 0 else None
        run.progress.update(ts.step, out.bytes // cfg.batch_size, metrics)
        best_before = ts.best_step
        if (cfg.eval_every and ts.step % cfg.eval_every == 0) or run.loader.epoch > out.epoch:  # or epoch end
            validate(run)
        if stopped := run.stop.agreed(run.accelerator, ts.step, cfg.log_every):
            run.exit_reason = f"stopped by {stopped}"
            break
        if ts.best_step != best_before or (cfg.save_every and ts.step % cfg.save_every == 0):
            save(run)
        run.profiler.step()
    run.progress.close(finished=run.exit_reason == "finished")
    run.profiler.close()


def finished(cfg: TrainConfig, ts: checkpoint.TrainState, loader: StreamLoader) -> bool:
    """The step limit is reached, or the loader's next segment lies beyond `cfg.epochs` passes."""
    position = loader.epoch + loader.offset / loader.stream_len  # where the next segment starts, in epochs
    return (cfg.max_steps is not None and ts.step >= cfg.max_steps) or position >= cfg.epochs


def log_interval(run: Run, lr: float) -> dict[str, float]:
    """The train metrics of the steps since the last log (every rank: they are all-reduced), logged."""
    run.guard.check()  # host syncs: here, once per log interval
    metrics = run.meter.metrics(run.accelerator, run.ts.step, lr, run.ts.epoch)
    run.logger.scalars(metrics, run.ts.step)
    if run.cfg.optimizer == "lamb":
        run.logger.histogram("train/lamb_trust_ratio", unwrap_optimizer(run.optimizer).last_trust_ratios(),
                             run.ts.step)
    return metrics


def validate(run: Run) -> float:
    """Validation bpc at this step, logged with the best so far, a text sample and the attention report.
    Every rank calls it (it all-reduces)."""
    cfg, ts, logger, is_main = run.cfg, run.ts, run.logger, run.accelerator.is_main_process
    bpc = evaluate(run.accelerator, run.raw_model, run.splits.valid, cfg.eval_streams, cfg.eval_len,
                   cfg.eval_max_segments)
    if bpc < ts.best_val_bpc:
        ts.best_val_bpc, ts.best_step = bpc, ts.step
    logger.scalars({"val/bpc": bpc, "val/best_bpc": ts.best_val_bpc}, ts.step)
    if cfg.sample_bytes and is_main:
        logger.text("sample", sample_text(run.raw_model, run.splits.valid, cfg.sample_bytes, cfg.seed,
                                          run.accelerator.device), ts.step)
    if cfg.attention_report and is_main:
        log_attention_report(logger, run.raw_model, run.splits.valid, cfg.eval_len, ts.step)
    run.accelerator.print(f"step {ts.step}: val bpc {bpc:.4f} (best {ts.best_val_bpc:.4f})")
    run.val_bpc, run.last_val_step = bpc, ts.step
    return bpc


def save(run: Run) -> None:
    """A checkpoint of this step. Every rank calls it: each writes its own carried state."""
    run.guard.check()  # never save the weights of a non-finite step
    run.ts.loader = run.loader.state_dict()
    if run.world > 1:
        check_same_weights(run.model, f"at step {run.ts.step}")
    checkpoint.save(run.accelerator, run.model, run.run_dir, run.ts, run.carry, dump_yaml(run.cfg),
                    run.cfg.keep_last)
    run.saved_step = run.ts.step


# ------------------------------------------------------------------------------------------------ finish
def finish(run: Run) -> None:
    """After the loop: validate a finished run's last step and checkpoint it (a stopped run is checkpointed
    as it is), score the best checkpoint on the test split, write summary.json, close the trackers."""
    cfg, ts, accelerator = run.cfg, run.ts, run.accelerator
    finished_run = run.exit_reason == "finished"
    if finished_run and run.last_val_step != ts.step:
        validate(run)
        run.saved_step = None  # a checkpoint of this step written before validating lacks the new best
    if run.saved_step != ts.step:
        save(run)
    test_bpc = final_test(run) if finished_run and cfg.test_at_end else None
    summary = {"step": ts.step, "epoch": ts.epoch, "val_bpc": finite_or_none(run.val_bpc),
               "best_val_bpc": finite_or_none(ts.best_val_bpc), "best_step": ts.best_step,
               "test_bpc": test_bpc, "exit": run.exit_reason}
    accelerator.print("summary: " + json.dumps(summary))
    if accelerator.is_main_process:
        atomic.write_json(run.run_dir / "summary.json", summary)
    run.logger.close()
    # Both calls: end_training alone aborts intermittently at exit under ZeRO (measured: 3 of 5 exits).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    StopSignal.ignore_from_now()


def final_test(run: Run) -> float:
    """Test bpc of the best checkpoint (else the latest), loaded into the run's model. Every rank."""
    run_dir, cfg = run.run_dir, run.cfg
    run.accelerator.load_state(str(checkpoint.best_checkpoint(run_dir)
                                   or checkpoint.complete_checkpoints(run_dir)[-1]))
    test_bpc = evaluate(run.accelerator, run.raw_model, run.splits.test, cfg.test_streams, cfg.eval_len)
    run.logger.scalars({"test/bpc": test_bpc}, run.ts.step)
    return test_bpc
