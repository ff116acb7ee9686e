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


def test_seed_statistics():
    from bench.seeds import describe, fmt, paired

    d = describe([2.0, 2.4, 2.2])
    assert d["n"] == 3 and abs(d["mean"] - 2.2) < 1e-12 and abs(d["std"] - 0.2) < 1e-12
    assert abs(d["se"] - 0.2 / 3 ** 0.5) < 1e-12
    assert describe([1.0]) == {"n": 1, "mean": 1.0, "std": None, "se": None}
    diff = paired({1: 2.0, 2: 2.4, 3: 2.2}, {1: 2.1, 2: 2.3})  # seeds 1 and 2 only: -0.1 and +0.1
    assert diff["n"] == 2 and abs(diff["mean"]) < 1e-12 and abs(diff["std"] - 2 ** 0.5 * 0.1) < 1e-12
    assert sorted(diff["values"]) == [1, 2] and abs(diff["t"]) < 1e-9
    assert (fmt(None), fmt(0.5), fmt(0.5, 2, sign=True)) == ("-", "0.5000", "+0.50")


def test_quality_summary_groups_by_setting_against_torch():
    from bench.quality import summarize

    runs = [{"impl": i, "seed": s, "val_bpc": v} for i, s, v in
            [("fast", 1, 2.0), ("torch", 1, 2.1), ("fast", 2, 2.4), ("torch", 2, 2.3), ("fast", 3, 2.2)]]
    summary = summarize(runs, ["fast", "torch"])
    assert summary["reference"] == "torch" and list(summary["paired"]) == ["fast"]
    assert summary["impls"]["fast"]["values"] == {1: 2.0, 2: 2.4, 3: 2.2}
    assert summary["paired"]["fast"]["values"] == pytest.approx({1: -0.1, 2: 0.1})


def test_quality_refuses_unknown_settings_and_missing_corpora(tmp_path, capsys):
    import bench.quality

    for argv, message in ([["--impl", "numpy"], "unknown --impl"],
                          [["--data", str(tmp_path)], "sharnn-prepare demo"]):
        with pytest.raises(SystemExit) as e:
            bench.quality.main(argv + (["--data", str(tmp_path)] if "--data" not in argv else []))
        assert e.value.code == 2 and message in capsys.readouterr().err
