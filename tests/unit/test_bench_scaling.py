"""python -m bench.scaling: global batch x lr scaling x warmup at equal bytes seen, over seeds."""

from __future__ import annotations

import pytest

import bench.scaling as scaling


def test_plan_runs_the_reference_batch_once_and_every_other_combination():
    configs = scaling.plan([16, 32, 64], ["none", "sqrt"], ["steps", "bytes"])
    names = [c["name"] for c in configs]
    assert names[0] == "b16-none-wsteps" and len(names) == len(set(names)) == 1 + 2 * 2 * 2
    assert {(c["batch"], c["rule"], c["warmup"]) for c in configs[1:]} == {
        (b, r, w) for b in (32, 64) for r in ("none", "sqrt") for w in ("steps", "bytes")}


def test_schedule_keeps_bytes_and_validation_points_equal_across_batches():
    a = scaling.schedule(16, 2**20, 8, 100, "steps")
    b = scaling.schedule(128, 2**20, 8, 100, "bytes")
    assert a == {"max_steps": 1024, "eval_every": 128, "warmup_steps": 100}
    assert b == {"max_steps": 128, "eval_every": 16, "warmup_steps": 12}  # 100 x 16 / 128 steps: same bytes
    assert scaling.schedule(128, 2**20, 8, 200, "steps")["warmup_steps"] == 128  # never past the run's end
    with pytest.raises(ValueError, match="not a multiple"):
        scaling.schedule(48, 2**20, 8, 100, "steps")


def test_first_reach_interpolates_between_validation_points():
    curve = [{"step": 10, "bytes": 100, "mean": 3.0}, {"step": 20, "bytes": 200, "mean": 2.0},
             {"step": 30, "bytes": 300, "mean": 1.5}]
    assert scaling.first_reach(curve, 2.5) == {"step": 15.0, "bytes": 150.0}
    assert scaling.first_reach(curve, 3.5) == {"step": 10, "bytes": 100}
    assert scaling.first_reach(curve, 1.0) is None


def _record(runs: list[dict]) -> dict:
    configs = scaling.plan([16, 32], ["sqrt"], ["steps"])
    return {"date": "d", "command": "c", "bytes": 4096, "points": 2, "lr": 2e-3, "warmup": 1, "bptt": 64,
            "configs": configs, "runs": runs}


def _run(config: str, seed: int, bpcs: list[float], batch: int) -> dict:
    return {"config": config, "seed": seed, "max_steps": 2 * len(bpcs), "peak_lr": 2e-3,
            "curve": [{"step": 2 * (i + 1), "bytes": 2 * (i + 1) * batch * 64, "bpc": v}
                      for i, v in enumerate(bpcs)]}


def test_analysis_of_merged_parts_targets_the_reference_batch_and_picks_the_best_rule():
    a = _record([_run("b16-none-wsteps", 1, [3.0, 2.0], 16), _run("b32-sqrt-wsteps", 1, [3.2, 2.4], 32)])
    b = _record([_run("b16-none-wsteps", 2, [3.0, 2.2], 16), _run("b32-sqrt-wsteps", 2, [2.8, 2.0], 32),
                 _run("b16-none-wsteps", 1, [9.0, 9.0], 16)])  # a duplicate run: the first part's counts
    merged = scaling.merge([a, b])
    assert len(merged["runs"]) == 4 and len(merged["parts"]) == 2
    analysis = scaling.analyse(merged)
    assert analysis["target_bpc"] == pytest.approx(2.1)
    assert analysis["final"]["b32-sqrt-wsteps"]["mean"] == pytest.approx(2.2)
    assert analysis["reach"]["b32-sqrt-wsteps"] is None  # 2.2 > 2.1: the budget ends first
    assert analysis["reach"]["b16-none-wsteps"]["step"] == pytest.approx(4.0)
    assert analysis["best_rule"] == {"rule": "sqrt", "warmup": "steps"}
    with pytest.raises(SystemExit, match="different studies"):
        scaling.merge([a, a | {"bytes": 8192}])
