"""Every rank starts from the same weights and keeps them: the trainer seeds the model the same on every
rank (train.build.build_model; each rank's own dropout stream starts after it) and checks the ranks' weights
at start and at every save (train.distributed.check_same_weights). Before, each rank built its model from
seed + rank and DeepSpeed's ZeRO-0 16-bit engine (train.distributed.prepare) kept each rank's own weights:
two ranks trained two models for the whole run."""

from __future__ import annotations

import re

import pytest
import torch

from tests.helpers import DDP, cli, deepspeed, free_port, run, train_cmd

pytestmark = pytest.mark.slow


def _gather_worker(rank: int, port: int, same: bool, out) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    from train.distributed import check_same_weights

    torch.manual_seed(0 if same else rank)
    model = torch.nn.Linear(4, 4)
    try:
        out.put((rank, check_same_weights(model, "at start")))
    except SystemExit as e:
        out.put((rank, str(e)))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("same", [True, False])
def test_the_weight_check_refuses_ranks_that_differ(same):
    """Two gloo ranks: the same weights pass on both; other weights on rank 1 stop both with one line."""
    ctx = torch.multiprocessing.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_gather_worker, args=(r, port, same, out)) for r in range(2)]
    for p in procs:
        p.start()
    said = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    for line in said.values():
        if same:
            assert line == "weights: the same on all 2 ranks (2 tensors checked at start)"
        else:
            assert line.startswith("error: at start, rank 1 holds other weights than rank 0")


@pytest.mark.parametrize("precision,optimizer,stage", [("fp16", "lamb", 0), ("fp16", "adamw", 1),
                                                       ("bf16", "adamw", 0), ("bf16", "adamw", 1)])
def test_deepspeed_16bit_ranks_start_and_step_with_the_same_weights(tmp_path, precision, optimizer, stage):
    """The trainer's seeding and DeepSpeed set-up on 2 ranks: each rank's weights after the engine is built
    and after one step (each rank a different loss, the gradients averaged) are the same on both. Before:
    rank 1 started from its own weights (checksums 143.90 vs 146.02 for the issue's model) and kept them."""
    launch = deepspeed(tmp_path, stage)
    proc = run(cli("tests.integration.same_weights_worker", precision, optimizer, launch=launch))
    sums = re.findall(r"RANK (\d) (start|step) (\d\.\d{12}e[+-]\d\d)", proc.stdout)
    by = {(int(r), when): value for r, when, value in sums}
    assert len(by) == 4, proc.stdout + proc.stderr
    assert by[0, "start"] == by[1, "start"] and by[0, "step"] == by[1, "step"]
    assert by[0, "start"] != by[0, "step"]  # the step moved the weights


@pytest.mark.parametrize("launch", ["ddp", "deepspeed-bf16"])
def test_multi_rank_runs_check_their_weights_at_start_and_at_every_save(tmp_path, text_corpus, launch):
    """The real trainer on 2 ranks, with dropout (each rank its own masks): the check passes at start and at
    the saves after steps 1 and 2."""
    how = DDP if launch == "ddp" else deepspeed(tmp_path, 0)
    extra = ["--optimizer", "adamw", "--precision", "bf16"] if launch != "ddp" else []
    out = tmp_path / "run"
    proc = run(train_cmd("--preset", "tiny", "--data", str(text_corpus), "--out", str(out),
                         "--max_steps", "2", "--warmup_steps", "1", "--save_every", "1", "--eval_every", "0",
                         "--eval_max_segments", "2", "--sample_bytes", "0", "--model.d_model", "32",
                         "--model.d_ff", "64",
                         "--model.mem_len", "64", "--bptt", "16", *extra, launch=how))
    assert "weights: the same on all 2 ranks" in proc.stdout
    assert (out / "checkpoints" / "step-00000002").is_dir()
