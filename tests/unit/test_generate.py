"""sharnn-generate (sharnn/generate.py): greedy decoding against a step-by-step argmax, seeded sampling,
one model step per byte, bytes that are not UTF-8, bad options. The incremental path (`SHARNN.step` with a
`MemoryWindow`) against forward once per byte: the same logits bit for bit, the same bytes; several
streams side by side against each stream alone; --num_samples."""

from __future__ import annotations

import pytest
import torch

from sharnn import SHARNN
from sharnn.generate import filter_logits, stream_batch, stream_bytes
from sharnn.io.pretrained import load_model
from sharnn.state import DecodeState, MemoryWindow
from tests.helpers import exits_with, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def sample_by_hand(model, prompt: bytes, n: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   generator: torch.Generator | None = None, prompt_chunk: int | None = None) -> bytes:
    """The straightforward path, as sharnn.generate sampled before `SHARNN.step`: forward once per byte
    (the memory concatenated and cut every byte), the same filtering and one multinomial draw per byte."""
    out, state = [], None
    x = torch.tensor(list(prompt)).view(-1, 1)
    chunk = prompt_chunk or x.shape[0]
    with torch.no_grad():
        for _ in range(n):
            for start in range(0, x.shape[0], chunk):
                logits, _, state = model(x[start:start + chunk], state)
            probs = filter_logits(logits[-1, 0].float(), temperature, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
            out.append(int(nxt))
            x = nxt.view(1, 1)
    return bytes(out)


def wrapping_model(attn: str = "penultimate") -> SHARNN:
    """Random weights, a 16-position memory: a few hundred bytes wrap the MemoryWindow many times."""
    torch.manual_seed(0)
    return SHARNN(tiny_config(d_model=32, d_ff=64, n_layer=3, mem_len=16, attn=attn)).eval()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("attn", ["penultimate", "all", "none"])
def test_step_equals_forward_bit_for_bit(attn, nan_windows):
    model = wrapping_model(attn)
    x = torch.randint(0, 256, (60, 1), generator=seeded(1))
    with torch.no_grad():
        _, _, carry = model(x[:5], None)
        decode = DecodeState.from_carry([carry], model.cfg.mem_len, model.cfg.attn_layers)
        for t in range(5, 60):  # 55 steps: the window wraps three times
            want, _, carry = model(x[t:t + 1], carry)
            got = model.step(x[t], decode)
            assert torch.equal(got, want[0]), t
            for mine, theirs in zip(decode.to_carry().memory, carry.memory):
                assert (mine is None and theirs is None) or torch.equal(mine, theirs)
            for mine, theirs in zip(decode.hidden, carry.hidden):
                assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])
    if attn != "none":
        assert carry.memory_len == 16


@pytest.mark.parametrize("options", [{"temperature": 0}, {"temperature": 1.0},
                                     {"temperature": 0.8, "top_k": 20, "top_p": 0.9}])
def test_stream_bytes_reproduces_forward_per_byte(options):
    model = wrapping_model()
    prompt = b"the prompt, read in pieces"
    want = sample_by_hand(model, prompt, 300, generator=seeded(5), prompt_chunk=7, **options)
    got = bytes(stream_bytes(model, prompt, 300, generator=seeded(5), prompt_chunk=7, **options))
    assert got == want
    if options["temperature"]:  # guard: the seed and the options matter
        assert got != sample_by_hand(model, prompt, 300, generator=seeded(6), prompt_chunk=7, **options)


@pytest.fixture
def nan_windows(monkeypatch):
    """MemoryWindow buffers start as NaN: a slot read before it was written would show in the output."""
    allocate = MemoryWindow._allocate

    def nan_filled(self, B, like):
        allocate(self, B, like)
        self.buf.fill_(float("nan"))

    monkeypatch.setattr(MemoryWindow, "_allocate", nan_filled)


@pytest.mark.parametrize("options", [{"temperature": 0}, {"temperature": 0.9, "top_k": 30, "top_p": 0.95}])
def test_streams_side_by_side_equal_each_stream_alone(options, nan_windows):
    """Prompts of different lengths (their memories fill at different steps), one repeated; stream k
    draws from its own generator."""
    model = wrapping_model("all")
    prompts = [b"abc", b"a longer prompt than the memory", b"abc", b"x"]
    steps = list(stream_batch(model, prompts, 200, generators=[seeded(9 + k) for k in range(4)], **options))
    assert len(steps) == 200 and all(len(step) == 4 for step in steps)
    got = [bytes(stream) for stream in zip(*steps)]
    assert got == [sample_by_hand(model, p, 200, generator=seeded(9 + k), **options)
                   for k, p in enumerate(prompts)]
    assert len(set(got)) == (3 if options["temperature"] == 0 else 4)


def test_generate_is_deterministic_given_a_seed(random_model, capsysbinary):
    from sharnn.generate import main

    def sample(seed: int) -> bytes:
        assert main([str(random_model), "--prompt", "import os", "--length", "60", "--seed", str(seed),
                     "--temperature", "1.0", "--top-k", "50", "--top-p", "0.95"]) == 0
        return capsysbinary.readouterr().out

    first = sample(3)
    assert len(first) == 60
    assert sample(3) == first
    assert sample(4) != first


def test_generation_costs_one_step_per_byte(random_model):
    model = load_model(random_model)
    lengths, steps = [], []

    def counting(x, state=None, targets=None):
        lengths.append(x.shape[0])
        return SHARNN.forward(model, x, state, targets)

    def stepping(x, state):
        steps.append(x.shape)
        return SHARNN.step(model, x, state)

    model.forward, model.step = counting, stepping
    prompt = b"class Foo:\n"
    out = bytes(stream_bytes(model, prompt, 12, temperature=0))
    assert lengths == [len(prompt)] and steps == [(1,)] * 11
    lengths.clear(), steps.clear()
    # a prompt read in pieces: the same bytes (mem_len 512 holds the whole prompt)
    assert bytes(stream_bytes(model, prompt, 12, temperature=0, prompt_chunk=4)) == out
    assert lengths == [4, 4, 3] and steps == [(1,)] * 11
    lengths.clear(), steps.clear()
    # three streams of one prompt: the prompt read once, one step per byte for all of them
    assert list(stream_batch(model, [prompt] * 3, 12, temperature=0)) == [[b] * 3 for b in out]
    assert lengths == [len(prompt)] and steps == [(3,)] * 11


def test_generate_num_samples(random_model, capsysbinary):
    """Sample K of --num_samples N --seed S is the run of its own with --seed S+K, under a header line."""
    from sharnn.generate import main

    def run(*args: str) -> bytes:
        assert main([str(random_model), "--prompt", "import os", "--length", "40", "--top-k", "50",
                     *args]) == 0
        return capsysbinary.readouterr().out

    alone = [run("--seed", str(7 + k)) for k in range(3)]
    assert len(set(alone)) == 3
    want = b"".join(f"==> sample {k} (seed {7 + k}) <==\n".encode() + b"import os" + alone[k] + b"\n"
                    for k in range(3))
    assert run("--seed", "7", "--num-samples", "3", "--echo") == want
    greedy = run("--temperature", "0", "--seed", "0")
    assert run("--temperature", "0", "--seed", "0", "--num_samples", "2") == (
        b"==> sample 0 (seed 0) <==\n" + greedy + b"\n==> sample 1 (seed 1) <==\n" + greedy + b"\n")


def test_generate_bad_options(random_model, tmp_path):
    from sharnn.generate import main

    exits_with(main, [str(tmp_path / "nope")], "does not exist")
    exits_with(main, [str(random_model), "--prompt", ""], "prompt is empty")
    exits_with(main, [str(random_model), "--seed", str(2**64 - 2), "--num_samples", "3"],
               "--num_samples 3", "below 2**64")
    for bad in (["--top-p", "0"], ["--num_samples", "0"], ["--num_samples", "two"]):
        with pytest.raises(SystemExit) as info:
            main([str(random_model), *bad])  # argparse: usage error, exit status 2
        assert info.value.code == 2
