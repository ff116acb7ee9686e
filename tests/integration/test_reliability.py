"""What a run trusts is checked, and bad input stops with one `error:` line that names the file or field.

The corpus is hashed against its manifest at the start and recorded in every checkpoint, and a resume on
other data is refused; a damaged checkpoint (weights, train state, optimizer, carried state, random states)
is refused before anything is written, leaving the run directory byte for byte as it was. One tiny trained
run (tests/conftest.py `trained`) serves every case that needs one (marked slow): each works on a copy of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest

from sharnn.io import rundir
from tests.conftest import TRAIN
from tests.helpers import exits_with
from tests.unit.test_reliability import train_main

pytestmark = pytest.mark.usefixtures("one_thread")


def tree_digest(root: Path) -> str:
    """One hash of every path under `root` and every file's bytes."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    """A copy of the tiny trained run (10 steps, checkpoint step-00000010), free to damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def step10(run: Path) -> Path:
    return rundir.checkpoint_dir(run, 10)


def other_corpus(corpus: Path, out: Path, same_sizes: bool) -> Path:
    """A corpus with one byte of `corpus`'s training split changed, and with the same split sizes or with
    1,000 training bytes fewer."""
    from sharnn.corpus.data import open_split
    from sharnn.corpus.prepare import prepare_files

    splits = {name: bytearray(open_split(corpus, name).read(0, len(open_split(corpus, name))).tobytes())
              for name in ("train", "valid", "test")}
    splits["train"][1000] ^= 1
    if not same_sizes:
        del splits["train"][-1000:]
    src = out.parent / "other.txt"
    src.write_bytes(b"".join(splits[name] for name in ("train", "valid", "test")))
    prepare_files([src], out, valid_bytes=len(splits["valid"]), test_bytes=len(splits["test"]))
    return out


# ------------------------------------------------------------------------------- damaged checkpoints
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


class Hostile:
    """Unpickling this runs `touch MARKER`: what a crafted random_states_0.pkl could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def as_written_by_two_ranks(ckpt: Path) -> None:
    """Make the checkpoint look written by two ranks: meta.json says so, rank 1's files copy rank 0's."""
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps(meta | {"world_size": 2}))
    for name in ("carry_rank{}.safetensors", "random_states_{}.pkl"):
        shutil.copy(ckpt / name.format(0), ckpt / name.format(1))


DAMAGED = {
    "model.safetensors truncated": (lambda ck: truncate(ck / "model.safetensors"),
                                    ["model.safetensors is unreadable", "--init_from"]),
    "train_state.json garbage": (lambda ck: (ck / "train_state.json").write_text("{garbage"),
                                 ["train_state.json", "damaged"]),
    "optimizer.bin garbage": (lambda ck: (ck / "optimizer.bin").write_bytes(os.urandom(4096)),
                              ["optimizer.bin is not a file torch.save wrote"]),
    "carry_rank0 missing": (lambda ck: (ck / "carry_rank0.safetensors").unlink(),
                            ["carry_rank0.safetensors is missing"]),
    "random states garbage": (lambda ck: (ck / "random_states_0.pkl").write_bytes(b"garbage"),
                              ["random_states_0.pkl (rank 0's random number generator states) is unreadable",
                               "would not draw the random numbers"]),
    "random states hostile": (lambda ck: (ck / "random_states_0.pkl").write_bytes(
                                  pickle.dumps(Hostile(ck.parent.parent.parent / "pwned"))),
                              ["random_states_0.pkl", "is unreadable"]),
    "rank 1's random states garbage (a 2-rank checkpoint)": (
        lambda ck: (as_written_by_two_ranks(ck), (ck / "random_states_1.pkl").write_bytes(b"garbage")),
        ["random_states_1.pkl (rank 1's random number generator states) is unreadable"]),
    "meta.json garbage": (lambda ck: (ck / "meta.json").write_text("[]"), ["meta.json is unreadable"]),
}


@pytest.mark.slow  # uses the trained run (tests/conftest.py `trained`)
@pytest.mark.parametrize("case", DAMAGED)
def test_a_damaged_checkpoint_is_refused_by_name_and_the_run_is_left_as_it_was(case, run_copy, text_corpus):
    damage, fragments = DAMAGED[case]
    damage(step10(run_copy))
    before = tree_digest(run_copy)
    exits_with(train_main, ["--data", str(text_corpus), "--out", str(run_copy), "--resume", "auto",
                            "--max_steps", "12"], *fragments)
    assert tree_digest(run_copy) == before  # not even config.yaml or metrics.jsonl rewritten
    assert not (run_copy.parent / "pwned").exists()  # the hostile pickle ran nothing


@pytest.mark.slow  # uses the trained run (tests/conftest.py `trained`)
def test_resume_with_another_layout_is_refused_before_anything_is_written(run_copy, text_corpus, tmp_path):
    before = tree_digest(run_copy)
    common = ["--data", str(text_corpus), "--out", str(run_copy), "--resume", "auto", "--max_steps", "12"]
    exits_with(train_main, [*common, "--batch_size", "4"], "the checkpoint holds 8 streams", "--batch_size")
    exits_with(train_main, [*common, "--bptt", "32"], "bptt saved 64, now 32")
    from train.loop import main

    exits_with(main, ["--preset", "small", "--warmup_steps", "3", *common], "holds 8 streams")
    assert tree_digest(run_copy) == before


@pytest.mark.slow  # uses the trained run (tests/conftest.py `trained`)
@pytest.mark.parametrize("same_sizes", [True, False], ids=["same sizes", "other size"])
def test_resume_on_another_corpus_is_refused_naming_the_split_that_differs(same_sizes, run_copy, text_corpus,
                                                                            tmp_path):
    other = other_corpus(text_corpus, tmp_path / "other", same_sizes)
    before = tree_digest(run_copy)
    saved = json.loads((step10(run_copy) / "train_state.json").read_text())["corpus"]["train"]
    message = exits_with(train_main, ["--data", str(other), "--out", str(run_copy), "--resume", "auto",
                                      "--max_steps", "12"], "is not the corpus",
                         f"train: checkpoint {saved['n_bytes']:,} bytes sha256 {saved['sha256']}, --data ",
                         f"data: {text_corpus}", "--init_from")
    assert "valid:" not in message  # only the training split differs
    assert tree_digest(run_copy) == before


@pytest.mark.slow  # uses the trained run (tests/conftest.py `trained`)
def test_a_checkpoint_without_corpus_hashes_resumes_with_a_warning_and_records_them(run_copy, text_corpus,
                                                                                    capsys):
    state_file = step10(run_copy) / "train_state.json"
    state = json.loads(state_file.read_text())
    recorded = state.pop("corpus")
    assert set(recorded) == {"train", "valid", "test"} and len(recorded["train"]["sha256"]) == 64
    state_file.write_text(json.dumps(state))  # as an older sharnn wrote it
    assert train_main(["--data", str(text_corpus), "--out", str(run_copy), "--resume", "auto", "--max_steps",
                       "11", "--eval_max_segments", "2", "--no_test_at_end"]) == 0
    assert "records no corpus hashes" in capsys.readouterr().out
    assert json.loads((step10(run_copy).parent / "step-00000011" / "train_state.json").read_text())[
        "corpus"] == recorded


# ------------------------------------------------------------------------------------------- the data
def overwrite_in_arrow(corpus: Path, split: str, n: int = 200) -> None:
    """Overwrite `n` bytes of a split's Arrow file in place (same size): damage only a hash finds."""
    arrow = sorted((corpus / split).glob("*.arrow"))[0]
    data = bytearray(arrow.read_bytes())
    middle = len(data) // 2
    data[middle:middle + n] = bytes(255 - b for b in data[middle:middle + n])
    arrow.write_bytes(bytes(data))


@pytest.mark.slow  # uses the trained run (tests/conftest.py `trained`)
def test_a_changed_split_is_refused_by_training_and_evaluation(text_corpus, trained, tmp_path):
    corpus = Path(shutil.copytree(text_corpus, tmp_path / "corpus"))
    overwrite_in_arrow(corpus, "train")
    exits_with(train_main, ["--data", str(corpus), "--out", str(tmp_path / "new")],
               "split 'train'", "has changed since sharnn-prepare wrote it", "--skip_data_check")
    assert not (tmp_path / "new").exists()
    overwrite_in_arrow(corpus, "test")
    from train.eval_command import main as evaluate

    exits_with(evaluate, [str(trained), "--data", str(corpus)], "split 'test'", "has changed")


# ------------------------------------------------------------------------------- the run directory
@pytest.mark.slow  # uses the trained run (tests/conftest.py `trained`)
def test_a_fresh_start_never_replaces_an_earlier_runs_records(run_copy, text_corpus):
    shutil.rmtree(run_copy / "checkpoints")
    before = tree_digest(run_copy)
    for resume in ([], ["--resume", "auto"]):  # summary.json: the run finished, its checkpoints were removed
        exits_with(train_main, ["--data", str(text_corpus), "--out", str(run_copy), *resume],
                   "holds the records of an earlier run (metrics.jsonl, summary.json)", "new --out")
    assert tree_digest(run_copy) == before


@pytest.mark.slow  # a trainer in a process of its own
def test_an_out_on_a_read_only_filesystem_is_refused_at_once(text_corpus, tmp_path):
    """The same refusal where the filesystem is read-only, which stops root too: a read-only bind mount in a
    mount namespace of the trainer's own (unshare), which nothing outside it sees and which ends with it."""
    from tests.helpers import REPO, subprocess_env, train_cmd

    ro = tmp_path / "ro"
    ro.mkdir()
    mount_ro = 'mount --bind -o ro "$0" "$0" && '
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", mount_ro + '! touch "$0/x" 2>/dev/null', str(ro)],
                           capture_output=True, text=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("no read-only bind mount in a namespace of its own here (unshare -rm, mount --bind -o "
                    "ro): " + (probe.stderr.strip() if probe else "no unshare"))
    out = ro / "run"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", mount_ro + 'exec "$@"', str(ro),
                           *train_cmd(*TRAIN, "--data", str(text_corpus), "--out", str(out))],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert f"--out {out}" in line and f"directory {ro} is not writable" in line, line
    assert "cannot write the run there" in line and "Traceback" not in proc.stderr
    assert list(ro.iterdir()) == []


# --------------------------------------------------------------------------- eval, export, generate
@pytest.mark.slow  # uses the trained run (tests/conftest.py `trained`)
def test_an_unreadable_best_json_is_said_not_replaced_by_the_latest(run_copy, text_corpus):
    (run_copy / "checkpoints" / "best.json").write_text("{not json")
    from train.eval_command import main as evaluate

    exits_with(evaluate, [str(run_copy), "--data", str(text_corpus)], "best.json is unreadable",
               "delete best.json to use the latest checkpoint")


@pytest.mark.slow  # uses the trained run (tests/conftest.py `trained`)
def test_eval_json_that_cannot_be_written_is_refused_before_evaluating(trained, text_corpus, tmp_path):
    (tmp_path / "file").write_text("x")
    from train.eval_command import main as evaluate

    json_path = tmp_path / "file" / "r.json"
    exits_with(evaluate, [str(trained), "--data", str(text_corpus), "--json", str(json_path)], "--json",
               "cannot write there", "is a file, not a directory")


@pytest.mark.slow  # uses the trained run (tests/conftest.py `trained`)
def test_an_exported_config_with_a_fractional_mem_len_is_named(exported, tmp_path):
    model = Path(shutil.copytree(exported, tmp_path / "model"))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"mem_len": 512.9}))
    from sharnn.generate import main as generate

    exits_with(generate, [str(model), "--length", "1"], "config.json",
               "mem_len must be an integer, got 512.9")


@pytest.mark.slow  # uses the trained run (tests/conftest.py `trained`)
def test_export_into_a_place_that_cannot_be_written_is_refused(trained, tmp_path):
    (tmp_path / "file").write_text("x")
    from train.export import main as export

    out = tmp_path / "file" / "model"
    exits_with(export, [str(trained), "--out", str(out)], f"--out {out}: cannot write there",
               "is a file, not a directory")
