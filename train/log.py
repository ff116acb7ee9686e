"""Run records on the main process only: TensorBoard (always) and the other trackers of --report_to through
accelerate's trackers, metrics.jsonl, MFU (`TrainMeter`), a torch.profiler trace on demand (`StepProfiler`).

Every other rank gets a `NullLogger` with the same methods, so the loop never branches on rank.
W&B runs offline when it cannot reach its server or has no API key (WANDB_MODE, when set, decides instead);
its run id is kept in RUN_DIR/trackers.json, so a resumed or requeued run continues the same W&B run.
"""

from __future__ import annotations

import html
import json
import logging
import math
import netrc
import os
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import psutil
import torch
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, TensorBoardTracker, WandBTracker, get_available_trackers

from sharnn.config import ModelConfig
from sharnn.io import atomic
from train.config import profile_range
from train.flops import mean_keys, train_flops_per_byte

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
        accelerator.init_trackers("sharnn", config=flat_hparams(config))
        self.writer = accelerator.get_tracker("tensorboard", unwrap=True)
        self.wandb = next((t.run for t in accelerator.trackers if t.name == "wandb"), None)
        self.metrics = open(self.metrics_path, "a", buffering=1)

    def _truncate_after(self, step: int) -> None:
        """Drop records past the starting step (all of them on a fresh start): those steps are run again."""
        if not self.metrics_path.exists():
            return
        keep = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic.write_text(self.metrics_path, "".join(line + "\n" for line in keep))

    def scalars(self, values: dict[str, float], step: int) -> None:
        """To the trackers as they are; to metrics.jsonl as strict JSON (a non-finite value, e.g. a diverged
        validation bpc or an overflow-skipped step's gradient norm, becomes null: NaN is not JSON)."""
        self.accelerator.log(values, step=step)
        row = {k: finite_or_none(v) if isinstance(v, float) else v for k, v in values.items()}
        row = {"step": step, **row}
        self.metrics.write(json.dumps(row, allow_nan=False) + "\n")

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        """To TensorBoard and W&B (accelerate's other trackers take scalars only)."""
        values = values.detach().float().cpu()
        self.writer.add_histogram(tag, values, step)
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Histogram(values.numpy())}, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        """To TensorBoard and W&B."""
        self.writer.add_text(tag, text, step)
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

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

    def __init__(self, world_size: int, grad_accum: int, device: torch.device,
                 model: ModelConfig | None = None, batch_size: int = 1, peak_flops: float | None = None):
        """With `model`, `batch_size` (per rank) and `peak_flops` (one device's), the intervals also report
        achieved FLOP/s (train.flops' count x bytes/s) and MFU."""
        self.world_size, self.grad_accum, self.device = world_size, grad_accum, device
        self.model, self.batch_size, self.peak_flops = model, batch_size, peak_flops
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
        if self.model is not None:
            # the segments' mean length, memory full: its first mem_len / bptt steps are counted a little high
            mean_bptt = self.bytes / (self.steps * self.grad_accum * self.batch_size)
            per_byte = train_flops_per_byte(self.model, mean_keys(self.model, mean_bptt), mean_bptt)
            out["perf/flops_per_s"] = per_byte * rate * self.world_size
            if self.peak_flops:
                out["perf/mfu"] = per_byte * rate / self.peak_flops
        self._start()
        return out


# ---------------------------------------------------------------------------------------------- trackers
def build_trackers(report_to: str, run_dir: Path, resuming: bool) -> list:
    """accelerate's `log_with` for --report_to (a comma list of accelerate's tracker names): TensorBoard in
    RUN_DIR/tensorboard always, W&B with its files in RUN_DIR/wandb, any other by its name. Called before
    anything is written: what would make a tracker fail to start is refused here, as one error line."""
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOGGER_TYPE_TO_CLASS]
    if unknown:
        raise SystemExit(f"error: --report_to: unknown tracker(s) {unknown}; choose from "
                         f"{', '.join(LOGGER_TYPE_TO_CLASS)} (comma-separated)")
    available = {str(t) for t in get_available_trackers()}
    missing = [n for n in names if n not in available]
    if missing:
        raise SystemExit(f"error: --report_to: tracker(s) {missing} not installed; pip install "
                         f"{' '.join(missing)}, or leave them out")
    trackers: list = [TensorBoardTracker("tensorboard", str(run_dir))]
    for name in dict.fromkeys(names):
        if name == "wandb":
            check_wandb_environment(os.environ)
            trackers.append(WandBRun(run_dir, resuming))
        elif name != "tensorboard":
            trackers.append(name)
    return trackers


TRACKERS_FILE = "trackers.json"
"""In the run directory: the tracker runs to continue on resume, e.g. {"wandb": {"id": ..., ...}}."""


class WandBRun(WandBTracker):
    """accelerate's W&B tracker, offline when W&B cannot be used online, continuing the run directory's W&B
    run on resume (its id in TRACKERS_FILE). Project: $WANDB_PROJECT or "sharnn"; run name: the run
    directory's name."""

    def __init__(self, run_dir: Path, resuming: bool):
        self.run_dir, self.resuming = Path(run_dir), resuming
        super().__init__(os.environ.get("WANDB_PROJECT", "sharnn"))

    def start(self) -> None:  # on the main process (RunLogger calls init_trackers there only)
        kept = read_trackers(self.run_dir).get("wandb", {}) if self.resuming else {}
        if kept.get("id"):  # continue it; a fresh start gets a new id from W&B
            self.init_kwargs.update(id=kept["id"], resume="allow")
        self.init_kwargs.update(dir=str(self.run_dir), name=self.run_dir.name)
        mode, why = wandb_mode()
        if mode is not None:
            self.init_kwargs["mode"] = mode
        super().start()
        mode = mode or os.environ.get("WANDB_MODE", "online")
        write_trackers(self.run_dir, "wandb", {"id": self.run.id, "project": self.run_name, "mode": mode})
        status = "continued" if kept.get("id") else "new"
        print(f"W&B run {self.run.id} ({status}): {mode}, {why}", flush=True)


def check_wandb_environment(environ) -> None:
    """SystemExit naming the first WANDB_* variable that W&B's settings refuse (WANDB_MODE=bogus, a project
    name with '/'). wandb.init checks them only when the run's trackers start, after config.yaml and the
    TensorBoard file were written, and as a pydantic traceback."""
    import wandb
    from wandb.errors import UsageError

    for name, value in sorted(environ.items()):
        if not name.startswith("WANDB_"):
            continue
        try:
            wandb.Settings().update_from_env_vars({name: value})
        except (ValueError, UsageError) as e:  # pydantic's ValidationError is a ValueError
            errors = e.errors() if hasattr(e, "errors") else []
            why = errors[0]["msg"] if errors else (str(e).splitlines() or [type(e).__name__])[0]
            raise SystemExit(f"error: --report_to wandb: {name}={value!r}: {why}") from None


def read_trackers(run_dir: Path) -> dict:
    path = Path(run_dir) / TRACKERS_FILE
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError) as e:
        log.warning("%s unreadable (%s): the trackers start new runs", path, e)
        return {}


def write_trackers(run_dir: Path, name: str, record: dict) -> None:
    atomic.write_json(Path(run_dir) / TRACKERS_FILE, read_trackers(run_dir) | {name: record})


def wandb_mode() -> tuple[str | None, str]:
    """(mode to pass to wandb.init, why): None when $WANDB_MODE is set (W&B reads it); "offline" without an
    API key ($WANDB_API_KEY or ~/.netrc, as `wandb login` writes) or when the server does not answer."""
    if "WANDB_MODE" in os.environ:
        return None, f"WANDB_MODE={os.environ['WANDB_MODE']}"
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    host = urlparse(base).hostname or "api.wandb.ai"
    if not os.environ.get("WANDB_API_KEY") and not _netrc_has(host):
        return "offline", "no W&B API key (wandb login)"
    try:
        socket.create_connection((host, urlparse(base).port or 443), timeout=3).close()
    except OSError as e:
        return "offline", f"{host} unreachable ({e})"
    return "online", f"{host} reachable"


def _netrc_has(host: str) -> bool:
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


# ---------------------------------------------------------------------------------------------- profiler
class StepProfiler:
    """A torch.profiler trace of optimizer steps A..B (`--profile_steps A:B`), one step of warm-up before,
    written by every rank to RUN_DIR/profile/ in the Chrome trace format (TensorBoard's profiler plugin,
    Perfetto, chrome://tracing). Inactive when no steps are given or they lie before `start_step`."""

    def __init__(self, profile_steps: str | None, start_step: int, run_dir: Path, rank: int):
        self.profiler = None
        if not profile_steps:
            return
        first, last = profile_range(profile_steps)
        first = max(first, start_step + 1)
        if first > last:
            log.warning("--profile_steps %s lies before the resumed step %d: no profile", profile_steps,
                        start_step)
            return
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        before = first - start_step - 1  # steps of this process before the first profiled one
        warmup = min(1, before)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.profiler = profile(
            activities=activities,
            schedule=schedule(wait=before - warmup, warmup=warmup, active=last - first + 1, repeat=1),
            on_trace_ready=tensorboard_trace_handler(str(Path(run_dir) / "profile"),
                                                     worker_name=f"rank{rank}"))
        self.profiler.start()

    def step(self) -> None:
        """After every optimizer step."""
        if self.profiler is not None:
            self.profiler.step()

    def close(self) -> None:
        """Writes the trace if the run ended inside the profiled steps."""
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None


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
