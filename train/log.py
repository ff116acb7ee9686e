"""Run records: TensorBoard (through accelerate's tracker) and metrics.jsonl, on the main process only.

Every other rank gets a `NullLogger` with the same methods, so the loop never branches on rank.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

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
    """Writes scalars, histograms and text to TensorBoard and one JSON object per step to metrics.jsonl."""

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
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.metrics_path)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.accelerator.log(values, step=step)
        self.metrics.write(json.dumps({"step": step, **values}) + "\n")

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        self.writer.add_histogram(tag, values.detach().float().cpu(), step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

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

    def close(self):
        pass
