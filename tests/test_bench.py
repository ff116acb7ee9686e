"""The benchmark runs and writes the records the speed issue asks for (no timing is asserted here)."""

import json

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
