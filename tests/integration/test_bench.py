"""The benchmark runs and writes the records the speed issue asks for (no timing is asserted here)."""

import json

import pytest

import bench.__main__ as bench
import train.distributed

FIELDS = {"scenario", "preset", "precision", "world_size", "compile", "bytes_per_s", "mfu", "peak_mem_bytes"}


@pytest.mark.slow  # a scenario trained and timed in a process of its own, end to end (~10 s)
def test_bench_runs_a_scenario_and_skips_emulated_bf16(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train.distributed, "native_cpu_matmul", lambda precision: precision == "fp32")
    out = tmp_path / "results.json"
    assert bench.main(["--scenario", "tiny-fp32", "--scenario", "small-bf16", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "tiny-fp32" in table and "small-bf16             skipped: this CPU has no bf16" in table
    ran, skipped = json.loads(out.read_text())
    assert FIELDS <= ran.keys() and FIELDS <= skipped.keys()
    assert ran["scenario"] == "tiny-fp32" and ran["bytes_per_s"] > 0 and 0 < ran["mfu"] < 1
    assert ran["peak_mem_bytes"] > 2**20 and ran["ceiling_flops"] > 0
    assert ran["achieved_flops"] == ran["bytes_per_s"] * ran["flops_per_byte"]
    assert skipped["bytes_per_s"] is None and "--force" in skipped["skipped"]
    assert ran["date"] and ran["command"].startswith("python -m bench")
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow  # two trainer processes
def test_quality_trains_each_implementation_and_pairs_the_seeds(text_corpus, tmp_path, capsys):
    """python -m bench.quality at a trivial size: both CPU kernel settings train in their own process."""
    import bench.quality

    out = tmp_path / "quality.json"
    assert bench.quality.main(["--preset", "tiny", "--steps", "2", "--seeds", "1", "--data", str(text_corpus),
                               "--json", str(out), "--", "--eval_max_segments", "2",
                               "--batch_size", "2"]) == 0
    record = json.loads(out.read_text())
    assert record["impls"] == ["fast", "torch"] and record["steps"] == 2 and record["preset"] == "tiny"
    assert record["command"].startswith("python -m bench.quality") and record["date"] and record["machine"]
    assert record["trainer_flags"] == ["--eval_max_segments", "2", "--batch_size", "2"]
    assert [(r["impl"], r["seed"]) for r in record["runs"]] == [("fast", 1), ("torch", 1)]
    assert all(0 < r["val_bpc"] < 10 and r["wall_s"] > 0 for r in record["runs"])
    summary = record["summary"]
    assert summary["reference"] == "torch"
    for impl in ("fast", "torch"):
        d = summary["impls"][impl]
        assert d["n"] == 1 and d["std"] is None and d["mean"] == d["values"]["1"]
    paired = summary["paired"]["fast"]
    assert paired["n"] == 1 and paired["mean"] == (summary["impls"]["fast"]["mean"]
                                                   - summary["impls"]["torch"]["mean"])
    table = capsys.readouterr().out
    assert "fast - torch" in table and "paired n=1" in table


@pytest.mark.slow  # two trainer processes
def test_quality_compares_precisions_paired_by_seed(text_corpus, tmp_path):
    """--precision fp32 --precision bf16: the same kernels in each precision, the trainer really runs each
    (its config.yaml), paired against the first."""
    import bench.quality

    out = tmp_path / "quality.json"
    assert bench.quality.main(["--preset", "tiny", "--steps", "2", "--seeds", "1", "--data", str(text_corpus),
                               "--precision", "fp32", "--precision", "bf16", "--json", str(out), "--",
                               "--eval_max_segments", "2", "--batch_size", "2"]) == 0
    record = json.loads(out.read_text())
    assert record["impls"] == ["fast/fp32", "fast/bf16"]
    ran = [(r["impl"], r["precision"]) for r in record["runs"]]
    assert ran == [("fast/fp32", "fp32"), ("fast/bf16", "bf16")]
    summary = record["summary"]
    assert summary["reference"] == "fast/fp32" and summary["paired"]["fast/bf16"]["n"] == 1
