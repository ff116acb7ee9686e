"""Host syncs in the training loop under DeepSpeed (ZeRO 0 with LAMB, ZeRO 2 with AdamW): the count of
tests/unit/test_host_sync.py (what counts as a sync, and the one-process loop) over whole iterations of the
real loop with a DeepSpeed engine, which needs a launcher's process environment."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, free_port
from tests.helpers import run as run_command
from tests.unit import test_host_sync as unit
from tests.unit.test_host_sync import (
    MAX_STEPS,
    LoopRun,
    Sync,
    SyncCounter,
    assert_no_sync_between_boundaries,
    run_loop,
)

pytestmark = pytest.mark.usefixtures("one_thread")

epoch_corpus = unit.epoch_corpus  # the unit tests' fixture


def in_zero_optimizer(sync: Sync) -> bool:
    return "/deepspeed/runtime/zero/" in sync.origin or "/deepspeed/runtime/utils.py" in sync.origin


@pytest.mark.slow
@pytest.mark.parametrize("stage,optimizer", [(0, "lamb"), (2, "adamw")], ids=["zero0-lamb", "zero2-adamw"])
def test_the_loop_under_deepspeed_adds_no_sync_of_its_own(stage, optimizer, epoch_corpus, tmp_path):
    """The same count under DeepSpeed (fp32, world size 1): ZeRO 0 with LAMB, the paper's path, syncs only at
    the boundaries. ZeRO 1 and 2 (DeepSpeedZeroOptimizer, 0.19.8) read the gradient norm on the host in
    their own step: `is_invalid_grad_norm` (a `bool()` of a device tensor) for the overflow check and again
    for clipping, and in bf16 also `has_overflow`'s `.item()`: 2-3 syncs per optimizer step that sharnn
    cannot remove. Those, and only those, are allowed under ZeRO 2; the loop's own code adds none."""
    cfg = json.loads((REPO / "ds_config.json").read_text())
    cfg["zero_optimization"]["stage"] = stage
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(json.dumps(cfg))
    args = ", ".join(repr(a) for a in (str(epoch_corpus), str(tmp_path / "run"), str(ds_config), optimizer))
    code = f"from tests.integration.test_host_sync import deepspeed_loop; deepspeed_loop({args})"
    proc = run_command([sys.executable, "-c", code])
    record = json.loads(next(line[4:] for line in proc.stdout.splitlines() if line.startswith("RUN ")))
    loop = LoopRun(SyncCounter(syncs=[Sync(**s) for s in record["syncs"]]), record["iterations"],
                   set(record["validated"]), set(record["saved"]))
    assert loop.iterations == list(range(1, MAX_STEPS + 1)) and loop.validated
    assert_no_sync_between_boundaries(loop, allowed=in_zero_optimizer if stage > 0 else lambda sync: False)
    assert {s.iteration for s in loop.counter.syncs if "train/log.py" in s.where} == loop.logged()


# ------------------------------------------------------------------------------------ under DeepSpeed
def deepspeed_loop(corpus: str, out: str, ds_config: str, optimizer: str) -> None:
    """Run in a process of its own (DeepSpeed keeps its process groups for the life of a process): the loop
    under DeepSpeed, world size 1 on the CPU, its run printed as one JSON line."""
    from dataclasses import asdict

    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": ds_config, "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    with pytest.MonkeyPatch.context() as monkeypatch:
        run = run_loop(monkeypatch, Path(corpus), Path(out), "cpu", ("--optimizer", optimizer), env)
    print("RUN " + json.dumps({"syncs": [asdict(s) for s in run.counter.syncs], "iterations": run.iterations,
                               "validated": sorted(run.validated), "saved": sorted(run.saved)}))
