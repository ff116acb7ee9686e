"""`python -m bench.gpu`, the GPU acceptance command, on a machine without a GPU: it must not pass (every
check skipped with its reason, exit status 3), a failed or crashed check fails it, its arguments and record;
and the checks' own logic on CPU stand-ins: the LSTM's computed dtype and kernel, gradient fidelity under bf16
autocast at a tiny shape, the two attention formulations timed and compared, the step profile, and the
trainer's throughput and resume runs at the tiny preset."""

from __future__ import annotations

import pytest

from bench import gpu
from tests.unit.test_bench_gpu import CPU

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow  # about a minute: four short runs of the trainer
def test_trainer_checks_on_a_cpu_stand_in(text_corpus, tmp_path):
    """The throughput and resume checks' procedure with `python -m train` at a tiny size on the CPU: the
    measured intervals read from metrics.jsonl; the resumed run's losses and carried state equal the
    uninterrupted run's bit for bit, the state loads as float32 on the device."""
    small = ("--model.d_model", "32", "--model.d_ff", "64", "--model.n_layer", "2", "--model.mem_len", "32",
             "--bptt", "16")
    parts = gpu.throughput_runs(None, text_corpus, tmp_path, "cpu", 300, preset="tiny",
                                batches=((4, ()), (8, ("--lr_scaling", "linear"))), extra=small,
                                warmup=2, measured=2)
    assert [p["status"] for p in parts] == ["passed", "passed"], parts
    assert all(p["steps"] == 2 and p["bytes_per_s"] > 0 and p["peak_memory_bytes"] > 0 for p in parts)
    resumed = gpu.resume_run(None, text_corpus, tmp_path, CPU, 300, preset="tiny", extra=small)
    assert resumed["status"] == "passed", resumed["reason"]
    assert resumed["bitwise"] and resumed["carry_max_difference"] == 0.0
    assert resumed["carry_loaded_as"] == ["cpu float32"] and set(resumed["losses"]) == {3, 4}
