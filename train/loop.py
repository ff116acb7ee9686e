"""The training loop: build -> prepare -> loop. The only module that creates an Accelerator.

Each rank owns its own contiguous byte streams (sharnn.data.StreamLoader) and carries its own LSTM state
and attention memory from step to step; the loader is NOT passed through accelerator.prepare, which would
deal consecutive batches to different ranks and break the carried state.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed
from safetensors.torch import load_file
from tqdm import tqdm

import sharnn
from sharnn import SHARNN, CarryState
from sharnn.data import CorpusError, StreamLoader, open_split
from sharnn.generate import generate
from sharnn.optim import LAMB
from train import checkpoint
from train.config import TrainConfig, dump_yaml, lr_at, parse_args
from train.log import NullLogger, RunLogger
from train.step import backward_and_step, check_precision, evaluate

log = logging.getLogger("sharnn")
ACCEL_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


# ------------------------------------------------------------------------------------------------- build
def build_accelerator(cfg: TrainConfig) -> Accelerator:
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    on_cpu = not torch.cuda.is_available()
    # On CPU, DDP needs cpu=True (else 2 unsynced processes) and DeepSpeed needs an explicit gloo group.
    launched_by_torchrun = "LOCAL_RANK" in os.environ
    pg = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.timeout_s),
                                **({"backend": "gloo"} if on_cpu and launched_by_torchrun else {}))
    try:
        accelerator = Accelerator(cpu=on_cpu and not use_deepspeed, mixed_precision=ACCEL_PRECISION[cfg.precision],
                                  gradient_accumulation_steps=cfg.grad_accum, log_with="tensorboard",
                                  project_dir=cfg.out, kwargs_handlers=[pg])
    except torch.distributed.DistError as e:
        raise SystemExit(f"error: rank {os.environ.get('RANK', '?')}: not every rank joined the process group "
                         f"within --timeout_s={cfg.timeout_s}s: a process on another node failed at start-up (its "
                         f"log names the cause) or never started. ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]})") from None
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise SystemExit(f"error: the launcher started {launched} processes but accelerate sees world size "
                         f"{accelerator.num_processes} ({accelerator.distributed_type}): the ranks would train "
                         "unsynchronised. On a machine without GPUs launch with ACCELERATE_USE_CPU=1 or use "
                         "launch/cpu_ddp.yaml.")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        fill_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, cfg, accelerator.num_processes)
    return accelerator


def fill_deepspeed_config(ds: dict, cfg: TrainConfig, world_size: int) -> None:
    """Fill the "auto" values of ds_config.json from the run's config; refuse values that disagree."""
    ours = {"train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": cfg.grad_accum,
            "train_batch_size": cfg.global_batch(world_size), "gradient_clipping": cfg.clip}
    for key, value in ours.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise SystemExit(f"error: the DeepSpeed config sets {key}={ds[key]} but the run's config says "
                             f"{value}: set it to \"auto\" in ds_config.json and choose it with --{key}")
    for name in ("bf16", "fp16"):
        section = ds.setdefault(name, {})
        want = cfg.precision == name
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = want
        elif section["enabled"] != want:
            raise SystemExit(f"error: the DeepSpeed config has {name}.enabled={section['enabled']} but "
                             f"--precision is {cfg.precision}: set it to \"auto\"")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        raise SystemExit("error: ZeRO stage 3 is not supported: it partitions the parameters, which a ~54M "
                         "parameter model never needs, and evaluation/sampling run on one rank. Use stage 0-2.")
    if cfg.optimizer == "lamb" and (stage > 0 or cfg.precision == "bf16"):
        raise SystemExit(
            f"error: LAMB with DeepSpeed {'ZeRO stage ' + str(stage) if stage else 'bf16'}: DeepSpeed hands the "
            "optimizer flat partitions that cut across parameter tensors, so LAMB's per-tensor trust ratios "
            "would silently change. Working alternatives: DeepSpeed ZeRO stage 0 in fp32/fp16 with LAMB; DDP "
            "(launch/ddp.yaml) with LAMB in any precision; or --optimizer adamw with any ZeRO stage.")


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    # The reference applies weight decay to every parameter (LAMB(params, weight_decay=wdecay)).
    if cfg.optimizer == "lamb":
        return LAMB(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, min_trust=cfg.min_trust)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, eps=1e-6)


def check_optimizer_sees_tensors(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
    """LAMB's trust ratio is per tensor: refuse any wrapper that hands it other shapes than the model's."""
    seen = sorted(tuple(p.shape) for g in optimizer.param_groups for p in g["params"])
    want = sorted(tuple(p.shape) for p in model.parameters())
    if seen != want:
        raise SystemExit("error: the optimizer was handed flattened partitions, not the model's tensors; LAMB "
                         "needs the real tensors. Use DDP, DeepSpeed ZeRO-0 in fp32/fp16, or --optimizer adamw.")


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop finishes the step, saves and exits cleanly on every rank."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum


def memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return psutil.Process().memory_info().rss


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN or Infinity: 'not measured' is null."""
    return x if math.isfinite(x) else None


def draw_resets(seed: int, step: int, p: float) -> tuple[bool, bool]:
    """The reference forgets hidden state and memory, independently, with probability p after a step.
    Drawn from (seed, step) so that every rank and every resumed run draws the same."""
    if p == 0:
        return False, False
    u = np.random.default_rng([seed, step, 1]).random(2)
    return bool(u[0] < p), bool(u[1] < p)


# -------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    cfg, flags = parse_args(argv)
    run_dir = Path(cfg.out)
    ckpt = checkpoint.resolve_resume(cfg.resume, run_dir)
    if ckpt is not None:  # the architecture comes from the checkpoint
        import yaml
        saved = yaml.safe_load((ckpt / "config.yaml").read_text())["model"]
        if saved != cfg.model.to_dict():
            print(f"resume: using the checkpoint's model config {saved}", file=sys.stderr)
        cfg.model = sharnn.ModelConfig.from_dict(saved)

    if ckpt is None and cfg.resume != "auto" and checkpoint.complete_checkpoints(run_dir) and not flags.dry_run:
        raise SystemExit(f"error: --out {run_dir} already holds a run with checkpoints; continue it with "
                         "--resume auto, or choose a new --out")
    accelerator = build_accelerator(cfg)
    world, rank = accelerator.num_processes, accelerator.process_index
    peak_lr = cfg.effective_lr(world)
    set_seed(cfg.seed, device_specific=True)  # rank-specific dropout streams, reproducible
    model = SHARNN(cfg.model)
    say = accelerator.print
    if flags.dry_run:
        say(dump_yaml(cfg), end="")
        say(f"world size: {world} ({accelerator.distributed_type})")
        say(f"global batch: {cfg.global_batch(world)} streams ({cfg.batch_size} per rank x {world} ranks x "
            f"{cfg.grad_accum} accumulation)")
        say(f"lr: {peak_lr:g} (lr_scaling={cfg.lr_scaling}, reference batch {cfg.lr_reference_batch})")
        say(f"parameters: {model.num_params()}")
        accelerator.end_training()
        return 0

    say(check_precision(cfg.precision, accelerator.device))
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    try:
        train_split, valid_split = open_split(cfg.data, "train"), open_split(cfg.data, "valid")
    except CorpusError as e:
        raise SystemExit(f"error: --data: {e}") from None
    loader = StreamLoader(train_split, cfg.batch_size, cfg.bptt, rank, world, cfg.seed, vary_bptt=cfg.vary_bptt)
    stream_len = len(train_split) // (world * cfg.batch_size)
    eval_bptt = cfg.eval_bptt or cfg.bptt

    if cfg.init_from and ckpt is None:  # weights only: a new optimizer, schedule and data position
        try:
            model.load_state_dict(load_file(checkpoint.weights_file(cfg.init_from)))
        except RuntimeError as e:
            raise SystemExit(f"error: --init_from {cfg.init_from}: the weights do not fit the model config "
                             f"({str(e).splitlines()[0]} ...); set the same --model.* fields") from None
        say(f"initialised weights from {checkpoint.weights_file(cfg.init_from)}")
    optimizer = build_optimizer(model, cfg, lr=lr_at(0, peak_lr, cfg))
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.optimizer == "lamb":
        check_optimizer_sees_tensors(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                                     accelerator.unwrap_model(model))
    raw_model = accelerator.unwrap_model(model)
    device = accelerator.device

    ts, carry = checkpoint.TrainState(), CarryState.empty(cfg.model.n_layer)
    if ckpt is not None:
        ts, carry = checkpoint.load(accelerator, ckpt, cfg.model.n_layer)
        loader.load_state_dict(ts.loader)
        say(f"resumed from {ckpt} at step {ts.step}")
    logger = (RunLogger if accelerator.is_main_process else NullLogger)(
        accelerator, run_dir, cfg.to_dict(), ts.step if ckpt is not None else 0)
    say(f"sharnn {sharnn.__version__} ({git_sha()}), torch {torch.__version__}, world size {world} "
        f"({accelerator.distributed_type}), global batch {cfg.global_batch(world)}, lr {peak_lr:g}, "
        f"parameters: {raw_model.num_params()}")
    stop = StopSignal()

    def run_eval(step: int) -> float:
        bpc = evaluate(accelerator, raw_model, valid_split, cfg.eval_streams, eval_bptt, cfg.eval_max_segments)
        if bpc < ts.best_val_bpc:
            ts.best_val_bpc, ts.best_step = bpc, step
        logger.scalars({"val/bpc": bpc, "val/best_bpc": ts.best_val_bpc}, step)
        if cfg.sample_bytes and accelerator.is_main_process:
            g = torch.Generator(device=device).manual_seed(cfg.seed)
            prompt = bytes(valid_split.read(0, 64))
            text = generate(raw_model, prompt, cfg.sample_bytes, temperature=0.8, generator=g)
            logger.text("sample", (prompt + b" >>> " + text).decode("utf-8", errors="replace"), step)
        return bpc

    def save() -> None:
        ts.loader = loader.state_dict()
        checkpoint.save(accelerator, model, run_dir, ts, carry, dump_yaml(cfg), cfg.keep_last)

    def done() -> bool:
        progress = ts.epoch + loader.state_dict()["offset"] / stream_len
        return (cfg.max_steps is not None and ts.step >= cfg.max_steps) or progress >= cfg.epochs

    model.train()
    bar = tqdm(total=cfg.max_steps, initial=ts.step, disable=not accelerator.is_main_process, unit="step",
               dynamic_ncols=True)
    loss_sum, grad_norm = torch.zeros((), device=device), torch.tensor(float("nan"))
    n_bytes, t_last, steps_since_log, val_bpc, exit_reason = 0, time.perf_counter(), 0, float("nan"), "finished"
    data_s = log_s = 0.0  # time in the loader and in the last logging call: perf/data_fraction, perf/log_fraction
    while not done():
        # set lr for this optimizer step
        for group in optimizer.param_groups:
            group["lr"] = lr_at(ts.step, peak_lr, cfg)
        # micro-steps: forward/backward on this rank's streams, state carried and detached
        for _ in range(cfg.grad_accum):
            t_data = time.perf_counter()
            batch = next(loader)
            if batch.is_epoch_start:  # the reference starts every epoch with empty state
                carry = carry.reset()
            x, y = batch.inputs.to(device, non_blocking=True).t(), batch.targets.to(device, non_blocking=True).t()
            data_s += time.perf_counter() - t_data
            with accelerator.accumulate(model):
                _, loss, carry = model(x, carry, targets=y)
                norm = backward_and_step(accelerator, model, optimizer, loss, cfg.clip, cfg.on_nonfinite, ts.step + 1)
                grad_norm = norm if norm is not None else grad_norm
            carry = carry.detach()
            loss_sum += loss.detach().float()
            n_bytes += y.numel()
        ts.epoch = batch.epoch
        ts.step += 1
        ts.bytes_seen += cfg.global_batch(world) * y.shape[0]
        steps_since_log += 1
        reset_hidden, reset_memory = draw_resets(cfg.seed, ts.step, cfg.state_reset_prob)
        if reset_hidden or reset_memory:
            carry = CarryState(hidden=carry.reset().hidden if reset_hidden else carry.hidden,
                               memory=carry.reset().memory if reset_memory else carry.memory)
        bar.update(1)
        # log: one all-reduce and host sync per interval
        if ts.step % cfg.log_every == 0:
            now = time.perf_counter()
            train_loss = accelerator.reduce(loss_sum, reduction="mean").item() / (steps_since_log * cfg.grad_accum)
            if not math.isfinite(train_loss):
                raise SystemExit(f"error: non-finite training loss at step {ts.step}; the last good checkpoint "
                                 "is intact. Lower --lr or use --precision fp32.")
            t_log = time.perf_counter()  # after the host sync above: what follows is logging work only
            rate = n_bytes / (now - t_last)
            metrics = {"train/loss": train_loss, "train/bpc": train_loss / math.log(2),
                       "train/lr": optimizer.param_groups[0]["lr"], "train/grad_norm": grad_norm.item(),
                       "perf/bytes_per_s": rate * world, "perf/bytes_per_s_per_rank": rate,
                       "perf/step_time_s": (now - t_last) / steps_since_log,
                       "perf/data_fraction": data_s / (now - t_last), "perf/log_fraction": log_s / (now - t_last),
                       "perf/memory_bytes": memory_bytes(device), "train/epoch": ts.epoch}
            logger.scalars(metrics, ts.step)
            if cfg.optimizer == "lamb":
                inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
                logger.histogram("train/lamb_trust_ratio", inner.last_trust_ratios(), ts.step)
            bar.set_postfix(loss=f"{train_loss:.3f}", bpc=f"{train_loss / math.log(2):.3f}",
                            val=f"{val_bpc:.3f}", Bps=f"{rate * world:,.0f}")
            loss_sum.zero_()
            n_bytes, t_last, steps_since_log, data_s = 0, now, 0, 0.0
            log_s = time.perf_counter() - t_log  # falls in the next interval, which reports it
        # evaluate and save
        epoch_ended = loader.state_dict()["epoch"] > ts.epoch
        if (cfg.eval_every and ts.step % cfg.eval_every == 0) or epoch_ended:
            val_bpc = run_eval(ts.step)
            say(f"step {ts.step}: val bpc {val_bpc:.4f} (best {ts.best_val_bpc:.4f})")
        received = accelerator.reduce(torch.tensor(float(stop.received or 0), device=device), "max").item()
        if received:
            exit_reason = f"stopped by {signal.Signals(int(received)).name}"
            break
        if cfg.save_every and ts.step % cfg.save_every == 0:
            save()
    bar.close()

    if exit_reason == "finished" and (not cfg.eval_every or ts.step % cfg.eval_every):
        val_bpc = run_eval(ts.step)
    save()
    test_bpc = None
    if exit_reason == "finished" and cfg.test_at_end:
        best = checkpoint.best_checkpoint(run_dir) or checkpoint.complete_checkpoints(run_dir)[-1]
        accelerator.load_state(str(best))
        test_bpc = evaluate(accelerator, raw_model, open_split(cfg.data, "test"), cfg.test_streams, eval_bptt)
        logger.scalars({"test/bpc": test_bpc}, ts.step)
    summary = {"step": ts.step, "epoch": ts.epoch, "val_bpc": finite_or_none(val_bpc),
               "best_val_bpc": finite_or_none(ts.best_val_bpc), "best_step": ts.best_step,
               "test_bpc": test_bpc, "exit": exit_reason}
    say("summary: " + json.dumps(summary))
    if accelerator.is_main_process:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    logger.close()
    # Both calls: end_training alone aborts intermittently at exit under ZeRO (shared STACK-NOTES).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    # A late SIGTERM during interpreter shutdown (after our handler is gone) would kill a cleanly stopped rank.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    return 0
