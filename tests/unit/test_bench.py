"""The benchmark runs and writes the records the speed issue asks for (no timing is asserted here)."""


import pytest

import bench.__main__ as bench


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
