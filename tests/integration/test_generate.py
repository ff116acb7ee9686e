"""sharnn-generate (sharnn/generate.py): greedy decoding against a step-by-step argmax, seeded sampling,
one model step per byte, bytes that are not UTF-8, bad options. The incremental path (`SHARNN.step` with a
`MemoryWindow`) against forward once per byte: the same logits bit for bit, the same bytes; several
streams side by side against each stream alone; --num_samples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sharnn import SHARNN
from sharnn.io.pretrained import load_model, save_model
from tests.helpers import REPO, cli, sharnn_only, subprocess_env, tiny_config
from tests.unit.test_fidelity import FIXTURE

pytestmark = pytest.mark.usefixtures("one_thread")


def greedy_by_hand(model, prompt: bytes, n: int, carry: bool = True) -> bytes:
    """Feed the prompt, take the argmax, then feed one byte at a time with the state carried."""
    out, state = [], None
    x = torch.tensor(list(prompt)).view(-1, 1)
    with torch.no_grad():
        for _ in range(n):
            logits, _, state = model(x, state if carry else None)
            out.append(int(logits[-1, 0].argmax()))
            x = torch.tensor([[out[-1]]])
    return bytes(out)


@pytest.fixture(scope="module")
def reference_model(tmp_path_factory) -> Path:
    """The reference fixture's weights imported: random weights, so every byte of context moves the output."""
    from sharnn.convert import main

    out = tmp_path_factory.mktemp("use") / "reference"
    assert main([str(FIXTURE), "--prefix", "penultimate.weights.", "--mem-len", "40", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_generate_greedy_equals_step_by_step_argmax(trained, exported, reference_model, capsysbinary):
    from sharnn.generate import main

    prompt = b"def main(args):\n    "
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "sharnn.generate", str(reference_model),
                           "--prompt", prompt.decode(), "--temperature", "0", "--length", "60"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    model = load_model(reference_model)
    want = greedy_by_hand(model, prompt, 60)
    assert proc.stdout == want
    assert want != greedy_by_hand(model, prompt, 60, carry=False)  # guard: this model needs the carried state
    sharnn_only(proc.stderr.decode())
    # the trained run (its best checkpoint), in-process
    assert main([str(trained), "--prompt", prompt.decode(), "--temperature", "0", "--length", "40"]) == 0
    assert capsysbinary.readouterr().out == greedy_by_hand(load_model(exported), prompt, 40)


@pytest.mark.slow
def test_generate_writes_bytes_that_are_not_utf8(tmp_path):
    torch.manual_seed(0)
    model = SHARNN(tiny_config(mem_len=16))
    allowed = [0xFF, 0xFE, 0xC3, 0x28]  # never valid UTF-8 in this mix
    with torch.no_grad():
        model.out_bias.fill_(-100.0)
        model.out_bias[allowed] = 0.0
    save_model(model, tmp_path / "bytes_model")
    (tmp_path / "prompt.bin").write_bytes(b"\xff\xfe")
    env = subprocess_env() | {"PYTHONIOENCODING": "ascii:strict"}  # any text-mode write of these bytes fails
    proc = subprocess.run(cli("sharnn.generate", str(tmp_path / "bytes_model"), "--prompt-file",
                              str(tmp_path / "prompt.bin"), "--echo", "--length", "50", "--seed", "0"),
                          cwd=REPO, env=env, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout[:2] == b"\xff\xfe" and len(proc.stdout) == 52
    assert set(proc.stdout[2:]) <= set(allowed) and len(set(proc.stdout[2:])) > 1
