"""Host syncs in the training loop: what would make the host wait for the GPU, counted over whole iterations
of the real loop (train.loop.main, one process), and proof that the count catches a sync added to a
micro-batch.

What counts as a sync (`SyncCounter`):
- at torch's dispatcher (a TorchDispatchMode): the ops whose result's size or value the host needs:
  `_local_scalar_dense` (`.item()`, `float()`, `bool()`, `if tensor:`), `nonzero` (`torch.nonzero`,
  `torch.where(c)`), `masked_select`, the `unique` family, `equal`, `is_nonzero`, `bincount`,
  `repeat_interleave` without `output_size`, indexing or assigning with a boolean mask; and every copy from a
  GPU to the host (`_to_copy`/`copy_` into a CPU tensor from another device);
- at the Python level (a TorchFunctionMode), the calls that read a tensor on the host without passing through
  the dispatcher on a CPU tensor: `.numpy()`, `.tolist()`, `np.asarray(tensor)`, formatting, and `.cpu()` or
  `.to("cpu")` of a tensor that is not a host batch. On a CPU run "the device" is the CPU, so a `.cpu()`
  there copies nothing, yet on a GPU it would be a device-to-host copy: it is counted by its call. A move
  spelled `.to(torch.device("cpu"))` looks there like `.to(p.device)` (a move to the training device, no
  sync on a GPU), so only the spellings `.cpu()` and `.to("cpu")` are counted on a CPU run; on a GPU the
  dispatcher sees every copy to the host.
The loader runs on the host (`StreamLoader.__next__` is not counted) and its batches are host tensors: their
`.to(device)` is the upload to the GPU, not a sync.

The CPU run uses torch's kernels (`--cpu_kernels torch`), the ops CUDA runs; sharnn's own CPU kernels draw
dropout seeds on the host, where on a CPU there is no device to wait for."""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers import REPO

TORCH = Path(torch.__file__).parent
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = pytest.mark.usefixtures("one_thread")

# aten ops (overload packets) whose result the host must wait for: a value or an output size
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
            "unique_consecutive", "unique_dim_consecutive", "equal", "is_nonzero", "bincount"}
# Tensor methods that read values on the host whatever the device (numpy/tolist of a CPU tensor never reach
# the dispatcher)
HOST_READS = {"item", "tolist", "numpy", "__array__", "__bool__", "__float__", "__int__", "__index__",
              "__complex__", "__format__", "__repr__", "__str__", "cpu"}


@dataclass
class Sync:
    what: str
    """The op or call, e.g. `aten._local_scalar_dense` or `Tensor.numpy`."""
    iteration: int | None
    """The loop iteration it happened in (1-based: the step it trains)."""
    phase: str | None
    """`step` inside train_step, else None (elsewhere in the iteration)."""
    where: str
    """The innermost frame of this repository's code (not tests) that led to it."""
    origin: str
    """The innermost frame outside torch: where the sync was asked for (this repository or a library)."""


@dataclass
class SyncCounter:
    """Records every sync (see the module docstring) made during a loop iteration, with the iteration and
    phase it happened in."""
    syncs: list[Sync] = field(default_factory=list)
    iteration: int | None = None
    """The iteration running now; None outside the loop (set-up, the end), where nothing is counted."""
    phase: str | None = None
    on_host: int = 0
    """> 0 while host-only code runs (the loader)."""
    host_batches: dict[int, torch.Tensor] = field(default_factory=dict)
    """The loader's batches by id (kept alive, so that no other tensor takes an id while the count runs)."""
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)

    def record(self, what: str, tensors=()) -> None:
        if self.on_host or self.iteration is None:
            return
        tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
        if tensors and all(self.on_the_host(t) for t in tensors):
            return
        self.syncs.append(Sync(what, self.iteration, self.phase, *callers()))

    def on_the_host(self, tensor: torch.Tensor) -> bool:
        """A tensor that lives on the host on a GPU too: a loader batch, or the step count of a torch.optim
        optimizer (kept on the CPU unless it is `capturable` or `fused`: torch/optim/adamw.py)."""
        if id(tensor) in self.host_batches:
            return True
        return any(state.get("step") is tensor for optimizer in self.optimizers
                   for group in optimizer.param_groups if not (group.get("capturable") or group.get("fused"))
                   for state in (optimizer.state.get(p, {}) for p in group["params"]))


def callers() -> tuple[str, str]:
    """(where, origin): file:line of the innermost frame in sharnn/, train/ or bench/, and of the innermost
    frame outside torch and this file (a library's own sync names the library there)."""
    frames = [f for f in traceback.extract_stack() if f.filename != __file__]
    where = next((f"{Path(f.filename).relative_to(REPO)}:{f.lineno} ({f.name})" for f in reversed(frames)
                  if repo_code(f.filename)), "?")
    origin = next((f"{f.filename}:{f.lineno}" for f in reversed(frames)
                   if not Path(f.filename).is_relative_to(TORCH)), "?")
    return where, origin


def repo_code(filename: str) -> bool:
    path = Path(filename)
    return path.is_relative_to(REPO) and path.relative_to(REPO).parts[0] in ("sharnn", "train", "bench")


def _is_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class _DispatchSyncs(TorchDispatchMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.counter.record(f"aten.{name}", args)
        elif name == "repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor") and \
                kwargs.get("output_size") is None:  # the output's size is the repeats' sum
            self.counter.record("aten.repeat_interleave", args)
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and _is_bool_index(args[1]):
            self.counter.record(f"aten.{name} (boolean mask)", [args[0], *args[1]])
        elif name in ("_to_copy", "_copy_from", "_copy_from_and_resize"):  # device-to-host copies
            src, dst = args[0], kwargs.get("device") if name == "_to_copy" else args[1].device
            if dst is not None and torch.device(dst).type == "cpu" and src.device.type != "cpu":
                self.counter.record(f"aten.{name} {src.device.type} -> cpu")
        elif name == "copy_":
            dst, src = args[0], args[1]
            if dst.device.type == "cpu" and isinstance(src, torch.Tensor) and src.device.type != "cpu":
                self.counter.record(f"aten.copy_ {src.device.type} -> cpu")
        return func(*args, **kwargs)


class _FunctionSyncs(TorchFunctionMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if args and isinstance(args[0], torch.Tensor):
            if name in HOST_READS:
                self.counter.record(f"Tensor.{name}", args[:1])
            # `.to("cpu")` written in this repository's code; DeepSpeed moves tensors to its device by name
            # (`.to(get_accelerator().device_name())`), "cpu" on a CPU run
            elif name == "to" and repo_code(sys._getframe(1).f_code.co_filename) and any(
                    isinstance(a, str) and a.startswith("cpu") for a in (*args[1:], kwargs.get("device"))):
                self.counter.record('Tensor.to("cpu")', args[:1])
        return func(*args, **kwargs)


# ------------------------------------------------------------------------------------- the loop, counted
BPTT, BATCH, ACCUM, STEPS_PER_EPOCH = 16, 8, 2, 5
# log every 4 steps, save every 7, validate at each epoch end (every 5 steps; the best checkpoint is saved
# then too), 2 micro-batches per step, the carried state reset at random (p=0.5) and at every epoch start
LOOP = ["--preset", "tiny", "--model.d_model", "32", "--model.d_ff", "64", "--model.n_layer", "2",
        "--model.mem_len", "32", "--batch_size", str(BATCH), "--bptt", str(BPTT), "--no_vary_bptt",
        "--grad_accum", str(ACCUM), "--epochs", "100", "--max_steps", "15", "--warmup_steps", "2",
        "--log_every", "4", "--eval_every", "0", "--save_every", "7", "--eval_streams", "2",
        "--eval_max_segments", "2", "--sample_bytes", "0", "--state_reset_prob", "0.5", "--no_test_at_end",
        "--cpu_kernels", "torch"]
LOG_EVERY, SAVE_EVERY, MAX_STEPS = 4, 7, 15


@pytest.fixture(scope="module")
def epoch_corpus(shipped_corpus) -> Path:
    """A training split of 8 streams of 10 segments of 16 bytes: an epoch every 5 steps of 2 micro-batches."""
    train_bytes = BATCH * (STEPS_PER_EPOCH * ACCUM * BPTT + 2)
    return shipped_corpus(train_bytes + 2048, valid_bytes=1024, test_bytes=1024)


@dataclass
class LoopRun:
    counter: SyncCounter
    iterations: list[int] = field(default_factory=list)
    validated: set[int] = field(default_factory=set)
    saved: set[int] = field(default_factory=set)

    def logged(self) -> set[int]:
        return {i for i in self.iterations if i % LOG_EVERY == 0}

    def boundaries(self) -> dict[int, str]:
        """The iterations allowed to sync, each with its reason."""
        named = {}
        for reasons, steps in (("log interval", self.logged()), ("validation", self.validated),
                               ("save", self.saved)):
            for i in steps:
                named[i] = f"{named[i]}, {reasons}" if i in named else reasons
        return named


def run_loop(monkeypatch, corpus: Path, out: Path, device: str, extra: tuple[str, ...] = (),
             env: dict[str, str] | None = None) -> LoopRun:
    """train.loop.main on `corpus`, with every sync recorded by the loop iteration it happened in: an
    iteration starts where the loop asks `finished()` and ends at the next ask. `env`: the launcher's
    variables (DeepSpeed's), else one process on `device`."""
    import train.checkpoint
    import train.loop
    from sharnn.corpus.data import StreamLoader

    counter = SyncCounter()
    result = LoopRun(counter)
    real_finished, real_step, real_evaluate = train.loop.finished, train.loop.train_step, train.loop.evaluate
    real_save, real_next = train.checkpoint.save, StreamLoader.__next__
    real_build_optimizer = train.loop.build_optimizer

    def finished(cfg, ts, loader):
        done = real_finished(cfg, ts, loader)
        counter.iteration = None if done else ts.step + 1
        if not done:
            result.iterations.append(ts.step + 1)
        return done

    def train_step(*args, **kwargs):
        counter.phase = "step"
        try:
            return real_step(*args, **kwargs)
        finally:
            counter.phase = None

    def evaluate(*args, **kwargs):
        if counter.iteration is not None:
            result.validated.add(counter.iteration)
        return real_evaluate(*args, **kwargs)

    def save(*args, **kwargs):
        if counter.iteration is not None:
            result.saved.add(counter.iteration)
        return real_save(*args, **kwargs)

    def next_batch(loader):
        counter.on_host += 1
        try:
            batch = real_next(loader)
        finally:
            counter.on_host -= 1
        counter.host_batches.update({id(t): t for t in (batch.inputs, batch.targets)})
        return batch

    def build_optimizer(*args, **kwargs):
        optimizer = real_build_optimizer(*args, **kwargs)
        counter.optimizers.append(optimizer)
        return optimizer

    monkeypatch.setattr(train.loop, "build_optimizer", build_optimizer)
    monkeypatch.setattr(train.loop, "finished", finished)
    monkeypatch.setattr(train.loop, "train_step", train_step)
    monkeypatch.setattr(train.loop, "evaluate", evaluate)
    monkeypatch.setattr(train.checkpoint, "save", save)
    monkeypatch.setattr(StreamLoader, "__next__", next_batch)
    monkeypatch.setattr("signal.signal", lambda *args: None)  # not this test process's handlers
    for key in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU", "WORLD_SIZE",
                "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    if env is None:
        env = {"ACCELERATE_USE_CPU": "1"} if device == "cpu" else {}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with _DispatchSyncs(counter), _FunctionSyncs(counter):
        code = train.loop.main([*LOOP, *extra, "--data", str(corpus), "--out", str(out)])
    assert code == 0
    assert result.iterations == list(range(1, MAX_STEPS + 1))
    return result


def assert_no_sync_between_boundaries(run: LoopRun, allowed=lambda sync: False) -> None:
    """No sync inside train_step in any iteration, and none at all in an iteration that is not a log
    interval, validation or save step; except those `allowed` says are."""
    boundaries = run.boundaries()
    syncs = [s for s in run.counter.syncs if not allowed(s)]
    in_step = [s for s in syncs if s.phase == "step"]
    assert not in_step, "host syncs inside train_step:\n" + "\n".join(
        f"  iteration {s.iteration}: {s.what} at {s.where} from {s.origin}" for s in in_step)
    elsewhere = [s for s in syncs if s.iteration not in boundaries]
    assert not elsewhere, "host syncs in iterations that are not a log, validation or save step:\n" + \
        "\n".join(f"  iteration {s.iteration}: {s.what} at {s.where} from {s.origin}" for s in elsewhere)


@pytest.mark.parametrize("optimizer", ["lamb", "adamw"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_gpu])])
def test_the_loop_syncs_only_at_log_validation_and_save_steps(device, optimizer, epoch_corpus, tmp_path,
                                                              monkeypatch, fresh_accelerate_state):
    """Whole iterations of train.loop.main: lr, train_step (2 micro-batches: forward with the carried state,
    backward, clip, LAMB or AdamW), the meter, the progress line, the stop flag, the profiler. Only the
    iterations that log, validate or save may sync, and never inside train_step."""
    run = run_loop(monkeypatch, epoch_corpus, tmp_path / "run", device, ("--optimizer", optimizer))
    epoch_ends = set(range(STEPS_PER_EPOCH, MAX_STEPS + 1, STEPS_PER_EPOCH))
    assert run.validated == epoch_ends
    assert run.saved >= set(range(SAVE_EVERY, MAX_STEPS + 1, SAVE_EVERY))
    assert run.saved <= run.validated | set(range(SAVE_EVERY, MAX_STEPS + 1, SAVE_EVERY))
    plain = set(run.iterations) - set(run.boundaries())
    # what is checked whole: the first steps, steps after every kind of boundary, the epoch starts (6, 11)
    assert {1, 2, 3, 6, 9, 11, 13} <= plain, plain
    assert_no_sync_between_boundaries(run)
    # the boundaries do sync (the counter sees the loop's own syncs): the log interval reads the loss
    logged = {s.iteration for s in run.counter.syncs if "train/log.py" in s.where}
    assert logged == run.logged(), logged


# A sync added to every micro-batch (after the forward, on its loss and logits), and what the counter must
# name for it.
INJECTIONS = {
    "loss.detach().cpu().numpy()": (lambda logits, loss: loss.detach().cpu().numpy(), "Tensor.numpy"),
    "torch.nonzero": (lambda logits, loss: torch.nonzero(logits.detach() > 0), "aten.nonzero"),
    "loss.tolist()": (lambda logits, loss: loss.detach().tolist(), "Tensor.tolist"),
    "if loss > 0:": (lambda logits, loss: bool(loss > 0), "aten._local_scalar_dense"),
    "logits[logits > 0]": (lambda logits, loss: logits[logits > 0], "aten.index (boolean mask)"),
    "torch.masked_select": (lambda logits, loss: torch.masked_select(logits, logits > 0),
                            "aten.masked_select"),
}


@pytest.mark.parametrize("injected", list(INJECTIONS))
def test_a_sync_added_to_a_micro_batch_fails_the_loop_test(injected, epoch_corpus, tmp_path, monkeypatch,
                                                           fresh_accelerate_state):
    """The check above fails, naming the sync in every iteration (2 per step: one per micro-batch)."""
    from sharnn.model import SHARNN

    inject, expected = INJECTIONS[injected]
    real_forward = SHARNN.forward

    def forward(self, *args, **kwargs):
        logits, loss, carry = real_forward(self, *args, **kwargs)
        if self.training:
            inject(logits, loss)
        return logits, loss, carry

    monkeypatch.setattr(SHARNN, "forward", forward)
    run = run_loop(monkeypatch, epoch_corpus, tmp_path / "run", "cpu")
    with pytest.raises(AssertionError, match="host syncs inside train_step") as failure:
        assert_no_sync_between_boundaries(run)
    assert expected in str(failure.value)
    per_iteration = {i: sum(s.what == expected and s.phase == "step" for s in run.counter.syncs
                            if s.iteration == i) for i in run.iterations}
    assert per_iteration == {i: ACCUM for i in run.iterations}, per_iteration


def test_a_step_without_its_guard_fails_the_loop_test(epoch_corpus, tmp_path, monkeypatch,
                                                       fresh_accelerate_state):
    """train_step without a NonFiniteGuard checks each gradient norm at once (`norm.item()`, the path of
    callers that pass none): the loop that dropped its guard fails, one sync per optimizer step."""
    import train.loop

    real_step = train.loop.train_step
    monkeypatch.setattr(train.loop, "train_step", lambda *args, **kwargs: real_step(*args[:7]))
    run = run_loop(monkeypatch, epoch_corpus, tmp_path / "run", "cpu")
    with pytest.raises(AssertionError, match=r"train/step.py:\d+ \(stop_if_nonfinite\)"):
        assert_no_sync_between_boundaries(run)
    per_iteration = {i: sum(s.what == "aten._local_scalar_dense" and s.phase == "step"
                            for s in run.counter.syncs if s.iteration == i) for i in run.iterations}
    assert per_iteration == {i: 1 for i in run.iterations}, per_iteration
