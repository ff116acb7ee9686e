"""python -m bench.scaling: global batch x lr scaling x warmup at equal bytes seen, over seeds."""

from __future__ import annotations

import json

import pytest

import bench.scaling as scaling


@pytest.mark.slow
def test_study_trains_writes_json_resumes_and_plots(shipped_corpus, tmp_path, capsys):
    data = shipped_corpus(60_000, valid_bytes=8_000, test_bytes=4_000)
    out = tmp_path / "study.json"
    argv = ["--data", str(data), "--batches", "16,32", "--rules", "linear", "--warmups", "bytes",
            "--seeds", "1", "--bytes", str(32 * 64 * 4), "--points", "2", "--warmup", "2", "--json", str(out),
            "--plots", str(tmp_path / "plots")]
    assert scaling.main(argv) == 0
    record = json.loads(out.read_text())
    runs = {r["config"]: r for r in record["runs"]}
    assert set(runs) == {"b16-none-wsteps", "b32-linear-wbytes"}
    assert runs["b16-none-wsteps"]["max_steps"] == 8 and runs["b32-linear-wbytes"]["max_steps"] == 4
    assert runs["b32-linear-wbytes"]["warmup_steps"] == 1 and runs["b32-linear-wbytes"]["peak_lr"] == 4e-3
    # validation at the same byte counts in both configurations
    assert [p["bytes"] for p in runs["b16-none-wsteps"]["curve"]] == [4096, 8192]
    assert [p["bytes"] for p in runs["b32-linear-wbytes"]["curve"]] == [4096, 8192]
    assert all(0 < p["bpc"] < 10 for r in runs.values() for p in r["curve"])
    for name in ("bpc_vs_bytes.png", "bpc_vs_steps.png", "bpc_vs_bytes_all_rules.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert scaling.main(argv) == 0  # everything recorded: nothing trains again
    assert "resuming: 2 runs" in capsys.readouterr().out
    assert scaling.main(["--report", str(out), "--json", str(tmp_path / "merged.json")]) == 0
    assert "b32-linear-wbytes" in capsys.readouterr().out
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert len(merged["runs"]) == 2 and "analysis" in merged and merged["parts"][0]["command"]
    # the merged study is itself a report source, and keeps the commands of its parts
    again = tmp_path / "again.json"
    assert scaling.main(["--report", str(tmp_path / "merged.json"), "--json", str(again)]) == 0
    assert json.loads(again.read_text())["parts"] == merged["parts"]
