"""Run under `accelerate launch` (2 CPU ranks, DeepSpeed): the trainer's own model seeding
(train.build.build_model) and engine set-up (build_accelerator, fill_deepspeed_config, prepare) in fp16 or
bf16, then one optimizer step; prints each rank's weight checksum after the start and after the step as
`RANK <r> <when> <checksum>`. DeepSpeed's fp16 is allowed on this CPU (its CPU accelerator refuses it without
fp16 instructions) and the forward is a sum of squares of the model's parameters, which needs no 16-bit LSTM
kernel: what is checked is where the weights come from, not the LSTM's arithmetic.

    accelerate launch --config_file launch/cpu_deepspeed.yaml --deepspeed_config_file DS -m
        tests.integration.same_weights_worker PRECISION OPTIMIZER
"""

from __future__ import annotations

import sys

import torch
from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

from tests.helpers import tiny_config
from train.build import build_model, build_optimizer
from train.config import TrainConfig
from train.distributed import build_accelerator, fill_deepspeed_config, prepare
from train.step import NonFiniteGuard, backward_and_step


class SumOfSquares(torch.nn.Module):
    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, factor: torch.Tensor) -> torch.Tensor:
        return factor.float() * 1e-3 * sum((p.float() ** 2).sum() for p in self.net.parameters())


def checksum(engine) -> str:
    return f"{sum(float(p.detach().double().abs().sum()) for p in engine.module.parameters()):.12e}"


def main(precision: str, optimizer_name: str) -> None:
    CPU_Accelerator.is_fp16_supported = lambda self: True
    cfg = TrainConfig(model=tiny_config(), optimizer=optimizer_name,
                      precision=precision, batch_size=1)
    accelerator = build_accelerator(precision)
    world, rank = accelerator.num_processes, accelerator.process_index
    fill_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, batch_size=1, grad_accum=1,
                          world_size=world, clip=0.0, precision=precision, optimizer=optimizer_name)
    model, _ = build_model(cfg, None, fresh=True, rank=rank)
    model = SumOfSquares(model)
    engine, optimizer = prepare(accelerator, model, build_optimizer(model, cfg, lr=1e-2))
    print(f"RANK {rank} start {checksum(engine)}", flush=True)
    guard = NonFiniteGuard(accelerator.device)
    factor = torch.tensor(1.0 + rank)  # each rank its own loss: the gradients are averaged
    backward_and_step(accelerator, engine, optimizer, engine(factor), 0.0, "stop", 1, guard)
    print(f"RANK {rank} step {checksum(engine)}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:])
