"""The paths that differ only on a GPU (issue 18, "Fails only on a GPU"), each checked here on the CPU with
the smallest stand-in that reaches the code: CPU launch configs on a machine that has GPUs, DeepSpeed's
fp16 gradient norm and its initial optimizer step, host syncs per step, pinned batches, the causal-mask
cache, ONNX export of a model not in fp32 on the CPU. Tests marked `gpu` need a CUDA device and run through
scripts/gpu_smoke.sh (`pytest -m gpu`)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import REPO, free_port

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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
    from sharnn import model as model_module

    model_module._CAUSAL_MASKS.clear()
    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    lengths = [(int(t), int(m)) for t, m in torch.randint(1, 40, (100, 2), generator=g)]
    lengths += [(1, m) for m in range(0, 60, 3)]  # generation: one byte at a time, the memory growing
    for T, mem_len in lengths:
        mask = model_module.causal_mask(T, mem_len, cpu)
        direct = torch.cat([torch.ones(T, mem_len, dtype=torch.bool),
                            torch.ones(T, T, dtype=torch.bool).tril()], dim=1)
        assert torch.equal(mask, direct), (T, mem_len)
    assert list(model_module._CAUSAL_MASKS) == [cpu]
    largest = model_module._CAUSAL_MASKS[cpu]
    assert largest.shape == (39, 57 + 39)  # the largest T and the largest memory: ~4 kB, not 32 masks
    assert model_module.causal_mask(5, 7, cpu).untyped_storage().data_ptr() == \
        largest.untyped_storage().data_ptr()  # a view: nothing new allocated


@pytest.mark.slow  # ~20 s: a real export and onnxruntime check
def test_onnx_export_of_a_model_that_is_not_cpu_float32(tmp_path):
    """export_onnx traces with CPU float32 inputs: a bf16 model (as a CUDA model) failed; it now exports a
    CPU float32 copy and leaves the caller's model as it was."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from sharnn import SHARNN, ModelConfig
    from train.export import export_onnx

    torch.manual_seed(0)
    model = SHARNN(ModelConfig(d_model=16, d_ff=32, n_layer=2, mem_len=6)).to(torch.bfloat16)
    assert "onnxruntime matches PyTorch" in export_onnx(model, tmp_path / "model.onnx")
    assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.gpu
@needs_gpu
def test_onnx_export_of_a_cuda_model(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from sharnn import SHARNN, ModelConfig
    from train.export import export_onnx

    model = SHARNN(ModelConfig(d_model=16, d_ff=32, n_layer=2, mem_len=6)).cuda()
    assert "onnxruntime matches PyTorch" in export_onnx(model, tmp_path / "model.onnx")
    assert next(model.parameters()).is_cuda
