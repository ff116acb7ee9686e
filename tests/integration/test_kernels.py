"""sharnn.kernels' two settings ($SHARNN_CPU_KERNELS, $SHARNN_ATTENTION) as a fresh interpreter and a
command read them from the environment. The kernels themselves: tests/unit/test_kernels.py."""

import os
import subprocess
import sys

import pytest

import sharnn.kernels as kernels
from sharnn import SHARNN
from tests.helpers import tiny_config

SWITCH_CASES = [(None, "fast"), ("", "fast"), ("torch", "torch"), ("fast-attention", "fast-attention"),
                ("bogus", None)]
ATTENTION_CASES = [(None, "written"), ("", "written"), ("sdpa", "sdpa"), ("bogus", None)]


@pytest.fixture(scope="module")
def fresh_import():
    """`fresh_import(variable, value)`: what a fresh interpreter with $variable=value (None: unset) prints
    for the setting at `import sharnn.kernels`: (exit status, stdout, stderr). Every case of the two tests
    below is started at once on first use, as importing torch is most of each one's time and side by side
    they share the cores."""
    calls = {kernels.ENV_VAR: "get_cpu_kernels", kernels.ATTENTION_ENV_VAR: "get_attention_impl"}
    cases = [(kernels.ENV_VAR, v) for v, _ in SWITCH_CASES] + [(kernels.ATTENTION_ENV_VAR, v)
                                                                for v, _ in ATTENTION_CASES]
    procs = {}
    for var, value in cases:
        env = {k: v for k, v in os.environ.items() if k != var} | ({} if value is None else {var: value})
        procs[var, value] = subprocess.Popen(
            [sys.executable, "-c", f"import sharnn.kernels as k; print(k.{calls[var]}())"], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}

    def result(var: str, value: str | None) -> tuple[int, str, str]:
        if (var, value) not in results:
            out, err = procs[var, value].communicate(timeout=300)
            results[var, value] = (procs[var, value].returncode, out, err)
        return results[var, value]

    yield result
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("value, want", SWITCH_CASES)
def test_switch_starts_from_the_environment(value, want, fresh_import):
    returncode, stdout, stderr = fresh_import(kernels.ENV_VAR, value)
    if want is None:  # the import works; asking for the setting is the error, naming the variable
        assert returncode != 0, stderr
        assert "SettingError: $SHARNN_CPU_KERNELS='bogus' names no setting" in stderr, stderr
    else:
        assert returncode == 0, stderr
        assert stdout.strip() == want


@pytest.mark.parametrize("value, want", ATTENTION_CASES)
def test_attention_switch_starts_from_the_environment(value, want, fresh_import):
    returncode, stdout, stderr = fresh_import(kernels.ATTENTION_ENV_VAR, value)
    if want is None:
        assert returncode != 0, stderr
        assert "SettingError: $SHARNN_ATTENTION='bogus' names no setting" in stderr, stderr
    else:
        assert returncode == 0, stderr
        assert stdout.strip() == want


def test_a_wrong_setting_in_the_environment_is_one_error_line_of_a_command(tmp_path):
    from tests.helpers import REPO, subprocess_env

    SHARNN(tiny_config()).save_pretrained(tmp_path / "model")
    env = subprocess_env() | {kernels.ENV_VAR: "bogus"}
    command = [sys.executable, "-m", "sharnn.generate", str(tmp_path / "model"), "--length", "4",
               "--seed", "1"]
    help_then_run = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for c in (command[:3] + ["--help"], command)]  # side by side
    (_, help_err), (out, err) = [p.communicate(timeout=300) for p in help_then_run]
    assert help_then_run[0].returncode == 0 and not help_err  # imports fine: nothing asks for the setting
    assert help_then_run[1].returncode == 1 and not out
    assert err.splitlines() == [
        "error: $SHARNN_CPU_KERNELS='bogus' names no setting: use one of fast, torch, fast-masks, "
        "fast-attention (or leave it unset for 'fast')"]
