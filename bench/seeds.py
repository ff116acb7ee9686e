"""Statistics over seeds, for the benchmarks that compare training runs (bench.quality, bench.recipe).

A seed fixes a run's initial weights and data order, so two settings run with the same seed form a pair:
their difference, seed by seed, has the seed's own luck partly cancelled. `describe` gives n, mean, standard
deviation and standard error of some values; `paired` the same for the per-seed differences a - b, with
t = mean / se.
"""

from __future__ import annotations

import math
import statistics


def describe(values: list[float]) -> dict:
    n = len(values)
    mean = statistics.fmean(values) if n else None
    std = statistics.stdev(values) if n > 1 else None
    return {"n": n, "mean": mean, "std": std, "se": std / math.sqrt(n) if std is not None else None}


def paired(a: dict[int, float], b: dict[int, float]) -> dict:
    """a - b over the seeds both have: describe(...) + t + the per-seed differences ("values")."""
    diffs = {s: a[s] - b[s] for s in sorted(set(a) & set(b))}
    d = describe(list(diffs.values()))
    d["t"] = d["mean"] / d["se"] if d["se"] else None
    return {**d, "values": diffs}


def fmt(x: float | None, digits: int = 4, sign: bool = False) -> str:
    return "-" if x is None else (f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}")
