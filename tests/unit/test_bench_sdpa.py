"""python -m bench.sdpa_check at a trivial size: the direct checks of the two CPU paths, the paired curves."""

import json


def test_checks_find_the_two_paths_equal_given_the_same_masks(tmp_path, capsys):
    import bench.sdpa_check as sdpa_check

    out = tmp_path / "checks.json"
    assert sdpa_check.main(["checks", "--size", "trivial", "--draws", "3", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["command"].startswith("python -m bench.sdpa_check") and record["date"] and record["machine"]
    rows = {r["check"]: r for r in record["rows"]}
    # SDPA on the CPU with dropout is its math path: softmax -> F.dropout -> matmul, bit for bit
    assert rows["SDPA p=0.1 bool mask: default vs MATH only, same seed"]["value"] == 0.0
    for name in ("output", "grad q", "grad k", "grad v"):
        assert rows[f"SDPA vs softmax->F.dropout->matmul, same seed: {name}"]["value"] < 1e-6
    assert rows["SDPA: two consecutive calls draw different masks"]["value"] > 0.01
    same = [r for c, r in rows.items() if c.startswith("model") and "same masks" in c or "dropout 0," in c]
    assert len(same) >= 4 and all(r["value"] < 1e-5 for r in same)
    other = [r for c, r in rows.items() if "other masks" in c and "gradients" in c]
    assert other and all(r["value"] > 1e-3 for r in other)  # the comparison sees a different mask
    emulated = [r for c, r in rows.items() if c.startswith("bernoulli_ == mt19937 emulation")]
    assert len(emulated) == 1 and emulated[0]["value"] is True
    rates = [r for c, r in rows.items() if "keep rate" in c]
    assert len(rates) == 9 and all(abs(r["value"] - 0.9) < 0.01 for r in rates)
    assert sum(c.startswith("expected gradient") for c in rows) == 4
    assert "fast A vs fast B" in capsys.readouterr().out


def test_torch_bernoulli_emulation_is_torch():
    import torch

    from bench.sdpa_check import torch_bernoulli_emulated

    torch.manual_seed(77)
    assert (torch.empty(1000).bernoulli_(0.3).bool().numpy() == torch_bernoulli_emulated(77, 1000, 0.3)).all()
