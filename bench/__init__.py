"""Measurements (docs/architecture.md lists the modules). What their outputs share: `check_output`, the rule
every command that writes follows (sharnn.io.atomic.check_output), for a bench command's --json record and
plots: a file at the path is replaced only when it is that command's own earlier output."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def written_by(module: str) -> Callable[[Path], bool]:
    """`is_ours` for a record of `python -m MODULE`: a JSON object (or a list of them, as `python -m bench`
    writes) whose "command" is that module's."""
    command = ["python", "-m", module]

    def check(path: Path) -> bool:
        record = json.loads(path.read_bytes())
        records = record if isinstance(record, list) and record else [record]
        return all(isinstance(r, dict) and str(r.get("command", "")).split(" ")[:3] == command
                   for r in records)
    return check


def is_png(path: Path) -> bool:
    """`is_ours` for a plot: a PNG file."""
    with open(path, "rb") as f:
        return f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE


def check_output(path: Path | None, option: str, is_ours: Callable[[Path], bool], what: str,
                 inputs: Iterable[tuple[str, str | Path | None]] = ()) -> None:
    """sharnn.io.atomic.check_output for a file a bench command writes (None: not asked for); SystemExit with
    one "error: ..." line, before any measuring, when the path holds something else."""
    from sharnn.io import atomic

    if path is None:
        return
    try:
        atomic.check_output(path, option, kind="file", what=what, is_ours=is_ours, inputs=inputs)
    except atomic.OutputRefused as e:
        raise SystemExit(f"error: {e}") from None
