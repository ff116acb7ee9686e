"""Run records: TensorBoard (through accelerate's tracker) and metrics.jsonl, on the main process only.

Every other rank gets a `NullLogger` with the same methods, so the loop never branches on rank.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import time
from pathlib import Path

import psutil
import torch

from sharnn import atomic

log = logging.getLogger("sharnn")


def flat_hparams(d: dict, prefix: str = "") -> dict:
    """Nested config -> {'model/d_model': 1024, ...} with TensorBoard-friendly values."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_hparams(v, f"{key}/"))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class RunLogger:
    """Writes scalars, histograms, text and images to TensorBoard and one JSON object per step to
    metrics.jsonl."""

    def __init__(self, accelerator, run_dir: Path, config: dict, start_step: int):
        self.accelerator = accelerator
        self.metrics_path = run_dir / "metrics.jsonl"
        self._truncate_after(start_step)
        accelerator.init_trackers("tensorboard", config=flat_hparams(config))
        self.writer = accelerator.get_tracker("tensorboard", unwrap=True)
        self.metrics = open(self.metrics_path, "a", buffering=1)

    def _truncate_after(self, step: int) -> None:
        """Drop records past the starting step (all of them on a fresh start): those steps are run again."""
        if not self.metrics_path.exists():
            return
        keep = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic.write_text(self.metrics_path, "".join(line + "\n" for line in keep))

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.accelerator.log(values, step=step)
        self.metrics.write(json.dumps({"step": step, **values}) + "\n")

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        self.writer.add_histogram(tag, values.detach().float().cpu(), step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def image(self, tag: str, rgb, step: int) -> None:
        """An (H, W, 3) uint8 image."""
        self.writer.add_image(tag, rgb, step, dataformats="HWC")

    def binned_histogram(self, tag: str, upper_edges, counts, stats: dict[str, float], step: int) -> None:
        """A histogram already binned: counts[i] (any non-negative weight, e.g. attention mass) of the values
        up to upper_edges[i]; stats holds min, max, num, sum, sum_squares of the values."""
        self.writer.add_histogram_raw(tag, bucket_limits=upper_edges, bucket_counts=counts, global_step=step,
                                      **stats)

    def close(self) -> None:
        self.metrics.close()
        self.writer.flush()


class NullLogger:
    """The logger of every rank but the main one: does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def scalars(self, values, step):
        pass

    def histogram(self, tag, values, step):
        pass

    def text(self, tag, text, step):
        pass

    def image(self, tag, rgb, step):
        pass

    def binned_histogram(self, tag, upper_edges, counts, stats, step):
        pass

    def close(self):
        pass


class TrainMeter:
    """Accumulates the steps between two log lines; `metrics()` turns them into the logged numbers with one
    all-reduce and one host sync per interval."""

    def __init__(self, world_size: int, grad_accum: int, device: torch.device):
        self.world_size, self.grad_accum, self.device = world_size, grad_accum, device
        self.log_s = 0.0  # time spent in the previous logging call: reported in the next interval
        self._start()

    def _start(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.grad_norm = torch.tensor(float("nan"))
        self.steps, self.bytes, self.data_s, self.t_start = 0, 0, 0.0, time.perf_counter()

    def add(self, out) -> None:
        """Record one `train.step.StepOutput`."""
        self.loss_sum += out.loss
        self.grad_norm = out.grad_norm if out.grad_norm is not None else self.grad_norm
        self.steps, self.bytes, self.data_s = self.steps + 1, self.bytes + out.bytes, self.data_s + out.data_s

    def metrics(self, accelerator, step: int, lr: float, epoch: int) -> dict[str, float]:
        """The interval's numbers (every rank calls this: it all-reduces), then a new interval starts."""
        now = time.perf_counter()
        # one all-reduce and host sync per log interval
        train_loss = (accelerator.reduce(self.loss_sum, reduction="mean").item()
                      / (self.steps * self.grad_accum))
        if not math.isfinite(train_loss):
            raise SystemExit(f"error: non-finite training loss at step {step}; the last good checkpoint is "
                             "intact. Lower --lr or use --precision fp32.")
        elapsed = now - self.t_start
        rate = self.bytes / elapsed
        out = {"train/loss": train_loss, "train/bpc": train_loss / math.log(2), "train/lr": lr,
               "train/grad_norm": float(self.grad_norm), "perf/bytes_per_s": rate * self.world_size,
               "perf/bytes_per_s_per_rank": rate, "perf/step_time_s": elapsed / self.steps,
               "perf/data_fraction": self.data_s / elapsed, "perf/log_fraction": self.log_s / elapsed,
               "perf/memory_bytes": memory_bytes(self.device), "train/epoch": epoch}
        self._start()
        return out


def memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return psutil.Process().memory_info().rss


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN or Infinity: 'not measured' is null."""
    return x if math.isfinite(x) else None


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except OSError:
        return "unknown"
