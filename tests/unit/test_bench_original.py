"""python -m bench.original: the original's data format, its log, the bytes/s conversion, the apex stand-in,
the run-and-kill harness (against a fake main.py), bad input; and, where checkouts of the original exist
(SHARNN_ORIGINAL, SHARNN_LAMB), one end-to-end run at a tiny shape. No timing is asserted."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import bench.original as bo
from tests.helpers import FIXTURES

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
    log = FIXTURES / "original_trained" / "main.log"  # lines: "seconds output"
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
