"""Device and distributed setup: the Accelerator, DeepSpeed's config, the precision check, signals.

Everything here is policy about *where* the model runs; the model (sharnn/) never sees it. The trainer,
`sharnn-eval` and `sharnn-export` build their Accelerator here, so a launch that works for one works for all.
"""

from __future__ import annotations

import datetime
import os
import signal

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

ACCEL_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def build_accelerator(precision: str, timeout_s: int = 600, grad_accum: int = 1,
                      project_dir: str | None = None, log_with: str | None = None) -> Accelerator:
    """An Accelerator for this launch (one process, DDP or DeepSpeed; CPU or CUDA), checked for the traps
    that make ranks train unsynchronised. Under DeepSpeed call `fill_deepspeed_config` next."""
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    on_cpu = cpu_requested() or not torch.cuda.is_available()
    if on_cpu and use_deepspeed:
        if torch.cuda.is_available():
            # accelerate has no CPU switch for DeepSpeed: it places the engine on cuda:LOCAL_RANK whenever
            # torch sees a GPU (accelerate/state.py, PartialState._prepare_backend and set_device)
            raise SystemExit("error: a CPU DeepSpeed launch on a machine whose GPUs are visible: accelerate "
                             "would put DeepSpeed on the GPUs. Hide them with CUDA_VISIBLE_DEVICES=-1 "
                             "(launch/cpu_deepspeed.yaml does, through gpu_ids) or use "
                             "launch/deepspeed.yaml.")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's ops and communication on the CPU too
    # On CPU, DDP needs cpu=True (else 2 unsynced processes) and DeepSpeed needs an explicit gloo group.
    launched_by_torchrun = "LOCAL_RANK" in os.environ
    pg = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=timeout_s),
                                **({"backend": "gloo"} if on_cpu and launched_by_torchrun else {}))
    try:
        accelerator = Accelerator(cpu=on_cpu and not use_deepspeed,
                                  mixed_precision=ACCEL_PRECISION[precision],
                                  gradient_accumulation_steps=grad_accum, log_with=log_with,
                                  project_dir=project_dir, kwargs_handlers=[pg])
    except torch.distributed.DistError as e:
        raise SystemExit(f"error: rank {os.environ.get('RANK', '?')}: not every rank joined the process "
                         f"group within --timeout_s={timeout_s}s: a process on another node failed at "
                         f"start-up (its log names the cause) or never started. ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]})") from None
    if precision == "fp16" and accelerator.device.type == "cpu" and not use_deepspeed:
        # accelerate makes fp16 autocast and its GradScaler on GPUs only: on CPU it would train in fp32
        raise SystemExit("error: --precision fp16 on CPU: accelerate runs fp16 (autocast with loss scaling) "
                         "on GPUs only, so this run would silently train in fp32. On CPU use --precision "
                         "bf16 or fp32, or DeepSpeed's fp16 (launch/cpu_deepspeed.yaml).")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise SystemExit(f"error: the launcher started {launched} processes but accelerate sees world size "
                         f"{accelerator.num_processes} ({accelerator.distributed_type}): the ranks would "
                         "train unsynchronised. On a machine without GPUs launch with ACCELERATE_USE_CPU=1 "
                         "or use launch/cpu_ddp.yaml.")
    return accelerator


def cpu_requested() -> bool:
    """Whether the launch asks for the CPU even on a machine with GPUs: ACCELERATE_USE_CPU (accelerate's
    --cpu, the simple launcher's use_cpu) or CUDA_VISIBLE_DEVICES hiding every GPU (empty, or a negative first
    id, which ends CUDA's list). launch/cpu_*.yaml hide them through `gpu_ids`: accelerate's multi-GPU and
    DeepSpeed launchers do not pass a YAML's `use_cpu` on, but turn `gpu_ids` into CUDA_VISIBLE_DEVICES
    (accelerate/utils/launch.py, prepare_multi_gpu_env and prepare_deepspeed_cmd_env)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return False
    first = visible.split(",")[0].strip()
    return first == "" or first.startswith("-")


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def fill_deepspeed_config(ds: dict, *, batch_size: int, grad_accum: int, world_size: int, clip: float,
                          precision: str, optimizer: str) -> None:
    """Fill the "auto" values of ds_config.json from the run's config; refuse values that disagree and the
    combinations that would silently train something else."""
    ours = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": grad_accum,
            "train_batch_size": batch_size * grad_accum * world_size, "gradient_clipping": clip}
    for key, value in ours.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise SystemExit(f"error: the DeepSpeed config sets {key}={ds[key]} but the run's config says "
                             f"{value}: set it to \"auto\" in ds_config.json and choose it with --{key}")
    for name in ("bf16", "fp16"):
        section = ds.setdefault(name, {})
        want = precision == name
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = want
        elif section["enabled"] != want:
            raise SystemExit(f"error: the DeepSpeed config has {name}.enabled={section['enabled']} but "
                             f"--precision is {precision}: set it to \"auto\"")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        raise SystemExit("error: ZeRO stage 3 is not supported: it partitions the parameters, which a ~54M "
                         "parameter model never needs, and evaluation/sampling run on one rank. "
                         "Use stage 0-2.")
    if optimizer == "lamb" and (stage > 0 or precision == "bf16"):
        raise SystemExit(
            f"error: LAMB with DeepSpeed {'ZeRO stage ' + str(stage) if stage else 'bf16'}: DeepSpeed hands "
            "the optimizer flat partitions that cut across parameter tensors, so LAMB's per-tensor trust "
            "ratios would silently change. Working alternatives: DeepSpeed ZeRO stage 0 in fp32/fp16 with "
            "LAMB; DDP (launch/ddp.yaml) with LAMB in any precision; or --optimizer adamw with any "
            "ZeRO stage.")


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The client optimizer inside accelerate's wrapper and, under DeepSpeed fp16, DeepSpeed's
    FP16_UnfusedOptimizer (two levels)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def check_optimizer_sees_tensors(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
    """LAMB's trust ratio is per tensor: refuse any wrapper that hands it other shapes than the model's."""
    seen = sorted(tuple(p.shape) for g in unwrap_optimizer(optimizer).param_groups for p in g["params"])
    want = sorted(tuple(p.shape) for p in model.parameters())
    if seen != want:
        raise SystemExit("error: the optimizer was handed flattened partitions, not the model's tensors; "
                         "LAMB needs the real tensors. Use DDP, DeepSpeed ZeRO-0 in fp32/fp16, or "
                         "--optimizer adamw.")


def native_cpu_matmul(precision: str) -> bool:
    """Whether this CPU multiplies bf16/fp16 matrices in hardware (avx512_bf16 or AMX). Without it, oneDNN
    emulates them: measured on a 2-core AMD EPYC without avx512, a 2048^2 bf16 product ran at 0.3 GFLOP/s
    against 120 in fp32."""
    cpu = torch.cpu
    if precision == "fp32":
        return True
    if precision == "bf16":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    else:
        probes = ("_is_amx_fp16_supported",)
    return any(getattr(cpu, name, lambda: False)() for name in probes)


def check_precision(precision: str, device: torch.device) -> str:
    """Run a small LSTM forward and backward in the chosen precision; return a line saying what runs.

    bf16/fp16 support for nn.LSTM differs between devices and CUDA/oneDNN versions: fail at start-up with a
    clear message rather than 20 minutes into a run.
    """
    if precision == "fp32":
        return "precision fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    lstm = torch.nn.LSTM(64, 64).to(device)
    x = torch.randn(8, 2, 64, device=device)
    try:
        with torch.autocast(device.type, dtype=dtype):
            y, _ = lstm(x.to(dtype))
        y.float().sum().backward()
    except RuntimeError as e:
        raise SystemExit(f"error: --precision {precision}: nn.LSTM does not run in {precision} on "
                         f"{device.type} here ({str(e).splitlines()[0]}). Use --precision fp32"
                         f"{'' if precision == 'bf16' else ' or bf16'}.") from None
    line = f"precision {precision}: LSTM forward/backward checked on {device.type} (output {y.dtype})"
    if device.type == "cpu" and not native_cpu_matmul(precision):
        line += (f"\nwarning: this CPU has no {precision} matrix instructions (avx512_bf16/AMX): {precision} "
                 f"runs emulated, typically 100x slower than fp32 here. Use --precision fp32 on "
                 "this machine.")
    return line


class StopSignal:
    """SIGTERM/SIGINT set a flag; `agreed()` tells every rank at once, so all finish the step, save and
    exit."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def agreed(self, accelerator: Accelerator) -> str | None:
        """The name of the signal any rank received, else None (one tiny all-reduce)."""
        flag = torch.tensor(float(self.received or 0), device=accelerator.device)
        received = int(accelerator.reduce(flag, "max").item())
        return signal.Signals(received).name if received else None

    @staticmethod
    def ignore_from_now() -> None:
        """A late SIGTERM during interpreter shutdown (after our handler is gone) would kill a cleanly
        stopped rank."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
