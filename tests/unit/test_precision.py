"""Which precision each part of the model computes in (README, Precision), checked on the CPU with stand-ins
for the CUDA paths: torch's autocast wrapper for cuDNN RNNs casts to fp16 whatever dtype autocast asks for,
so under CUDA autocast the LSTM must run outside autocast, in float32; the start-up check reads the dtypes
the LSTM's kernels really receive and refuses a run whose LSTM would compute in another precision."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharnn.model import Block
from tests.helpers import tiny_config


class FakeCuda(torch.Tensor):
    """A CPU tensor that reports a CUDA device: enough for code that branches on `x.device.type`."""

    @property
    def device(self):
        return torch.device("cuda")


class RecordingLSTM(nn.LSTM):
    """nn.LSTM that records what it receives: the autocast state for CUDA and the dtypes of input, weights
    and carried state."""

    def forward(self, x, hx=None):
        self.seen = {"cuda_autocast": torch.is_autocast_enabled("cuda"), "input": x.dtype,
                     "weights": self.weight_ih_l0.dtype,
                     "state": None if hx is None else (hx[0].dtype, hx[1].dtype)}
        w = self.weight_ih_l0.dtype  # the real LSTM on the CPU data, its result in the dtype it was given
        plain = [t.as_subclass(torch.Tensor).to(w) for t in ([x] if hx is None else [x, *hx])]
        out, (h, c) = super().forward(plain[0], None if hx is None else tuple(plain[1:]))
        return out.to(x.dtype), (h.to(x.dtype), c.to(x.dtype))


@pytest.fixture
def cuda_autocast_bf16():
    """CUDA autocast in bf16, as accelerate's `--precision bf16` sets it on a GPU (thread-local flags; they
    need no GPU). Tensors must still report a CUDA device (FakeCuda) for the model to take its CUDA branch."""
    enabled, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    yield
    torch.set_autocast_enabled("cuda", enabled)
    torch.set_autocast_dtype("cuda", dtype)


def recording_block() -> Block:
    block = Block(tiny_config(n_layer=1, attn="none"), use_attn=False)
    lstm = RecordingLSTM(16, 16)
    lstm.load_state_dict(block.lstm.state_dict())
    block.lstm = lstm
    return block


@pytest.mark.parametrize("carried", [False, True])
def test_under_cuda_autocast_the_lstm_runs_outside_it_in_float32(cuda_autocast_bf16, carried):
    """Before: Block.recur cast the LSTM's input and state to bf16 and called nn.LSTM inside CUDA autocast,
    whose cuDNN wrapper would have run it in fp16 with no loss scaler. Now nn.LSTM gets autocast off, and
    input, weights and state in float32 (the state too when it was carried in bf16)."""
    block = recording_block()
    x = torch.randn(5, 2, 16).as_subclass(FakeCuda)
    hidden = (torch.zeros(1, 2, 16, dtype=torch.bfloat16).as_subclass(FakeCuda),) * 2 if carried else None
    out, (h, c) = block.recur(x, hidden)
    seen = block.lstm.seen
    assert seen["cuda_autocast"] is False
    assert seen["input"] == seen["weights"] == torch.float32
    assert seen["state"] == ((torch.float32, torch.float32) if carried else None)
    assert h.dtype == c.dtype == torch.float32  # the carried state stays float32 from segment to segment
    assert torch.is_autocast_enabled("cuda")  # and the rest of the model is still under autocast


@pytest.fixture
def cpu_kernels():
    """Set sharnn's CPU kernels for one test: `cpu_kernels(name)`; the previous setting comes back after."""
    from sharnn import kernels

    previous = kernels.get_cpu_kernels()
    yield kernels.set_cpu_kernels
    kernels.set_cpu_kernels(previous)


@pytest.mark.parametrize("setting", ["fast", "fast-masks", "fast-attention"])
def test_under_cpu_autocast_the_lstm_computes_in_bf16(cpu_kernels, setting):
    """On a CPU, with the CPU's own kernels, autocast reaches oneDNN's LSTM (aten.mkldnn_rnn_layer) with its
    weights cast: bf16 really computes in bf16, as the README says."""
    from train.distributed import lstm_kernel_dtypes

    cpu_kernels(setting)
    block = Block(tiny_config(n_layer=1, attn="none"), use_attn=False)
    x = torch.randn(5, 2, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), lstm_kernel_dtypes() as seen:
        out, _ = block.recur(x, None)
    assert seen.dtypes == {torch.bfloat16}


@pytest.mark.parametrize("carried", [False, True])
def test_under_cpu_autocast_with_torch_s_kernels_the_lstm_runs_in_float32_as_on_cuda(cpu_kernels, carried):
    """Before: `--cpu_kernels torch`, the CUDA formulation on a CPU, ran the LSTM in bf16 under bf16
    autocast (oneDNN), where a GPU runs it outside autocast in float32: the CPU side-by-side benchmark's
    torch/bf16 measured a model no GPU trains. Now its LSTM kernels receive float32 only, with autocast off
    (the carried state too), while the rest of the block stays under autocast."""
    from train.distributed import lstm_kernel_dtypes

    cpu_kernels("torch")
    block = Block(tiny_config(n_layer=1, attn="none"), use_attn=False)
    x = torch.randn(5, 2, 16, requires_grad=True)
    hidden = (torch.zeros(1, 2, 16, dtype=torch.bfloat16),) * 2 if carried else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with lstm_kernel_dtypes() as seen:
            out, (h, c) = block.recur(x, hidden)
        assert torch.is_autocast_enabled("cpu")
    assert seen.dtypes == {torch.float32}
    assert h.dtype == c.dtype == torch.float32
    out.float().sum().backward()
    assert torch.isfinite(block.lstm.weight_hh_l0.grad).all()


def test_the_precision_check_promises_float32_for_torch_s_kernels_on_a_cpu(cpu_kernels):
    """The start-up check follows the setting: with `--cpu_kernels torch` it checks for (and reports) a
    float32 LSTM under bf16, as on a GPU; with "fast", oneDNN's bf16 LSTM."""
    from train import distributed

    cpu_kernels("torch")
    assert "computes in float32" in distributed.check_precision("bf16", torch.device("cpu"))
    cpu_kernels("fast")
    assert "computes in bfloat16" in distributed.check_precision("bf16", torch.device("cpu"))


def test_the_precision_check_refuses_an_lstm_that_computes_in_another_dtype(monkeypatch, cpu_kernels):
    """The start-up check compares what the LSTM's kernels received with what the README promises. Stand-in:
    an nn.LSTM that computes in fp16 whatever it is given, as cuDNN's autocast wrapper does under bf16. With
    the CPU's own kernels, which promise bf16 (set here: an earlier test may leave another setting)."""
    import train.distributed as distributed

    cpu_kernels("fast")

    def as_fp16(self, x, hx=None):
        with torch.autocast("cpu", enabled=False):
            h0 = x.new_zeros(1, x.shape[1], self.hidden_size, dtype=torch.half)
            hx = (h0, h0) if hx is None else tuple(t.half() for t in hx)
            out, h, c = torch._VF.lstm(x.half(), hx, [w.half() for w in self._flat_weights], True, 1, 0.0,
                                       self.training, False, False)
        return out.to(x.dtype), (h.to(x.dtype), c.to(x.dtype))

    assert distributed.check_precision("bf16", torch.device("cpu")).startswith("precision bf16")
    monkeypatch.setattr(nn.LSTM, "forward", as_fp16)
    with pytest.raises(SystemExit, match=r"error: --precision bf16: the LSTM computed in float16 .*"
                                         r"promises bfloat16"):
        distributed.check_precision("bf16", torch.device("cpu"))


def test_promised_lstm_precision_per_device_and_setup():
    from train.distributed import promised_lstm_dtype

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    assert promised_lstm_dtype("fp32", "cuda", deepspeed=False) == f32
    assert promised_lstm_dtype("bf16", "cuda", deepspeed=False) == f32  # never cuDNN's fp16 wrapper
    assert promised_lstm_dtype("fp16", "cuda", deepspeed=False) == f32
    assert promised_lstm_dtype("bf16", "cpu", deepspeed=False) == bf16
    assert promised_lstm_dtype("bf16", "cpu", deepspeed=False, cpu_kernels="torch") == f32  # as on a GPU
    assert promised_lstm_dtype("bf16", "cpu", deepspeed=True, cpu_kernels="torch") == bf16  # as on a GPU
    assert promised_lstm_dtype("bf16", "cuda", deepspeed=True) == bf16  # DeepSpeed's bf16 weights
    assert promised_lstm_dtype("fp16", "cuda", deepspeed=True) == f16  # with DeepSpeed's loss scaling


# --------------------------------------------------------------- accelerate launch --mixed_precision
@pytest.mark.parametrize("launcher,args,want", [
    ("bf16", [], "bf16"),  # the launcher's choice over the preset's fp32
    ("fp16", ["--preset", "paper"], "fp16"),  # and over the paper preset's bf16
    ("no", [], "fp32"), (None, ["--precision", "bf16"], "bf16"),
    ("bf16", ["--precision", "bf16"], "bf16"),  # both, agreeing
])
def test_the_launcher_s_mixed_precision_is_honoured(monkeypatch, launcher, args, want):
    """Before: `accelerate launch --mixed_precision bf16 -m train` trained tiny/small in fp32 without a word
    (the trainer builds its Accelerator from --precision)."""
    from train.config import parse_args

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    if launcher is not None:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    assert parse_args(args)[0].precision == want


@pytest.mark.parametrize("launcher,args", [("bf16", ["--precision", "fp32"]),
                                           ("fp16", ["--precision", "bf16"]), ("fp8", [])])
def test_a_launcher_precision_that_disagrees_is_refused(monkeypatch, tmp_path, launcher, args):
    from train.config import parse_args

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    with pytest.raises(SystemExit, match="^error: the launcher asks for mixed precision"):
        parse_args(args)
    if args:  # from a YAML file too
        (tmp_path / "run.yaml").write_text(f"precision: {args[1]}\n")
        with pytest.raises(SystemExit, match="^error: the launcher asks for mixed precision"):
            parse_args(["--config", str(tmp_path / "run.yaml")])
