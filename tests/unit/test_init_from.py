"""--init_from's messages: weights that do not fit the config name the --model.* options that make them fit;
a run directory that has saved no checkpoint yet is called that, not 'an incomplete checkpoint'."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sharnn import SHARNN
from sharnn.io.pretrained import save_model
from tests.helpers import tiny_config
from train.build import build_model
from train.config import dump_yaml, preset


@pytest.fixture
def tiny_cfg():
    return dataclasses.replace(preset("tiny"), model=tiny_config(d_model=32, d_ff=64, mem_len=16))


def test_weights_that_do_not_fit_name_the_model_options(tiny_cfg, tmp_path):
    """Before: torch's state-dict error cut to its first line ('Error(s) in loading state_dict ...'), naming
    no field."""
    torch.manual_seed(0)
    save_model(SHARNN(dataclasses.replace(tiny_cfg.model, d_model=48, d_ff=96)), tmp_path / "m")
    with pytest.raises(SystemExit) as e:
        build_model(dataclasses.replace(tiny_cfg, init_from=str(tmp_path / "m")), None, fresh=True)
    said = str(e.value)
    assert said.startswith("error: ") and "--init_from" in said and "\n" not in said
    assert "--model.d_model 48 --model.d_ff 96" in said


def test_a_run_that_saved_no_checkpoint_is_not_called_incomplete(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_yaml(tiny_cfg))  # a run writes it at its start
    with pytest.raises(SystemExit) as e:
        build_model(dataclasses.replace(tiny_cfg, init_from=str(run)), None, fresh=True)
    assert "still being written" not in str(e.value) and "incomplete" not in str(e.value)
    assert "saved no checkpoint yet" in str(e.value)
