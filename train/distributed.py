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
from torch.utils._python_dispatch import TorchDispatchMode

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


def prepare(accelerator: Accelerator, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """`accelerator.prepare(model, optimizer)`, undoing what building a DeepSpeed engine in fp16/bf16 does to
    a fresh model. Its FP16_UnfusedOptimizer (no ZeRO) copies the fp32 master weights from the module after
    casting it to 16 bits, so they start rounded, then calls the optimizer's step() once with zero gradients
    (deepspeed/runtime/fp16/unfused_optimizer.py, initialize_optimizer_states), which with weight decay
    moves LAMB's weights by up to the first learning rate (a relative 1 - lr) and leaves optimizer state;
    ZeRO's masters start rounded too. Measured on the tiny preset with the trainer's LAMB at its first
    learning rate (1.5e-4): the masters were up to 1.3e-4 off the
    model's weights (2.6e-4 of a tensor's norm) and LAMB held state for 39 tensors. Afterwards the masters
    hold the model's fp32 weights again (difference 0), the module their 16-bit copy, and the optimizer no
    state: the run starts where a DDP run starts."""
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    model, optimizer = accelerator.prepare(model, optimizer)
    if is_deepspeed(accelerator) and (model.fp16_enabled() or model.bfloat16_enabled()):
        from deepspeed.utils import safe_set_full_fp32_param

        masters = _unfused_masters(model)
        with torch.no_grad():
            for name, p in model.module.named_parameters():
                if masters is not None:
                    masters[id(p)].copy_(weights[name])
                else:  # ZeRO 1-2: each rank sets its partition
                    safe_set_full_fp32_param(p, weights[name].to(p.device))
                p.copy_(weights[name])
        if masters is not None:
            unwrap_optimizer(optimizer).state.clear()
    return model, optimizer


def check_same_weights(model: torch.nn.Module, when: str) -> str:
    """Refuse to go on unless every rank holds the same weights: one all-gather of a checksum per tensor (its
    sum and sum of squares in float64). Ranks that start from different weights train different models
    without a word under DeepSpeed's ZeRO-0 16-bit engine (nothing re-syncs them), and validation then
    averages over them. Every rank calls this (a collective); all raise together. Returns a line to log."""
    world = torch.distributed.get_world_size()
    params = [p.detach() for p in getattr(model, "module", model).parameters()]
    sums = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in params]).flatten()
    if torch.distributed.get_backend() == "gloo":
        sums = sums.cpu()
    gathered = [torch.empty_like(sums) for _ in range(world)]
    torch.distributed.all_gather(gathered, sums)
    differ = [rank for rank in range(1, world) if not torch.equal(gathered[rank], gathered[0])]
    if differ:
        ranks = f"rank{'s' if len(differ) > 1 else ''} {', '.join(map(str, differ))}"
        raise SystemExit(f"error: {when}, {ranks} hold{'' if len(differ) > 1 else 's'} other weights than "
                         f"rank 0: the ranks would train different models. Every rank must build the model "
                         f"from the same seed (train.build.build_model) and load the same checkpoint.")
    return f"weights: the same on all {world} ranks ({len(params)} tensors checked {when})"


def _unfused_masters(engine) -> dict[int, torch.Tensor] | None:
    """id(module parameter) -> its fp32 master weight under DeepSpeed's FP16_UnfusedOptimizer, else None."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    wrapper = engine.optimizer
    if not isinstance(wrapper, FP16_UnfusedOptimizer):
        return None
    return {id(p16): p32 for group16, group32 in zip(wrapper.fp16_groups, wrapper.fp32_groups)
            for p16, p32 in zip(group16, group32)}


def fp32_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights to write as model.safetensors: accelerate's state dict, except under DeepSpeed fp16/bf16,
    whose module holds 16-bit copies: there the fp32 master weights, which are what trains (and what
    --init_from and sharnn-export then read). Every rank calls this: under ZeRO the masters are gathered."""
    weights = accelerator.get_state_dict(model)
    if not is_deepspeed(accelerator) or not (model.fp16_enabled() or model.bfloat16_enabled()):
        return weights
    from deepspeed.utils import safe_get_full_fp32_param

    masters = _unfused_masters(model)
    for name, p in model.module.named_parameters():
        master = masters[id(p)] if masters is not None else safe_get_full_fp32_param(p)
        if master is None:
            raise SystemExit(f"error: DeepSpeed keeps no fp32 master weight for {name} here "
                             f"({type(model.optimizer).__name__}); use --precision fp32 or ZeRO stage 0-2")
        weights[name] = master.detach().to("cpu", torch.float32, copy=True)
    return weights


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


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def promised_lstm_dtype(precision: str, device_type: str, deepspeed: bool,
                        cpu_kernels: str = "fast") -> torch.dtype:
    """The dtype the README promises the LSTM computes in (its precision table). Under accelerate's autocast
    (one process, DDP) the LSTM computes in the autocast dtype on a CPU (oneDNN) and in float32 on a GPU
    (cuDNN's autocast wrapper would run it in fp16, see sharnn.model.lstm_dtype) and on a CPU under
    `--cpu_kernels torch` (the CUDA formulation); under DeepSpeed's bf16/fp16 engine in the module's 16-bit
    dtype (fp16 with DeepSpeed's loss scaling)."""
    dtype = DTYPES[precision]
    return dtype if deepspeed or (device_type == "cpu" and cpu_kernels != "torch") else torch.float32


class lstm_kernel_dtypes(TorchDispatchMode):
    """Records the floating dtypes of the tensors that the LSTM's kernels receive, as dispatched (after
    autocast's casts): cuDNN's and oneDNN's RNN ops, or, in torch's step-by-step fallback, its matrix
    products. `kernels` names the RNN ops seen."""

    RNN_OPS = ("_cudnn_rnn", "miopen_rnn", "mkldnn_rnn", "_thnn_fused_lstm_cell")
    MATMULS = ("aten.mm.", "aten.addmm.", "aten.linear.", "aten.matmul.")

    def __enter__(self):
        self.dtypes, self.kernels = set(), set()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        rnn = any(op in name for op in self.RNN_OPS)
        if rnn or name.startswith(self.MATMULS):
            if rnn:
                self.kernels.add(name)
            tensors = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a])]
            self.dtypes |= {t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()}
        return func(*args, **(kwargs or {}))


def check_precision(precision: str, device: torch.device, deepspeed: bool = False) -> str:
    """Run one of the model's LSTM blocks forward and backward on the device as the run will (under
    accelerate's autocast, or cast to 16 bits as DeepSpeed's engine casts the module), record the dtypes its
    kernels receive, and refuse a run whose LSTM would not compute in the precision the README promises
    (`promised_lstm_dtype`) or gets no finite gradient. Returns a line saying what runs.

    bf16/fp16 support for nn.LSTM differs between devices and CUDA/cuDNN/oneDNN versions: fail at start-up
    with a clear message rather than 20 minutes into a run. Under DeepSpeed on a CPU, also ask DeepSpeed's CPU
    accelerator, which refuses fp16 where oneDNN has no fp16 kernels (its engine would raise a bare
    "Type fp16 is not supported on your device" from inside accelerator.prepare).
    """
    from sharnn import ModelConfig
    from sharnn.model import Block

    if precision == "fp32":
        return "precision fp32"
    if deepspeed and device.type == "cpu" and precision == "fp16":
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():
            raise SystemExit("error: --precision fp16: DeepSpeed's CPU accelerator refuses fp16 on this CPU "
                             "(oneDNN has no fp16 kernels here: they need AVX512-FP16 or AMX-FP16). Use "
                             "--precision fp32, or bf16 with launch/cpu_ddp.yaml.")
    from sharnn.kernels import get_cpu_kernels

    dtype = DTYPES[precision]
    promised = promised_lstm_dtype(precision, device.type, deepspeed, get_cpu_kernels())
    block = Block(ModelConfig(d_model=64, d_ff=128, n_layer=1, attn="none", mem_len=8), use_attn=False)
    block = block.to(device, dtype if deepspeed else torch.float32)
    x = torch.randn(8, 2, 64, device=device, dtype=dtype if deepspeed else torch.float32, requires_grad=True)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=not deepspeed)
    try:
        with lstm_kernel_dtypes() as seen:
            with autocast:
                y, _ = block.recur(x, None)
            y.float().square().sum().backward()  # outside autocast, as the training step's backward
    except RuntimeError as e:
        raise SystemExit(f"error: --precision {precision}: nn.LSTM does not run in {precision} on "
                         f"{device.type} here ({str(e).splitlines()[0]}). Use --precision fp32"
                         f"{'' if precision == 'bf16' else ' or bf16'}.") from None
    computed = seen.dtypes or {y.dtype}
    if computed != {promised}:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in computed))
        raise SystemExit(f"error: --precision {precision}: the LSTM computed in {names} on {device.type} "
                         f"({', '.join(sorted(seen.kernels)) or 'no RNN kernel'}), where sharnn promises "
                         f"{str(promised).removeprefix('torch.')} (README, Precision): this torch/cuDNN "
                         "would train another model than the one asked for. Use --precision fp32, or report "
                         "the versions.")
    grad = block.lstm.weight_hh_l0.grad
    if grad is None or not torch.isfinite(grad).all() or not grad.count_nonzero():
        raise SystemExit(f"error: --precision {precision}: the LSTM's weights got no finite, non-zero "
                         f"gradient on {device.type} in this precision. Use --precision fp32.")
    kernel = ("cuDNN" if any("cudnn" in k for k in seen.kernels) else
              "oneDNN" if any("mkldnn" in k for k in seen.kernels) else "torch's step-by-step LSTM")
    line = (f"precision {precision}: LSTM forward/backward checked on {device.type}: it computes in "
            f"{str(promised).removeprefix('torch.')} ({kernel})")
    if device.type == "cpu" and not native_cpu_matmul(precision):
        line += (f"\nwarning: this CPU has no {precision} matrix instructions (avx512_bf16/AMX): {precision} "
                 f"runs emulated, typically 100x slower than fp32 here. Use --precision fp32 on "
                 "this machine.")
    if device.type == "cuda" and "cuDNN" != kernel:
        line += (f"\nwarning: the LSTM runs torch's step-by-step kernel on this GPU in {precision}, several "
                 "times slower than cuDNN's")
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

    def agreed(self, accelerator: Accelerator, step: int = 0, every: int = 1) -> str | None:
        """The name of the signal any rank received, else None. One process reads its own flag. Several
        ranks agree through an all-reduce and a host sync, so they do it only at steps that are multiples of
        `every` (the same steps on every rank; the loop passes its log interval) and return None between."""
        if accelerator.num_processes == 1:
            return signal.Signals(self.received).name if self.received else None
        if step % every:
            return None
        flag = torch.tensor(float(self.received or 0), device=accelerator.device)
        received = int(accelerator.reduce(flag, "max").item())
        return signal.Signals(received).name if received else None

    @staticmethod
    def ignore_from_now() -> None:
        """A late SIGTERM during interpreter shutdown (after our handler is gone) would kill a cleanly
        stopped rank."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
