"""Using trained models: sharnn-eval, sharnn-generate, sharnn-export, sharnn-import and sharnn.pretrained, on
a tiny model trained in this module (and a DeepSpeed ZeRO-2 one), the reference fixture, and bad inputs."""

from __future__ import annotations

import configparser
import importlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from sharnn import SHARNN, ModelConfig
from sharnn.data import EvalStreams, open_split
from sharnn.generate import stream_bytes
from sharnn.pretrained import ModelError, load_model, save_model
from tests.conftest import REPO, run, subprocess_env, train_cmd
from tests.test_fidelity import FIXTURE, fixture, run_segments

# The tiny preset, with the sizes these tests rely on spelled out (d_model 128, memory 512, bptt 64).
TRAIN = ["--preset", "tiny", "--max_steps", "10", "--warmup_steps", "3", "--eval_every", "10", "--save_every",
         "10", "--eval_max_segments", "5", "--sample_bytes", "0", "--log_every", "5", "--bptt", "64",
         "--test_streams", "4", "--model.d_model", "128", "--model.d_ff", "512", "--model.n_layer", "2",
         "--model.mem_len", "512"]
DDP = ["--config_file", str(REPO / "launch" / "cpu_ddp.yaml")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """In-process model runs use one thread: tiny matrices gain nothing, and other tests run beside."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli(module: str, *args: str, launch: list[str] | None = None) -> list[str]:
    """`python -m MODULE ARGS`, or `accelerate launch LAUNCH -m MODULE ARGS`."""
    if launch is None:
        return [sys.executable, "-m", module, *args]
    return [sys.executable, "-m", "accelerate.commands.launch", *launch, "-m", module, *args]


def exits_with(main, argv: list[str], *fragments: str) -> str:
    """Call an entry point in-process; it must stop with an 'error: ...' message holding every fragment."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = str(info.value.code)
    assert message.startswith("error: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


@pytest.fixture(scope="module")
def trained(text_corpus, tmp_path_factory) -> Path:
    """A tiny run of 10 steps: checkpoints/step-00000010 (the best), summary.json with its test bpc."""
    out = tmp_path_factory.mktemp("use") / "run"
    run(train_cmd(*TRAIN, "--data", str(text_corpus), "--out", str(out)))  # one thread, as others run beside
    return out


@pytest.fixture(scope="module")
def ckpt(trained) -> Path:
    return trained / "checkpoints" / "step-00000010"


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    from train.export import main

    out = tmp_path_factory.mktemp("use") / "exported"
    assert main([str(trained), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    """An untrained tiny model saved with save_model: for tests that need no training."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("use") / "random"
    save_model(SHARNN(ModelConfig(d_model=128, d_ff=512, n_layer=2, mem_len=512)), out)
    return out


@pytest.fixture(scope="module")
def zero2(text_corpus, tmp_path_factory) -> Path:
    """A DeepSpeed ZeRO-2 checkpoint (2 ranks, AdamW, 4 steps)."""
    tmp = tmp_path_factory.mktemp("zero2")
    cfg = json.loads((REPO / "ds_config.json").read_text())
    cfg["zero_optimization"]["stage"] = 2
    (tmp / "ds.json").write_text(json.dumps(cfg))
    launch = ["--config_file", str(REPO / "launch" / "cpu_deepspeed.yaml"), "--deepspeed_config_file",
              str(tmp / "ds.json")]
    args = ["--preset", "tiny", "--max_steps", "4", "--warmup_steps", "2", "--eval_every", "4",
            "--save_every", "4", "--eval_max_segments", "2", "--sample_bytes", "0", "--optimizer", "adamw",
            "--batch_size", "4", "--no_test_at_end", "--data", str(text_corpus), "--out", str(tmp / "run")]
    run(train_cmd(*args, launch=launch))
    return tmp / "run" / "checkpoints" / "step-00000004"


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -------------------------------------------------------------------------------------------------- eval
@pytest.mark.slow
def test_eval_one_process_matches_the_runs_test_bpc(trained, text_corpus, tmp_path):
    summary = json.loads((trained / "summary.json").read_text())
    out = tmp_path / "eval.json"
    proc = run(cli("train.evaluate", str(trained), "--data", str(text_corpus), "--split", "test", "--streams",
                   "4", "--json", str(out)))
    result = json.loads(out.read_text())
    # --seg-len defaults to the run's evaluation length (bptt 64 for tiny), as the run's own test evaluation
    assert (result["seg_len"], result["n_streams"], result["world_size"]) == (64, 4, 1)
    assert result["model_kind"] == "checkpoint" and result["step"] == 10
    assert result["predicted_bytes"] == 4 * (50_000 // 4 - 1)
    assert math.isclose(result["bpc"], summary["test_bpc"], rel_tol=1e-6), (result, summary)
    assert f"{result['bpc']:.5f}" in proc.stdout and "512" in proc.stdout


@pytest.mark.slow
def test_eval_two_processes_give_the_same_bpc(exported, trained, text_corpus, tmp_path):
    summary = json.loads((trained / "summary.json").read_text())
    out = tmp_path / "eval2.json"
    run(cli("train.evaluate", str(exported), "--data", str(text_corpus), "--streams", "4", "--seg-len", "64",
            "--json", str(out), launch=DDP))
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["model_kind"] == "exported"
    assert math.isclose(result["bpc"], summary["test_bpc"], rel_tol=1e-6), (result, summary)


def reference_bpc(model, split, n_streams: int, seg_len: int, max_segments: int) -> float:
    """Bits per byte computed here, independently of train.step.evaluate."""
    total, count, state = 0.0, 0, None
    with torch.no_grad():
        for i, (x, y) in enumerate(EvalStreams(split, n_streams, seg_len, 0, 1)):
            if i >= max_segments:
                break
            logits, _, state = model(x.t(), state)
            loss = nn.functional.cross_entropy(logits.reshape(-1, 256), y.t().reshape(-1), reduction="sum")
            total += loss.item()
            count += y.numel()
    return total / count / math.log(2)


@pytest.mark.slow
def test_eval_several_memory_lengths_print_a_table(exported, text_corpus, tmp_path, capsys):
    from train.evaluate import main

    out = tmp_path / "mem.json"
    assert main([str(exported), "--data", str(text_corpus), "--split", "valid", "--streams", "4", "--seg-len",
                 "32", "--max-segments", "6", "--mem-len", "8", "40", "512", "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [r["mem_len"] for r in result["results"]] == [8, 40, 512] and "bpc" not in result
    split = open_split(text_corpus, "valid")
    for r in result["results"]:
        want = reference_bpc(load_model(exported, mem_len=r["mem_len"]), split, 4, 32, 6)
        assert math.isclose(r["bpc"], want, rel_tol=1e-6), (r, want)
        assert f"{r['mem_len']:>9} {r['bpc']:>9.5f}" in stdout
    assert len({r["bpc"] for r in result["results"]}) == 3  # the memory length really changed


@pytest.mark.slow
def test_eval_bad_inputs_are_clear_errors(trained, ckpt, exported, tmp_path):
    from train.evaluate import main

    corpus_args = ["--data", str(trained)]
    exits_with(main, [str(tmp_path / "nope"), *corpus_args], "does not exist")
    partial = tmp_path / "run" / "checkpoints" / "step-00000010"
    shutil.copytree(ckpt, partial)
    (partial / "train_state.json").unlink()  # as if the run died while writing it
    exits_with(main, [str(partial), *corpus_args], "incomplete checkpoint", "train_state.json")
    exits_with(main, [str(tmp_path / "run"), *corpus_args], "no complete checkpoint")
    wrong = tmp_path / "wrong"
    shutil.copytree(exported, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps(config | {"d_model": 64}))
    exits_with(main, [str(wrong), *corpus_args], "does not match", "embed.weight", "(256, 128)")
    exits_with(main, [str(exported), "--data", str(trained)], "not a prepared sharnn corpus",
               "sharnn-prepare")
    other = tmp_path / "other_corpus"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"format": "token-corpus", "splits": {"test": {}}}))
    exits_with(main, [str(exported), "--data", str(other)], "not a sharnn corpus manifest")
    assert not list(tmp_path.glob("*.json"))


def sharnn_only(stderr: str) -> None:
    """`python -X importtime` lists every module imported: a sharnn command must not load these."""
    imported = {line.split("|")[-1].strip().split(".")[0] for line in stderr.splitlines()
                if line.startswith("import time:")}
    assert "sharnn" in imported and not imported & {"accelerate", "deepspeed", "train"}, imported


@pytest.mark.slow
def test_bad_input_exits_nonzero_without_traceback(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    for cmd, fragment in [
            (cli("sharnn.convert", str(tmp_path / "garbage.pt"), "--out", str(tmp_path / "m")),
             "cannot read"),
            (cli("sharnn.generate", str(tmp_path)), "is not a sharnn model")]:
        proc = run([sys.executable, "-X", "importtime", *cmd[1:]], check=False)
        assert proc.returncode == 1 and fragment in proc.stderr, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr
        sharnn_only(proc.stderr)
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------- generate
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
    lengths = []

    def counting(x, state=None, targets=None):
        lengths.append(x.shape[0])
        return SHARNN.forward(model, x, state, targets)

    model.forward = counting
    prompt = b"class Foo:\n"
    out = bytes(stream_bytes(model, prompt, 12, temperature=0))
    assert lengths == [len(prompt)] + [1] * 11
    lengths.clear()
    # a prompt read in pieces: the same bytes (mem_len 512 holds the whole prompt)
    assert bytes(stream_bytes(model, prompt, 12, temperature=0, prompt_chunk=4)) == out
    assert lengths == [4, 4, 3] + [1] * 11


@pytest.mark.slow
def test_generate_writes_bytes_that_are_not_utf8(tmp_path):
    torch.manual_seed(0)
    model = SHARNN(ModelConfig(d_model=16, d_ff=32, n_layer=2, mem_len=16))
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


def test_generate_bad_options(random_model, tmp_path):
    from sharnn.generate import main

    exits_with(main, [str(tmp_path / "nope")], "does not exist")
    exits_with(main, [str(random_model), "--prompt", ""], "prompt is empty")
    with pytest.raises(SystemExit) as info:
        main([str(random_model), "--top-p", "0"])  # argparse: usage error, exit status 2
    assert info.value.code == 2


# ------------------------------------------------------------------------------------- export and loading
@pytest.mark.slow
def test_export_then_load_gives_identical_logits(trained, ckpt, exported):
    config = yaml.safe_load((ckpt / "config.yaml").read_text())["model"]
    assert json.loads((exported / "config.json").read_text()) == config
    direct = SHARNN(ModelConfig.from_dict(config)).eval()
    direct.load_state_dict(load_file(ckpt / "model.safetensors"))
    x = torch.randint(0, 256, (48, 3))
    with torch.no_grad():
        want = [run_segments(direct, x, [20, 20])[i][0] for i in range(2)]
        for path in (exported, trained, ckpt):  # exported dir, run dir (best checkpoint), checkpoint
            got = [run_segments(load_model(path), x, [20, 20])[i][0] for i in range(2)]
            assert all(torch.equal(g, w) for g, w in zip(got, want)), path
    assert load_model(exported, mem_len=40).cfg.mem_len == 40
    with safe_open(exported / "model.safetensors", "pt") as f:
        assert f.metadata()["step"] == "10" and f.metadata()["format"] == "sharnn-model"


@pytest.mark.slow
def test_export_deepspeed_zero2_with_and_without_its_weights(zero2, tmp_path):
    from train.export import main

    assert (zero2 / "pytorch_model").is_dir()  # really a DeepSpeed checkpoint
    assert main([str(zero2), "--out", str(tmp_path / "a")]) == 0
    shards_only = tmp_path / "ckpt"
    shutil.copytree(zero2, shards_only)
    (shards_only / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="sharnn-export"):
        load_model(shards_only)
    assert main([str(shards_only), "--out", str(tmp_path / "b")]) == 0
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert state_dicts_equal(a, b) and state_dicts_equal(a, load_file(zero2 / "model.safetensors"))
    with safe_open(tmp_path / "b" / "model.safetensors", "pt") as f:
        assert "ZeRO" in f.metadata()["weights_from"]
    load_model(tmp_path / "b")
    # a missing rank's shard: a clear error, nothing written
    next((shards_only / "pytorch_model").glob("zero_pp_rank_1_*")).unlink()
    exits_with(main, [str(shards_only), "--out", str(tmp_path / "c")], "cannot consolidate", "ZeRO shards")
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_export_bad_inputs_write_nothing(trained, ckpt, exported, text_corpus, tmp_path):
    from train.export import main

    exits_with(main, [str(text_corpus), "--out", str(tmp_path / "x")], "prepared corpus")
    exits_with(main, [str(exported), "--out", str(exported)], "already exists", "--overwrite")
    bad = tmp_path / "bad_ckpt"
    shutil.copytree(ckpt, bad)
    cfg = yaml.safe_load((bad / "config.yaml").read_text())
    cfg["model"]["n_layer"] = 3
    (bad / "config.yaml").write_text(yaml.safe_dump(cfg))
    message = exits_with(main, [str(bad), "--out", str(tmp_path / "x")], "does not match",
                         "the weights lack: ")
    assert "blocks.2." in message and "'n_layer': 3" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad_ckpt"]  # no output, no temporary directory
    # --overwrite replaces an exported model, never a directory of other files
    exits_with(main, [str(trained), "--out", str(trained), "--overwrite"], "not part of an exported model")
    assert main([str(ckpt), "--out", str(tmp_path / "y"), "--mem-len", "64"]) == 0
    assert main([str(ckpt), "--out", str(tmp_path / "y"), "--overwrite"]) == 0
    assert load_model(tmp_path / "y").cfg.mem_len == 512


@pytest.mark.slow
def test_onnx_step_matches_pytorch(exported, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnxruntime

    from train.export import OneStep, export_onnx

    model = load_model(exported)
    assert "onnxruntime matches PyTorch" in export_onnx(model, tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    h = c = torch.zeros(2, 1, 128)
    memory, state = torch.zeros(1, 0, 1, 128), None
    with torch.no_grad():
        for byte in b"def f(x):\n    return x\n":  # a rollout with every state fed back
            x = torch.tensor([[byte]])
            want, _, state = model(x, state)
            logits, h, c, memory = (torch.from_numpy(t) for t in session.run(
                None, {"x": x.numpy(), "h": h.numpy(), "c": c.numpy(), "memory": memory.numpy()}))
            torch.testing.assert_close(logits, want, atol=1e-4, rtol=0)
    assert OneStep(model)(x, h, c, memory)[0].shape == (1, 1, 256)


# ---------------------------------------------------------------------------------------------- import
class RefOverparam(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.l1 = nn.Linear(d, 2 * d)


class RefAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qs, self.ks, self.vs = (nn.Parameter(torch.zeros(1, 1, d)) for _ in range(3))
        self.qkvs = nn.Parameter(torch.zeros(1, 3, d))
        self.r_gate = nn.Parameter(torch.ones(1, 1, d))
        self.q, self.qln, self.vq = nn.Linear(d, d), nn.LayerNorm(d), RefOverparam(d)


class RefBoom(nn.Module):
    def __init__(self, d, d_ff):
        super().__init__()
        self.linear1 = nn.Linear(d, d_ff)


class RefBlock(nn.Module):
    def __init__(self, d, d_ff, use_attn):
        super().__init__()
        self.attn = RefAttention(d) if use_attn else None
        for name in ("lnstart", "lnmid", "lnmem", "lnff", "lnxff", "lnout"):
            setattr(self, name, nn.LayerNorm(d))
        self.rnn, self.ff = nn.LSTM(d, d), RefBoom(d, d_ff)


class RefSHARNN(nn.Module):
    """A stand-in with the reference's attribute names (Smerity/sha-rnn model.py); its code is not needed."""

    def __init__(self, d=32, d_ff=128, n_layer=4):
        super().__init__()
        self.encoder = nn.Embedding(256, d)
        self.blocks = nn.ModuleList(RefBlock(d, d_ff, i == n_layer - 2) for i in range(n_layer))
        self.decoder = nn.Linear(d, 256)
        self.decoder.weight = self.encoder.weight


class RefCriterion(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("tail_vectors", torch.zeros(0, 32))


def _plant_marker(path):
    Path(path).write_text("the pickle ran code")


class Malicious:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_plant_marker, (str(self.marker),))


def assert_reproduces_fixture(model_dir: Path) -> None:
    info, _, expected, tokens = fixture("penultimate")
    model = load_model(model_dir)
    assert model.cfg.mem_len == info["max_positions"] == 40 and model.cfg.attn == "penultimate"
    with torch.no_grad():
        for i, (logits, _, _) in enumerate(run_segments(model, tokens.long(), info["segments"])):
            torch.testing.assert_close(logits, expected[f"seg{i}.logits"], atol=1e-4, rtol=0)


def test_import_reference_state_dict(tmp_path):
    from sharnn.convert import main

    assert main([str(FIXTURE), "--prefix", "penultimate.weights.", "--mem-len", "40", "--out",
                 str(tmp_path / "m")]) == 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    assert_reproduces_fixture(tmp_path / "m")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_import_pickled_model_and_criterion_safely(tmp_path, zip_format):
    from sharnn.convert import main

    _, weights, _, _ = fixture("penultimate")
    ref = RefSHARNN()
    ref.load_state_dict(weights)
    path = tmp_path / "ENWIK8.pt"
    torch.save([ref, RefCriterion()], path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)  # the file really holds pickled modules
    assert main([str(path), "--mem-len", "40", "--out", str(tmp_path / "m")]) == 0
    assert_reproduces_fixture(tmp_path / "m")


def test_import_never_runs_code_from_the_pickle(tmp_path):
    from sharnn.convert import main

    marker = tmp_path / "marker"
    _, weights, _, _ = fixture("penultimate")
    torch.save({"state_dict": weights, "extra": Malicious(marker)}, tmp_path / "ckpt.pt")
    assert main([str(tmp_path / "ckpt.pt"), "--mem-len", "40", "--out", str(tmp_path / "m")]) == 0
    assert not marker.exists()
    assert_reproduces_fixture(tmp_path / "m")
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), tmp_path / "script.pt")
    exits_with(main, [str(tmp_path / "script.pt"), "--out", str(tmp_path / "s")], "TorchScript")


def test_import_bad_inputs(tmp_path, random_model):
    from sharnn.convert import main

    exits_with(main, [str(tmp_path / "nope.pt"), "--out", str(tmp_path / "m")], "is not a file")
    (tmp_path / "notes.txt").write_text("hello")
    exits_with(main, [str(tmp_path / "notes.txt"), "--out", str(tmp_path / "m")], "cannot read")
    exits_with(main, [str(random_model / "model.safetensors"), "--out", str(tmp_path / "m")],
               "sharnn's naming")
    exits_with(main, [str(FIXTURE), "--out", str(tmp_path / "m")], "--prefix")
    exits_with(main, [str(FIXTURE), "--prefix", "nothing.", "--out", str(tmp_path / "m")], "'nothing.'")
    _, weights, _, _ = fixture("penultimate")
    del weights["blocks.1.rnn.weight_hh_l0"]
    torch.save(weights, tmp_path / "partial.pt")
    exits_with(main, [str(tmp_path / "partial.pt"), "--out", str(tmp_path / "m")],
               "lack: blocks.1.lstm.weight_hh_l0", "incomplete")
    assert not (tmp_path / "m").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "partial.pt"]


def test_console_scripts_point_at_entry_points():
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    scripts = dict(line.split(" = ") for line in parser["options.entry_points"]["console_scripts"].split("\n")
                   if line.strip())
    for name in ("sharnn-eval", "sharnn-export", "sharnn-generate", "sharnn-import"):
        module, func = scripts[name].split(":")
        assert callable(getattr(importlib.import_module(module), func)), name


def test_loading_errors_name_the_problem(tmp_path, random_model):
    exported = random_model
    shutil.copy(exported / "model.safetensors", tmp_path / "weights.safetensors")
    with pytest.raises(ModelError, match="bare weights file"):
        load_model(tmp_path / "weights.safetensors")
    (tmp_path / "half").mkdir()
    shutil.copy(exported / "config.json", tmp_path / "half")
    with pytest.raises(ModelError, match="incomplete: it has config.json but no model.safetensors"):
        load_model(tmp_path / "half")
    (tmp_path / "no_config").mkdir()
    shutil.copy(exported / "model.safetensors", tmp_path / "no_config")
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path / "no_config")
    assert load_model(exported / "model.safetensors").cfg.d_model == 128  # inside a model directory: fine


@pytest.mark.parametrize("module, flag", [("train.evaluate", "--streams"), ("sharnn.generate", "--mem-len")])
@pytest.mark.parametrize("value, message", [("x", "expected a whole number, got 'x'"), ("0", "must be >= 1, got 0")])
def test_count_arguments_are_checked_by_both_clis(module, flag, value, message, capsys):
    parser = importlib.import_module(module).build_parser()
    args = ["model", "--data", "d"] if module == "train.evaluate" else ["model", "--prompt", "a"]
    with pytest.raises(SystemExit) as e:
        parser.parse_args([*args, flag, value])
    assert e.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err


# -------------------------------------------------------------------------------- option spellings
# Underscores are the canonical spelling (as sharnn-train's); the hyphenated (and older) ones stay aliases.
SPELLINGS = [
    ("train.evaluate", ["m", "--data", "d", "--bptt", "64", "--mem_len", "8", "40", "--max_segments", "3",
                        "--timeout_s", "5"],
     [["m", "--data", "d", "--seg-len", "64", "--mem-len", "8", "40", "--max-segments", "3",
       "--timeout-s", "5"],
      ["m", "--data", "d", "--seg_len", "64", "--mem_len", "8", "40", "--max_segments", "3",
       "--timeout_s", "5"]]),
    ("train.export", ["s", "--out", "o", "--from_zero", "--mem_len", "64", "--onnx_batch", "2"],
     [["s", "--out", "o", "--from-zero", "--mem-len", "64", "--onnx-batch", "2"]]),
    ("sharnn.generate", ["m", "--prompt_file", "p", "--top_k", "5", "--top_p", "0.9", "--mem_len", "8",
                         "--prompt_chunk", "4"],
     [["m", "--prompt-file", "p", "--top-k", "5", "--top-p", "0.9", "--mem-len", "8",
       "--prompt-chunk", "4"]]),
    ("sharnn.convert", ["f", "--out", "o", "--mem_len", "40"], [["f", "--out", "o", "--mem-len", "40"]]),
    ("sharnn.prepare", ["files", "a", "--out", "o", "--valid_bytes", "2000", "--test_bytes", "3000"],
     [["files", "a", "--out", "o", "--valid-bytes", "2000", "--test-bytes", "3000"]]),
    ("sharnn.prepare", ["enwik8", "--out", "o", "--no_checksum"],
     [["enwik8", "--out", "o", "--no-checksum"]]),
]


@pytest.mark.parametrize("module, canonical, olds", SPELLINGS, ids=[s[0] for s in SPELLINGS])
def test_old_and_canonical_spellings_parse_the_same(module, canonical, olds, capsys):
    parser = importlib.import_module(module).build_parser()
    want = vars(parser.parse_args(canonical))
    seen = ("bptt", "mem_len", "top_k", "valid_bytes", "no_checksum", "from_zero")
    assert all(want[k] not in (None, False) for k in seen if k in want)  # the options were taken
    for old in olds:
        assert vars(parser.parse_args(old)) == want
    sub = [canonical[0]] if module == "sharnn.prepare" else []
    with pytest.raises(SystemExit):
        parser.parse_args([*sub, "--help"])
    shown = capsys.readouterr().out
    for arg in canonical:
        if arg.startswith("--"):
            assert arg in shown
    assert "--mem-len N" not in shown and "--top-k TOP_K" not in shown  # --help names one spelling


def test_option_errors_name_the_spelling_typed(capsys):
    parser = importlib.import_module("sharnn.generate").build_parser()
    for flag in ("--mem_len", "--mem-len"):
        with pytest.raises(SystemExit):
            parser.parse_args(["m", flag, "0"])
        assert f"argument {flag}: must be >= 1, got 0" in capsys.readouterr().err
    assert parser.parse_args(["m", "--mem", "5"]).mem_len == 5  # an abbreviation of one option, not ambiguous
