"""Sampling bytes from a SHA-RNN with its state carried, so each new byte costs one step.

`sharnn-generate MODEL --prompt TEXT` (`main` below) streams the sampled bytes to stdout as they are produced;
`--num_samples N` samples N streams side by side (one batch) and writes each in turn.

The prompt is read by the model's forward; each further byte is one `SHARNN.step`, which keeps the attention
memory in a preallocated `MemoryWindow` (sharnn/state.py) instead of concatenating and cutting it every byte,
with the same arithmetic: the bytes are those of calling forward once per byte (tests/unit/test_generate.py
keeps that straightforward path as the reference).
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from sharnn import cli, kernels
from sharnn.io import signals
from sharnn.state import CarryState, DecodeState


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering of (..., V) logits. temperature 0: greedy."""
    if temperature == 0:
        out = torch.full_like(logits, float("-inf"))
        return out.scatter(-1, logits.argmax(-1, keepdim=True), 0.0)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the mass before it already reaches top_p (the first token always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def stream_bytes(model, prompt: bytes, n_bytes: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, generator: torch.Generator | None = None,
                 state: CarryState | None = None, prompt_chunk: int | None = None) -> Iterator[int]:
    """Yield n_bytes sampled bytes, one at a time, after reading `prompt` (at least one byte).

    The prompt is read in one forward call, or in pieces of at most `prompt_chunk` bytes with the state
    carried (bounds the attention's T x T cost for long prompts, as the segments of training do). Each
    further byte is one `model.step`. `stream_batch` with one prompt.
    """
    for step in stream_batch(model, [prompt], n_bytes, temperature, top_k, top_p, [generator], state,
                             prompt_chunk):
        yield step[0]


@torch.no_grad()
def stream_batch(model, prompts: Sequence[bytes], n_bytes: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, generators: Sequence[torch.Generator | None] | None = None,
                 state: CarryState | None = None, prompt_chunk: int | None = None) -> Iterator[list[int]]:
    """Sample B = len(prompts) streams side by side: yield n_bytes times the next byte of every stream.

    Stream b reads prompts[b] (after `state`, one stream's carried state, when given) and draws from
    generators[b] (default: torch's global generator): its bytes are those that `stream_bytes` samples
    from that prompt and generator alone, up to the rounding of batched matrix products (different
    kernels may add in a different order). Each prompt is read by itself (identical prompts once); then
    one `model.step` per byte advances all streams.
    """
    if not prompts or any(not p for p in prompts):
        raise ValueError("every prompt must hold at least one byte")
    generators = list(generators) if generators is not None else [None] * len(prompts)
    if len(generators) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(generators)} generators")
    device = next(model.parameters()).device
    read = {p: read_prompt(model, p, state, prompt_chunk, device) for p in dict.fromkeys(prompts)}
    logits = torch.stack([read[p][0] for p in prompts])  # (B, V)
    window = decode_window(model.cfg.mem_len, state, max(map(len, prompts)), n_bytes)
    decode = DecodeState.from_carry([read[p][1] for p in prompts], window, model.cfg.attn_layers)
    for i in range(n_bytes):
        probs = filter_logits(logits.float(), temperature, top_k, top_p).softmax(-1)  # (B, V)
        # one draw per stream from its own generator: what each stream alone would draw
        nxt = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])  # (B,)
        yield nxt.tolist()
        if i + 1 < n_bytes:
            logits = model.step(nxt, decode)


def decode_window(mem_len: int, state: CarryState | None, prompt_len: int, n_bytes: int) -> int:
    """Positions the generation's memory window must hold: mem_len, or fewer when the carried state, the
    longest prompt and the bytes generated are fewer (its keys are then the same: nothing is ever cut), so
    a memory longer than anything generation reaches (--mem_len 10**12) is not allocated."""
    held = max((m.shape[0] for m in state.memory if m is not None), default=0) if state is not None else 0
    return max(1, min(mem_len, held + prompt_len + n_bytes))


def read_prompt(model, prompt: bytes, state: CarryState | None, prompt_chunk: int | None,
                device: torch.device) -> tuple[Tensor, CarryState]:
    """forward over the prompt, in pieces of `prompt_chunk` bytes: (the last logits (V,), the state). Only
    the piece being read is held as int64 (a long prompt as bytes)."""
    data = torch.frombuffer(bytearray(prompt), dtype=torch.uint8)
    chunk = prompt_chunk or len(data)
    for start in range(0, len(data), chunk):
        x = data[start:start + chunk].to(device=device, dtype=torch.long).view(-1, 1)  # (T, 1)
        logits, _, state = model(x, state)
    return logits[-1, 0], state


def generation_bytes(cfg, prompt_len: int, chunk: int, n_streams: int, n_bytes: int) -> dict[str, int]:
    """About the memory each size option makes generation take: reading the prompt in pieces of `chunk`
    (the attention over chunk x (memory + chunk) keys), then n_streams streams stepping with a memory window
    (sharnn.state.MemoryWindow: 2 x window positions per attention block) and, with several streams, the
    samples kept until all are done."""
    from sharnn.attention_report import forward_bytes

    T = min(chunk, prompt_len)
    window = decode_window(cfg.mem_len, None, prompt_len, n_bytes)
    steps = (2 * len(cfg.attn_layers) * window * n_streams * cfg.d_model * 4
             + forward_bytes(cfg, 1, window + 1, n_streams))
    return {"prompt": prompt_len + forward_bytes(cfg, T, min(cfg.mem_len, prompt_len - T) + T),
            "steps": steps, "streams": n_streams * STREAM_HOST_BYTES,
            "samples": n_streams * n_bytes if n_streams > 1 else 0}


STREAM_HOST_BYTES = 4096
"""Host memory per sampled stream besides the model's: its torch.Generator (2.7 kB measured for a CPU one,
torch 2.13) and its entries in the per-stream lists."""


def generate(model, prompt: bytes, n_bytes: int, **kwargs) -> bytes:
    """All of `stream_bytes` at once. Evaluates in eval mode and restores the model's mode."""
    was_training = model.training
    model.eval()
    try:
        return bytes(stream_bytes(model, prompt, n_bytes, **kwargs))
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------ command line
PROMPT_LIMIT = 1 << 30
"""The longest --prompt_file read (1 GiB): the model reads every byte of a prompt, and a file without an end
(a device, a pipe left open) must not be read for ever."""
SEED_LIMIT = 2**64
"""torch.Generator.manual_seed takes seeds in [0, 2**64) (and negative ones, which --seed refuses)."""


def parse_temperature(text: str) -> float:
    """argparse type: a finite number >= 0 (nan or inf would turn every probability into nan)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def parse_seed(text: str) -> int:
    """argparse type: a whole number in [0, 2**64), the range torch's generators accept."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64), got {text}")
    return value


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="sharnn-generate",
        description="Sample bytes from a trained SHA-RNN and stream them to stdout as they are produced. The "
                    "LSTM state and attention memory are carried, so each byte costs one step.")
    parser.add_argument("model",
                        help="exported model directory, checkpoint, or run directory (its best checkpoint)")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text (encoded as UTF-8; default: a newline)")
    prompt.add_argument(*cli.spellings("--prompt_file"), type=Path,
                        help="read the prompt's raw bytes from this file")
    parser.add_argument("--length", type=cli.non_negative(int), default=256,
                        help="bytes to generate (default 256)")
    parser.add_argument("--temperature", type=parse_temperature, default=1.0,
                        help="softmax temperature; 0 = greedy, always the most likely byte (default 1.0)")
    parser.add_argument(*cli.spellings("--top_k"), type=cli.non_negative(int), default=0,
                        help="sample among the k most likely bytes only (0 = all; default 0)")
    parser.add_argument(*cli.spellings("--top_p"), type=cli.probability, default=1.0,
                        help="nucleus sampling: the smallest set of bytes holding this much probability "
                             "(default 1.0 = all)")
    parser.add_argument(*cli.spellings("--num_samples"), type=cli.positive_int, default=1,
                        help="samples of the prompt to draw side by side, one stream each (default 1). With "
                             "N > 1 they are written when all are done, each after a line "
                             "'==> sample K (seed S) <==' (K = 0 .. N-1) and followed by a newline. Sample K "
                             "draws from seed + K, as a run of its own with --seed seed+K would")
    parser.add_argument("--seed", type=parse_seed,
                        help="random seed in [0, 2**64) (default: a fresh one, printed to stderr)")
    parser.add_argument(*cli.spellings("--mem_len"), type=cli.positive_int,
                        help="attention memory length (default: the model's own)")
    parser.add_argument(*cli.spellings("--prompt_chunk"), type=cli.positive_int,
                        help="read the prompt in pieces of this many bytes with the state carried "
                             "(default: min(1024, mem_len / 2))")
    parser.add_argument("--echo", action="store_true", help="write the prompt before the generated bytes")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    return parser


@signals.command
def main(argv: list[str] | None = None) -> int:
    """Entry point of `sharnn-generate` and `python -m sharnn.generate`; returns the exit code."""
    from sharnn.io.pretrained import ModelError, load_model

    args = build_parser().parse_args(argv)
    if problem := kernels.settings_problem():  # $SHARNN_CPU_KERNELS / $SHARNN_ATTENTION
        raise SystemExit(f"error: {problem}")
    if args.prompt_file is not None:
        try:
            prompt = read_prompt_file(args.prompt_file)
        except OSError as e:
            raise SystemExit(f"error: --prompt_file: {e}") from None
    else:
        # os.fsencode keeps bytes that the shell passed but that are not valid UTF-8 (surrogateescape)
        prompt = os.fsencode("\n" if args.prompt is None else args.prompt)
    if not prompt:
        raise SystemExit("error: the prompt is empty; the model needs at least one byte to start from")
    try:
        device = torch.device(args.device)
        model = load_model(args.model, device=device, mem_len=args.mem_len)
    except ModelError as e:
        raise SystemExit(f"error: {e}") from None
    except (RuntimeError, AssertionError) as e:  # unknown or unavailable --device (no CUDA: AssertionError)
        raise SystemExit(f"error: --device {args.device}: {str(e).splitlines()[0]}") from None
    if model.cfg.vocab_size != 256:
        raise SystemExit(f"error: the model's vocabulary has {model.cfg.vocab_size} symbols; sharnn-generate "
                         "reads and writes bytes (vocabulary 256)")
    seed = args.seed
    if seed is None:
        seed = secrets.randbits(63)
        print(f"seed {seed}", file=sys.stderr)
    n = args.num_samples
    if seed + n - 1 >= SEED_LIMIT:
        raise SystemExit(f"error: --seed {seed} with --num_samples {n}: sample K draws from seed + K, "
                         f"which must stay below 2**64")
    chunk = args.prompt_chunk or max(1, min(1024, model.cfg.mem_len // 2))
    check_sizes(model.cfg, device, len(prompt), chunk, n, args.length)  # before a generator per stream
    generators = [torch.Generator(device=device).manual_seed(seed + k) for k in range(n)]

    out = sys.stdout.buffer  # raw bytes: the model's output need not be valid UTF-8
    steps = stream_batch(model, [prompt] * n, args.length, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, generators=generators, prompt_chunk=chunk)
    try:
        if n == 1:  # streamed, byte by byte
            if args.echo:
                out.write(prompt)
                out.flush()
            for step in steps:
                out.write(bytes(step))
                out.flush()
        else:
            samples = [bytearray() for _ in range(n)]  # a byte per byte sampled, until all are done
            for step in steps:
                for sample, byte in zip(samples, step):
                    sample.append(byte)
            for k, sample in enumerate(samples):
                out.write(f"==> sample {k} (seed {seed + k}) <==\n".encode())
                out.write((prompt if args.echo else b"") + bytes(sample) + b"\n")
            out.flush()
    except BrokenPipeError:  # e.g. `| head -c 100`: the reader has gone, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except KeyboardInterrupt:
        return 130
    return 0


def read_prompt_file(path: Path, limit: int = PROMPT_LIMIT) -> bytes:
    """The bytes of --prompt_file, read in pieces up to `limit` (SystemExit beyond it: a file that long, or
    one without an end such as /dev/zero, is not a prompt)."""
    prompt = signals.read_head(path, limit + 1)
    if len(prompt) > limit:
        raise SystemExit(f"error: --prompt_file {path} holds more than {limit:,} bytes (or has no end, as a "
                         "device or an open pipe); give a shorter prompt")
    return prompt


def check_sizes(cfg, device: torch.device, prompt_len: int, chunk: int, n_streams: int, n_bytes: int) -> None:
    """--prompt_chunk, --mem_len, --num_samples and --length bounded by the memory they make generation
    take (`generation_bytes`): one error line naming the option, before anything is allocated."""
    from sharnn.attention_report import check_fits

    need = generation_bytes(cfg, prompt_len, chunk, n_streams, n_bytes)
    T = min(chunk, prompt_len)
    checks = [(need["prompt"], f"--prompt_chunk {chunk}: reading the prompt in pieces of {T:,} bytes",
               "give a smaller --prompt_chunk (the default is min(1024, mem_len / 2))"),
              (need["steps"], f"--num_samples {n_streams}: stepping {n_streams} stream(s) with a memory of "
                              f"{decode_window(cfg.mem_len, None, prompt_len, n_bytes):,} positions",
               "lower --num_samples or --mem_len"),
              (need["samples"] + need["steps"], f"--length {n_bytes:,} x --num_samples {n_streams}: keeping "
                                                "the samples until all are done",
               "lower --length or --num_samples (one sample is streamed as it is drawn)")]
    host = [(need["streams"] + need["samples"], f"--num_samples {n_streams}: a random generator per stream",
             "lower --num_samples")]
    try:
        for n, what, fix in checks:
            check_fits(n, device, what, fix)
        for n, what, fix in host:
            check_fits(n, "cpu", what, fix)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
