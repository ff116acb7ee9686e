"""Does `--cpu_kernels torch` (torch's F.dropout and SDPA on CPU, the CUDA formulation) compute what the fast
CPU path computes? Direct checks (seconds to minutes) and paired training curves: what took apart the 0.18 bpc
gap between the two settings measured on 2026-12-02 (bench/RESULTS.md, 2026-12-07).

    python -m bench.sdpa_check checks [--size small|trivial] [--draws 40] [--parts sdpa,...] [--json FILE]
    python -m bench.sdpa_check train --seeds 3 --first_seed 6 --steps 400 [--impl ...] --json FILE -- FLAGS
    python -m bench.sdpa_check report FILE

`checks` prints a table (and writes it as JSON):
- sdpa: which SDPA implementation runs on the CPU with a bool mask and dropout (the shapes of the `small`
  preset's attention: (B, 1, T, C) queries, K = memory + T keys), and whether its output and gradients equal
  softmax -> F.dropout -> matmul written out, drawing the same mask (same seed); 1 vs 2 threads;
- model: the whole model, `torch` against `fast-attention` (the written-out attention with its masks drawn
  by torch's bernoulli_, in the order the torch path draws them): the same loss and gradients when both draw
  the same masks; `fast` against `torch` with dropout off; for each attention `torch` can run;
- masks: which generator torch's CPU bernoulli_ is (its masks against an mt19937 emulation from the seed);
  the masks' statistics, torch's and the fast path's, in the `small` shapes (rate, rate per position,
  neighbours along every axis, consecutive calls; a non-contiguous input);
- expectation: the mean gradient, its variance and the mean squared gradient norm over `--draws` dropout
  draws, `fast` against `torch` (same weights, batch and memory; only the masks differ), with controls.

`train` runs the trainer (`python -m train`, one process per run, one thread, SHARNN_CPU_KERNELS=<impl>) for
each seed and implementation in turn, and keeps the training curve (train bpc per log interval, gradient norm)
and every validation (`--eval_every` among the trainer flags), resumable: a run already in the JSON is
skipped. `--impl same-masks` is fast-attention drawing, seed for seed, the masks torch draws: against torch it
isolates what the formulations' rounding alone does to a run. `report` prints mean, spread and the paired
differences (against the last --impl) at every validated step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from bench.seeds import describe, fmt, paired

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- training
SAME_MASKS = "same-masks"  # `train --impl same-masks`: "fast-attention" drawing exactly the masks of "torch"
TRAINER_SAME_MASKS = "_trainer-same-masks"


def train_run(impl: str, seed: int, args, extra: list[str]) -> dict:
    """One training run; its curve (train bpc, grad norm per log interval) and its validations."""
    from bench.quality import train_command

    out = Path(tempfile.mkdtemp(prefix=f"sharnn-sdpa-{impl}-{seed}-"))
    cmd = train_command(args.preset, args.data, out, args.steps, seed, extra)
    setting = impl
    if impl == SAME_MASKS:  # the trainer, in a process where fast-attention draws torch's masks in its order
        module = __spec__.name if __spec__ is not None else "bench.sdpa_check"
        cmd = [sys.executable, "-m", module, TRAINER_SAME_MASKS, *cmd[3:]]
        setting = "fast-attention"
    env = dict(os.environ, SHARNN_CPU_KERNELS=setting, OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    env.pop("ACCELERATE_USE_CPU", None)
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} (SHARNN_CPU_KERNELS={impl}) exited {proc.returncode}:\n"
                               f"{proc.stderr[-3000:]}")
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
        return {"impl": impl, "seed": seed, "wall_s": time.perf_counter() - t,
                "train_bpc": {str(m["step"]): m["train/bpc"] for m in metrics if "train/bpc" in m},
                "grad_norm": {str(m["step"]): m["train/grad_norm"] for m in metrics
                              if "train/grad_norm" in m},
                "val_bpc": {str(m["step"]): m["val/bpc"] for m in metrics if "val/bpc" in m}}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def curve_summary(runs: list[dict], impls: list[str], key: str = "val_bpc") -> dict:
    """Per step of `key`: each implementation's describe() and the paired differences against the last
    implementation (torch when it is measured last)."""
    ref = impls[-1]
    steps = sorted({int(s) for r in runs for s in r[key]})
    table = {}
    for step in steps:
        by = {i: {r["seed"]: r[key][str(step)] for r in runs if r["impl"] == i and str(step) in r[key]}
              for i in impls}
        table[step] = {"impls": {i: describe(list(v.values())) for i, v in by.items()},
                       "paired": {i: paired(by[i], by[ref]) for i in impls if i != ref}}
    return {"metric": key, "reference": ref, "steps": table}


def print_curves(summary: dict) -> None:
    ref = summary["reference"]
    print(f"\n{summary['metric']} (paired differences: impl - {ref})")
    for step, row in summary["steps"].items():
        cells = "  ".join(f"{i} {fmt(d['mean'])} (sd {fmt(d['std'], 3)}, n {d['n']})"
                          for i, d in row["impls"].items())
        pairs = "  ".join(f"{i}-{ref} {fmt(d['mean'], sign=True)} se {fmt(d['se'])}"
                          f" [{' '.join(f'{v:+.3f}' for v in d['values'].values())}]"
                          for i, d in row["paired"].items() if d["n"])
        print(f"step {step:5d}: {cells}  |  {pairs}")


def train_main(args, extra: list[str]) -> int:
    record = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "command": "python -m bench.sdpa_check " + " ".join(sys.argv[1:]), "machine": _machine(),
              "preset": args.preset, "steps": args.steps, "threads": args.threads, "trainer_flags": extra,
              "impls": args.impl, "runs": []}
    if args.json and args.json.exists():
        old = json.loads(args.json.read_text())
        record["runs"] = old["runs"]
        record["date"], record["command"] = old["date"], old["command"]
    done = {(r["impl"], r["seed"]) for r in record["runs"]}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for impl in args.impl:
            if (impl, seed) in done:
                continue
            run = train_run(impl, seed, args, extra)
            record["runs"].append(run)
            print(f"seed {seed} {impl:15s} val {' '.join(f'{s}:{v:.4f}' for s, v in run['val_bpc'].items())} "
                  f"({run['wall_s']:.0f} s)", flush=True)
            record["summary"] = curve_summary(record["runs"], args.impl)
            if args.json:
                _write(args.json, record)
    print_curves(curve_summary(record["runs"], args.impl))
    return 0


# ------------------------------------------------------------------------------------------ direct checks
SIZES = {  # B, T, C, memory, d_ff, blocks
    "small": (16, 64, 256, 1000, 1024, 4),
    "trivial": (2, 8, 16, 24, 64, 2),
}


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def sdpa_checks(size: str, p: float = 0.1) -> list[dict]:
    """Which SDPA implementation runs on the CPU with a bool mask and dropout, and whether its output and
    gradients equal softmax -> F.dropout -> matmul written out with the same mask (same seed)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, T, C, M = SIZES[size][:4]
    K = M + T
    g = torch.Generator().manual_seed(0)
    q0, k0, v0 = (torch.randn(B, 1, n, C, generator=g) for n in (T, K, K))
    mask = torch.arange(K)[None, :] <= torch.arange(T)[:, None] + M  # True = may attend, as causal_mask

    def run(fn, seed=5):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        torch.manual_seed(seed)
        out = fn(q, k, v)
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        out.backward(gout)
        return out.detach(), q.grad, k.grad, v.grad

    def sdpa(q, k, v):
        with warnings.catch_warnings():  # "Both fused kernels do not support non-zero dropout": the point
            warnings.simplefilter("ignore", UserWarning)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)

    def written(q, k, v):
        s = (q @ k.transpose(-1, -2)) / math.sqrt(C)
        w = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
        return F.dropout(w, p, True) @ v

    rows = []
    default = run(sdpa)
    for backend in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                other = run(sdpa)
            rows.append({"check": f"SDPA p={p} bool mask: default vs {backend.name} only, same seed",
                         "value": max(float((a - b).abs().max()) for a, b in zip(default, other)),
                         "unit": "max abs diff (output and grads)"})
        except RuntimeError as e:
            rows.append({"check": f"SDPA p={p} bool mask: {backend.name} only", "value": None,
                         "unit": "refused: " + str(e).splitlines()[0][:60]})
    mine = run(written)
    for name, a, b in zip(("output", "grad q", "grad k", "grad v"), default, mine):
        rows.append({"check": f"SDPA vs softmax->F.dropout->matmul, same seed: {name}", "value": _rel(a, b),
                     "unit": "relative L2 diff"})
    torch.manual_seed(5)
    a1 = sdpa(q0, k0, v0)
    a2 = sdpa(q0, k0, v0)
    rows.append({"check": "SDPA: two consecutive calls draw different masks", "value": _rel(a1, a2),
                 "unit": "relative L2 diff (> 0)"})
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(run(sdpa))
    finally:
        torch.set_num_threads(threads)
    rows.append({"check": "SDPA with dropout, 1 vs 2 threads, same seed (output, grads)",
                 "value": max(_rel(a, b) for a, b in zip(*outs)), "unit": "relative L2 diff"})
    return rows


def _model(size: str, p: float):
    import torch

    from sharnn import SHARNN, ModelConfig

    B, T, C, M, d_ff, n = SIZES[size]
    torch.manual_seed(0)
    return SHARNN(ModelConfig(d_model=C, d_ff=d_ff, n_layer=n, mem_len=M, dropout=p, dropouth=p,
                              dropouti=p)).train()


def _batches(size: str):
    import torch

    B, T, C, M = SIZES[size][:4]
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, 256, (T, B), generator=g) for _ in range(M // T + 2)]  # the memory full


def _state(model, xs, setting: str):
    """The carried state after all but the last batch (dropout on, no gradient)."""
    import torch

    import sharnn.kernels as kernels

    previous = kernels.set_cpu_kernels(setting)
    try:
        torch.manual_seed(99)
        state = None
        with torch.no_grad():
            for x in xs[:-1]:
                _, _, state = model(x, state, targets=x)
        return state
    finally:
        kernels.set_cpu_kernels(previous)


def model_grads(model, x, state, setting: str, seed: int, values_first: bool = False):
    """(loss, {name: grad}) of one forward and backward with `setting`, torch's generator seeded with `seed`.
    values_first: under "fast-attention", the attention's values mask is drawn before its weights mask, in
    the order the torch path draws them (F.dropout(keys), then SDPA's own): the same masks as "torch"."""
    import torch

    import sharnn.kernels as kernels

    previous = kernels.set_cpu_kernels(setting)
    restore = install_values_first() if values_first else None
    try:
        torch.manual_seed(seed)
        model.zero_grad()
        _, loss, _ = model(x, state, targets=x)
        loss.backward()
        return loss.item(), {k: q.grad.clone() for k, q in model.named_parameters() if q.grad is not None}
    finally:
        if restore:
            restore()
        kernels.set_cpu_kernels(previous)


def install_values_first():
    """Make the written attention of "fast-attention" draw its values' mask before its weights' mask (both by
    torch's bernoulli_), the order of the torch path with SDPA (F.dropout(keys), then SDPA's own): with the
    same seed, "fast-attention" then draws exactly the masks "torch" draws. Returns the undo."""
    import torch

    import sharnn.kernels as kernels

    real_attend, real_masked = kernels._attend, kernels.masked
    pending: dict = {}

    def attend(q, keys, p):
        pending["keys"] = keys.shape
        return real_attend(q, keys, p)

    def masked(x, p, scale=1.0):
        if "keys" in pending:  # the attention's first mask (its weights): draw the values' mask before it
            pending["values"] = kernels.keep_mask(pending.pop("keys"), p)
            keep = kernels.keep_mask(x.shape, p)
        elif "values" in pending:
            keep = pending.pop("values")
        else:
            return real_masked(x, p, scale)
        out = torch.where(keep, x, 0)
        return (out.mul_(scale) if scale != 1.0 else out), keep

    kernels._attend, kernels.masked = attend, masked

    def undo():
        kernels._attend, kernels.masked = real_attend, real_masked
    return undo


def _values_first_order() -> bool:
    """Whether the torch path draws the attention's values mask first: with SDPA (F.dropout(keys) before
    SDPA's own dropout); the written attention of 1854ef0 draws the weights' first, as fast-attention."""
    import sharnn.kernels as kernels

    return getattr(kernels, "get_attention_impl", lambda: "sdpa")() == "sdpa"


def attention_impls() -> tuple[str, ...]:
    """The attentions `--cpu_kernels torch` can run: torch's SDPA, and where sharnn.kernels has it (from
    1854ef0 on, the default) the attention written out in torch's ops."""
    import sharnn.kernels as kernels

    return tuple(getattr(kernels, "ATTENTION_IMPLS", ("sdpa",)))


class _attention_impl:
    """with _attention_impl(name): `--cpu_kernels torch` runs that attention (no-op if only SDPA exists)."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        import sharnn.kernels as kernels

        setter = getattr(kernels, "set_attention_impl", None)
        self.previous = setter(self.name) if setter else None

    def __exit__(self, *exc):
        import sharnn.kernels as kernels

        if self.previous is not None:
            kernels.set_attention_impl(self.previous)


def model_checks(size: str) -> list[dict]:
    """The whole model: fast vs torch without dropout; torch vs fast-attention drawing the same masks (SDPA
    draws the values' mask first, F.dropout(keys) before its own; the written attention the weights' first,
    as fast-attention does)."""
    rows = []
    xs = _batches(size)

    def compare(what, a, b):
        (la, ga), (lb, gb) = a, b
        rows.append({"check": f"model {what}: loss", "value": abs(la - lb), "unit": "abs diff"})
        rows.append({"check": f"model {what}: gradients ({len(gb)} tensors)",
                     "value": max(_rel(ga[k], gb[k]) for k in gb) if set(ga) == set(gb) else float("inf"),
                     "unit": "worst relative L2 diff"})

    for impl in attention_impls():
        with _attention_impl(impl):
            model = _model(size, 0.0)
            state = _state(model, xs, "fast")
            compare(f"dropout 0, fast vs torch ({impl})", model_grads(model, xs[-1], state, "fast", 1),
                    model_grads(model, xs[-1], state, "torch", 1))
            model = _model(size, 0.1)
            state = _state(model, xs, "fast")
            torch_ = model_grads(model, xs[-1], state, "torch", 7)
            first = impl == "sdpa"
            compare(f"dropout 0.1, torch ({impl}) vs fast-attention, same masks",
                    torch_, model_grads(model, xs[-1], state, "fast-attention", 7, values_first=first))
            compare(f"dropout 0.1, torch ({impl}) vs fast-attention, other masks (for scale)",
                    torch_, model_grads(model, xs[-1], state, "fast-attention", 7, values_first=not first))
    return rows


def torch_bernoulli_emulated(seed: int, n: int, p: float):
    """torch.manual_seed(seed); torch.empty(n).bernoulli_(p), emulated: one mt19937 random64() per element
    (two 32-bit outputs, the first the high word), its low 53 bits as a double u in [0, 1), 1 where u < p:
    torch's CPU default (serial) kernel, at::bernoulli_distribution<double>."""
    import numpy as np

    mt = np.random.MT19937()
    mt._legacy_seeding(seed)  # init_genrand(seed), as torch's at::mt19937(seed)
    raw = mt.random_raw(2 * n).astype(np.uint64)
    x = (raw[0::2] << np.uint64(32)) | raw[1::2]
    return (x & np.uint64((1 << 53) - 1)).astype(np.float64) * 2.0**-53 < p


def _corr_z(a, b) -> float:
    from bench.quality import _corr_z as corr

    return corr(a, b)


def mask_checks(size: str, p: float = 0.1, calls: int = 24) -> list[dict]:
    """torch's CPU bernoulli_ (what F.dropout and SDPA draw): which generator, and its masks' statistics in
    the shapes the model draws (the values (K, B, C), the weights (B, 1, T, K), the Boom (T, B, d_ff), the
    rest (T, B, C)): keep rate, rate per position over calls, neighbours along every axis, consecutive
    calls; F.dropout on a non-contiguous input. The same statistics of the fast path's numpy masks."""
    import torch
    import torch.nn.functional as F

    B, T, C, M, d_ff = SIZES[size][:5]
    K = M + T
    rows = []
    same = all((torch.manual_seed(s) and torch.empty(1 << 16).bernoulli_(1 - p).bool().numpy()
                == torch_bernoulli_emulated(s, 1 << 16, 1 - p)).all() for s in (0, 1, 12345))
    rows.append({"check": "bernoulli_ == mt19937 emulation (serial, 53-bit uniform < p), 3 seeds x 65536",
                 "value": bool(same), "unit": "bit for bit"})
    import sharnn.kernels as kernels

    def draw(source, shape):
        if source == "torch":
            return F.dropout(torch.ones(shape), p, True) != 0
        previous = kernels.set_cpu_kernels("fast")
        try:
            return kernels.dropout(torch.ones(shape), p, True) != 0
        finally:
            kernels.set_cpu_kernels(previous)

    torch.manual_seed(2024)
    for source, name, shape in [(src, name, shape) for src in ("torch", "fast") for name, shape in (
            ("values (K, B, C)", (K, B, C)), ("weights (B, 1, T, K)", (B, 1, T, K)),
            ("Boom (T, B, d_ff)", (T, B, d_ff)), ("(T, B, C)", (T, B, C)))]:
        name = f"{source} {name}"
        n_calls = calls if math.prod(shape) <= 5_000_000 else calls // 2
        masks = [draw(source, shape) for _ in range(n_calls)]
        n = sum(m.numel() for m in masks)
        rate = sum(int(m.sum()) for m in masks) / n
        rows.append({"check": f"{name}: keep rate over {n_calls} calls", "value": rate,
                     "z": (rate - (1 - p)) / math.sqrt(p * (1 - p) / n), "unit": "rate (z)"})
        counts = torch.stack(masks).sum(0).double()  # per position, Binomial(n_calls, 1 - p)
        dispersion = float(counts.var() / (n_calls * p * (1 - p)))
        rows.append({"check": f"{name}: variance of per-position keep counts / binomial", "value": dispersion,
                     "z": (dispersion - 1) * math.sqrt(counts.numel() / 2), "unit": "ratio (z)"})
        zs = []
        for axis in range(len(shape)):
            if shape[axis] > 1:
                zs += [_corr_z(m.narrow(axis, 0, shape[axis] - 1), m.narrow(axis, 1, shape[axis] - 1))
                       for m in masks[:4]]
        rows.append({"check": f"{name}: neighbours along each axis ({len(zs)} pairs)",
                     "value": max(map(abs, zs)), "rms_z": math.sqrt(sum(z * z for z in zs) / len(zs)),
                     "unit": "max |z| (rms z)"})
        zs = [_corr_z(a, b) for a, b in zip(masks, masks[1:])]
        rows.append({"check": f"{name}: consecutive calls ({len(zs)} pairs)", "value": max(map(abs, zs)),
                     "rms_z": math.sqrt(sum(z * z for z in zs) / len(zs)), "unit": "max |z| (rms z)"})
    x = torch.randn(K, B, C).transpose(0, 1)  # (B, K, C), not contiguous
    torch.manual_seed(3)
    out = F.dropout(x, p, True)
    keep = out != 0
    rate = float(keep.double().mean())
    rows.append({"check": "F.dropout on a non-contiguous input: keep rate", "value": rate,
                 "z": (rate - (1 - p)) / math.sqrt(p * (1 - p) / keep.numel()),
                 "unit": "rate (z)"})
    rows.append({"check": "F.dropout on a non-contiguous input: kept values scaled by 1/(1-p)",
                 "value": float((out[keep] - x[keep] / (1 - p)).abs().max()), "unit": "max abs error"})
    previous = kernels.set_cpu_kernels("fast")
    try:  # the fast path's dropout: kept values and their gradients times 1/(1-p), dropped ones 0
        x = torch.randn(T, B, d_ff, requires_grad=True)
        out = kernels.dropout(x, p, True)
        grad = torch.randn(out.shape)
        out.backward(grad)
    finally:
        kernels.set_cpu_kernels(previous)
    keep = out.detach() != 0
    err = max(float((out.detach() - torch.where(keep, x.detach() / (1 - p), 0)).abs().max()),
              float((x.grad - torch.where(keep, grad / (1 - p), 0)).abs().max()))
    rows.append({"check": "fast dropout: output and gradient = where(keep, . / (1-p), 0) with one mask",
                 "value": err, "unit": "max abs error"})
    return rows


def gradient_expectation(size: str, draws: int, p: float = 0.1) -> list[dict]:
    """Mean gradient and mean squared gradient norm over `draws` dropout draws in each of four groups: fast
    and torch (SDPA) with seeds A, fast and torch with seeds B; the same weights, batch and memory, only the
    masks differ. For two groups, z^2 = (mean_a - mean_b)^2 / ((var_a + var_b) / draws) per gradient
    element, averaged; the controls (fast A vs fast B, torch A vs torch B) give its value when expectations
    agree (a little above 1: estimated variances, correlated elements). Then a cross-validated test: the
    draws of B projected on the direction mean(fast A) - mean(torch A); a real difference of the expected
    gradients shows as a positive z (about N(0, 1) when there is none)."""
    import torch

    xs = _batches(size)
    model = _model(size, p)
    state = _state(model, xs, "fast")
    draws_of, stats, names, sizes = {}, {}, [], []
    for group, setting, first_seed in (("fast A", "fast", 10_000), ("torch A", "torch", 10_000),
                                       ("fast B", "fast", 20_000), ("torch B", "torch", 20_000)):
        flats, losses = [], []
        for d in range(draws):
            with _attention_impl("sdpa"):  # the formulation the 0.18 was measured with
                loss, grads = model_grads(model, xs[-1], state, setting, first_seed + d)
            names = sorted(grads)
            sizes = [grads[k].numel() for k in names]
            flats.append(torch.cat([grads[k].flatten() for k in names]))
            losses.append(loss)
        g = torch.stack(flats).double()  # (draws, parameters)
        draws_of[group] = g
        stats[group] = (g.mean(0), g.var(0), describe([float(x) for x in (g * g).sum(1)]), describe(losses))

    rows = []
    for a, b in (("fast A", "torch A"), ("fast B", "torch B"), ("fast A", "fast B"), ("torch A", "torch B")):
        (ma, va, *_), (mb, vb, *_) = stats[a], stats[b]
        z = (ma - mb) ** 2 / ((va + vb) / draws).clamp_min(1e-300)
        per = [float(part.mean()) for part in z.split(sizes)]
        top = sorted(range(len(per)), key=lambda i: -per[i])[:3]
        rows.append({"check": f"expected gradient, {a} vs {b}, {draws} draws each: mean z^2 over {z.numel()} "
                              f"elements; largest per tensor: "
                              + ", ".join(f"{names[i]} {per[i]:.2f}" for i in top),
                     "value": float(z.mean()), "unit": "mean z^2 (controls: A vs B of one path)",
                     "per_tensor": dict(zip(names, per))})
    # (mean fast B - mean torch B) . (mean fast A - mean torch A): with the direction fixed by A, B's draws
    # give its standard error; about N(0, 1) when the paths' expected gradients are equal
    direction = stats["fast A"][0] - stats["torch A"][0]
    f, t = draws_of["fast B"] @ direction, draws_of["torch B"] @ direction
    se = math.sqrt(float(f.var() + t.var()) / draws)
    rows.append({"check": "cross-validated: draws B projected on mean(fast A) - mean(torch A): fast - torch",
                 "value": float(f.mean() - t.mean()), "se": se, "z": float(f.mean() - t.mean()) / se,
                 "unit": "projection (z ~ N(0, 1) if equal)"})
    for s in ("A", "B"):
        nf, nt = stats[f"fast {s}"][2], stats[f"torch {s}"][2]
        ratio = nf["mean"] / nt["mean"]
        se = ratio * math.sqrt((nf["se"] / nf["mean"]) ** 2 + (nt["se"] / nt["mean"]) ** 2)
        rows.append({"check": f"mean squared gradient norm, fast {s} / torch {s} "
                              f"({nf['mean']:.4g}/{nt['mean']:.4g})",
                     "value": ratio, "se": se, "z": (ratio - 1) / se, "unit": "ratio"})
        lf, lt = stats[f"fast {s}"][3], stats[f"torch {s}"][3]
        se = math.sqrt(lf["se"] ** 2 + lt["se"] ** 2)
        rows.append({"check": f"mean loss, fast {s} - torch {s}", "value": lf["mean"] - lt["mean"], "se": se,
                     "z": (lf["mean"] - lt["mean"]) / se, "unit": "nats"})
        rows.append({"check": f"total gradient variance over draws, fast {s} / torch {s}",
                     "value": float(stats[f"fast {s}"][1].sum() / stats[f"torch {s}"][1].sum()),
                     "unit": "ratio"})
    return rows


PARTS = ("sdpa", "model", "masks", "expectation")


def run_checks(size: str, draws: int, parts: tuple[str, ...] = PARTS) -> list[dict]:
    rows = []
    for part, fn in (("sdpa", lambda: sdpa_checks(size)), ("model", lambda: model_checks(size)),
                     ("masks", lambda: mask_checks(size)),
                     ("expectation", lambda: gradient_expectation(size, draws))):
        if part not in parts:
            continue
        t = time.perf_counter()
        for r in fn():
            rows.append({"part": part, **r})
            print_row(rows[-1])
        print(f"  ({part}: {time.perf_counter() - t:.0f} s)", flush=True)
    return rows


def print_row(r: dict) -> None:
    v = r["value"]
    text = str(v) if isinstance(v, bool) or v is None else (f"{v:.3e}" if abs(v) < 1e-3 and v else f"{v:.5f}")
    extra = "".join(f"  {k} {r[k]:+.2f}" if k == "z" else f"  {k} {r[k]:.3g}"
                    for k in ("z", "rms_z", "se") if r.get(k) is not None)
    print(f"{r['check'][:130]:130s} {text:>12s}{extra}  [{r['unit']}]", flush=True)


# ------------------------------------------------------------------------------------------------ helpers
def _machine() -> str:
    import platform

    import torch

    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} x{os.cpu_count()} cores, torch {torch.__version__}"


def _write(path: Path, record: dict) -> None:
    from sharnn.io import atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, record)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [TRAINER_SAME_MASKS]:  # the trainer (python -m train ARGS) with install_values_first
        from train.loop import main as train_main_

        if _values_first_order():
            install_values_first()
        return train_main_(argv[1:])
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(prog="python -m bench.sdpa_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("checks", help="direct checks of the two CPU paths")
    c.add_argument("--json", type=Path)
    c.add_argument("--draws", type=int, default=40, help="dropout draws per group for the mean gradient")
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    c.add_argument("--size", choices=["small", "trivial"], default="small",
                   help="shapes: the `small` preset's (memory 1000, bptt 64, batch 16), or trivial (tests)")
    t = sub.add_parser("train", help="paired training curves (trainer flags after --)")
    t.add_argument("--preset", default="small")
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--seeds", type=int, default=4)
    t.add_argument("--first_seed", type=int, default=1)
    t.add_argument("--impl", action="append",
                   help="kernel settings in the order run (default: fast, torch); also 'same-masks': "
                        "fast-attention drawing, seed for seed, the masks torch draws (formulations alone)")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--data", type=Path, default=REPO / "data" / "demo")
    t.add_argument("--json", type=Path)
    r = sub.add_parser("report", help="print the tables of a JSON written by `train`")
    r.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    if args.what in ("checks", "train"):  # before any measuring: --json replaces only our own record
        from bench import check_output, written_by

        check_output(args.json, "--json", written_by("bench.sdpa_check"),
                     "record of python -m bench.sdpa_check",
                     inputs=[("corpus (--data)", getattr(args, "data", None))])
    if args.what == "train":
        args.impl = args.impl or ["fast", "torch"]
        return train_main(args, extra)
    if args.what == "report":
        record = json.loads(args.file.read_text())
        print(f"{record['command']}  ({record['date']}, {record['machine']})")
        for key in ("val_bpc", "train_bpc"):
            print_curves(curve_summary(record["runs"], record["impls"], key))
        return 0
    import torch

    torch.set_num_threads(args.threads)
    parts = tuple(args.parts.split(","))
    if not set(parts) <= set(PARTS):
        parser.error(f"--parts: choose from {', '.join(PARTS)}")
    rows = run_checks(args.size, args.draws, parts)
    if args.json:
        _write(args.json, {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                           "command": "python -m bench.sdpa_check " + " ".join(argv), "machine": _machine(),
                           "size": dict(zip(("B", "T", "C", "memory", "d_ff", "blocks"), SIZES[args.size])),
                           "draws": args.draws, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
