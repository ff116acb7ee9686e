"""Shared fixtures: a small prepared corpus, a tiny trained run and the models made from it (for
tests/test_eval.py, test_generate.py, test_export.py, test_import.py). Plain helpers: tests/helpers.py."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from tests.helpers import run, train_cmd


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """A prepared corpus of ~700 KB of real text (Python standard library sources): train/valid/test."""
    from sharnn.corpus.prepare import prepare_files

    src = tmp_path_factory.mktemp("src") / "stdlib.txt"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join(p.read_bytes() for p in sorted(stdlib.glob("*.py")))[:700_000]
    src.write_bytes(data)
    out = tmp_path_factory.mktemp("corpus") / "text"
    prepare_files([src], out, valid_bytes=50_000, test_bytes=50_000)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """In-process model runs use one thread: tiny matrices gain nothing, and other tests run beside.
    A module asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_accelerate_state():
    """For tests that make a real Accelerator in the test process: its singleton state (and a process group
    it started) is reset before and after, so neither an earlier in-process entry point (sharnn-eval's main
    makes an Accelerator) nor this test leaks its state into the next."""
    import torch
    from accelerate.state import AcceleratorState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    reset()
    yield
    reset()


# ------------------------------------------------------------------- a trained run and models made from it
# The tiny preset, with the sizes these tests rely on spelled out (d_model 128, memory 512, bptt 64).
TRAIN = ["--preset", "tiny", "--max_steps", "10", "--warmup_steps", "3", "--eval_every", "10", "--save_every",
         "10", "--eval_max_segments", "5", "--sample_bytes", "0", "--log_every", "5", "--bptt", "64",
         "--test_streams", "4", "--model.d_model", "128", "--model.d_ff", "512", "--model.n_layer", "2",
         "--model.mem_len", "512"]


@pytest.fixture(scope="session")
def trained(text_corpus, tmp_path_factory) -> Path:
    """A tiny run of 10 steps: checkpoints/step-00000010 (the best), summary.json with its test bpc."""
    out = tmp_path_factory.mktemp("use") / "run"
    run(train_cmd(*TRAIN, "--data", str(text_corpus), "--out", str(out)))  # one thread, as others run beside
    return out


@pytest.fixture(scope="session")
def ckpt(trained) -> Path:
    return trained / "checkpoints" / "step-00000010"


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory) -> Path:
    from train.export import main

    out = tmp_path_factory.mktemp("use") / "exported"
    assert main([str(trained), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def random_model(tmp_path_factory) -> Path:
    """An untrained tiny model saved with save_model: for tests that need no training."""
    import torch

    from sharnn import SHARNN, ModelConfig
    from sharnn.io.pretrained import save_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("use") / "random"
    save_model(SHARNN(ModelConfig(d_model=128, d_ff=512, n_layer=2, mem_len=512)), out)
    return out
