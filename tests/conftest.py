"""Fixtures shared by tests/unit/ and tests/integration/: corpora made from the text the repository ships for
tests, a tiny trained run and the models made from it, a tmpfs mount point. Plain helpers (tiny_config, the
commands, a run's records): tests/helpers.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import run, shipped_text, tiny_config, train_cmd

INTEGRATION = Path(__file__).resolve().parent / "integration"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Every test in tests/integration/ starts processes (commands, launches, training runs): all are marked
    `slow`, so `pytest -m "not slow"` is exactly tests/unit/."""
    for item in items:
        if INTEGRATION in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def shipped_corpus(tmp_path_factory):
    """The tests' one corpus maker: `shipped_corpus(n_bytes, valid_bytes, test_bytes)` is a prepared corpus
    (train/valid/test) of the first `n_bytes` of the text the repository ships for tests
    (helpers.shipped_text), made once per size in a session."""
    from sharnn.corpus.prepare import prepare_files

    made: dict[tuple[int, int, int], Path] = {}

    def make(n_bytes: int, valid_bytes: int, test_bytes: int) -> Path:
        key = (n_bytes, valid_bytes, test_bytes)
        if key not in made:
            root = tmp_path_factory.mktemp("corpus")
            (root / "text.txt").write_bytes(shipped_text(n_bytes))
            prepare_files([root / "text.txt"], root / "corpus", valid_bytes=valid_bytes,
                          test_bytes=test_bytes)
            made[key] = root / "corpus"
        return made[key]

    return make


@pytest.fixture(scope="session")
def text_corpus(shipped_corpus) -> Path:
    """The corpus most tests train on: 600,000 bytes of training text, 50,000 each of validation and test."""
    return shipped_corpus(700_000, valid_bytes=50_000, test_bytes=50_000)


@pytest.fixture(scope="session")
def small_corpus(shipped_corpus) -> Path:
    """20,000 bytes of training text, 4,000 each of validation and test: epochs of tens of steps."""
    return shipped_corpus(28_000, valid_bytes=4_000, test_bytes=4_000)


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


@pytest.fixture
def tmpfs(tmp_path):
    """A mount point (a tmpfs of a few MB) under tmp_path; the test is skipped where mounting is refused."""
    made = []

    def mount(size: str = "4m") -> Path:
        point = tmp_path / f"disk{len(made)}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
        made.append(point)
        return point

    yield mount
    for point in made:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


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

    from sharnn import SHARNN
    from sharnn.io.pretrained import save_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("use") / "random"
    save_model(SHARNN(tiny_config(d_model=128, d_ff=512, mem_len=512)), out)
    return out
