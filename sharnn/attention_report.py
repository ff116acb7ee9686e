"""What the single attention head reads: its weights over one window of text, and a report on them.

The SHA-RNN's one head attends over the memory (up to `mem_len` - T earlier positions) and the segment. The
paper's claim is that this one head is enough; this module shows what it does with it:

    window = read_window(model, data, bptt)   # warm the memory over the preceding segments, then capture
    report = summarize(window)                # entropy, attention mass by distance, most-attended bytes
    write_report_dir(window, report, out)     # attention.png, distance.png, report.json, report.md (atomic)

The window: the text is cut into `bptt`-long segments from its start, as evaluation cuts stream 0 of a split;
the model reads the first `ceil((mem_len - T) / T)` of them with its carried state (so the memory holds real
earlier positions), and the weights of the next one are the window. The trainer logs this for the first
bytes of the validation split (the start of stream 0) at every validation; `sharnn-eval --attention_report`
writes it for any text.

The weights are captured from outside the model (`capture_attention`): forward hooks on the attention modules,
registered only inside the `with` block, recompute softmax(queries(h) keys^T / sqrt(C) + causal mask) from
the module's inputs, in float32, without dropout (the model is read in eval mode). Training never runs them:
outside the block the model has no hooks, and its code path is the one it always runs.

Distances: query t of the segment sits at key position n_memory + t; key j is n_memory + t - j bytes back
(0: the query's own position). Entropy is in bits. matplotlib is imported only when a picture is drawn.

A report directory is recognised by its files and the format marker in its report.json (`is_report_dir`):
`write_report_dir` replaces only a directory that is an earlier report (sharnn.io.atomic.check_output).
What a forward over a window needs in memory (`forward_bytes`, the attention's T x K scores dominating) is
checked against what the device has (`check_fits`) by the commands whose size options set T and K.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sharnn.io import atomic
from sharnn.model import SHARNN, SingleHeadAttention, causal_mask

REPORT_FORMAT = "sharnn-attention-report"
"""The `format` in a report's report.json: what marks a directory as a report that a new one may replace."""
REPORT_FILES = ("attention.png", "distance.png", "report.json", "report.md")
N_QUERIES_SHOWN = 6  # query positions whose top keys the text report lists
TOP_K = 5  # keys listed per query
CONTEXT_BYTES = 12  # bytes shown on either side of a key in the text report


# --------------------------------------------------------------------------------------------- capture
def attention_weights(attn: SingleHeadAttention, h: Tensor, keys: Tensor) -> Tensor:
    """(B, T, K) float32: the weights `attn` gives the keys for segment `h` ((T, B, C)), keys (K, B, C) being
    the memory then the segment, computed as the module computes them without dropout."""
    T, _, C = h.shape
    q = attn.queries(h).float().transpose(0, 1)  # (B, T, C)
    scores = torch.bmm(q, keys.float().permute(1, 2, 0)) / math.sqrt(C)  # (B, T, K)
    visible = causal_mask(T, keys.shape[0] - T, h.device)  # (T, K), True = may attend
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)


def _record(captured: dict[int, Tensor], block_index: int, row: int, attn: SingleHeadAttention,
            inputs: tuple, output: Tensor) -> None:
    h, keys, _ = inputs  # SingleHeadAttention.forward(h, keys, segment_keys)
    # float32 also inside an autocast region: the report's weights sum to 1 within float32's rounding
    with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
        captured[block_index] = attention_weights(attn, h[:, row:row + 1], keys[:, row:row + 1])[0].cpu()


@contextlib.contextmanager
def capture_attention(model: SHARNN, row: int = 0) -> Iterator[dict[int, Tensor]]:
    """Within the block, each forward of `model` stores every attention block's weights for batch row `row`
    in the yielded dict: block index -> (T, K) float32 CPU tensor, the last forward's. The hooks are removed
    when the block ends (also on an exception)."""
    captured: dict[int, Tensor] = {}
    handles = [block.attn.register_forward_hook(partial(_record, captured, i, row))
               for i, block in enumerate(model.blocks) if block.attn is not None]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class AttentionWindow:
    """One segment's attention weights with the bytes its keys stand for."""

    weights: dict[int, np.ndarray]
    """Block index -> (T, K) float32 weights; row t is query t of the segment, column j key j."""
    key_bytes: bytes
    """The K bytes the keys were computed from: the n_memory bytes before the segment, then the segment."""
    n_memory: int
    """Keys from the memory (before the segment): K - T."""
    start: int
    """Offset of the segment in the text it was read from."""

    @property
    def segment_len(self) -> int:
        return len(self.key_bytes) - self.n_memory


def window_start(n_bytes: int, bptt: int, mem_len: int) -> tuple[int, int]:
    """(start, T) of the window in a text of `n_bytes`: the first segment on the bptt grid whose memory is
    full (the memory holds mem_len - T positions), or the last whole segment of a shorter text."""
    if n_bytes < 1:
        raise ValueError("the text is empty: the attention report needs at least one byte")
    T = min(bptt, n_bytes)
    n_warm = -(-max(mem_len - T, 0) // T)  # segments read before the window
    return min(n_warm, n_bytes // T - 1) * T, T


@torch.no_grad()
def read_window(model: SHARNN, data: bytes | np.ndarray, bptt: int) -> AttentionWindow:
    """Run `model` (eval mode, batch 1, on its device) over `data` in `bptt`-long segments with the carried
    state up to the window (see `window_start`) and capture the window's attention weights."""
    if not any(block.attn is not None for block in model.blocks):
        raise ValueError("the model has no attention block (attn_layers is empty): nothing to report")
    data = np.frombuffer(bytes(data), dtype=np.uint8)
    start, T = window_start(len(data), bptt, model.cfg.mem_len)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        state = None
        for offset in range(0, start, T):  # warm the memory, as evaluation reads stream 0
            x = torch.from_numpy(data[offset:offset + T].astype(np.int64)).to(device)[:, None]  # (T, 1)
            _, _, state = model(x, state)
        x = torch.from_numpy(data[start:start + T].astype(np.int64)).to(device)[:, None]  # (T, 1)
        with capture_attention(model) as captured:
            model(x, state)
    finally:
        model.train(was_training)
    weights = {i: w.numpy() for i, w in captured.items()}
    K = next(iter(weights.values())).shape[1]
    return AttentionWindow(weights=weights, key_bytes=data[start + T - K:start + T].tobytes(),
                           n_memory=K - T, start=start)


# ------------------------------------------------------------------------------------------- the numbers
def distance_edges(n_keys: int) -> np.ndarray:
    """Log-spaced distance bins [edges[i], edges[i+1]): 0 (the query's own position), 1, 2-3, 4-7, ...,
    up to the farthest key (n_keys - 1)."""
    edges = [0, 1]
    while edges[-1] < n_keys:
        edges.append(edges[-1] * 2)
    return np.asarray(edges, dtype=np.int64)


def distances(T: int, n_memory: int) -> np.ndarray:
    """(T, K) int: how many bytes back key j lies from query t (negative: a future key, masked)."""
    return (n_memory + np.arange(T))[:, None] - np.arange(n_memory + T)[None, :]


def entropy_bits(weights: np.ndarray) -> np.ndarray:
    """(T,) the entropy of each query's distribution over the keys, in bits."""
    w = weights.astype(np.float64)
    return -(w * np.log2(np.where(w > 0, w, 1.0))).sum(axis=-1)


def printable(b: int) -> str:
    """One character per byte, so that marked positions line up: printable ASCII as itself, newline as
    '⏎', tab as '→', every other byte (also each byte of a multi-byte UTF-8 character) as '·'."""
    if b == 10:
        return "⏎"
    if b == 9:
        return "→"
    if b == 96:  # a backtick would end the markdown code span
        return "'"
    return chr(b) if 32 <= b < 127 else "·"


def show(data: bytes) -> str:
    return "".join(printable(b) for b in data)


def _layer_report(window: AttentionWindow, block: int) -> dict:
    weights = window.weights[block]
    T, K = weights.shape
    d = distances(T, window.n_memory)
    visible = d >= 0
    upper_edges, mass, stats = distance_histogram(window, block)
    uniform_mass = distance_histogram(window, None)[1]
    entropy = entropy_bits(weights)
    shown = np.unique(np.linspace(0, T - 1, min(N_QUERIES_SHOWN, T)).round().astype(int))
    queries = []
    for t in shown:
        top = np.argsort(weights[t])[::-1][:TOP_K]
        queries.append({"query": int(t), "query_byte": window.key_bytes[window.n_memory + t],
                        "top": [{"key": int(j), "distance": int(d[t, j]), "byte": window.key_bytes[j],
                                 "weight": float(weights[t, j])} for j in top]})
    received = weights.sum(axis=0)  # attention each key receives, summed over the queries
    most_read = np.argsort(received)[::-1][:10]
    return {
        "entropy_bits": float(entropy.mean()),
        "uniform_entropy_bits": float(np.log2(visible.sum(axis=-1)).mean()),
        "mean_distance": stats["sum"],
        "memory_mass": float(weights[:, :window.n_memory].sum() / T),
        "distance_bins": [{"from": int(lo), "to": int(hi), "mass": float(m), "uniform_mass": float(u)}
                          for lo, hi, m, u in zip(distance_edges(K)[:-1], upper_edges, mass, uniform_mass)],
        "queries": queries,
        "most_attended_keys": [{"key": int(j), "byte": window.key_bytes[j],
                                "weight_sum": float(received[j])} for j in most_read],
    }


@dataclass
class AttentionReport:
    """The numbers of one window: per attention block, and the entropy over all of them."""

    entropy_bits: float
    """Mean over blocks and queries of each query's attention entropy, in bits."""
    layers: dict[int, dict]
    """Block index -> its numbers (see `summarize`)."""
    n_memory: int
    segment_len: int
    start: int

    def to_json(self) -> dict:
        return {"format": REPORT_FORMAT, "format_version": 1, "entropy_bits": self.entropy_bits,
                "entropy_unit": "bits", "start": self.start, "segment_len": self.segment_len,
                "n_memory": self.n_memory,
                "layers": {str(i): layer for i, layer in self.layers.items()}}


def summarize(window: AttentionWindow) -> AttentionReport:
    """Per attention block: mean entropy (bits; and that of a uniform distribution over the visible keys),
    mean distance, the mass on the memory, the mass in each log-spaced distance bin (the mean query's,
    summing to 1; `uniform_mass`: that of a head attending evenly to every visible key), the top keys of a few
    query positions and the keys that receive the most attention."""
    layers = {i: _layer_report(window, i) for i in sorted(window.weights)}
    entropy = float(np.mean([layer["entropy_bits"] for layer in layers.values()]))
    return AttentionReport(entropy_bits=entropy, layers=layers, n_memory=window.n_memory,
                           segment_len=window.segment_len, start=window.start)


def marked_text(window: AttentionWindow, report: AttentionReport) -> str:
    """Markdown: the window's segment, then for a few query positions their most-attended earlier bytes, each
    shown in its context with the byte in [brackets] (bytes as `printable` shows them)."""
    kb, M = window.key_bytes, window.n_memory
    lines = [f"Attention over bytes {report.start - M}..{report.start + report.segment_len - 1} "
             f"({M} in memory, a segment of {report.segment_len}); entropy {report.entropy_bits:.2f} bits.",
             "", f"Segment: `{show(kb[M:])}`"]
    for i, layer in report.layers.items():
        lines += ["", f"**Block {i}**: entropy {layer['entropy_bits']:.2f} bits (uniform: "
                      f"{layer['uniform_entropy_bits']:.2f}), mean distance {layer['mean_distance']:.1f} "
                      "bytes, "
                      f"{100 * layer['memory_mass']:.0f}% of the attention on the memory", ""]
        for q in layer["queries"]:
            t = M + q["query"]
            lines.append(f"- query {q['query']} `{show(kb[max(0, t - CONTEXT_BYTES):t])}"
                         f"[{printable(q['query_byte'])}]` reads:")
            for key in q["top"]:
                j = key["key"]
                context = (show(kb[max(0, j - CONTEXT_BYTES):j]) + f"[{printable(key['byte'])}]"
                           + show(kb[j + 1:min(j + 1 + CONTEXT_BYTES, t + 1)]))
                lines.append(f"    - {key['weight']:.3f} at {key['distance']} bytes back: `{context}`")
    return "\n".join(lines) + "\n"


def distance_histogram(window: AttentionWindow, block: int | None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Block `block`'s attention mass by distance as a binned histogram (TensorBoard's raw histogram): the
    bins' inclusive upper edges, the mean query's mass in each (summing to 1), and min, max, num, sum,
    sum_squares of the distance under that mass. Block None: a head spreading its attention evenly over
    the keys each query may see (the reference a bin's mass is read against)."""
    if block is None:
        visible = distances(window.segment_len, window.n_memory) >= 0
        weights = visible / visible.sum(axis=-1, keepdims=True)
    else:
        weights = window.weights[block].astype(np.float64)
    T, K = weights.shape
    d = np.maximum(distances(T, window.n_memory), 0)  # masked keys have weight 0
    edges = distance_edges(K)
    mass = np.zeros(len(edges) - 1)
    np.add.at(mass, np.searchsorted(edges, d, side="right") - 1, weights)
    stats = {"min": 0.0, "max": float(K - 1), "num": 1.0, "sum": float((weights * d).sum() / T),
             "sum_squares": float((weights * d.astype(np.float64) ** 2).sum() / T)}
    return np.minimum(edges[1:], K) - 1.0, mass / T, stats


def weights_rgb(weights: np.ndarray, max_keys: int = 1024, floor: float = 1e-6) -> np.ndarray:
    """(T, min(K, max_keys), 3) uint8: the weights as an image (queries down, keys across: memory then the
    segment), log colour scale from `floor` to 1 (viridis), the masked future black. Keys are averaged in
    groups of ceil(K / max_keys), so a 5000-byte memory stays a readable (and small) image."""
    from matplotlib import colormaps  # imported here: training never draws

    T, K = weights.shape
    group = -(-K // max_keys)
    pad = (-K) % group
    w = np.pad(weights, ((0, 0), (0, pad))).reshape(T, -1, group).mean(axis=-1)  # (T, ceil(K / group))
    level = (np.log10(np.maximum(w, floor)) - math.log10(floor)) / -math.log10(floor)  # 0 at floor, 1 at 1
    rgb = colormaps["viridis"](level)[..., :3]
    rgb[w <= 0] = 0.0
    return (rgb * 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------------------------- pictures
def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # imported here: only the pictures need matplotlib

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def weights_figure(window: AttentionWindow, report: AttentionReport):
    """Per attention block, the weights (queries x keys, memory then segment) with a log colour scale."""
    from matplotlib.colors import LogNorm

    n = len(window.weights)
    fig = _figure(10, 3.6 * n)
    M, T = window.n_memory, window.segment_len
    for ax, (i, w) in zip(np.atleast_1d(fig.subplots(n, 1)), sorted(window.weights.items())):
        shown = np.ma.masked_less_equal(w, 0.0)  # the masked future (weight 0) stays blank
        image = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis",
                          norm=LogNorm(vmin=max(float(shown.min()), 1e-6), vmax=1.0),
                          extent=(-M - 0.5, T - 0.5, T - 0.5, -0.5))
        ax.axvline(-0.5, color="white", linewidth=0.8, linestyle="--")
        ax.set_title(f"block {i}: attention weights (entropy {report.layers[i]['entropy_bits']:.2f} bits)")
        ax.set_xlabel("key position (negative: memory; 0..T-1: the segment)")
        ax.set_ylabel("query position")
        fig.colorbar(image, ax=ax, label="weight (log scale)")
    return fig


def distance_figure(report: AttentionReport):
    """Per attention block, the attention mass in each log-spaced distance bin."""
    fig = _figure(8, 3.6)
    ax = fig.subplots()
    n = len(report.layers)
    for k, (i, layer) in enumerate(report.layers.items()):
        bins = layer["distance_bins"]
        x = np.arange(len(bins)) + (k - (n - 1) / 2) * 0.8 / n
        ax.bar(x, [b["mass"] for b in bins], width=0.8 / n,
               label=f"block {i} (entropy {layer['entropy_bits']:.2f} bits)")
    reference = next(iter(report.layers.values()))["distance_bins"]
    ax.scatter(np.arange(len(reference)), [b["uniform_mass"] for b in reference], marker="_", s=300,
               color="black", label="attending evenly to every visible key", zorder=3)
    labels = [str(b["from"]) if b["from"] == b["to"] else f"{b['from']}-{b['to']}" for b in reference]
    ax.set_xticks(np.arange(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("distance back (bytes; 0 = the query's own position)")
    ax.set_yscale("log")  # the nearest bins are a few bytes wide: on a linear scale they would not show
    ax.set_ylabel("attention mass (mean query, log scale)")
    ax.set_title("how far back the head reads")
    ax.legend(fontsize=8)
    return fig


def figure_png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def figure_rgb(fig) -> np.ndarray:
    """(H, W, 3) uint8: the figure rendered, for TensorBoard's images."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def is_report_dir(path: str | Path) -> bool:
    """Whether `path` is an attention report `write_report_dir` wrote: nothing but its files, and a
    report.json with the report's format marker."""
    path = Path(path)
    if not atomic.holds_only(REPORT_FILES)(path):
        return False
    try:
        record = json.loads((path / "report.json").read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("format") == REPORT_FORMAT


def write_report_dir(window: AttentionWindow, report: AttentionReport, out: str | Path,
                     inputs: Sequence[tuple[str, str | Path | None]] = (),
                     option: str = "--attention_report") -> None:
    """Write attention.png, distance.png, report.json and report.md to the directory `out`, atomically. An
    existing `out` is replaced only when it is an earlier report (`is_report_dir`); `inputs` (what the report
    was read from) may not be, hold or lie inside `out`: sharnn.io.atomic.check_output, OutputRefused
    otherwise."""
    atomic.check_output(out, option, kind="dir", what="attention report", is_ours=is_report_dir,
                        inputs=inputs)
    with atomic.build_dir(out) as tmp:
        (tmp / "attention.png").write_bytes(figure_png(weights_figure(window, report)))
        (tmp / "distance.png").write_bytes(figure_png(distance_figure(report)))
        atomic.write_json(tmp / "report.json", report.to_json())
        atomic.write_text(tmp / "report.md", marked_text(window, report))


# ---------------------------------------------------------------------------------- memory of a window
def forward_bytes(cfg, T: int, K: int, B: int = 1) -> int:
    """About the memory a forward of T positions over B streams with K keys (memory + segment) takes
    without gradients, in float32: the attention's (B, T, K) scores, softmax and weights (three copies, the
    written-out CPU attention's), the memory kept per attention block, and each block's activations (LSTM,
    layer norms, Boom: a few (T, B, C) and (T, B, d_ff) tensors) and the logits. An estimate for refusing
    sizes that cannot fit, not a measurement."""
    n_attn = len(cfg.attn_layers)
    scores = 3 * B * T * K * 4 if n_attn else 0
    kept = n_attn * K * B * cfg.d_model * 4
    activations = B * T * (12 * cfg.d_model + 3 * cfg.d_ff + 2 * cfg.vocab_size + 8) * 4
    return scores + kept + activations


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory free for new tensors on `device`: a CUDA device's free memory; for the CPU the smaller of the
    system's MemAvailable and what the cgroup's memory.max still allows. None where it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    found = []
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    return max(0, min(found)) if found else None


def check_fits(need: int, device: torch.device | str, what: str, fix: str) -> None:
    """ValueError "`what` needs about N of memory, more than the M available on DEVICE; `fix`" when `need`
    bytes exceed the device's available memory (nothing when that cannot be told)."""
    free = available_bytes(device)
    if free is not None and need > free:
        raise ValueError(f"{what} needs about {atomic.size_text(need)} of memory, more than the "
                         f"{atomic.size_text(free)} available on {torch.device(device)}; {fix}")
