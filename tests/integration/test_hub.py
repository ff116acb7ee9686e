"""The Hugging Face Hub in fresh processes: the model card of a real trained run, and `sharnn-export
--push_to_hub` with HF_ENDPOINT pointing at the stand-in Hub of tests/unit/test_hub.py (where the rest of
the Hub's behaviour is tested in-process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from huggingface_hub import ModelCard

from tests.helpers import REPO, subprocess_env
from tests.unit import test_hub as unit
from tests.unit.test_hub import (
    TINY,
    fake_run,
    model_files,
)

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # huggingface_hub's LFS upload hands httpx2 a file object, which httpx2 deprecates
              pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")]

stand_in_hub = unit.stand_in_hub  # the unit tests' fixture
tiny_model = unit.tiny_model  # the unit tests' fixture
transfer = unit.transfer  # the unit tests' fixture


@pytest.mark.slow
def test_the_card_of_a_trained_run(trained, tmp_path):
    from train.export import main as export

    summary = json.loads((trained / "summary.json").read_text())
    assert export([str(trained), "--out", str(tmp_path / "out")]) == 0
    text = ModelCard.load(tmp_path / "out" / "README.md").text
    assert f"- Test bpc: {summary['test_bpc']:.4f}" in text and "- Steps: 10" in text
    assert "prepared by sharnn-prepare: train" in text


@pytest.mark.slow
def test_export_push_to_hub_in_a_fresh_process_with_hf_endpoint(stand_in_hub, tiny_model, tmp_path):
    from safetensors.torch import load_file

    run_dir = fake_run(tmp_path, load_file(tiny_model / "model.safetensors"), TINY, test_bpc=4.25)
    out = tmp_path / "out"
    env = subprocess_env()
    env.update(HF_ENDPOINT=stand_in_hub.url, HF_TOKEN="hf_alice", HF_HOME=str(tmp_path / "hf-home"),
               HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, "-m", "train.export", str(run_dir), "--out", str(out),
                           "--push-to-hub", "alice/pushed", "--private"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert stand_in_hub.repos["alice/pushed"].private
    assert stand_in_hub.tokens_seen == {"Bearer hf_alice"}  # Xet storage takes its own token
    arrived = stand_in_hub.files("alice/pushed")
    assert arrived == model_files(out)  # every file, byte for byte
    assert stand_in_hub.lfs_paths("alice/pushed") == {"model.safetensors": "xet"}
    assert 'SHARNN.from_pretrained("alice/pushed")' in arrived["README.md"].decode()
    assert stand_in_hub.validated == [arrived["README.md"].decode()]  # the card's metadata was checked
