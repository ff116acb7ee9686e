"""The benchmark runs and writes the records the speed issue asks for (no timing is asserted here)."""

import json

import pytest

import bench.__main__ as bench
import train.distributed

FIELDS = {"scenario", "preset", "precision", "world_size", "compile", "bytes_per_s", "mfu", "peak_mem_bytes"}


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


def test_bench_lists_the_issue_scenarios(capsys):
    assert bench.main(["--list"]) == 0
    names = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    want = {"tiny-fp32", "small-fp32", "small-bf16", "small-fp32-compile", "small-mem1000", "small-mem20000",
            "paper-fp32", "paper-bf16", "small-eval", "small-generate", "scaling-ws1", "scaling-ws2-ddp",
            "scaling-ws2-deepspeed"}
    assert want <= names, want - names


def test_unknown_scenario_is_an_error(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        bench.main(["--scenario", "nope"])
    assert e.value.code == 2 and "unknown scenario" in capsys.readouterr().err


def test_profile_prints_the_step_operators(capsys):
    import bench.profile

    assert bench.profile.main(["--scenario", "tiny-fp32", "--steps", "1", "--rows", "40"]) == 0
    out = capsys.readouterr().out
    assert "tiny-fp32: 1 steps of 64 x 8 bytes" in out
    for op in ("aten::mkldnn_rnn_layer_backward", "_Attention", "_Dropout", "aten::addmm"):
        assert op in out, op


def test_profile_refuses_a_scenario_that_is_not_training(capsys):
    import pytest

    import bench.profile

    with pytest.raises(SystemExit) as e:
        bench.profile.main(["--scenario", "small-eval"])
    assert e.value.code == 2 and "training scenario" in capsys.readouterr().err


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


def test_quality_summary_statistics():
    from bench.quality import summarize

    runs = [{"impl": i, "seed": s, "val_bpc": v} for i, s, v in
            [("fast", 1, 2.0), ("torch", 1, 2.1), ("fast", 2, 2.4), ("torch", 2, 2.3), ("fast", 3, 2.2)]]
    summary = summarize(runs, ["fast", "torch"])
    fast, torch_ = summary["impls"]["fast"], summary["impls"]["torch"]
    assert fast["n"] == 3 and abs(fast["mean"] - 2.2) < 1e-12 and abs(fast["std"] - 0.2) < 1e-12
    assert abs(fast["se"] - 0.2 / 3 ** 0.5) < 1e-12 and torch_["n"] == 2
    paired = summary["paired"]["fast"]  # seeds 1 and 2 only: -0.1 and +0.1
    assert paired["n"] == 2 and abs(paired["mean"]) < 1e-12 and abs(paired["std"] - 2 ** 0.5 * 0.1) < 1e-12
    assert sorted(paired["values"]) == [1, 2]


def test_quality_refuses_unknown_settings_and_missing_corpora(tmp_path, capsys):
    import pytest

    import bench.quality

    for argv, message in ([["--impl", "numpy"], "unknown --impl"],
                          [["--data", str(tmp_path)], "sharnn-prepare demo"]):
        with pytest.raises(SystemExit) as e:
            bench.quality.main(argv + (["--data", str(tmp_path)] if "--data" not in argv else []))
        assert e.value.code == 2 and message in capsys.readouterr().err
