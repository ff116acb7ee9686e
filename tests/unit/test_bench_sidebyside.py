"""python -m bench.sidebyside (the original code and sharnn trained side by side): the corpus it cuts, the
segment lengths it replays, its statistics, resuming and scheduling, bad input. The whole benchmark against
the original's checkouts: tests/integration/test_bench_sidebyside.py."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import bench.sidebyside as sbs
from sharnn.corpus import data
from tests.helpers import SHIPPED_TEXT as TEXT


def corpus_tokens(text: str) -> list[str]:
    """What the original's data.Corpus.tokenize makes of a file: per line, line.split() + ['<eos>']."""
    out = []
    for line in text.splitlines(keepends=True):
        out += line.split() + ["<eos>"]
    return out


# ---------------------------------------------------------------------------------------------- corpus
def test_splits_end_in_a_newline_divide_into_the_streams_and_train_holds_every_byte_value():
    size = sbs.SIZES["tiny"]
    text = TEXT.read_bytes()
    splits = sbs.cut_splits(text, size)
    assert splits["train"][:256] == bytes(range(256))
    assert b"".join(splits.values()) == bytes(range(256)) + text[:sum(map(len, splits.values())) - 256]
    for name, n in (("train", size.train_bytes), ("valid", size.valid_bytes), ("test", size.test_bytes)):
        split = splits[name]
        assert len(split) >= n and split.endswith(b"\n")
        assert len(split) % 8 == 0 and len(split) % size.batch == 0  # 8 test streams, 4 training/valid
    with pytest.raises(ValueError, match="too short"):
        sbs.cut_splits(text[:4000], size)


def test_the_originals_tokens_are_exactly_the_bytes():
    """No <eos> added at a split's end: the original's token sequence is the split byte for byte, so both
    programs cut the same streams and score the same predictions."""
    splits = sbs.cut_splits(TEXT.read_bytes(), sbs.SIZES["tiny"])
    for split in splits.values():
        tokens = corpus_tokens(sbs.original_text(split))
        assert tokens == ["<eos>" if b == 10 else str(b) for b in split]


# ------------------------------------------------------------------------------------- segment lengths
def originals_draws(seed: int, bptt: int, n: int) -> list[int]:
    """main.py's train() as it draws (np.random's global generator, seeded once at its start)."""
    np.random.seed(seed)
    out = []
    for _ in range(n):
        base = bptt if np.random.random() < 0.95 else bptt / 2.
        seq_len = max(5, int(np.random.normal(base, 5)))
        out.append(min(seq_len, bptt))
    return out


@pytest.mark.parametrize("seed,bptt", [(1, 64), (7, 16), (5512, 128)])
def test_replayed_lengths_are_the_originals_draws(seed, bptt):
    assert sbs.original_seq_lens(seed, bptt, 3000) == originals_draws(seed, bptt, 3000)


def test_sharnns_loader_with_the_replayed_lengths_walks_the_originals_epoch(monkeypatch):
    seed, bptt, batch = 3, 16, 4
    lengths = sbs.original_seq_lens(seed, bptt, 10_000)
    monkeypatch.setattr(data, "draw_seq_len", lambda b, s, epoch, step: lengths[step])
    split = data.ByteSplit.from_bytes(TEXT.read_bytes()[:4096])
    loader = data.StreamLoader(split, batch_size=batch, bptt=bptt, rank=0, world_size=1, seed=seed)
    got = []
    while True:
        b = next(loader)
        got.append(b.T)
        if loader.epoch == 1:
            break
    L = 4096 // batch
    assert len(got) == sbs.epoch_steps(L, lengths)
    assert got[:-1] == lengths[:len(got) - 1] and got[-1] == min(lengths[len(got) - 1], L - 1 - sum(got[:-1]))


@pytest.mark.parametrize("L,steps", [(10, 2), (11, 3), (12, 3)])
def test_the_epoch_ends_where_the_originals_loop_ends(monkeypatch, L, steps):
    """`while i < L - 2`, each segment cut to L - 1 - i: at L = 10 the cursor stops at 8 = L - 2 after two
    segments of 4; at 11 a third, cut to 2 bytes."""
    assert sbs.epoch_steps(L, [4] * 10) == steps
    monkeypatch.setattr(data, "draw_seq_len", lambda b, s, epoch, step: 4)
    loader = data.StreamLoader(data.ByteSplit.from_bytes(bytes(L * 2)), batch_size=2, bptt=4, rank=0,
                               world_size=1, seed=0)
    n = 0
    while loader.epoch == 0:
        next(loader)
        n += 1
    assert n == steps


def test_replay_refuses_what_it_cannot_replay(monkeypatch):
    """`replay` installs the lengths for the first epoch at its bptt only; anything else is an error, not
    sharnn's own draws."""
    calls = []
    monkeypatch.setattr("sharnn.entry.run", lambda module: calls.append(module))
    monkeypatch.setattr(data, "draw_seq_len", data.draw_seq_len)  # restored after the test
    sbs.replay(["--seed", "2", "--bptt", "32", "--", "--max_steps", "3"])
    assert calls == ["train.loop"] and sys.argv[1:] == ["--max_steps", "3"]
    assert [data.draw_seq_len(32, 99, 0, i) for i in range(50)] == sbs.original_seq_lens(2, 32, 50)
    with pytest.raises(RuntimeError, match="first epoch"):
        data.draw_seq_len(32, 2, 1, 0)
    with pytest.raises(RuntimeError, match="first epoch"):
        data.draw_seq_len(64, 2, 0, 0)


# ------------------------------------------------------------------------------------------ statistics
def result(setting, seed, val, test, steps=100, printed=None):
    r = {"setting": setting, "seed": seed, "val_bpc": val, "test_bpc": test, "steps": steps}
    if printed is not None:
        r["printed_bpc"] = printed
    return r


def test_differences_are_paired_by_seed_with_a_95_percent_interval():
    runs = [result("original", 1, 2.0, 2.1), result("original", 2, 2.5, 2.6), result("original", 3, 3.0, 3.0),
            result("fast", 1, 2.01, 2.1), result("fast", 2, 2.53, 2.6), result("fast", 3, 3.02, 3.0)]
    s = sbs.summarize(runs, ["original", "fast"])
    d = s["val_bpc"]["minus_original"]["fast"]
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.02)
    assert d["se"] == pytest.approx(np.std([0.01, 0.03, 0.02], ddof=1) / np.sqrt(3))
    assert d["ci95"] == pytest.approx([0.02 - 4.303 * d["se"], 0.02 + 4.303 * d["se"]])
    assert d["within_002"] and not d["resolved_002"]
    assert s["val_bpc"]["settings"]["original"]["std"] == pytest.approx(0.5)
    assert sbs.t95(40) == pytest.approx(2.021, abs=2e-3) and sbs.t95(1000) == pytest.approx(1.962, abs=2e-3)
    assert any("+0.0200 +- " in line for line in sbs.table(s))


def test_unsound_runs_are_reported():
    corpus = {"valid": {"n_bytes": 1600}, "test": {"n_bytes": 800}}
    size = sbs.SIZES["tiny"]  # valid: 4 streams of 400, test: 8 of 100
    good = result("original", 1, 4.0, 5.0, 59, printed={"valid": round(4.0 * 399 / 400, 3),
                                                        "test": round(5.0 * 99 / 100, 3)})
    assert sbs.check_runs([good, result("fast", 1, 4.1, 5.1, 59)], size, corpus) == []
    bad = sbs.check_runs([{**good, "printed_bpc": {"valid": 4.0, "test": 4.95}},
                          result("fast", 1, 4.1, 5.1, 58)], size, corpus)
    assert len(bad) == 2
    assert "fast seed 1 took 58 steps, the original's epoch 59" in bad[1]
    assert "valid bpc printed 4.000, its imported model scores 4.00000" in bad[0]


# ------------------------------------------------------------------------------- resuming, scheduling
def context(tmp_path: Path) -> sbs.Context:
    return sbs.Context(original=tmp_path, lamb=tmp_path, work=tmp_path, size=sbs.SIZES["tiny"], corpus={},
                       threads=1, log_interval=10, timeout=60)


def test_a_finished_run_is_not_run_again_and_an_interrupted_one_starts_over(tmp_path, monkeypatch):
    ctx, calls = context(tmp_path), []

    def fake_sharnn(c, setting, seed, run_dir):
        calls.append((setting, seed, sorted(p.name for p in run_dir.iterdir())))
        return {"val_bpc": 1.0, "test_bpc": 1.0, "steps": 3}

    monkeypatch.setattr(sbs, "run_sharnn", fake_sharnn)
    first = sbs.run_one(ctx, "torch/bf16", 4)
    assert first["setting"] == "torch/bf16" and (tmp_path / "runs" / "torch-bf16-s4" / "result.json").exists()
    assert sbs.run_one(ctx, "torch/bf16", 4) == first and len(calls) == 1
    leftover = tmp_path / "runs" / "fast-s4"
    leftover.mkdir(parents=True)
    (leftover / "train.log").write_text("killed half way")
    sbs.run_one(ctx, "fast", 4)
    assert calls[-1] == ("fast", 4, [])  # started from an empty directory


def test_sharnn_runs_wait_for_their_seeds_original_and_a_failure_stops_new_runs(tmp_path, monkeypatch):
    ctx, order, lock = context(tmp_path), [], threading.Lock()
    finished: set = set()

    def fake_run_one(c, setting, seed):
        if setting == "original":
            time.sleep(0.2)  # a second worker is free meanwhile
        with lock:
            if setting != "original":
                assert ("original", seed) in finished
            order.append((setting, seed))
        if (setting, seed) == ("torch", 2):
            raise RuntimeError("boom")
        with lock:
            finished.add((setting, seed))
        return {"setting": setting, "seed": seed}

    monkeypatch.setattr(sbs, "run_one", fake_run_one)
    seen = []
    with pytest.raises(RuntimeError, match="torch seed 2: boom"):
        sbs.schedule(ctx, ["original", "fast", "torch"], [1, 2, 3], 2, seen.append)
    assert ("original", 3) not in order[order.index(("torch", 2)) + 2:]
    assert len(order) < 9 and [r["setting"] for r in seen].count("original") >= 2
    order.clear()
    monkeypatch.setattr(sbs, "run_one", lambda c, st, s: order.append((st, s)) or {"setting": st, "seed": s})
    sbs.schedule(ctx, ["original", "fast"], [1, 2], 1, lambda r: None)
    assert order == [("original", 1), ("fast", 1), ("original", 2), ("fast", 2)]


# -------------------------------------------------------------------------------------------- bad input
def checkouts(tmp_path: Path) -> tuple[Path, Path]:
    original, lamb = tmp_path / "sha-rnn", tmp_path / "pytorch-lamb"
    for f in (original / "main.py", original / "model.py", lamb / "pytorch_lamb" / "__init__.py"):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("")
    return original, lamb


@pytest.mark.parametrize("case,message", [
    ("no-original", "has no main.py"),
    ("setting", "--setting 'cuda'"),
    ("seeds", "--seeds must be >= 1"),
    ("dropout", "--dropout must be in [0, 1)"),
    ("work", "holds files this benchmark did not write"),
    ("text", "does not exist"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, case, message):
    original, lamb = checkouts(tmp_path)
    work = tmp_path / "work"
    args = ["--original", str(original), "--lamb", str(lamb), "--work", str(work), "--size", "tiny"]
    if case == "no-original":
        (original / "main.py").unlink()
    extra = {"setting": ["--setting", "cuda"], "seeds": ["--seeds", "0"], "dropout": ["--dropout", "1"],
             "text": ["--text", str(tmp_path / "missing")]}.get(case, [])
    if case == "work":
        work.mkdir()
        (work / "notes.txt").write_text("mine")
    assert sbs.main([*args, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    if case == "work":
        assert (work / "notes.txt").read_text() == "mine"


def test_a_work_directory_it_made_is_taken_back_even_without_its_corpus(tmp_path, monkeypatch):
    """Killed while cutting the corpus: the rerun finishes it instead of calling the directory foreign."""
    original, lamb = checkouts(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    (work / sbs.WORK_MARKER).touch()
    (work / "original-data").mkdir()  # half written
    reached = []
    monkeypatch.setattr(sbs, "write_corpus", lambda *a: reached.append(a) or sys.exit(0))
    with pytest.raises(SystemExit):
        sbs.main(["--original", str(original), "--lamb", str(lamb), "--work", str(work), "--size", "tiny"])
    assert reached and reached[0][0] == work


# -------------------------------------------------------------------------------------------- pooling
def record(path: Path, runs: list[dict], **changes) -> Path:
    """A record as --json writes it (the fields pool reads), with `changes` applied."""
    corpus = {"train": {"n_bytes": 3008, "sha256": "a"}, "valid": {"n_bytes": 1600, "sha256": "b"},
              "test": {"n_bytes": 800, "sha256": "c"}, "sources": ["/usr/lib/python3.11"], "pattern": "*.py"}
    rec = {"benchmark": "bench.sidebyside", "command": "python -m bench.sidebyside --size tiny",
           "size": "tiny",
           "shape": sbs.dataclasses.asdict(sbs.SIZES["tiny"]), "memory": 5000, "corpus": corpus,
           "original": {"path": "/src/sha-rnn", "commit": "218d748", "main_py_sha256": "m"},
           "settings": ["original", "fast"], "runs": runs, "date": "2026-12-07", "sharnn": {"commit": "x"}}
    for key, value in changes.items():
        rec[key] = {**rec[key], **value} if isinstance(value, dict) else value
    path.write_text(sbs.json.dumps(rec))
    return path


def seed_runs(seed: int, original: float, fast: float) -> list[dict]:
    printed = {"valid": round(original * 399 / 400, 3), "test": round(original * 99 / 100, 3)}
    return [result("original", seed, original, original, 59, printed=printed),
            result("fast", seed, fast, fast, 59)]


def test_pool_is_one_table_over_records_of_other_seeds(tmp_path, capsys):
    a = record(tmp_path / "a.json", seed_runs(1, 2.0, 2.01) + seed_runs(2, 2.5, 2.53))
    # another machine: the same bytes and commits at other paths
    b = record(tmp_path / "b.json", seed_runs(3, 3.0, 3.02), corpus={"sources": ["/opt/py/lib"]},
               original={"path": "/home/u/sha-rnn"}, sharnn={"commit": "y"})
    assert sbs.main(["pool", str(a), str(b), "--json", str(tmp_path / "pooled.json")]) == 0
    pooled = sbs.json.loads((tmp_path / "pooled.json").read_text())
    d = pooled["summary"]["val_bpc"]["minus_original"]["fast"]
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.02)  # as the three seeds in one record
    assert pooled["seeds"] == [1, 2, 3] and len(pooled["runs"]) == 6 and pooled["problems"] == []
    assert [(s["seeds"], s["sharnn"]) for s in pooled["pooled_from"]] == [([1, 2], {"commit": "x"}),
                                                                         ([3], {"commit": "y"})]
    assert "+0.0200 +- " in capsys.readouterr().out
    # the pooled record is this benchmark's: it can be pooled again, with a record of newer seeds, and its
    # file rewritten by the next pool; never written over a record it reads
    c = record(tmp_path / "c.json", seed_runs(4, 2.0, 2.02))
    again = ["pool", str(tmp_path / "pooled.json"), str(c), "--json", str(tmp_path / "again.json")]
    assert sbs.main(again) == 0 and sbs.main(again) == 0
    assert sbs.json.loads((tmp_path / "again.json").read_text())["seeds"] == [1, 2, 3, 4]
    with pytest.raises(SystemExit, match="the command reads"):
        sbs.main(["pool", str(tmp_path / "pooled.json"), "--json", str(tmp_path / "pooled.json")])


def test_pool_checks_its_runs_as_the_benchmark_does(tmp_path, capsys):
    runs = seed_runs(1, 2.0, 2.01)
    runs[1]["steps"] = 58
    a = record(tmp_path / "a.json", runs)
    assert sbs.main(["pool", str(a)]) == 1
    assert "fast seed 1 took 58 steps" in capsys.readouterr().err


@pytest.mark.parametrize("changes,message", [
    ({"shape": {"emsize": 32}}, "differ in their shape"),
    ({"corpus": {"valid": {"n_bytes": 1600, "sha256": "other"}}}, "differ in their corpus"),
    ({"original": {"commit": "abc1234"}}, "differ in their original"),
    ({"memory": 1000}, "differ in their memory"),
    ({"runs": seed_runs(1, 2.2, 2.3)}, "original seed 1 is in both"),
    ({"command": "python -m bench.original"}, "is not a record of python -m bench.sidebyside"),
])
def test_pool_refuses_records_of_another_benchmark_or_the_same_seeds(tmp_path, capsys, changes, message):
    a = record(tmp_path / "a.json", seed_runs(1, 2.0, 2.01))
    changes = {"runs": seed_runs(2, 2.0, 2.01), **changes}
    b = record(tmp_path / "b.json", changes.pop("runs"), **changes)
    out = tmp_path / "pooled.json"
    assert sbs.main(["pool", str(a), str(b), "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1
    assert not out.exists()


def test_pool_refuses_an_unreadable_record_and_keeps_a_foreign_json(tmp_path, capsys):
    a = record(tmp_path / "a.json", seed_runs(1, 2.0, 2.01))
    (tmp_path / "bad.json").write_text("{not json")
    assert sbs.main(["pool", str(a), str(tmp_path / "bad.json")]) == 2
    assert "bad.json: not a readable JSON record" in capsys.readouterr().err
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": true}')
    with pytest.raises(SystemExit, match="error: .*notes.json"):
        sbs.main(["pool", str(a), "--json", str(foreign)])
    assert foreign.read_text() == '{"mine": true}'


@pytest.mark.parametrize("native,extra,settings", [
    (True, [], ["original", "fast", "torch", "torch/bf16"]),
    (False, [], ["original", "fast", "torch"]),  # left out, said on stdout
    (False, ["--force"], ["original", "fast", "torch", "torch/bf16"]),
    (False, ["--setting", "fast"], ["original", "fast"]),
])
def test_bf16_runs_only_on_a_cpu_with_bf16_instructions_unless_forced(tmp_path, monkeypatch, capsys, native,
                                                                      extra, settings):
    import train.distributed

    monkeypatch.setattr(train.distributed, "native_cpu_matmul", lambda precision: native)
    seen = []
    monkeypatch.setattr(sbs, "check_args", lambda args: seen.append(list(args.settings)) or "stop here")
    original, lamb = checkouts(tmp_path)
    argv = ["--original", str(original), "--lamb", str(lamb), "--work", str(tmp_path / "w"), *extra]
    assert sbs.main(argv) == 2 and seen == [settings]
    assert ("torch/bf16 left out: this CPU has no bf16 matrix instructions" in capsys.readouterr().out) == (
        not native and not extra)


def test_an_asked_bf16_setting_on_a_cpu_without_bf16_instructions_is_refused(tmp_path, monkeypatch, capsys):
    import train.distributed

    monkeypatch.setattr(train.distributed, "native_cpu_matmul", lambda precision: precision == "fp32")
    original, lamb = checkouts(tmp_path)
    work = tmp_path / "w"
    argv = ["--original", str(original), "--lamb", str(lamb), "--work", str(work), "--setting", "torch/bf16"]
    assert sbs.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no bf16 matrix instructions" in err[0] and "--force" in err[0]
    assert not work.exists()
