"""python -m bench.recipe: variants (flags, git revisions) over seeds, paired by seed."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.helpers import REPO


def _head() -> str | None:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


@pytest.mark.slow  # a git worktree of HEAD and a training run of it, end to end
def test_recipe_runs_a_revision_in_its_worktree_and_writes_the_json(small_corpus, tmp_path, capsys):
    import bench.recipe

    head = _head()
    if head is None:
        pytest.skip("not a git checkout")
    worktree = Path(tempfile.gettempdir()) / f"sharnn-rev-{head[:12]}"
    existed = worktree.exists()
    out = tmp_path / "recipe.json"
    extra = ["--max_steps", "3", "--warmup_steps", "1", "--batch_size", "2", "--bptt", "16",
             "--log_every", "1", "--eval_max_segments", "2"]
    argv = ["--data", str(small_corpus), "--variant", "head@HEAD:--state_reset_prob 0.5", "--seeds", "1",
            "--first_seed", "3", "--early_steps", "2", "--json", str(out), "--", *extra]
    assert bench.recipe.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["command"].startswith("python -m bench.recipe") and record["date"] and record["machine"]
    assert record["common_flags"] == bench.recipe.COMMON + extra and record["pairs"] == []
    assert record["variants"] == [{"name": "head", "rev": "HEAD", "sha": head, "tree": str(worktree),
                                   "flags": ["--state_reset_prob", "0.5"]}]
    (run,) = record["runs"]
    assert run["variant"] == "head" and run["seed"] == 3 and run["step"] == 3 and run["wall_s"] > 0
    assert head.startswith(run["git_sha"])  # the trainer's own log line: the worktree's code ran
    assert run["state_reset_prob"] == 0.5 and run["output_bias_init"] == "zeros"  # read from its config.yaml
    for key in ("best_val_bpc", "test_bpc", "val_bpc"):
        assert 0 < run[key] < 10
        d = record["summary"][key]["variants"]["head"]
        assert d["n"] == 1 and d["std"] is None and d["se"] is None and d["mean"] == run[key]
        assert d["values"] == {"3": run[key]}
    assert run["val_curve"][-1]["step"] == 3 and run["val_curve"][-1]["bpc"] == run["val_bpc"]
    assert set(run["early_train_bpc"]) == {"2"} and 0 < run["early_train_bpc"]["2"] < 10
    early = record["summary_early_train_bpc"]["2"]["variants"]["head"]["values"]
    assert early == {"3": run["early_train_bpc"]["2"]}
    assert record["wall_s"]["head"]["n"] == 1
    assert worktree.exists() == existed  # made here, removed at exit (or someone else's, left alone)
    table = capsys.readouterr().out
    assert "best_val_bpc" in table and "test_bpc" in table
