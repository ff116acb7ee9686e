"""Everything a run would fail on later is refused at the start, by the trainer's main, with one `error:`
line naming the field and its limit, before anything is written to --out (issue 18: "Fails late")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sharnn.corpus.data import ByteSplit, EvalStreams, StreamLoader
from tests.helpers import exits_with
from train.config import TrainConfig
from train.loop import main
from train.preflight import MIN_EVAL_STREAM_BYTES, MIN_TRAIN_STREAM_BYTES, corpus_problem

# The text corpus's splits (tests/conftest.py): valid and test 50,000 bytes each, train 600,000.
CASES = [
    # fields that cannot work on any corpus
    (["--eval_max_segments", "0"], ["eval_max_segments must be >= 1 or None", "got 0"]),
    (["--eval_bptt", "0"], ["eval_bptt must be >= 1 or None", "got 0"]),
    (["--model.vocab_size", "300"], ["model.vocab_size must be 256", "got 300"]),
    # the model's own checks (sharnn.config.ModelConfig.check), as one line and not tyro's box
    (["--model.mem_len", "0"], ["model.mem_len must be >= 1, got 0"]),
    (["--model.dropout", "1.5"], ["model.dropout must be in [0, 1), got 1.5"]),
    (["--model.d_model", "64", "--model.d_ff", "32"], ["model.d_ff (32) must be >= d_model (64)"]),
    (["--lr", "-0.001"], ["lr must be a finite number > 0", "got -0.001"]),
    (["--lr", "nan"], ["lr must be a finite number > 0", "got nan"]),
    (["--lr", "inf"], ["lr must be a finite number > 0", "got inf"]),
    (["--min_trust", "-0.25"], ["min_trust must be a finite number >= 0", "got -0.25"]),
    (["--min_trust", "inf"], ["min_trust must be a finite number >= 0", "got inf"]),
    (["--clip", "nan"], ["clip must be a finite number >= 0"]),
    (["--weight_decay", "-1"], ["weight_decay must be a finite number >= 0"]),
    (["--warmup_steps", "-1"], ["warmup_steps must be >= 0", "got -1"]),
    (["--save_every", "-1"], ["save_every must be >= 0", "got -1"]),
    (["--sample_bytes", "-1"], ["sample_bytes must be >= 0", "got -1"]),
    (["--eval_every", "-1"], ["eval_every must be >= 0", "got -1"]),
    (["--cooldown_steps", "-1"], ["cooldown_steps must be >= 0", "got -1"]),
    (["--max_steps", "10", "--warmup_steps", "2", "--cooldown_steps", "11"],
     ["cooldown_steps must be <= max_steps (10)", "got 11"]),
    (["--epochs", "nan"], ["epochs must be > 0"]),
    (["--epochs", "inf", "--max_steps", "None"], ["epochs must be > 0 (and finite unless max_steps is set)"]),
    (["--seed", "-1"], ["seed must be in [0, 2**31)", "got -1"]),
    # the corpus's real sizes
    (["--eval_streams", "25001"], ["eval_streams 25001 is too many for the validation split of 50000 bytes",
                                   "eval_streams must be <= 25000"]),
    (["--test_streams", "30000"], ["test_streams 30000 is too many for the test split of 50000 bytes",
                                   "test_streams must be <= 25000"]),
    (["--batch_size", "200001"], ["200001 training streams is too many for the training split of 600000",
                                  "batch_size must be <= 200000"]),
]

YAML_CASES = [  # typed exactly as flags are, the file and the field named
    ("batch_size: true\n", ["batch_size: true is not a value --batch_size takes (INT)"]),
    ("batch_size: 2.7\n", ["batch_size: 2.7 is not a value --batch_size takes (INT)"]),
    ('vary_bptt: "no"\n', ["vary_bptt: 'no' is not a value --vary_bptt takes (true or false)"]),
    ("model: 5\n", ["model must be a mapping of its fields (vocab_size, d_model", "got 5"]),
    ("model:\n  mem_len: 512.9\n", ["model.mem_len: 512.9 is not a value --model.mem_len takes (INT)"]),
    ("model:\n  n_layer: 0\n", ["model.n_layer must be >= 1, got 0"]),
    ("lr: -1e-3\n", ["lr must be a finite number > 0, got -0.001"]),  # a string to PyYAML: a number here
    ("eval_max_segments: 0\n", ["eval_max_segments must be >= 1"]),
    ("learning_rate: 0.1\n", ["unknown fields ['learning_rate']"]),
]


@pytest.fixture(scope="module")
def tiny_valid_corpus(tmp_path_factory) -> Path:
    """A corpus whose validation split holds 10 bytes (sharnn-prepare now refuses splits under 1 KiB; a
    corpus made otherwise, or by an earlier version, may have one)."""
    import sharnn.corpus.prepare
    import sharnn.corpus.writer

    src = tmp_path_factory.mktemp("src") / "bytes.bin"
    src.write_bytes(np.random.default_rng(0).integers(0, 256, 6000, dtype=np.uint8).tobytes())
    out = tmp_path_factory.mktemp("corpus") / "tiny-valid"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sharnn.corpus.writer, "MIN_SPLIT_BYTES", 1)
        sharnn.corpus.prepare.prepare_files([src], out, valid_bytes=10, test_bytes=1000)
    return out


def refused(argv: list[str], out: Path, *fragments: str) -> str:
    message = exits_with(main, [*argv, "--out", str(out)], *fragments)
    assert "\n" not in message, message
    assert not out.exists(), "a refused start wrote to --out"
    return message


@pytest.mark.parametrize("argv,fragments", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_refused_at_start(argv, fragments, text_corpus, tmp_path):
    refused(["--data", str(text_corpus), *argv], tmp_path / "run", *fragments)


@pytest.mark.parametrize("text,fragments", YAML_CASES, ids=[t.strip() for t, _ in YAML_CASES])
def test_yaml_refused_at_start_naming_the_file(text, fragments, text_corpus, tmp_path):
    yml = tmp_path / "run.yaml"
    yml.write_text(text)
    message = refused(["--data", str(text_corpus), "--config", str(yml)], tmp_path / "run", *fragments)
    assert message.startswith(f"error: {yml}: "), message


def test_a_ten_byte_validation_split(tiny_valid_corpus, tmp_path):
    data = ["--data", str(tiny_valid_corpus)]
    refused(data, tmp_path / "run", "eval_streams 8 is too many for the validation split of 10 bytes",
            "eval_streams must be <= 5")
    refused([*data, "--eval_streams", "5"], tmp_path / "run",
            "sample_bytes 160 needs a validation split of at least 64 bytes", "--sample_bytes 0")


@pytest.mark.parametrize("n_bytes", [2, 3, 17, 1000])
def test_limits_are_those_of_the_loaders(n_bytes):
    """The largest stream counts accepted are the largest the data loaders take: one more and they refuse."""
    split = ByteSplit.from_bytes(bytes(n_bytes))
    most = n_bytes // MIN_EVAL_STREAM_BYTES
    cfg = TrainConfig(eval_streams=most, test_streams=most, batch_size=1, sample_bytes=0)
    assert corpus_problem(cfg, 1, ByteSplit.from_bytes(bytes(10**4)), split, split) is None
    EvalStreams(split, most, 64, 0, 1)
    cfg.eval_streams += 1
    assert "eval_streams" in corpus_problem(cfg, 1, ByteSplit.from_bytes(bytes(10**4)), split, split)
    with pytest.raises(ValueError):
        EvalStreams(split, most + 1, 64, 0, 1)

    most_train = n_bytes // MIN_TRAIN_STREAM_BYTES  # 2 ranks: at most most_train // 2 streams each
    cfg = TrainConfig(batch_size=max(1, most_train // 2), eval_streams=1, test_streams=1, sample_bytes=0)
    fits = most_train >= 2
    assert (corpus_problem(cfg, 2, split, split, None) is None) is fits
    if fits:
        StreamLoader(split, cfg.batch_size, 64, 1, 2, 0)
        cfg.batch_size += 1
        assert "batch_size must be <=" in corpus_problem(cfg, 2, split, split, None)
    with pytest.raises(ValueError):
        StreamLoader(split, cfg.batch_size, 64, 1, 2, 0)


def test_test_split_unchecked_without_a_final_test():
    split = ByteSplit.from_bytes(bytes(100))
    cfg = TrainConfig(batch_size=1, eval_streams=1, test_streams=1000, test_at_end=False)
    assert corpus_problem(cfg, 1, split, split, None) is None
