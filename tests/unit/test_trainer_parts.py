"""The trainer's parts on their own (train/loop.py: start, train, finish, validate, save), the values derived
in one place, and what a start must refuse (or warn about) before anything is written to --out: options that
would be accepted and then ignored, tracker settings the tracker refuses, paths no UTF-8 record can hold
(issue 26 items 9 and 10)."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from sharnn.corpus.data import ByteSplit, StreamLoader
from tests.helpers import REPO, exits_with
from train.config import TrainConfig, eval_segment_len, parse_args

pytestmark = pytest.mark.usefixtures("one_thread")

# A model small enough that a start, two steps and a test take seconds.
SMALL = ["--preset", "tiny", "--model.d_model", "32", "--model.d_ff", "64", "--model.mem_len", "64",
         "--bptt", "32", "--warmup_steps", "1", "--log_every", "1", "--eval_every", "0", "--save_every", "0",
         "--eval_max_segments", "2", "--sample_bytes", "16", "--test_streams", "4"]


def refused(argv: list[str], out: Path, *fragments: str) -> str:
    """train.loop.main stops with one `error:` line holding every fragment, and --out is not created."""
    from train.loop import main

    message = exits_with(main, [*argv, "--out", str(out)], *fragments)
    assert "\n" not in message, message
    assert not os.path.lexists(out), "a refused start wrote to --out"
    return message


# ------------------------------------------------------------------------------- one owner per value
def test_the_evaluation_segment_length_is_worked_out_in_one_place():
    assert TrainConfig(bptt=64).eval_len == 64
    assert TrainConfig(bptt=64, eval_bptt=200).eval_len == 200
    assert eval_segment_len(None, 1024) == 1024 and eval_segment_len(16, 1024) == 16


def test_train_loop_functions_fit_on_one_screen():
    tree = ast.parse((REPO / "train" / "loop.py").read_text())
    long = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 80}
    assert not long, long


# --------------------------------------------------------------------------- issue 26 item 9: ignored
def test_profile_steps_beyond_max_steps_is_refused_in_one_line(text_corpus, tmp_path):
    message = refused(["--data", str(text_corpus), "--max_steps", "10", "--warmup_steps", "2",
                       "--profile_steps", "5:20"], tmp_path / "run",
                      "profile_steps 5:20 ends after max_steps (10)")
    assert message.startswith("error: profile_steps"), message
    cfg, _ = parse_args(["--max_steps", "10", "--warmup_steps", "2", "--profile_steps", "5:10"])  # fits
    assert cfg.profile_steps == "5:10"


def test_profile_steps_after_the_end_of_an_epoch_bounded_run_is_a_warning():
    from train.loop import warn_if_profile_past_end

    split = ByteSplit.from_bytes(np.arange(10_000, dtype=np.uint8).tobytes())
    loader = StreamLoader(split, batch_size=4, bptt=50, rank=0, world_size=1, seed=0, vary_bptt=False)
    said = []
    cfg = TrainConfig(max_steps=None, epochs=1, bptt=50, vary_bptt=False, batch_size=4, warmup_steps=1,
                      profile_steps="60:61")
    warn_if_profile_past_end(cfg, 0, loader, said.append)  # an epoch: (2500 - 2) / 50 -> 50 steps
    assert len(said) == 1 and "expected to end at step 50" in said[0] and "no profile" in said[0], said
    said.clear()
    warn_if_profile_past_end(dataclasses.replace(cfg, profile_steps="45:55"), 0, loader, said.append)
    assert len(said) == 1 and "the profile will stop there" in said[0], said
    said.clear()
    warn_if_profile_past_end(dataclasses.replace(cfg, profile_steps="2:3"), 0, loader, said.append)
    assert said == []


def test_init_from_with_a_unigram_output_bias_is_refused_in_one_line(text_corpus, random_model, tmp_path,
                                                                     fresh_accelerate_state):
    """--output_bias_init sets the bias of random weights; --init_from brings trained ones, and the setting
    would be dropped without a word. Refused rather than applied: overwriting a trained bias undoes part of
    the training the run starts from. (Weights that fit, and a short run: without the refusal it trains.)"""
    fits = ["--model.d_model", "128", "--model.d_ff", "512", "--model.n_layer", "2", "--model.mem_len", "512"]
    message = refused(["--data", str(text_corpus), *SMALL, *fits, "--max_steps", "1", "--no_test_at_end",
                       "--init_from", str(random_model), "--output_bias_init", "unigram"], tmp_path / "run",
                      "output_bias_init unigram", "init_from", "give one of them")
    assert message.startswith("error: output_bias_init"), message


# ---------------------------------------------------------------- issue 26 item 10: checked before writing
def test_a_wandb_setting_that_wandb_refuses_is_one_line_and_writes_nothing(text_corpus, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "bogus")
    refused(["--data", str(text_corpus), "--report_to", "wandb"], tmp_path / "run",
            "--report_to wandb: WANDB_MODE='bogus'", "'online', 'offline'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "a/b")
    refused(["--data", str(text_corpus), "--report_to", "tensorboard,wandb"], tmp_path / "run",
            "WANDB_PROJECT='a/b'", "Invalid project name")


def test_a_non_utf8_out_is_one_line_and_writes_nothing(text_corpus, tmp_path):
    out = os.fsdecode(bytes(tmp_path / "run") + b"\xff")  # as Python decodes such a command-line argument
    refused(["--data", str(text_corpus)], Path(out), "out b'", "\\xff' is not UTF-8")


# ----------------------------------------------------------------------------- start, train and finish
def test_start_validate_save_train_finish_one_by_one(text_corpus, tmp_path, fresh_accelerate_state):
    from sharnn.io.runlock import RunLock
    from train import loop

    out = tmp_path / "run"
    cfg, _ = parse_args([*SMALL, "--data", str(text_corpus), "--out", str(out), "--max_steps", "2"])
    with RunLock() as lock:
        run = loop.start(cfg, lock)
        written = sorted(p.name for p in out.iterdir())
        assert written == [".lock", "config.yaml", "metrics.jsonl", "tensorboard"]
        assert run.ts.step == 0 and run.raw_model is run.accelerator.unwrap_model(run.model)

        bpc = loop.validate(run)  # before any step: the random model's bpc, the best so far
        assert (run.val_bpc, run.last_val_step, run.ts.best_val_bpc, run.ts.best_step) == (bpc, 0, bpc, 0)
        loop.save(run)
        assert run.saved_step == 0 and (out / "checkpoints" / "step-00000000").is_dir()

        loop.train(run)
        assert run.ts.step == 2 and run.exit_reason == "finished" and run.last_val_step == 0
        loop.finish(run)  # the last step validated and saved, then tested
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 2 and summary["exit"] == "finished" and summary["test_bpc"] is not None
    assert run.last_val_step == 2 and run.saved_step == 2
    assert (out / "checkpoints" / "step-00000002").is_dir() and not (out / ".lock").exists()
