"""The training loop: set up, then `for each step: lr, train_step, log, validate, save`, then test.

Each rank owns its own contiguous byte streams (sharnn.data.StreamLoader) and carries its own LSTM state and
attention memory from step to step (train.step.train_step); the loader is NOT passed through
accelerator.prepare, which would deal consecutive batches to different ranks and break the carried state.
The parts live in files named for what they are: distributed.py (Accelerator, DeepSpeed, signals),
build.py (model, optimizer), step.py (one optimizer step), evaluation.py, checkpoint.py, log.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

import sharnn
from sharnn import CarryState, atomic, kernels
from sharnn.data import CorpusChanged, CorpusError, StreamLoader, corpus_record, open_split
from sharnn.rundir import ModelError
from sharnn.runlock import RunLock
from train import checkpoint
from train.build import build_model, build_optimizer, model_config_for_resume
from train.config import TrainConfig, dump_yaml, lr_at, parse_args
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
from train.progress import Progress
from train.step import NonFiniteGuard, train_step


def main(argv: list[str] | None = None) -> int:
    with RunLock() as lock:  # one trainer per run directory (sharnn/runlock.py); released however run() ends
        return run(argv, lock)


def run(argv: list[str] | None, lock: RunLock) -> int:
    cfg, flags = parse_args(argv)
    run_dir = Path(cfg.out)
    # Nothing is written to the run directory before the start has succeeded: a failed start (a damaged
    # checkpoint, another corpus) leaves it as it was.
    if problem := atomic.cannot_write_into(run_dir):
        raise SystemExit(f"error: --out {run_dir}: cannot write the run there ({problem}); choose another "
                         "--out")
    if not flags.dry_run:
        lock.acquire(run_dir)  # global rank 0, before anything reads the run directory
    ckpt = checkpoint.resolve_resume(cfg.resume, run_dir)
    resumable = checkpoint.inspect(ckpt) if ckpt is not None else None  # the files are there and readable
    if ckpt is not None:
        cfg.model = model_config_for_resume(cfg, ckpt)
    if ckpt is None and not flags.dry_run:
        refuse_earlier_run(run_dir, cfg.resume)
    accelerator = build_accelerator(cfg.precision, cfg.timeout_s, cfg.grad_accum, cfg.out,
                                    build_trackers(cfg.report_to, run_dir, resuming=ckpt is not None))
    world, rank, say = accelerator.num_processes, accelerator.process_index, accelerator.print
    if is_deepspeed(accelerator):
        fill_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, batch_size=cfg.batch_size,
                              grad_accum=cfg.grad_accum, world_size=world, clip=cfg.clip,
                              precision=cfg.precision, optimizer=cfg.optimizer)
    if cfg.cpu_kernels is not None:
        kernels.set_cpu_kernels(cfg.cpu_kernels)
    peak_lr = cfg.effective_lr(world)
    if flags.dry_run:
        return dry_run(accelerator, cfg, peak_lr)

    say(check_precision(cfg.precision, accelerator.device, deepspeed=is_deepspeed(accelerator)))
    try:  # every rank hashes the splits it reads (about a second per GB): all fail alike, none waits
        train_split, valid_split = (open_split(cfg.data, name, verify=not cfg.skip_data_check)
                                    for name in ("train", "valid"))
        test_split = open_split(cfg.data, "test", verify=not cfg.skip_data_check) if cfg.test_at_end else None
        corpus = corpus_record(cfg.data)
    except CorpusError as e:
        hint = " (or pass --skip_data_check to use it as it is)" if isinstance(e, CorpusChanged) else ""
        raise SystemExit(f"error: --data: {e}{hint}") from None
    check_against_corpus(cfg, world, train_split, valid_split, test_split)  # the splits' sizes, now
    if cfg.skip_data_check:
        say(f"WARNING: --skip_data_check: the splits of {cfg.data} were not checked against its manifest; "
            "a corpus changed since sharnn-prepare wrote it trains without a word")
    if resumable is not None and (warning := checkpoint.check_same_corpus(resumable, corpus, cfg.data)):
        say(warning)
    loader = StreamLoader(train_split, cfg.batch_size, cfg.bptt, rank, world, cfg.seed,
                          vary_bptt=cfg.vary_bptt)
    model, origin = build_model(cfg, train_split, fresh=ckpt is None, rank=rank)  # seeds: see build_model
    say(origin)
    if cfg.compile:
        model.compile()  # in place: forward compiled, state_dict keys unchanged (no _orig_mod. prefix)
    optimizer = build_optimizer(model, cfg, lr=lr_at(0, peak_lr, cfg))
    model, optimizer = prepare(accelerator, model, optimizer)  # DeepSpeed: undoes its initial step
    raw_model, device = accelerator.unwrap_model(model), accelerator.device
    if cfg.optimizer == "lamb":
        check_optimizer_sees_tensors(optimizer, raw_model)
    ts, carry = checkpoint.TrainState(), CarryState.empty(cfg.model.n_layer)
    if ckpt is not None:
        ts, carry = checkpoint.load(accelerator, ckpt, cfg.model.n_layer, cfg.batch_size, cfg.restart_streams)
        try:
            loader.load_state_dict(ts.loader)
        except ValueError as e:
            raise SystemExit(f"error: --resume {ckpt}: {e}") from None
        say(f"resumed from {ckpt} at step {ts.step}")
    if world > 1:
        say(check_same_weights(model, "at start"))
    ts.corpus = corpus  # checked equal above; an older checkpoint's run records it from now on

    # The start has succeeded: from here on the run directory is written.
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

    def validate() -> float:  # every rank: it all-reduces
        bpc = evaluate(accelerator, raw_model, valid_split, cfg.eval_streams, cfg.eval_bptt or cfg.bptt,
                       cfg.eval_max_segments)
        if bpc < ts.best_val_bpc:
            ts.best_val_bpc, ts.best_step = bpc, ts.step
        logger.scalars({"val/bpc": bpc, "val/best_bpc": ts.best_val_bpc}, ts.step)
        if cfg.sample_bytes and accelerator.is_main_process:
            logger.text("sample", sample_text(raw_model, valid_split, cfg.sample_bytes, cfg.seed, device),
                        ts.step)
        if cfg.attention_report and accelerator.is_main_process:
            log_attention_report(logger, raw_model, valid_split, cfg.eval_bptt or cfg.bptt, ts.step)
        say(f"step {ts.step}: val bpc {bpc:.4f} (best {ts.best_val_bpc:.4f})")
        return bpc

    def save() -> None:  # every rank: each writes its own carried state
        guard.check()  # never save the weights of a non-finite step
        ts.loader = loader.state_dict()
        if world > 1:
            check_same_weights(model, f"at step {ts.step}")
        checkpoint.save(accelerator, model, run_dir, ts, carry, dump_yaml(cfg), cfg.keep_last)

    stop = StopSignal()
    meter = TrainMeter(world, cfg.grad_accum, device, cfg.model, cfg.batch_size, peak_flops)
    guard = NonFiniteGuard(device)  # --on_nonfinite stop, checked at log intervals and saves
    progress = Progress(loader, cfg.epochs, cfg.max_steps, cfg.grad_accum, ts.step,
                        enabled=accelerator.is_main_process, interval_s=cfg.progress_interval_s)
    profiler = StepProfiler(cfg.profile_steps, ts.step, run_dir, rank)
    val_bpc, exit_reason, last_val_step, saved_step = math.nan, "finished", None, None
    model.train()
    while not finished(cfg, ts, loader):
        lr = lr_at(ts.step, peak_lr, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        out, carry = train_step(accelerator, model, optimizer, loader, carry, cfg, ts.step + 1, guard)
        ts.step, ts.epoch, ts.bytes_seen = ts.step + 1, out.epoch, ts.bytes_seen + out.bytes * world
        meter.add(out)
        metrics = None
        if ts.step % cfg.log_every == 0:
            guard.check()  # host syncs: here, once per log interval
            metrics = meter.metrics(accelerator, ts.step, lr, ts.epoch)
            logger.scalars(metrics, ts.step)
            if cfg.optimizer == "lamb":
                logger.histogram("train/lamb_trust_ratio", unwrap_optimizer(optimizer).last_trust_ratios(),
                                 ts.step)
        progress.update(ts.step, out.bytes // cfg.batch_size, metrics)
        best_before = ts.best_step
        # every eval_every steps, or when an epoch ended
        if (cfg.eval_every and ts.step % cfg.eval_every == 0) or loader.epoch > out.epoch:
            val_bpc, last_val_step = validate(), ts.step
        if stopped := stop.agreed(accelerator, ts.step, cfg.log_every):
            exit_reason = f"stopped by {stopped}"
            break
        if ts.best_step != best_before or (cfg.save_every and ts.step % cfg.save_every == 0):
            save()
            saved_step = ts.step
        profiler.step()
    progress.close(finished=exit_reason == "finished")
    profiler.close()

    if exit_reason == "finished" and last_val_step != ts.step:
        val_bpc, saved_step = validate(), None
    if saved_step != ts.step:
        save()
    test_bpc = None
    if exit_reason == "finished" and cfg.test_at_end:
        accelerator.load_state(str(checkpoint.best_checkpoint(run_dir)
                                   or checkpoint.complete_checkpoints(run_dir)[-1]))
        test_bpc = evaluate(accelerator, raw_model, test_split, cfg.test_streams,
                            cfg.eval_bptt or cfg.bptt)
        logger.scalars({"test/bpc": test_bpc}, ts.step)
    summary = {"step": ts.step, "epoch": ts.epoch, "val_bpc": finite_or_none(val_bpc),
               "best_val_bpc": finite_or_none(ts.best_val_bpc), "best_step": ts.best_step,
               "test_bpc": test_bpc, "exit": exit_reason}
    say("summary: " + json.dumps(summary))
    if accelerator.is_main_process:
        atomic.write_json(run_dir / "summary.json", summary)
    logger.close()
    # Both calls: end_training alone aborts intermittently at exit under ZeRO (measured: 3 of 5 exits).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    StopSignal.ignore_from_now()
    return 0


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


def finished(cfg: TrainConfig, ts: checkpoint.TrainState, loader: StreamLoader) -> bool:
    """The step limit is reached, or the loader's next segment lies beyond `cfg.epochs` passes."""
    position = loader.epoch + loader.offset / loader.stream_len  # where the next segment starts, in epochs
    return (cfg.max_steps is not None and ts.step >= cfg.max_steps) or position >= cfg.epochs


def dry_run(accelerator, cfg: TrainConfig, peak_lr: float) -> int:
    world, say = accelerator.num_processes, accelerator.print
    say(dump_yaml(cfg), end="")
    say(f"world size: {world} ({accelerator.distributed_type})")
    say(f"global batch: {cfg.global_batch(world)} streams ({cfg.batch_size} per rank x {world} ranks x "
        f"{cfg.grad_accum} accumulation)")
    say(f"lr: {peak_lr:g} (lr_scaling={cfg.lr_scaling}, reference batch {cfg.lr_reference_batch})")
    say(f"parameters: {sharnn.SHARNN(cfg.model).num_params()}")
    accelerator.end_training()
    return 0
