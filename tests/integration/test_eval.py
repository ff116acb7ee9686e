"""sharnn-eval (train/eval_command.py) on the tiny trained run and its export (fixtures in tests/conftest.py):
one process and two give the run's own test bpc, several memory lengths, bad inputs."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from torch import nn

from sharnn.corpus.data import EvalStreams, open_split
from sharnn.io.pretrained import load_model
from tests.helpers import DDP, cli, exits_with, run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_eval_one_process_matches_the_runs_test_bpc(trained, text_corpus, tmp_path):
    summary = json.loads((trained / "summary.json").read_text())
    out = tmp_path / "eval.json"
    proc = run(cli("train.eval_command", str(trained), "--data", str(text_corpus), "--split", "test",
                   "--streams", "4", "--json", str(out)))
    result = json.loads(out.read_text())
    # --seg-len defaults to the run's evaluation length (bptt 64 for tiny), as the run's own test evaluation
    assert (result["seg_len"], result["n_streams"], result["world_size"]) == (64, 4, 1)
    assert result["model_kind"] == "checkpoint" and result["step"] == 10
    assert result["predicted_bytes"] == 4 * (50_000 // 4 - 1)
    assert math.isclose(result["bpc"], summary["test_bpc"], rel_tol=1e-6), (result, summary)
    assert f"{result['bpc']:.5f}" in proc.stdout and "512" in proc.stdout


@pytest.mark.slow
def test_eval_two_processes_give_the_same_bpc(exported, trained, text_corpus, tmp_path):
    summary = json.loads((trained / "summary.json").read_text())
    out = tmp_path / "eval2.json"
    run(cli("train.eval_command", str(exported), "--data", str(text_corpus), "--streams", "4", "--seg-len",
            "64", "--json", str(out), launch=DDP))
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["model_kind"] == "exported"
    assert math.isclose(result["bpc"], summary["test_bpc"], rel_tol=1e-6), (result, summary)


def reference_bpc(model, split, n_streams: int, seg_len: int, max_segments: int) -> float:
    """Bits per byte computed here, independently of train.step.evaluate."""
    total, count, state = 0.0, 0, None
    with torch.no_grad():
        for i, (x, y) in enumerate(EvalStreams(split, n_streams, seg_len, 0, 1)):
            if i >= max_segments:
                break
            logits, _, state = model(x.t(), state)
            loss = nn.functional.cross_entropy(logits.reshape(-1, 256), y.t().reshape(-1), reduction="sum")
            total += loss.item()
            count += y.numel()
    return total / count / math.log(2)


@pytest.mark.slow
def test_eval_several_memory_lengths_print_a_table(exported, text_corpus, tmp_path, capsys):
    from train.eval_command import main

    out = tmp_path / "mem.json"
    assert main([str(exported), "--data", str(text_corpus), "--split", "valid", "--streams", "4", "--seg-len",
                 "32", "--max-segments", "6", "--mem-len", "8", "40", "512", "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [r["mem_len"] for r in result["results"]] == [8, 40, 512] and "bpc" not in result
    split = open_split(text_corpus, "valid")
    for r in result["results"]:
        want = reference_bpc(load_model(exported, mem_len=r["mem_len"]), split, 4, 32, 6)
        assert math.isclose(r["bpc"], want, rel_tol=1e-6), (r, want)
        assert f"{r['mem_len']:>9} {r['bpc']:>9.5f}" in stdout
    assert len({r["bpc"] for r in result["results"]}) == 3  # the memory length really changed


@pytest.mark.slow
def test_eval_bad_inputs_are_clear_errors(trained, ckpt, exported, tmp_path):
    from train.eval_command import main

    corpus_args = ["--data", str(trained)]
    exits_with(main, [str(tmp_path / "nope"), *corpus_args], "does not exist")
    partial = tmp_path / "run" / "checkpoints" / "step-00000010"
    shutil.copytree(ckpt, partial)
    (partial / "train_state.json").unlink()  # as if the run died while writing it
    exits_with(main, [str(partial), *corpus_args], "incomplete checkpoint", "train_state.json")
    exits_with(main, [str(tmp_path / "run"), *corpus_args], "no complete checkpoint")
    wrong = tmp_path / "wrong"
    shutil.copytree(exported, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps(config | {"d_model": 64}))
    exits_with(main, [str(wrong), *corpus_args], "does not match", "embed.weight", "(256, 128)")
    exits_with(main, [str(exported), "--data", str(trained)], "not a prepared sharnn corpus",
               "sharnn-prepare")
    other = tmp_path / "other_corpus"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"format": "token-corpus", "splits": {"test": {}}}))
    exits_with(main, [str(exported), "--data", str(other)], "not a sharnn corpus manifest")
    assert not list(tmp_path.glob("*.json"))
