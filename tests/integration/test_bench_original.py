"""python -m bench.original: the original's data format, its log, the bytes/s conversion, the apex stand-in,
the run-and-kill harness (against a fake main.py), bad input; and, where checkouts of the original exist
(SHARNN_ORIGINAL, SHARNN_LAMB), one end-to-end run at a tiny shape. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import bench.original as bo
from tests.helpers import REPO
from tests.unit.test_bench_original import ORIGINAL_FORMAT, fake_checkouts


# ---------------------------------------------------------------------------------------- the stand-ins
def test_apex_standin_is_layer_norm_with_eps_1e12_and_amp_does_nothing(tmp_path):
    assert bo.write_standins(tmp_path, tensorboardx=True) == ["apex", "tensorboardX"]
    check = textwrap.dedent("""
        import torch
        import torch.nn.functional as F
        from apex import amp
        from apex.normalization.fused_layer_norm import FusedLayerNorm as LayerNorm  # the original's import
        from tensorboardX import SummaryWriter

        ln = LayerNorm(16, eps=1e-12)  # as the original's model.py builds every LayerNorm
        x = torch.randn(5, 3, 16) * 1e-4  # small variance: eps 1e-12 and torch's 1e-5 differ here
        assert torch.equal(ln(x), F.layer_norm(x, (16,), eps=1e-12))
        assert not torch.allclose(ln(x), F.layer_norm(x, (16,), eps=1e-5))
        params = dict(ln.named_parameters())
        assert sorted(params) == ["bias", "weight"], params  # as apex's: the optimizer steps them
        assert torch.equal(params["weight"], torch.ones(16)) and torch.equal(params["bias"], torch.zeros(16))
        assert not isinstance(ln, torch.nn.LayerNorm)  # the original's init_weights leaves it alone

        model, opt = torch.nn.Linear(2, 1), object()
        assert amp.initialize(model, opt, opt_level="O1") == (model, opt)
        loss = model(torch.ones(1, 2)).sum()
        with amp.scale_loss(loss, opt) as scaled:
            assert scaled is loss
            scaled.backward()
        assert model.weight.grad is not None
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", check], env={**os.environ, "PYTHONPATH": str(tmp_path)},
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "apex stand-in: amp.initialize(opt_level=O1) does nothing; torch threads" in proc.stdout
    assert proc.stdout.strip().endswith("OK")
    assert bo.write_standins(tmp_path / "b", tensorboardx=False) == ["apex"]


# ------------------------------------------------------------------------ the harness, on a fake original
FAKE_MAIN = textwrap.dedent("""
    import os, sys, time
    from apex import amp                      # the stand-ins and the lamb checkout are importable
    from apex.normalization.fused_layer_norm import FusedLayerNorm
    from pytorch_lamb import Lamb
    assert "--cuda" in sys.argv and os.environ["OMP_NUM_THREADS"] == "1"
    open(os.environ["FAKE_PID_FILE"], "a").write(f"{os.getpid()}\\n")
    print("Total number of tokens: 256")
    print("Model total parameters: 1234")
    amp.initialize(None, None, opt_level="O1")
    for batch in range(1, 1000):
        if batch % 2 == 0:
            print(FORMAT.format(0, batch, 999, 0.002, 100.0 * batch, 3.0, 20.0, 4.3), flush=True)
        if batch > int(os.environ.get("FAKE_STOP_AT", "1000")):
            sys.exit(3)
    time.sleep(600)
""").replace("FORMAT", repr(ORIGINAL_FORMAT))


def test_harness_kills_the_original_at_the_batch_count_and_writes_the_record(tmp_path, monkeypatch, capsys):
    original, lamb = fake_checkouts(tmp_path, FAKE_MAIN, "Lamb = object\n")
    pids = tmp_path / "pids"
    monkeypatch.setenv("FAKE_PID_FILE", str(pids))
    sharnn = {"bytes_per_s": 1000.0, "bytes_per_s_min": 900.0, "bytes_per_s_max": 1100.0, "threads": 1}
    calls = []

    def fake_sharnn(scenario, out, env, timeout):
        calls.append((scenario, env["OMP_NUM_THREADS"]))
        record = {**sharnn, "wall_s": 1.0, "others_cores": 0.0}
        return ["python", "-m", "bench", "--scenario", scenario], record

    monkeypatch.setattr(bo, "run_sharnn", fake_sharnn)
    out = tmp_path / "out.json"
    assert bo.main(["--original", str(original), "--lamb", str(lamb), "--batches", "10", "--log-interval",
                    "2", "--warmup-batches", "4", "--threads", "1", "--rounds", "2", "--json", str(out)]) == 0
    assert calls == [("small-fp32", "1")] * 2
    for pid in map(int, pids.read_text().split()):  # both runs were killed (and reaped)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    record = json.loads(out.read_text())
    assert [r["first"] for r in record["rounds"]] == ["original", "sharnn"]
    o = record["rounds"][0]["original"]
    assert [(i["batch"], i["timed"]) for i in o["intervals"]] == [(2, False), (4, False), (6, True),
                                                                   (8, True), (10, True)]
    assert o["ms_per_batch"] == 800.0 and o["vocabulary"] == 256 and o["params_printed"] == 1234
    assert o["threads"] == 1
    seq = bo.expected_seq_len(128)
    assert o["bytes_per_s"] == pytest.approx(16 * seq / 0.8)
    assert o["bytes_per_s_max"] == pytest.approx(16 * seq / 0.6)
    assert record["rounds"][0]["ratio"] == pytest.approx(1000.0 / o["bytes_per_s"])
    assert record["summary"]["ratio"] == pytest.approx(1000.0 / o["bytes_per_s"])
    assert record["same_shape"] and record["threads"] == 1 and record["machine"]["torch"]
    assert record["original"]["command"][1] == str(original / "main.py")
    assert record["original"]["warmup_batches"] == 4 and record["original"]["commit"] is None
    assert record["sharnn"]["command"][:3] == ["python", "-m", "bench"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.json")]
    table = capsys.readouterr().out
    assert "sharnn / original =" in table and "NOT met" in table


def test_harness_reports_an_original_that_stops_early(tmp_path, monkeypatch):
    original, lamb = fake_checkouts(tmp_path, FAKE_MAIN, "Lamb = object\n")
    monkeypatch.setenv("FAKE_PID_FILE", str(tmp_path / "pids"))
    monkeypatch.setenv("FAKE_STOP_AT", "5")
    env = bo.run_env(1, [tmp_path / "standins", lamb])
    bo.write_standins(tmp_path / "standins", tensorboardx=False)
    with pytest.raises(RuntimeError, match=r"exited 3 before its log showed batch 10:[\s\S]*ms/batch"):
        bo.run_original([sys.executable, str(original / "main.py"), "--cuda"], tmp_path, env, 10, 2, 120)
    monkeypatch.delenv("FAKE_STOP_AT")
    env = bo.run_env(1, [tmp_path / "standins", lamb])
    with pytest.raises(RuntimeError, match="timed out after 3 s before its log showed batch 2000"):
        bo.run_original([sys.executable, str(original / "main.py"), "--cuda"], tmp_path, env, 2000, 2, 3)


def test_sharnn_run_that_fails_is_reported(tmp_path):
    with pytest.raises(RuntimeError, match=r"--scenario nope .* exited 2:[\s\S]*unknown scenario"):
        bo.run_sharnn("nope", tmp_path / "x.json", bo.run_env(1, [REPO]), timeout=300)


# ------------------------------------------------------------------------- the real original, tiny shape
@pytest.mark.slow  # the original and sharnn's tiny-fp32 bench, each in its own process (~30 s)
def test_end_to_end_against_the_original_checkouts(tmp_path):
    original, lamb = os.environ.get("SHARNN_ORIGINAL"), os.environ.get("SHARNN_LAMB")
    if not original or not lamb:
        pytest.skip("set SHARNN_ORIGINAL and SHARNN_LAMB to checkouts of Smerity/sha-rnn (218d748) and "
                    "Smerity/pytorch-lamb to run the original")
    out = tmp_path / "original.json"
    cmd = [sys.executable, "-m", "bench.original", "--original", original, "--lamb", lamb, "--rounds", "1",
           "--emsize", "32", "--nhid", "128", "--nlayers", "2", "--bptt", "32", "--batch-size", "4",
           "--batches", "6", "--log-interval", "2", "--warmup-batches", "2", "--scenario", "tiny-fp32",
           "--threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sharnn / original =" in proc.stdout
    record = json.loads(out.read_text())
    (r,) = record["rounds"]
    o = r["original"]
    assert o["vocabulary"] == 256 and o["threads"] == 1 and o["params_printed"] > 0
    assert [(i["batch"], i["timed"]) for i in o["intervals"]] == [(2, False), (4, True), (6, True)]
    assert all(i["ms_per_batch"] > 0 for i in o["intervals"]) and o["bytes_per_s"] > 0
    assert any("apex stand-in: amp.initialize" in line for line in o["log"])
    assert r["sharnn"]["scenario"] == "tiny-fp32" and r["sharnn"]["bytes_per_s"] > 0 and r["ratio"] > 0
    assert not record["same_shape"] and record["original"]["expected_commit"] == "218d748"
    assert "--emsize" in record["original"]["command"] and "--cuda" in record["original"]["command"]
