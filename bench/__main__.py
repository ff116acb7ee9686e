"""SHA-RNN throughput benchmarks: training step, evaluation, generation, and data-parallel scaling.

    python -m bench                              # every scenario for this device
    python -m bench --scenario small-fp32 --scenario small-bf16 --json bench/out/results.json
    python -m bench --list
    python -m bench --scenario small-generate --scenario small-generate-4 --scenario small-generate-16
    python -m bench --scenario small-fp32 --against ../before --pairs 10  # two checkouts, alternated

Each scenario runs in a fresh process (clean peak memory, its own thread count). Training scenarios time the
real step (forward, backward, clipping, LAMB step, state carry and detach) after warm-up with the attention
memory full, and report the median over repeats with the min-max spread. FLOPs per byte come from the analytic
formula in train/flops.py (tested against FlopCounterMode); MFU divides the achieved FLOP/s by the device's
matmul ceiling for that dtype, measured in the same process. World-size scenarios run the trainer itself
under `accelerate launch` (gloo on CPU) and report per-process throughput, so the scaling efficiency shows.
Generation scenarios sample 64 bytes from 1, 4 or 16 streams side by side (sharnn.generate.stream_batch) with
the memory full and report the bytes of all streams per second, and per stream.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import check_output, written_by

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Scenario:
    name: str
    kind: str = "train"  # train | eval | generate | scaling
    preset: str = "small"
    precision: str = "fp32"
    compile: bool = False
    world_size: int = 1
    launcher: str = "none"  # none | ddp | deepspeed | independent (scaling scenarios)
    mem_len: int | None = None
    batch: int | None = None
    bptt: int | None = None
    threads: int | None = None
    repeats: int = 5
    streams: int = 1  # generate scenarios: streams sampled side by side (one batch)


def scenarios(device: str) -> dict[str, Scenario]:
    on_gpu = device == "cuda"
    # On a CPU the paper model runs at a reduced batch and segment; on a GPU at the paper's own.
    paper_shape = {} if on_gpu else {"batch": 4, "bptt": 128}
    out = [
        Scenario("tiny-fp32", preset="tiny"),
        Scenario("small-fp32"),
        Scenario("small-bf16", precision="bf16"),
        Scenario("small-fp32-compile", compile=True),
        Scenario("small-bf16-compile", precision="bf16", compile=True),
        Scenario("small-mem1000", mem_len=1000),
        Scenario("small-mem20000", mem_len=20000, repeats=3),
        Scenario("paper-fp32", preset="paper", repeats=3, **paper_shape),
        Scenario("paper-bf16", preset="paper", precision="bf16", repeats=3, **paper_shape),
        Scenario("small-eval", kind="eval"),
        Scenario("small-generate", kind="generate", repeats=3),
        Scenario("small-generate-4", kind="generate", streams=4, repeats=3),
        Scenario("small-generate-16", kind="generate", streams=16, repeats=3),
    ]
    if on_gpu:
        out += [Scenario("paper-fp16", preset="paper", precision="fp16", repeats=3),
                Scenario("paper-bf16-compile", preset="paper", precision="bf16", compile=True, repeats=3),
                Scenario("paper-fp16-compile", preset="paper", precision="fp16", compile=True, repeats=3)]
    else:  # per-process throughput of 2 processes x 1 thread against 1 process x 1 thread
        scaling = {"mem_len": 1000, "threads": 1}
        out += [Scenario("scaling-ws1", kind="scaling", **scaling),
                Scenario("scaling-ws2-ddp", kind="scaling", world_size=2, launcher="ddp", **scaling),
                Scenario("scaling-ws2-deepspeed", kind="scaling", world_size=2, launcher="deepspeed",
                         **scaling),
                Scenario("scaling-2x-independent", kind="scaling", world_size=2, launcher="independent",
                         **scaling)]
    return {s.name: s for s in out}


# ---------------------------------------------------------------------------------------- in-process runs
def _model_config(sc: Scenario):
    from train.config import preset

    cfg = preset(sc.preset)
    model_cfg = dataclasses.replace(cfg.model, **({"mem_len": sc.mem_len} if sc.mem_len else {}))
    return cfg, model_cfg, sc.batch or cfg.batch_size, sc.bptt or cfg.bptt


def matmul_ceiling(device, dtype) -> float:
    """The device's practical matmul ceiling for dtype: the best 2048 x 2048 product over 3 seconds
    (train.flops.measure_matmul_flops, which measures the trainer's CPU peak). Callers measure it before and
    after their timed work and keep the higher: on a shared VM a single measurement can catch a slow moment
    (seen here: 78 to 135 GFLOP/s for the same product)."""
    from train.flops import measure_matmul_flops

    return measure_matmul_flops(device, dtype, budget_s=3.0, min_n=2048)[0]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_work(sc: Scenario):
    """The scenario's model, state and timed unit of work, warmed up: (work, bytes per call of work, FLOPs per
    byte, batch, segment length, model config, device, dtype). The memory starts full: a long run's steady
    state."""
    import torch

    from sharnn import SHARNN
    from sharnn.generate import stream_batch
    from sharnn.optim import LAMB
    from train.flops import forward_flops_per_byte, steady_keys, train_flops_per_byte

    if sc.threads:
        torch.set_num_threads(sc.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[sc.precision]
    cfg, model_cfg, B, T = _model_config(sc)
    torch.manual_seed(0)
    model = SHARNN(model_cfg).to(device)
    step_model = torch.compile(model) if sc.compile else model
    autocast = torch.autocast(device.type, dtype=dtype, enabled=sc.precision != "fp32")
    scaler = torch.amp.GradScaler(device.type, enabled=sc.precision == "fp16")
    optimizer = LAMB(model.parameters(), lr=1e-4, weight_decay=cfg.weight_decay, min_trust=cfg.min_trust)
    if sc.kind == "generate":
        B = 1  # the memory filled for one stream, then sc.streams copies of it sampled side by side
    data = torch.randint(0, 256, (T + 1, B), device=device)
    x, y = data[:-1], data[1:]
    if model_cfg.attn_layers:  # start with a full memory: the steady state of a long run
        state = None
        with torch.no_grad(), autocast:
            for _ in range(-(-model_cfg.mem_len // T)):
                _, _, state = model(torch.randint(0, 256, (T, B), device=device), state)
    else:
        state = model.initial_state()

    if sc.kind == "train":
        model.train()

        def work():
            nonlocal state
            with autocast:
                _, loss, state = step_model(x, state, targets=y)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state = state.detach()
        n_bytes, flops_per_byte = T * B, train_flops_per_byte(model_cfg, steady_keys(model_cfg, T), T)
    elif sc.kind == "eval":
        model.eval()

        def work():
            nonlocal state
            with torch.no_grad(), autocast:
                _, _, state = step_model(x, state, targets=y)
        n_bytes, flops_per_byte = T * B, forward_flops_per_byte(model_cfg, steady_keys(model_cfg, T))
    else:  # generate: one byte per stream and step (SHARNN.step), state carried, the memory full
        model.eval()
        n_new = 64

        def work():
            with autocast:
                for _ in stream_batch(model, [b"x"] * sc.streams, n_new, temperature=1.0, state=state):
                    pass
        n_bytes = n_new * sc.streams
        flops_per_byte = forward_flops_per_byte(model_cfg, steady_keys(model_cfg, 1))
        B = sc.streams

    for _ in range(2):  # warm-up (and compilation)
        work()
    return work, n_bytes, flops_per_byte, B, T, model_cfg, device, dtype


def run_in_process(sc: Scenario) -> dict:
    import torch

    work, n_bytes, flops_per_byte, B, T, model_cfg, device, dtype = build_work(sc)
    ceiling = matmul_ceiling(device, dtype)
    times = []
    for _ in range(sc.repeats):
        _sync(device)
        t = time.perf_counter()
        work()
        _sync(device)
        times.append(time.perf_counter() - t)
    ceiling = max(ceiling, matmul_ceiling(device, dtype))
    rates = sorted(n_bytes / t for t in times)
    rate = statistics.median(rates)
    per_stream = {}
    if sc.kind == "generate":  # bytes_per_s counts every stream's bytes
        per_stream = {"streams": sc.streams, "bytes_per_s_per_stream": rate / sc.streams}
    return {**per_stream, "bytes_per_s": rate, "bytes_per_s_min": rates[0], "bytes_per_s_max": rates[-1],
            "step_time_s": statistics.median(times), "flops_per_byte": flops_per_byte,
            "achieved_flops": rate * flops_per_byte, "ceiling_flops": ceiling,
            "mfu": rate * flops_per_byte / ceiling, "peak_mem_bytes": _peak_memory(device),
            "threads": torch.get_num_threads(), "device": _device_name(device), "batch": B, "bptt": T,
            "mem_len": model_cfg.mem_len}


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()} cores"


# ------------------------------------------------------------------------ two checkouts, alternated
# t quantiles (two-sided 95%) for 1-30 degrees of freedom; beyond, the normal's
_T95 = [12.71, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def serve(sc: Scenario) -> None:
    """`--_serve NAME`: build the scenario (warmed up, memory full), print READY, then time one call of its
    work per line read from stdin, answering "TIME wall_seconds cpu_seconds" (the process's CPU time, all its
    threads); end at the end of stdin."""
    work, n_bytes, *_, device, _ = build_work(sc)
    print(f"READY {n_bytes}", flush=True)
    for _ in sys.stdin:
        _sync(device)
        t, c = time.perf_counter(), time.process_time()
        work()
        _sync(device)
        print(f"TIME {time.perf_counter() - t!r} {time.process_time() - c!r}", flush=True)


def _server(name: str, tree: Path) -> subprocess.Popen:
    """This file's `serve` over the code of `tree` (its sharnn, train and bench packages): the same
    measurement for both checkouts, whatever the other's bench/__main__.py holds."""
    code = (f"import runpy, sys; sys.argv = ['bench', '--_serve', {name!r}]; "
            f"runpy.run_path({str(Path(__file__).resolve())!r}, run_name='__main__')")
    env = dict(os.environ, PYTHONPATH=str(tree))
    return subprocess.Popen([sys.executable, "-c", code], cwd=tree, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def _answer(proc: subprocess.Popen, word: str) -> str:
    for line in proc.stdout:
        if line.startswith(word + " "):
            return line[len(word) + 1:].strip()
    raise RuntimeError(f"the {word} line never came (exit status {proc.wait()})")


def _paired(against: list[float], this: list[float]) -> dict:
    """this / against per pair: mean, sample sd, 95% t interval, median."""
    ratios = [b / a for a, b in zip(against, this)]
    n, mean, sd = len(ratios), statistics.mean(ratios), statistics.stdev(ratios)
    half = (_T95[n - 2] if n - 2 < len(_T95) else 1.96) * sd / n ** 0.5
    return {"against": against, "this": this, "against_median": statistics.median(against),
            "this_median": statistics.median(this), "ratio_mean": mean, "ratio_sd": sd,
            "ratio_ci95": [mean - half, mean + half], "ratio_median": statistics.median(ratios)}


def alternate(name: str, against: Path, pairs: int) -> dict:
    """The scenario's work timed in two processes that stay up, one over `against` (A) and one over this
    checkout (B), one call at a time in turn, A B B A A B ...: drift of the machine falls on both alike.
    Returns bytes/s on both sides, by the wall clock and by the process's CPU time (which leaves out the time
    other processes of a shared machine held the cores), and this / against per pair (`_paired`)."""
    procs = {"against": _server(name, against), "this": _server(name, REPO)}
    rates = {clock: {"against": [], "this": []} for clock in ("wall", "cpu")}  # bytes/s per clock and side
    try:
        n_bytes = {side: int(_answer(proc, "READY")) for side, proc in procs.items()}
        for i in range(pairs):
            for side in (("against", "this") if i % 2 == 0 else ("this", "against")):
                procs[side].stdin.write("run\n")
                procs[side].stdin.flush()
                wall, cpu = map(float, _answer(procs[side], "TIME").split())
                rates["wall"][side].append(n_bytes[side] / wall)
                rates["cpu"][side].append(n_bytes[side] / cpu)
            print(f"  {name} pair {i + 1}/{pairs}: bytes/s against {rates['wall']['against'][-1]:,.0f} "
                  f"(CPU time {rates['cpu']['against'][-1]:,.0f}), this {rates['wall']['this'][-1]:,.0f} "
                  f"({rates['cpu']['this'][-1]:,.0f})", file=sys.stderr, flush=True)
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
    return {"against": str(against), "pairs": pairs, "order": "A B B A A B ... (A = against)",
            "bytes_per_s_wall": _paired(rates["wall"]["against"], rates["wall"]["this"]),
            "bytes_per_s_cpu_time": _paired(rates["cpu"]["against"], rates["cpu"]["this"])}


# ------------------------------------------------------------------------------------------ scaling runs
def run_scaling(sc: Scenario, corpus: Path) -> dict:
    """The trainer itself, 1 process or 2 under accelerate launch, each with sc.threads threads."""
    from train.flops import steady_keys, train_flops_per_byte

    cfg, model_cfg, B, T = _model_config(sc)
    steps = 24
    # "independent": world_size single processes at once, no communication: what sharing the machine costs
    copies = sc.world_size if sc.launcher == "independent" else 1
    outs = [Path(tempfile.mkdtemp(prefix="sharnn-bench-run-")) for _ in range(copies)]

    def command(out: Path) -> list[str]:
        args = ["--preset", sc.preset, "--data", str(corpus), "--out", str(out), "--max_steps", str(steps),
                "--eval_every", "0", "--save_every", "0", "--no_test_at_end", "--log_every", "1",
                "--sample_bytes", "0", "--no_vary_bptt", "--warmup_steps", "1"]
        if sc.mem_len:
            args += ["--model.mem_len", str(sc.mem_len)]
        if sc.launcher in ("none", "independent"):
            return [sys.executable, "-m", "train", *args]
        config = {"ddp": "launch/cpu_ddp.yaml", "deepspeed": "launch/cpu_deepspeed.yaml"}[sc.launcher]
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
                "--num_processes", str(sc.world_size), "-m", "train", *args]

    env = dict(os.environ, OMP_NUM_THREADS=str(sc.threads or 1), PYTHONPATH=str(REPO))
    import torch
    torch.set_num_threads(sc.threads or 1)
    ceiling = matmul_ceiling(torch.device("cpu"), torch.float32)  # before and after the run, the higher
    procs = [subprocess.Popen(command(out), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for out in outs]
    for proc, out in zip(procs, outs):
        _, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command(out))} failed:\n{stderr[-3000:]}")
    records = []
    for out in outs:  # the second half of each run's steps: the memory (mem_len / bptt steps) has filled
        lines = (out / "metrics.jsonl").read_text().splitlines()
        steps_records = [r for r in map(json.loads, lines) if "perf/bytes_per_s_per_rank" in r]
        records += steps_records[steps // 2:]
    steady = sorted(r["perf/bytes_per_s_per_rank"] for r in records)
    rate = statistics.median(steady)
    flops_per_byte = train_flops_per_byte(model_cfg, steady_keys(model_cfg, T), T)
    ceiling = max(ceiling, matmul_ceiling(torch.device("cpu"), torch.float32))
    mem = max(r.get("perf/memory_bytes", 0) for r in records)
    data = statistics.median(r["perf/data_fraction"] for r in records)
    log = statistics.median(r["perf/log_fraction"] for r in records)
    return {"bytes_per_s": rate, "bytes_per_s_min": steady[0], "bytes_per_s_max": steady[-1],
            "step_time_s": B * T / rate, "flops_per_byte": flops_per_byte,
            "achieved_flops": rate * flops_per_byte, "ceiling_flops": ceiling,
            "mfu": rate * flops_per_byte / ceiling, "peak_mem_bytes": mem, "threads": sc.threads or 1,
            "device": _device_name(torch.device("cpu")), "batch": B, "bptt": T, "mem_len": model_cfg.mem_len,
            "data_fraction": data, "log_fraction": log}


def _scaling_corpus() -> Path:
    import numpy as np

    from sharnn.corpus.prepare import prepare_files

    root = Path(tempfile.mkdtemp(prefix="sharnn-bench-corpus-"))
    src = root / "random.bin"
    src.write_bytes(np.random.default_rng(0).integers(0, 256, 8_000_000, dtype=np.uint8).tobytes())
    prepare_files([src], root / "corpus", valid_bytes=100_000, test_bytes=100_000)
    return root / "corpus"


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", action="append", help="scenario name (repeatable); default: all")
    parser.add_argument("--json", type=Path, help="write the records as a JSON list here")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--force", action="store_true",
                        help="also run bf16/fp16 scenarios on a CPU without bf16/fp16 matrix instructions "
                             "(emulated: 100x slower than fp32; skipped by default)")
    parser.add_argument("--against", type=Path,
                        help="another checkout (e.g. from `git worktree add`): time each scenario there and "
                             "here in turn, in two processes that stay up, one call of the scenario's work "
                             "at a time (A B B A ...), and report both and their ratio per pair")
    parser.add_argument("--pairs", type=int, default=10,
                        help="with --against: calls on each side (default 10)")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    parser.add_argument("--_serve", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_output(args.json, "--json", written_by("bench"), "record of python -m bench")

    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    table = scenarios(device)
    if args._serve:  # one scenario, timed call by call on request (--against)
        serve(table[args._serve])
        return 0
    if args._worker:  # one scenario in this fresh process: print its record as JSON
        print("RESULT " + json.dumps(run_in_process(table[args._worker])))
        return 0
    if args.list:
        for sc in table.values():
            print(f"{sc.name:24s} {sc.kind:9s} preset={sc.preset} precision={sc.precision} "
                  f"compile={sc.compile} world_size={sc.world_size} launcher={sc.launcher}")
        return 0
    names = args.scenario or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; --list shows them")
    if args.against is not None:
        return run_against(args, names, table, argv)

    records, corpus = [], None
    header = (f"{'scenario':22s} {'kind':8s} {'prec':5s} {'comp':5s} {'ws':>2s} {'bytes/s':>10s} "
              f"{'spread':>17s} {'GFLOP/s':>8s} {'ceiling':>8s} {'MFU':>6s} {'peak MiB':>9s}")
    print(header)
    from train.distributed import native_cpu_matmul

    for name in names:
        sc = table[name]
        if device == "cpu" and not native_cpu_matmul(sc.precision) and not args.force:
            reason = (f"this CPU has no {sc.precision} matrix instructions (avx512_bf16/AMX): emulated, "
                      f"100x slower than fp32; --force runs it")
            print(f"{name:22s} skipped: {reason}", flush=True)
            records.append({"scenario": name, "kind": sc.kind, "preset": sc.preset,
                            "precision": sc.precision, "compile": sc.compile, "world_size": sc.world_size,
                            "bytes_per_s": None, "mfu": None, "peak_mem_bytes": None, "skipped": reason})
            continue
        if sc.kind == "scaling":
            corpus = corpus or _scaling_corpus()
            try:
                result = run_scaling(sc, corpus)
            except RuntimeError as e:
                print(f"{name:22s} FAILED: {str(e).strip().splitlines()[-1]}", flush=True)
                records.append({"scenario": name, "kind": sc.kind, "preset": sc.preset,
                                "precision": sc.precision, "compile": sc.compile, "world_size": sc.world_size,
                                "bytes_per_s": None, "mfu": None, "peak_mem_bytes": None,
                                "error": str(e)[-2000:]})
                continue
        else:
            proc = subprocess.run([sys.executable, "-m", "bench", "--_worker", name], cwd=REPO,
                                  env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"{name:22s} FAILED: "
                      f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else '?'}")
                records.append({"scenario": name, "kind": sc.kind, "preset": sc.preset,
                                "precision": sc.precision, "compile": sc.compile, "world_size": sc.world_size,
                                "bytes_per_s": None, "mfu": None, "peak_mem_bytes": None,
                                "error": proc.stderr[-2000:]})
                continue
            result = json.loads(lines[0][len("RESULT "):])
        record = {"scenario": name, "kind": sc.kind, "preset": sc.preset, "precision": sc.precision,
                  "compile": sc.compile, "world_size": sc.world_size, "launcher": sc.launcher, **result}
        records.append(record)
        print(f"{name:22s} {sc.kind:8s} {sc.precision:5s} {str(sc.compile):5s} {sc.world_size:2d} "
              f"{record['bytes_per_s']:10,.0f} "
              f"{record['bytes_per_s_min']:8,.0f}-{record['bytes_per_s_max']:<8,.0f} "
              f"{record['achieved_flops'] / 1e9:8.1f} {record['ceiling_flops'] / 1e9:8.1f} "
              f"{record['mfu']:6.1%} {record['peak_mem_bytes'] / 2**20:9,.0f}"
              + (f"  loader {record['data_fraction']:.2%} of step time, logging {record['log_fraction']:.2%}"
                 if "data_fraction" in record else "")
              + (f"  {record['streams']} streams: {record['bytes_per_s_per_stream']:,.0f} bytes/s each"
                 if "streams" in record else ""), flush=True)
    write_records(args.json, records, argv)
    return 0


def write_records(path: Path | None, records: list[dict], argv: list[str] | None) -> None:
    """The records as a JSON list at `path` (nothing when None), each stamped with the date and command."""
    if path is None:
        return
    from sharnn.io import atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m bench " + " ".join(argv or sys.argv[1:])
    stamp = {"date": time.strftime("%Y-%m-%d"), "command": command}
    atomic.write_text(path, json.dumps([{**r, **stamp} for r in records], indent=1))


def run_against(args, names: list[str], table: dict[str, Scenario], argv: list[str] | None) -> int:
    """--against: each scenario alternated between the other checkout and this one (`alternate`)."""
    if not (args.against / "sharnn").is_dir():
        raise SystemExit(f"error: --against {args.against}: not a sharnn checkout (no sharnn/ in it)")
    if args.pairs < 2:
        raise SystemExit(f"error: --pairs {args.pairs}: at least 2 pairs are needed for a spread")
    if scaling := [n for n in names if table[n].kind == "scaling"]:
        raise SystemExit(f"error: --against times in-process scenarios; {', '.join(scaling)} run the trainer")
    print(f"{'scenario':22s} {'clock':5s} {'against: bytes/s (min-max)':>28s} "
          f"{'this: bytes/s (min-max)':>28s}  this / against per pair: mean, sd, 95% interval")
    records = []
    for name in names:
        sc = table[name]
        result = alternate(name, args.against, args.pairs)
        records.append({"scenario": name, "kind": sc.kind, "preset": sc.preset, "precision": sc.precision,
                        "compile": sc.compile, **result})
        for clock, key in (("wall", "bytes_per_s_wall"), ("cpu", "bytes_per_s_cpu_time")):
            r = result[key]
            a, b, (lo, hi) = r["against"], r["this"], r["ratio_ci95"]
            print(f"{name:22s} {clock:5s} {r['against_median']:10,.0f} ({min(a):,.0f}-{max(a):,.0f}) "
                  f"{r['this_median']:10,.0f} ({min(b):,.0f}-{max(b):,.0f})  {r['ratio_mean']:.3f}, "
                  f"{r['ratio_sd']:.3f}, [{lo:.3f}, {hi:.3f}] ({result['pairs']} pairs)", flush=True)
    write_records(args.json, records, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
