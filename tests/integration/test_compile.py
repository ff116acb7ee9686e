"""`--compile`: the model is compiled once for each variant of its inputs (training or evaluation, a stream's
first segment or a later one, a one-stream sample), never again for a new segment length, memory length or
batch size, and never up to torch's recompile limit (past which it would run eagerly)."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.helpers import REPO, subprocess_env, train_cmd

# A tiny model (inductor compiles every graph: minutes on 2 shared cores), segments of 5-16 bytes drawn anew
# every step, a memory that fills over the first steps, validation with another batch size and a sample
# (one stream) at steps 10 and 20.
COMPILED = ["--preset", "tiny", "--max_steps", "20", "--compile", "--eval_every", "10", "--save_every", "0",
            "--no_test_at_end", "--sample_bytes", "8", "--log_every", "5", "--bptt", "16",
            "--batch_size", "4", "--eval_streams", "3", "--eval_max_segments", "3", "--model.d_model", "32",
            "--model.d_ff", "64", "--model.mem_len", "48"]


@pytest.mark.slow  # ~2-4 minutes: inductor's C++ compilation of every graph
def test_compiled_training_compiles_each_variant_once(text_corpus, tmp_path):
    env = subprocess_env(threads=1) | {"TORCH_LOGS": "recompiles", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(train_cmd(*COMPILED, "--data", str(text_corpus), "--out", str(tmp_path / "run")),
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=1200)
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:]
    assert "recompile_limit" not in out, out[-6000:]
    reasons = re.findall(r"triggered by the following guard failure\(s\):\n.*?- (\S+: .*)", out)
    recompiles = out.count("Recompiling function")
    assert len(reasons) == recompiles
    # nothing is compiled for a new size: segment length, memory length and batch are dynamic from the start
    assert not [r for r in reasons if "size mismatch" in r], reasons
    # every variant has been met by the end of the first validation and its sample: nothing compiles after
    first_validation = out.index("step 10: val bpc")
    assert "Recompiling function" not in out[first_validation:], out[first_validation:][:6000]
    assert recompiles <= 24, reasons  # 20 here (torch 2.13): the variants above, in the frames between breaks
