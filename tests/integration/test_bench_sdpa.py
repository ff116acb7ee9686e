"""python -m bench.sdpa_check at a trivial size: the direct checks of the two CPU paths, the paired curves."""

import json

import pytest


@pytest.mark.slow  # two trainer processes
def test_train_keeps_curves_resumes_and_reports(text_corpus, tmp_path, capsys):
    import bench.sdpa_check as sdpa_check

    out = tmp_path / "curves.json"
    argv = ["train", "--preset", "tiny", "--steps", "2", "--seeds", "1", "--data", str(text_corpus),
            "--json", str(out), "--", "--eval_max_segments", "2", "--batch_size", "2", "--eval_every", "1",
            "--log_every", "1"]
    assert sdpa_check.main(argv) == 0
    record = json.loads(out.read_text())
    assert [(r["impl"], r["seed"]) for r in record["runs"]] == [("fast", 1), ("torch", 1)]
    for r in record["runs"]:
        assert set(r["val_bpc"]) == {"1", "2"} and set(r["train_bpc"]) == {"1", "2"}
        assert all(0 < v < 10 for v in r["val_bpc"].values())
    step2 = record["summary"]["steps"]["2"]
    assert step2["paired"]["fast"]["n"] == 1
    capsys.readouterr()
    assert sdpa_check.main(argv) == 0  # resumed: nothing left to run
    assert len(json.loads(out.read_text())["runs"]) == 2
    assert sdpa_check.main(["report", str(out)]) == 0
    assert "fast-torch" in capsys.readouterr().out


@pytest.mark.slow  # two trainer processes
@pytest.mark.parametrize("attention", ["written", "sdpa"])
def test_same_masks_trains_what_torch_trains(text_corpus, tmp_path, monkeypatch, attention):
    """--impl same-masks (fast-attention drawing torch's masks in torch's order) follows torch's run: the same
    training losses, to rounding, for either attention of `--cpu_kernels torch`."""
    import bench.sdpa_check as sdpa_check
    import sharnn.kernels as kernels

    if attention not in getattr(kernels, "ATTENTION_IMPLS", ("sdpa",)):
        pytest.skip(f"no {attention} attention here")
    monkeypatch.setenv("SHARNN_ATTENTION", attention)
    out = tmp_path / "same.json"
    assert sdpa_check.main(["train", "--preset", "tiny", "--steps", "3", "--seeds", "1", "--impl", "torch",
                            "--impl", "same-masks", "--data", str(text_corpus), "--json", str(out), "--",
                            "--eval_max_segments", "2", "--batch_size", "2", "--log_every", "1",
                            "--model.dropouth", "0.1", "--model.dropouti", "0.1",
                            "--model.dropout", "0.1"]) == 0
    torch_run, same = json.loads(out.read_text())["runs"]
    assert (torch_run["impl"], same["impl"]) == ("torch", "same-masks")
    assert set(same["train_bpc"]) == {"1", "2", "3"}
    for step, bpc in torch_run["train_bpc"].items():
        assert abs(same["train_bpc"][step] - bpc) < 1e-4, (step, bpc, same["train_bpc"][step])
