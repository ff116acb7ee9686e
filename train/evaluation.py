"""Evaluation: bits per byte over held-out streams with carried state (the trainer and `sharnn-eval`), and
what is logged with it: a text sample and the attention report."""

from __future__ import annotations

import math

import torch

from sharnn import attention_report
from sharnn.corpus.data import ByteSplit, EvalStreams
from sharnn.generate import generate

SAMPLE_PROMPT_BYTES = 64
"""The logged sample continues the validation split's first SAMPLE_PROMPT_BYTES bytes."""


@torch.no_grad()
def evaluate(accelerator, model, split: ByteSplit, n_streams: int, bptt: int,
             max_segments: int | None = None) -> float:
    """Bits per byte over `n_streams` streams of `split`, split among the ranks, state carried.

    Every rank calls this (it all-reduces). The number does not depend on the world size: the streams are
    the same for any world size, each rank scores its share, and the sums are added. bpc = sum of per-byte
    losses / bytes predicted / ln 2 (the reference divides by the stream length, one more than the bytes
    predicted: a relative difference of 1/L).
    """
    was_training = model.training
    model.eval()
    streams = EvalStreams(split, n_streams, bptt, accelerator.process_index, accelerator.num_processes)
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (sum of losses, bytes)
    state = None
    with accelerator.autocast():
        for i, (x, y) in enumerate(streams):
            if max_segments is not None and i >= max_segments:
                break
            x, y = x.to(accelerator.device).t(), y.to(accelerator.device).t()  # (T, b): time-major
            _, loss, state = model(x, state, targets=y)
            totals += torch.stack([loss.double() * y.numel(),
                                   torch.tensor(float(y.numel()), dtype=torch.float64, device=totals.device)])
    model.train(was_training)
    totals = accelerator.reduce(totals, reduction="sum")
    return (totals[0] / totals[1]).item() / math.log(2)


def sample_text(model, split: ByteSplit, n_bytes: int, seed: int, device: torch.device) -> str:
    """What the model writes after the first SAMPLE_PROMPT_BYTES bytes of `split` (temperature 0.8), for the
    run's logs."""
    g = torch.Generator(device=device).manual_seed(seed)
    prompt = bytes(split.read(0, SAMPLE_PROMPT_BYTES))
    text = generate(model, prompt, n_bytes, temperature=0.8, generator=g)
    return (prompt + b" >>> " + text).decode("utf-8", errors="replace")


def log_attention_report(logger, model, split: ByteSplit, bptt: int, step: int) -> None:
    """What the attention head reads in the validation split's fixed window (sharnn.attention_report: the
    first
    `bptt`-long segment of stream 0 whose memory is full, after the preceding ones): per attention block the
    weights as an image (`attention/weights/block{i}`, log colour scale), the mass by distance as a histogram
    (`attention/distance/block{i}`), the mean entropy in bits as scalars (`attention/entropy`, and per block
    when there are several), and the window's text with the most-attended earlier bytes marked
    (`attention/reads`). Main process only (no collectives); the model is read in eval mode, batch 1. A model
    without attention (attn_layers empty) logs nothing."""
    if all(block.attn is None for block in model.blocks):
        return
    window = attention_report.read_window(model, split.read(0, min(len(split), model.cfg.mem_len + bptt)),
                                          bptt)
    report = attention_report.summarize(window)
    entropies = {"attention/entropy": report.entropy_bits}
    if len(report.layers) > 1:
        entropies.update({f"attention/entropy/block{i}": layer["entropy_bits"]
                          for i, layer in report.layers.items()})
    logger.scalars(entropies, step)
    for i, weights in window.weights.items():
        logger.image(f"attention/weights/block{i}", attention_report.weights_rgb(weights), step)
        upper_edges, mass, stats = attention_report.distance_histogram(window, i)
        logger.binned_histogram(f"attention/distance/block{i}", upper_edges, mass, stats, step)
    logger.text("attention/reads", attention_report.marked_text(window, report), step)
