"""Progress of a run: how many steps it will take, a bar on a terminal, plain lines in a log file, the ETA.

A run bounded by epochs (the paper's presets) has no step count until its loader says how many segments an
epoch holds: `estimate_total_steps` reads it from the loader's position and a mean segment length. Segment
lengths are random (--vary_bptt), so the mean starts at the expected draw and moves to the observed mean as
the run goes (exact with --no_vary_bptt). On a terminal a tqdm bar shows percent, rate and ETA; when stdout
is not a terminal (SLURM, nohup, `> log`), a plain line is printed every --progress_interval_s seconds instead
of carriage-return updates:

    step 1200/45000 (2.7%) epoch 0.84/32 loss 1.234 bpc 1.780 3.4 kB/s 1.9 GFLOP/s MFU 12.1% ETA 3h12m
"""

from __future__ import annotations

import math
import sys
import time

from tqdm import tqdm

from sharnn.corpus.data import StreamLoader

PRIOR_SEGMENTS = 100
"""Weight of the expected mean segment length, in segments, against the observed ones."""


def estimate_total_steps(step: int, loader: StreamLoader, epochs: float, max_steps: int | None,
                         mean_len: float, grad_accum: int = 1) -> int:
    """Optimizer steps the run will have taken when it ends: `step` so far, plus the segments left before
    the loader's position reaches `epochs` (train.loop.finished), at `mean_len` bytes each, `grad_accum`
    segments per step; at most `max_steps`. An epoch's segments end at cursor L - 2 (sharnn.corpus.data)."""
    stream_len, span = loader.stream_len, loader.stream_len - 2
    epoch, offset = loader.epoch, loader.offset
    segments = 0
    if epoch + offset / stream_len < epochs:
        last_epoch = math.ceil(epochs) - 1  # the epoch in which the run ends
        if epoch < last_epoch:  # the rest of this epoch, then whole epochs
            segments += math.ceil((span - offset) / mean_len)
            segments += (last_epoch - epoch - 1) * math.ceil(span / mean_len)
            offset = 0
        end = min(span, (epochs - last_epoch) * stream_len)  # the cursor at which the run stops
        segments += math.ceil((end - offset) / mean_len)
    total = step + math.ceil(segments / grad_accum)
    return min(total, max_steps) if max_steps is not None else total


def expected_segment_len(loader: StreamLoader) -> float:
    """The mean segment length the loader's own estimate of an epoch implies (exact without vary_bptt)."""
    return (loader.stream_len - 2) / loader.estimate_steps_per_epoch()


def duration(seconds: float) -> str:
    """3h12m, 12m05s, 45s."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def si(value: float, unit: str) -> str:
    """3.4 kB/s, 1.2 GFLOP/s (decimal prefixes)."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {prefix}{unit}"
    return f"{value:.1f} {unit}"


class Progress:
    """The run's progress on the main process (pass `enabled=False` on the others): a tqdm bar with a total
    on a terminal, else a plain line every `interval_s` seconds (0: none) and one at the end."""

    def __init__(self, loader: StreamLoader, epochs: float, max_steps: int | None, grad_accum: int,
                 start_step: int, enabled: bool, interval_s: float, is_terminal: bool | None = None):
        self.loader, self.epochs, self.max_steps, self.grad_accum = loader, epochs, max_steps, grad_accum
        self.prior_len = expected_segment_len(loader)
        self.seen_segments, self.seen_bytes = 0, 0  # per stream, observed in this process
        self.step = self.start_step = start_step
        self.total = self._estimate()
        self.is_terminal = sys.stdout.isatty() if is_terminal is None else is_terminal
        self.enabled, self.interval_s = enabled, interval_s
        self.bar = tqdm(total=self.total, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not (enabled and self.is_terminal))
        self.t_line = time.perf_counter()
        self.t_first: float | None = None  # the end of this process's first step: rates start there
        self.latest: dict[str, float] = {}
        self.printed_step: int | None = None

    def mean_segment_len(self) -> float:
        return ((self.prior_len * PRIOR_SEGMENTS + self.seen_bytes)
                / (PRIOR_SEGMENTS + self.seen_segments))

    def _estimate(self) -> int:
        return estimate_total_steps(self.step, self.loader, self.epochs, self.max_steps,
                                    self.mean_segment_len(), self.grad_accum)

    def update(self, step: int, bytes_per_stream: int, metrics: dict[str, float] | None = None) -> None:
        """After optimizer step `step`, which read `bytes_per_stream` bytes of each stream (all its
        micro-batches); `metrics` when the step logged them (the estimate is refined then)."""
        self.step = step
        self.seen_segments += self.grad_accum
        self.seen_bytes += bytes_per_stream
        if metrics is not None:
            self.latest = metrics
            self.total = self._estimate()
            if self.bar.total != self.total:
                self.bar.total = self.total
            self.bar.set_postfix_str(self.summary(), refresh=False)
        self.bar.update(1)
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first, self.first_step = now, step
        if self.enabled and not self.is_terminal and self.interval_s and now - self.t_line >= self.interval_s:
            self.t_line, self.printed_step = now, step
            print(self.line(), flush=True)

    def eta_s(self) -> float | None:
        """Seconds left at this process's mean rate since its first step, which pays one-off costs (None
        until a second step has ended)."""
        if self.t_first is None or self.step == self.first_step:
            return None
        return (self.total - self.step) * (time.perf_counter() - self.t_first) / (self.step - self.first_step)

    def summary(self) -> str:
        """The latest logged numbers: loss, bpc, throughput, FLOP/s and MFU."""
        m, parts = self.latest, []
        if "train/loss" in m:
            parts.append(f"loss {m['train/loss']:.3f} bpc {m['train/bpc']:.3f}")
        if "perf/bytes_per_s" in m:
            parts.append(si(m["perf/bytes_per_s"], "B/s"))
        if "perf/flops_per_s" in m:
            parts.append(si(m["perf/flops_per_s"], "FLOP/s"))
        if "perf/mfu" in m:
            parts.append(f"MFU {m['perf/mfu']:.1%}")
        return " ".join(parts)

    def line(self) -> str:
        position = self.loader.epoch + self.loader.offset / self.loader.stream_len
        eta = self.eta_s()
        return " ".join(p for p in (
            f"step {self.step}/{self.total} ({self.step / max(self.total, 1):.1%})",
            f"epoch {position:.2f}/{self.epochs:g}", self.summary(),
            f"ETA {duration(eta)}" if eta is not None else "") if p)

    def close(self, finished: bool) -> None:
        """The last line; when the run `finished` (not stopped), its total is the step it ended at."""
        if finished:
            self.total = self.step
        self.bar.close()
        if self.enabled and not self.is_terminal and self.interval_s and self.printed_step != self.step:
            print(self.line(), flush=True)
