"""python -m bench.original: the original's data format, its log, the bytes/s conversion, the apex stand-in,
the run-and-kill harness (against a fake main.py), bad input; and, where checkouts of the original exist
(SHARNN_ORIGINAL, SHARNN_LAMB), one end-to-end run at a tiny shape. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import bench.original as bo
from tests.helpers import REPO

# The original's log line, as its main.py formats it (train(), every --log-interval batches).
ORIGINAL_FORMAT = ("| epoch {:3d} | {:5d}/{:5d} batches | lr {:05.5f} | ms/batch {:5.2f} | "
                   "loss {:5.2f} | ppl {:8.2f} | bpc {:8.3f}")


def original_line(batch: int, ms: float, total: int = 385) -> str:
    return ORIGINAL_FORMAT.format(0, batch, total, 0.002, ms, 3.1, 22.2, 4.47)


def corpus_tokens(text: str) -> list[str]:
    """What the original's data.Corpus.tokenize makes of a file: per line, line.split() + ['<eos>']."""
    out = []
    for line in text.splitlines(keepends=True):
        out += line.split() + ["<eos>"]
    return out


# ------------------------------------------------------------------------------------------ data format
def test_original_text_is_prep_enwik8s_format():
    data = bytes([65, 32, 10, 0, 255, 10, 10, 9, 13, 49])
    text = bo.original_text(data)
    assert text == "65 32 \n 0 255 \n \n 9 13 49"
    # prep_enwik8.py's own expression
    assert text == " ".join([str(c) if c != ord("\n") else "\n" for c in data])
    # data.Corpus: every byte its decimal token, byte 10 the <eos> of its line, one <eos> for the last line
    assert corpus_tokens(text) == ["<eos>" if b == 10 else str(b) for b in data] + ["<eos>"]
    assert corpus_tokens(bo.original_text(b"\n\n")) == ["<eos>", "<eos>"]  # ends with a newline: no extra


def test_corpus_has_every_byte_value_and_enough_tokens(tmp_path):
    data = bo.random_bytes(5000, seed=3)
    assert len(data) == 5000 and set(data) == set(range(256)) and data == bo.random_bytes(5000, seed=3)
    sizes = bo.write_corpus(tmp_path, batch_size=4, bptt=32, batches=6)
    train = corpus_tokens((tmp_path / "train.txt").read_text())
    assert len(set(train)) == 256  # 255 byte tokens and <eos>: the original's vocabulary, as sharnn's 256
    assert len(train) in (sizes["train"], sizes["train"] + 1)  # + 1: the last line's <eos>
    assert len(train) // 4 >= 32 * (6 + 10)  # per stream, for batches + 10 segments of at most bptt
    for split in ("valid", "test"):
        assert len(corpus_tokens((tmp_path / f"{split}.txt").read_text())) in (sizes[split], sizes[split] + 1)


# ------------------------------------------------------------------------------------------------- log
def test_parse_log_times_only_intervals_after_the_warm_up():
    lines = ["Producing dataset...", "Model total parameters: 3433991",
             *(original_line(b, 1000.0 + b) for b in range(10, 90, 10)),
             "| end of epoch   1 | time: 1.00s |"]
    intervals = bo.parse_log(lines, log_interval=10, warmup_batches=50)
    assert [i.batch for i in intervals] == [10, 20, 30, 40, 50, 60, 70, 80]
    assert [i.ms_per_batch for i in intervals] == [1000.0 + b for b in range(10, 90, 10)]
    assert [i.batch for i in intervals if i.timed] == [60, 70, 80]  # batches 51..80
    # no warm-up: still not the first line (batches 0..10, its time divided by 10)
    assert [i.batch for i in bo.parse_log(lines, 10, 0) if i.timed] == [20, 30, 40, 50, 60, 70, 80]
    assert [i.batch for i in bo.parse_log(lines, 10, 45) if i.timed] == [60, 70, 80]


def test_parse_log_reads_the_originals_number_formats():
    for batch, total, ms in [(1, 14, 7.12), (10, 385, 37.96), (100, 30, 5597.95), (3, 5, 0.5),
                             (12345, 99999, 32782.26)]:
        (interval,) = bo.parse_log([original_line(batch, ms, total)], 1, 0)
        assert interval.batch == batch and interval.ms_per_batch == pytest.approx(ms)


def test_parse_log_reads_a_log_the_original_wrote():
    log = Path(__file__).parent / "fixtures" / "original_trained" / "main.log"  # lines: "seconds output"
    lines = [line.strip().split(" ", 1)[1] for line in log.read_text().splitlines() if line.strip()]
    intervals = bo.parse_log(lines, 10, 0)
    assert intervals[0].batch == 10 and intervals[0].ms_per_batch == 37.96 and not intervals[0].timed
    logged = [line for line in lines if "ms/batch" in line]
    assert len(logged) > 30 and [i.batch for i in intervals] == list(range(10, 10 * len(logged) + 1, 10))
    assert [i.ms_per_batch for i in intervals] == [float(line.split("ms/batch")[1].split("|")[0])
                                                    for line in logged]


# ---------------------------------------------------------------------------------------------- bytes/s
def test_bytes_per_s_uses_the_expected_segment_length():
    assert bo.bytes_per_s(1000.0, 16, 128) == 2048.0
    assert bo.bytes_per_s(500.0, 4, 32.5) == 260.0
    # the original's draw (main.py train()), vectorised: bptt w.p. 0.95 else bptt / 2, int(N(., 5)) (toward
    # zero), at least 5, at most bptt
    rng = np.random.RandomState(0)
    for bptt in (128, 32):
        n = 1_000_000
        base = np.where(rng.random_sample(n) < 0.95, float(bptt), bptt / 2.0)
        seq = np.minimum(np.maximum(5, np.trunc(rng.normal(base, 5))), bptt)
        assert bo.expected_seq_len(bptt) == pytest.approx(seq.mean(), abs=0.06)
    assert bo.expected_seq_len(128) == pytest.approx(122.64, abs=0.01)
    # the warm-up: the 5000-position memory is full after ~41 batches of 122.6 bytes, rounded up to 50
    assert bo.default_warmup(128, 10) == 50
    assert bo.default_warmup(128, 1) == 41


def test_summary_pools_the_original_and_takes_the_ratio_per_round():
    def rnd(r, original_rates, sharnn_rate):
        intervals = [{"batch": 10, "bytes_per_s": 1.0, "timed": False}]
        intervals += [{"batch": 20 + i, "bytes_per_s": x, "timed": True, "others_cores": 0.0}
                      for i, x in enumerate(original_rates)]
        o = {"intervals": intervals, "bytes_per_s": float(np.median(original_rates)),
             "bytes_per_s_min": min(original_rates), "bytes_per_s_max": max(original_rates),
             "ms_per_batch": 1000.0, "others_cores": 0.0}
        s = {"bytes_per_s": sharnn_rate, "bytes_per_s_min": sharnn_rate - 10,
             "bytes_per_s_max": sharnn_rate + 10, "others_cores": None}
        return {"round": r, "original": o, "sharnn": s, "ratio": sharnn_rate / o["bytes_per_s"]}

    rounds = [rnd(1, [100, 110, 90], 300), rnd(2, [120, 100, 100], 330)]
    summary = bo.summarize(rounds)
    assert summary["original_bytes_per_s"] == 100 and summary["original_bytes_per_s_min"] == 90
    assert summary["original_bytes_per_s_max"] == 120
    assert summary["sharnn_bytes_per_s"] == 315 and summary["sharnn_bytes_per_s_min"] == 290
    assert summary["ratio"] == pytest.approx(3.15) and summary["ratio_min"] == 3.0
    assert summary["ratio_max"] == 3.3 and summary["meets_target"]
    text = "\n".join(bo.table(rounds, summary))
    assert "3.15 (3.00-3.30)" in text and "100 (90-120)" in text and "target >= 3: met" in text
    assert summary["original_quiet_intervals"] == 6 == summary["original_intervals"]
    assert "quiet intervals only" not in text
    # intervals with other processes busy are counted apart: the original's median while the machine was quiet
    rounds[0]["original"]["intervals"][1]["others_cores"] = 0.9  # the 100 of round 1
    rounds[1]["original"]["intervals"][1]["others_cores"] = 0.5  # the 120 of round 2
    summary = bo.summarize(rounds)
    assert summary["original_quiet_intervals"] == 4 and summary["original_quiet_bytes_per_s"] == 100
    assert (summary["original_quiet_bytes_per_s_min"], summary["original_quiet_bytes_per_s_max"]) == (90, 110)
    assert "quiet intervals only (others <= 0.1), 4 of 6: 100 (90-110) bytes/s" in "\n".join(
        bo.table(rounds, summary))


def test_others_cores_is_the_machines_cpu_time_less_ours():
    assert bo.others_cores(10.0, 16.0, 4.0, 4.0) == 0.5
    assert bo.others_cores(10.0, 12.0, 4.0, 4.0) == 0.0  # clock ticks and rusage disagree a little
    assert bo.others_cores(None, 12.0, 4.0, 4.0) is None
    if Path("/proc/stat").exists():
        assert bo.machine_cpu_s() > 0 and bo.process_cpu_s(os.getpid()) > 0


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


# --------------------------------------------------------------------------------------------- flags
def test_original_flags_map_sharnns_small_preset():
    _, cfg, model_cfg, batch, bptt = bo.scenario_config("small-fp32")
    shape = bo.Shape(emsize=256, nhid=1024, nlayers=4, bptt=128, batch_size=16)
    flags = bo.original_flags(cfg, shape, Path("/d"), Path("/s.pt"), 10)
    pairs = dict(zip(flags[::2], flags[1::2]))
    assert {k: pairs[k] for k in ("--emsize", "--nhid", "--nlayers", "--bptt", "--batch_size", "--optimizer",
                                  "--log-interval", "--epochs", "--data")} == {
        "--emsize": "256", "--nhid": "1024", "--nlayers": "4", "--bptt": "128", "--batch_size": "16",
        "--optimizer": "lamb", "--log-interval": "10", "--epochs": "1", "--data": "/d/"}
    floats = ("--dropout", "--dropouth", "--dropouti", "--lr", "--wdecay", "--clip")
    assert [float(pairs[k]) for k in floats] == [0.1, 0.1, 0.1, 2e-3, 1.2e-6, 0.25]
    assert flags[-1] == "--cuda"  # store_false in the original: passing it turns CUDA off
    assert bo.shape_differences(cfg, model_cfg, batch, bptt, shape) == []
    tiny = bo.Shape(emsize=32, nhid=128, nlayers=2, bptt=32, batch_size=4)
    assert len(bo.shape_differences(cfg, model_cfg, batch, bptt, tiny)) == 5


# ------------------------------------------------------------------------------------------- bad input
def fake_checkouts(root: Path, main_py: str = "", lamb_init: str = "") -> tuple[Path, Path]:
    original, lamb = root / "sha-rnn", root / "pytorch-lamb"
    (lamb / "pytorch_lamb").mkdir(parents=True)
    original.mkdir()
    (original / "main.py").write_text(main_py)
    (original / "model.py").write_text("")
    (lamb / "pytorch_lamb" / "__init__.py").write_text(lamb_init)
    return original, lamb


@pytest.mark.parametrize("case, message", [
    ("no-main", "has no main.py: point it at a checkout of Smerity/sha-rnn"),
    ("no-lamb", "has no pytorch_lamb/__init__.py"),
    ("batches-not-multiple", "must be a multiple of --log-interval"),
    ("batches-before-warmup", "leaves no timed log interval"),
    ("scenario", "is not a training scenario"),
    ("rounds", "must be >= 1"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, case, message):
    original, lamb = fake_checkouts(tmp_path)
    out = tmp_path / "out" / "sub" / "original.json"
    args = ["--original", str(original), "--lamb", str(lamb), "--json", str(out)]
    if case == "no-main":
        (original / "main.py").unlink()
    elif case == "no-lamb":
        args[3] = str(tmp_path)
    elif case == "batches-not-multiple":
        args += ["--batches", "55"]
    elif case == "batches-before-warmup":
        args += ["--batches", "50"]  # small: warm-up 50, so the first timed line is 60
    elif case == "scenario":
        args += ["--scenario", "small-eval"]
    else:
        args += ["--rounds", "0"]
    assert bo.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


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
