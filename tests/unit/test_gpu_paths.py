"""The paths that differ only on a GPU, each checked here on the CPU with the smallest stand-in that reaches
the code: CPU launch configs on a machine that has GPUs, DeepSpeed's fp16 gradient norm and its initial
optimizer step, the non-finite guard and the stop flag (the host syncs of whole loop iterations are counted in
tests/integration/test_host_sync.py), pinned batches, the causal-mask cache, ONNX export of a model not in
fp32 on the CPU. Tests marked `gpu` need a CUDA device and run through scripts/gpu_smoke.sh (`pytest -m
gpu`)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import REPO, free_port, tiny_config

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ------------------------------------------------------------------------------------ CPU launch configs
def worker_env(config: str) -> dict[str, str]:
    """The environment accelerate's launcher gives the training processes of `accelerate launch
    --config_file launch/CONFIG -m train` (its own argument handling; nothing is started)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(REPO / "launch" / config),
                                               "--main_process_port", "0", "-m", "train"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before its DeepSpeed launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    assert args.multi_gpu
    return prepare_multi_gpu_env(args)


@pytest.fixture
def gpu_host(monkeypatch):
    """torch reports two CUDA devices, as on a GPU machine, unless CUDA_VISIBLE_DEVICES hides them (as CUDA
    itself does)."""
    def visible() -> int:
        return min(2, len(torch.cuda._parse_visible_devices()))  # 64 ids when the variable is not set

    monkeypatch.setattr(torch.cuda, "device_count", visible)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible() > 0)


@pytest.mark.parametrize("config", ["cpu_ddp.yaml", "cpu_deepspeed.yaml"])
def test_cpu_configs_train_on_the_cpu_of_a_gpu_machine(config, gpu_host, monkeypatch, fresh_accelerate_state):
    """Before: the processes of launch/cpu_*.yaml saw the GPUs and accelerate put them there (NCCL, rank 1 on
    a cuda:1 that may not exist). Now the config hides the GPUs from its processes and the trainer, told so,
    builds gloo on the CPU (DeepSpeed included)."""
    from train.distributed import build_accelerator, cpu_requested

    env = worker_env(config)
    for key in ("CUDA_VISIBLE_DEVICES", "ACCELERATE_USE_CPU", "ACCELERATE_USE_DEEPSPEED", "DS_ACCELERATOR",
                "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "CUDA_")):
            monkeypatch.setenv(key, value)
    # rank 0 of a world of 1, as torchrun would start it
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "0")
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(REPO)  # ds_config.json is named relative to the repository root
    assert cpu_requested() and torch.cuda.device_count() == 0
    accelerator = build_accelerator("fp32")
    assert accelerator.device.type == "cpu"
    assert torch.distributed.get_backend() == "gloo"
    if config == "cpu_deepspeed.yaml":
        from deepspeed.accelerator import get_accelerator

        assert os.environ["DS_ACCELERATOR"] == "cpu" and get_accelerator().device_name() == "cpu"


def test_a_cpu_request_wins_over_visible_gpus(monkeypatch, fresh_accelerate_state):
    """ACCELERATE_USE_CPU=1 on a machine whose GPUs stay visible: DDP goes to the CPU (before, CUDA's
    presence alone decided); DeepSpeed, which accelerate cannot keep off visible GPUs, stops with the fix."""
    from train.distributed import build_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    accelerator = build_accelerator("fp32")
    assert accelerator.device.type == "cpu" and torch.distributed.get_backend() == "gloo"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(SystemExit, match="CUDA_VISIBLE_DEVICES=-1"):
        build_accelerator("fp32")


# ------------------------------------------------------------------------------------ causal mask, ONNX
def test_causal_mask_cache_holds_one_mask_per_device_whatever_the_lengths():
    """Random segment lengths and a memory growing byte by byte (generation) used to fill a 32-entry cache
    keyed on (T, mem_len); now every mask is a view of the largest one of its device, and equal to the
    mask built directly."""
    from sharnn import kernels

    kernels._CAUSAL_MASKS.clear()
    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    lengths = [(int(t), int(m)) for t, m in torch.randint(1, 40, (100, 2), generator=g)]
    lengths += [(1, m) for m in range(0, 60, 3)]  # generation: one byte at a time, the memory growing
    for T, mem_len in lengths:
        mask = kernels.causal_mask(T, mem_len, cpu)
        direct = torch.cat([torch.ones(T, mem_len, dtype=torch.bool),
                            torch.ones(T, T, dtype=torch.bool).tril()], dim=1)
        assert torch.equal(mask, direct), (T, mem_len)
    assert list(kernels._CAUSAL_MASKS) == [cpu]
    largest = kernels._CAUSAL_MASKS[cpu]
    assert largest.shape == (39, 57 + 39)  # the largest T and the largest memory: ~4 kB, not 32 masks
    assert kernels.causal_mask(5, 7, cpu).untyped_storage().data_ptr() == \
        largest.untyped_storage().data_ptr()  # a view: nothing new allocated


@pytest.mark.gpu
@needs_gpu
def test_onnx_export_of_a_cuda_model(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from sharnn import SHARNN
    from train.export import export_onnx

    model = SHARNN(tiny_config(mem_len=6)).cuda()
    assert "onnxruntime matches PyTorch" in export_onnx(model, tmp_path / "model.onnx")
    assert next(model.parameters()).is_cuda


# ------------------------------------------------------------------------ DeepSpeed fp16: norm, masters
def deepspeed_engine(monkeypatch, tmp_path, precision: str, model: torch.nn.Module, optimizer):
    """A real DeepSpeed engine (ZeRO-0, world size 1, gloo) built by the trainer's own path:
    build_accelerator, fill_deepspeed_config, train.distributed.prepare. DeepSpeed refuses fp16 on a CPU
    without fp16 instructions (its CPU accelerator asks oneDNN): that check is lifted; the 16-bit arithmetic
    then runs emulated, slowly, which tiny sizes allow."""
    import json

    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    from train.distributed import build_accelerator, fill_deepspeed_config, prepare

    monkeypatch.setattr(CPU_Accelerator, "is_fp16_supported", lambda self: True)
    ds = json.loads((REPO / "ds_config.json").read_text())
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    for key, value in {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE":
                       str(tmp_path / "ds.json"), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    accelerator = build_accelerator(precision)
    fill_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, batch_size=1, grad_accum=1,
                          world_size=1, clip=0.0, precision=precision, optimizer="lamb")
    engine, optimizer = prepare(accelerator, model, optimizer)
    return accelerator, engine, optimizer


class SumOfSquares(torch.nn.Module):
    """A tiny SHARNN's parameters with a forward that needs no fp16 LSTM (which needs fp16 instructions):
    factor * 1e-3 * sum(p^2), whose gradient 2e-3 * factor * p is known without DeepSpeed."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, factor: torch.Tensor) -> torch.Tensor:
        return factor.float() * 1e-3 * sum((p.float() ** 2).sum() for p in self.net.parameters())


def test_deepspeed_fp16_starts_from_the_fp32_weights_steps_true_gradients_and_saves_fp32_masters(
        monkeypatch, tmp_path, fresh_accelerate_state):
    """One engine (DeepSpeed keeps process-group state across engines in one process), fp16, no ZeRO, LAMB:
    - building it rounded the fp32 master weights to fp16 and stepped LAMB once with zero gradients (weight
      decay moves the weights); now the masters equal the model's weights before, the optimizer has no state;
    - DeepSpeed 0.19.8 did not scale the loss for its unfused fp16 optimizer, whose step divides the
      gradients by the scale: LAMB got them 65536x too small. Now LAMB gets the true gradients, the step
      returns their true norm, and None for a step skipped on overflow (there was none to skip);
    - the checkpoint's weights were the fp16 module's; fp32_state_dict is now the masters."""
    from sharnn import SHARNN
    from sharnn.optim import LAMB
    from train.distributed import fp32_state_dict, unwrap_optimizer
    from train.step import NonFiniteGuard, backward_and_step

    torch.manual_seed(0)
    model = SumOfSquares(SHARNN(tiny_config()))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = LAMB(model.parameters(), lr=0.1, weight_decay=0.1)
    accelerator, engine, optimizer = deepspeed_engine(monkeypatch, tmp_path, "fp16", model, optimizer)
    wrapper = engine.optimizer
    assert type(wrapper).__name__ == "FP16_UnfusedOptimizer"
    masters = dict(zip([n for n, _ in engine.module.named_parameters()],
                       [p for group in wrapper.fp32_groups for p in group]))
    for name, value in before.items():
        assert torch.equal(masters[name], value), name  # exactly the fp32 weights, not a rounded copy
        assert torch.equal(dict(engine.module.named_parameters())[name], value.half()), name
    lamb = unwrap_optimizer(optimizer)
    assert not lamb.state  # no state from the zero-gradient step
    saved = fp32_state_dict(accelerator, engine)
    assert all(saved[name].dtype == torch.float32 and torch.equal(saved[name], value)
               for name, value in before.items())

    seen = []  # the norm of the gradients LAMB steps with
    lamb_step = lamb.step
    monkeypatch.setattr(lamb, "step", lambda *a, **k: (seen.append(torch.nn.utils.get_total_norm(
        [p.grad for group in lamb.param_groups for p in group["params"]]).item()), lamb_step(*a, **k))[1])
    guard = NonFiniteGuard(accelerator.device)
    assert wrapper.loss_scale == 2.0**16
    params = list(engine.module.parameters())
    want = 2e-3 * torch.linalg.vector_norm(torch.cat([p.detach().float().flatten() for p in params])).item()
    norm = backward_and_step(accelerator, engine, optimizer, engine(torch.tensor(1.0)), 0.0, "stop", 1, guard)
    assert norm is not None and float(norm) == pytest.approx(want, rel=1e-2)
    assert seen == [pytest.approx(want, rel=1e-2)]
    # an overflow: the scaled gradients do not fit in fp16; DeepSpeed skips the step and lowers the scale
    weights = [p.detach().clone() for p in params]
    assert backward_and_step(accelerator, engine, optimizer, engine(torch.tensor(1e3)), 0.0, "stop", 2,
                             guard) is None
    assert all(torch.equal(a, b) for a, b in zip(weights, engine.module.parameters())) and len(seen) == 1
    guard.check()  # an fp16 overflow is the loss scaler's business, not a non-finite step


def test_the_loss_scale_is_the_one_before_the_step():
    """A fake engine pinning the rule: the unfused optimizer's loss goes in scaled and its norm comes out
    divided by the scale of that backward, even when its step() raises the scale (every loss_scale_window
    clean steps)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    from train.step import _deepspeed_backward_and_step

    class Unfused(FP16_UnfusedOptimizer):
        def __init__(self):  # none of DeepSpeed's set-up: only the loss scale
            self.custom_loss_scaler = False
            self.loss_scale_config = SimpleNamespace(cur_scale=2.0**16)

    class Engine:
        optimizer = Unfused()
        applied = True

        def set_gradient_accumulation_boundary(self, boundary):
            pass

        def backward(self, loss):
            self.loss = float(loss)

        def zero_optimization_stage(self):
            return 0

        def fp16_enabled(self):
            return True

        def bfloat16_enabled(self):
            return False

        def step(self):
            self.norm = 3.0 * self.loss  # the norm of the scaled gradients, of a loss of 1 with a norm of 3
            self.optimizer.loss_scale *= 2  # then a clean window ends: the scale goes up

        def was_step_applied(self):
            return self.applied

        def get_global_grad_norm(self):
            return self.norm if self.applied else float("inf")

    class Accelerator:
        sync_gradients = True

    engine = Engine()
    assert float(_deepspeed_backward_and_step(Accelerator(), engine, torch.tensor(1.0), 1, None)) == 3.0
    assert engine.loss == 2.0**16
    assert float(_deepspeed_backward_and_step(Accelerator(), engine, torch.tensor(1.0), 2, None)) == 3.0
    assert engine.loss == 2.0**17
    engine.applied = False
    assert _deepspeed_backward_and_step(Accelerator(), engine, torch.tensor(1.0), 3, None) is None


# -------------------------------------------------------- the non-finite guard, stop flag, pinned batches
def test_a_nonfinite_norm_is_reported_at_the_next_check_with_its_step():
    from train.step import NonFiniteError, NonFiniteGuard

    guard = NonFiniteGuard(torch.device("cpu"))
    guard.record(torch.tensor(2.0), 7)
    guard.check()
    guard.record(torch.tensor(float("nan")), 8)
    guard.record(torch.tensor(float("inf")), 9)
    with pytest.raises(NonFiniteError, match=r"\(nan\) at step 8"):
        guard.check()


def test_the_stop_flag_is_agreed_on_every_n_steps_only(monkeypatch):
    """Several ranks all-reduce the flag at the steps that are multiples of N (the log interval): the same
    steps on every rank, so they still stop together; one process reads its own flag at every step."""
    from train.distributed import StopSignal

    reduced = []

    class Ranks:
        num_processes, device = 2, torch.device("cpu")

        def reduce(self, tensor, reduction):
            reduced.append(reduction)
            return tensor

    monkeypatch.setattr("signal.signal", lambda *args: None)  # not this test process's handlers
    stop = StopSignal()
    assert [stop.agreed(Ranks(), step, 5) for step in range(1, 11)] == [None] * 10 and len(reduced) == 2
    stop.received = 15  # SIGTERM arrives at step 11
    assert [stop.agreed(Ranks(), step, 5) for step in range(11, 16)] == [None] * 4 + ["SIGTERM"]
    assert len(reduced) == 3
    one = Ranks()
    one.num_processes = 1
    assert stop.agreed(one, 11, 5) == "SIGTERM" and len(reduced) == 3


def test_batches_go_to_a_gpu_through_pinned_memory(monkeypatch):
    """The path to CUDA (a stand-in: no GPU here): pin, then a non-blocking copy. Before: a non-blocking copy
    from pageable memory. To the CPU nothing is pinned."""
    from train.step import to_device

    events = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: (events.append("pin"), self)[1])
    monkeypatch.setattr(torch.Tensor, "to",
                        lambda self, device, non_blocking=False: (events.append((str(device), non_blocking)),
                                                                  self)[1])
    batch = torch.zeros(2, 8, dtype=torch.int64)
    to_device(batch, torch.device("cuda", 0))
    assert events == ["pin", ("cuda:0", True)]
    events.clear()
    to_device(batch, torch.device("cpu"))
    assert events == [("cpu", True)]


@pytest.mark.gpu
@needs_gpu
def test_pinned_batches_on_a_real_gpu():
    from train.step import to_device

    seen = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        seen.append(self.is_pinned())
        return real_to(self, *args, **kwargs)

    batch = torch.randint(0, 256, (4, 64))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "to", spy)
        out = to_device(batch, torch.device("cuda"))
    assert seen == [True] and torch.equal(out.cpu(), batch)


@pytest.mark.gpu
@needs_gpu
def test_sliced_causal_masks_give_sdpa_the_same_attention_on_a_gpu():
    """The mask is a strided view of a larger one: SDPA on CUDA must read it as the contiguous mask."""
    import torch.nn.functional as F

    from sharnn.model import causal_mask

    torch.manual_seed(0)
    causal_mask(100, 300, torch.device("cuda"))  # a larger mask first: the next is a strided view
    q, k, v = (torch.randn(2, 1, n, 32, device="cuda") for n in (40, 240, 240))
    mask = causal_mask(40, 200, torch.device("cuda"))
    assert not mask.is_contiguous()
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.contiguous())
    assert torch.allclose(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), want, atol=1e-5)
