"""sharnn-import (sharnn/convert.py): the reference's state dicts and pickled checkpoints become sharnn models
that reproduce the reference fixture; code in a pickle never runs; bad inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from sharnn.pretrained import load_model
from tests.helpers import exits_with
from tests.test_fidelity import FIXTURE, fixture, run_segments

pytestmark = pytest.mark.usefixtures("one_thread")


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
