"""Checks of a run's config against the corpus's real sizes, before the first step.

`TrainConfig` checks every value that cannot work on any corpus; what depends on the splits' sizes and the
world size is checked here, right after the splits are opened and before anything is written to the run
directory, so that a run does not fail at its first validation or, hours later, at the final test (where a
failure would lose the training done). Each problem is one `error:` line naming the field and its limit.
"""

from __future__ import annotations

from sharnn.corpus.data import MIN_EVAL_STREAM_BYTES, MIN_TRAIN_STREAM_BYTES, ByteSplit
from train.config import TrainConfig
from train.evaluation import SAMPLE_PROMPT_BYTES


def corpus_problem(cfg: TrainConfig, world_size: int, train: ByteSplit, valid: ByteSplit,
                   test: ByteSplit | None) -> str | None:
    """The first thing in `cfg` that the splits cannot give (None: nothing). `test` is None without
    test_at_end."""
    n_streams = world_size * cfg.batch_size
    if len(train) // n_streams < MIN_TRAIN_STREAM_BYTES:
        most = len(train) // MIN_TRAIN_STREAM_BYTES // world_size
        return (f"batch_size {cfg.batch_size} x {world_size} rank(s) = {n_streams} training streams is too "
                f"many for the training split of {len(train)} bytes: each stream needs at least "
                f"{MIN_TRAIN_STREAM_BYTES} bytes, so batch_size must be <= {most}"
                + ("" if most else "; prepare a larger training split"))
    for field, n, split, name in (("eval_streams", cfg.eval_streams, valid, "validation"),
                                  ("test_streams", cfg.test_streams, test, "test")):
        if split is None:
            continue
        if len(split) // n < MIN_EVAL_STREAM_BYTES:
            most = len(split) // MIN_EVAL_STREAM_BYTES
            limit = (f"so {field} must be <= {most}" if most else
                     f"so it holds no stream at all; prepare a larger {name} split")
            return (f"{field} {n} is too many for the {name} split of {len(split)} bytes: each stream needs "
                    f"at least {MIN_EVAL_STREAM_BYTES} bytes, {limit}")
    if cfg.sample_bytes and len(valid) < SAMPLE_PROMPT_BYTES:
        return (f"sample_bytes {cfg.sample_bytes} needs a validation split of at least {SAMPLE_PROMPT_BYTES} "
                f"bytes (the sample continues its first {SAMPLE_PROMPT_BYTES}), this one holds {len(valid)}: "
                f"pass --sample_bytes 0")
    return None


def check_against_corpus(cfg: TrainConfig, world_size: int, train: ByteSplit, valid: ByteSplit,
                         test: ByteSplit | None) -> None:
    """Stops with one `error:` line if the splits cannot give what `cfg` asks (see `corpus_problem`)."""
    if problem := corpus_problem(cfg, world_size, train, valid, test):
        raise SystemExit(f"error: --data {cfg.data}: {problem}")
