"""sharnn.kernels: the CPU dropout masks and the written-out attentions (the CPU's `attend_cpu`, CUDA's
`attend`) compute what torch's ops compute."""


import pytest

import sharnn.kernels as kernels
from sharnn import SHARNN
from tests.helpers import tiny_config


@pytest.mark.parametrize("value, want", [(None, "fast"), ("", "fast"), ("torch", "torch"),
                                         ("fast-attention", "fast-attention"), ("bogus", None)])
def test_switch_starts_from_the_environment(value, want):
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != kernels.ENV_VAR}
    if value is not None:
        env[kernels.ENV_VAR] = value
    proc = subprocess.run([sys.executable, "-c", "import sharnn.kernels as k; print(k.get_cpu_kernels())"],
                          env=env, capture_output=True, text=True)
    if want is None:  # the import works; asking for the setting is the error, naming the variable
        assert proc.returncode != 0 and "SettingError: $SHARNN_CPU_KERNELS='bogus' names no setting" in \
            proc.stderr, proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == want


@pytest.mark.parametrize("value, want", [(None, "written"), ("", "written"), ("sdpa", "sdpa"),
                                         ("bogus", None)])
def test_attention_switch_starts_from_the_environment(value, want):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != kernels.ATTENTION_ENV_VAR}
    if value is not None:
        env[kernels.ATTENTION_ENV_VAR] = value
    proc = subprocess.run([sys.executable, "-c", "import sharnn.kernels as k; print(k.get_attention_impl())"],
                          env=env, capture_output=True, text=True)
    if want is None:
        assert proc.returncode != 0 and "SettingError: $SHARNN_ATTENTION='bogus' names no setting" in \
            proc.stderr, proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == want


def test_a_wrong_setting_in_the_environment_is_one_error_line_of_a_command(tmp_path):
    import subprocess
    import sys

    from tests.helpers import REPO, subprocess_env

    SHARNN(tiny_config()).save_pretrained(tmp_path / "model")
    env = subprocess_env() | {kernels.ENV_VAR: "bogus"}
    command = [sys.executable, "-m", "sharnn.generate", str(tmp_path / "model"), "--length", "4",
               "--seed", "1"]
    ok = subprocess.run(command[:3] + ["--help"], cwd=REPO, env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and not ok.stderr  # imports fine: nothing has asked for the setting yet
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and not proc.stdout
    assert proc.stderr.splitlines() == [
        "error: $SHARNN_CPU_KERNELS='bogus' names no setting: use one of fast, torch, fast-masks, "
        "fast-attention (or leave it unset for 'fast')"]
