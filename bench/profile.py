"""Where a training step's time goes: torch.profiler over the real step of a bench scenario.

    python -m bench.profile --scenario small-fp32 [--steps 2] [--rows 25] [--shapes]

Builds the scenario's model, fills the attention memory, warms up, then profiles `--steps` training steps
(forward, backward, clipping, LAMB, state carry) and prints the operators by self time. bench/RESULTS.md
cites its tables. Time spent outside torch operators (numpy, Python) shows as the gap between the wall time
printed first and the profiler's total.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="small-fp32",
                        help="a training scenario of `python -m bench --list`")
    parser.add_argument("--steps", type=int, default=2, help="steps to profile (after 2 warm-up steps)")
    parser.add_argument("--rows", type=int, default=25, help="operators to print")
    parser.add_argument("--shapes", action="store_true", help="group the operators by input shape too")
    args = parser.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.__main__ import _model_config, scenarios
    from sharnn import SHARNN
    from sharnn.optim import LAMB

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    table = scenarios(device.type)
    sc = table.get(args.scenario)
    if sc is None or sc.kind != "train":
        parser.error(f"--scenario must be a training scenario of `python -m bench --list`, "
                     f"got {args.scenario!r}")
    cfg, model_cfg, B, T = _model_config(sc)
    torch.manual_seed(0)
    model = SHARNN(model_cfg).to(device)
    optimizer = LAMB(model.parameters(), lr=1e-4, weight_decay=cfg.weight_decay, min_trust=cfg.min_trust)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[sc.precision]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=sc.precision != "fp32")
    data = torch.randint(0, 256, (T + 1, B), device=device)
    x, y = data[:-1], data[1:]
    state = None
    with torch.no_grad(), autocast:  # a full memory, as in a long run
        for _ in range(-(-model_cfg.mem_len // T) if model_cfg.attn_layers else 0):
            _, _, state = model(torch.randint(0, 256, (T, B), device=device), state)

    def step() -> None:
        nonlocal state
        with autocast:
            _, loss, state = model(x, state, targets=y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state = state.detach()

    model.train()
    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=args.shapes) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    print(f"{args.scenario}: {args.steps} steps of {T} x {B} bytes, wall {wall / args.steps:.3f} s per step "
          f"(under the profiler)")
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages(group_by_input_shape=args.shapes).table(sort_by=sort, row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
