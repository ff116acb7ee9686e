"""sharnn-export (train/export.py) and loading models (sharnn.io.pretrained): the exported model computes what
the checkpoint does, DeepSpeed ZeRO-2 checkpoints, ONNX, bad inputs that write nothing, loading errors."""

from __future__ import annotations

import shutil

import pytest

from sharnn.io.pretrained import ModelError, load_model

pytestmark = pytest.mark.usefixtures("one_thread")


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


@pytest.mark.parametrize("given,kept", [("mit", "mit"), ("Apache-2.0", "apache-2.0"), ("other", "other")])
def test_the_license_is_a_hub_license_id(given, kept):
    from sharnn.io.hub import license_id

    assert license_id(given) == kept


def test_a_license_the_hub_does_not_know_is_one_usage_error(random_model, tmp_path, capsys):
    """Before: any text went into the card's metadata, which the Hub then shows as no license (issue 26,
    item 11); nothing is written."""
    from train.export import main

    with pytest.raises(SystemExit) as e:
        main([str(random_model), "--out", str(tmp_path / "out"), "--license", "MIT License"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "'MIT License' is not a Hub license id" in err and "mit" in err
    assert not (tmp_path / "out").exists()
