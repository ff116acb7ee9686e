"""Which precision each part of the model computes in (README, Precision), checked on the CPU with stand-ins
for the CUDA paths: torch's autocast wrapper for cuDNN RNNs casts to fp16 whatever dtype autocast asks for,
so under CUDA autocast the LSTM must run outside autocast, in float32; the start-up check reads the dtypes
the LSTM's kernels really receive and refuses a run whose LSTM would compute in another precision."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_accelerate_launch_mixed_precision_reaches_the_run(tmp_path):
    """The real launcher: its --mixed_precision bf16 makes a tiny dry run bf16."""
    from tests.helpers import run, train_cmd

    proc = run(train_cmd("--dry_run", launch=["--cpu", "--num_processes", "1", "--mixed_precision", "bf16"]))
    assert "precision: bf16" in proc.stdout
