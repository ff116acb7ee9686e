"""sharnn-prepare hf: datasets made here (save_to_disk, parquet and JSON lines folders, a builder with
data files) become corpora whose splits are exactly their records' text; bad input is one `error:` line; a
dataset larger than the process's memory limit is prepared. Nothing touches the network: the Hub is switched
off where a name could reach it.
"""

from __future__ import annotations

import json

import datasets
import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sharnn.corpus.data import SPLITS, read_manifest
from sharnn.corpus.hf import HFSource, prepare_hf
from tests.unit.test_prepare import assert_failed_cleanly, listing, run_main, split_bytes_via_datasets


def records(n: int, seed: int = 0, prefix: str = "") -> list[str]:
    """Distinct lines of text, some non-ASCII, of varied lengths."""
    return [f"{prefix}record {seed}-{i}: {'héllo wörld ' * (i % 7)}{'∑' * (i % 3)} end" for i in range(n)]


def joined(texts: list[str], separator: str = "\n") -> bytes:
    return separator.join(texts).encode("utf-8")


def save_to_disk(dataset: datasets.Dataset | datasets.DatasetDict, path) -> None:
    """`save_to_disk` without its progress bar, which would land in the captured stderr the tests read."""
    datasets.disable_progress_bars()
    try:
        dataset.save_to_disk(str(path))
    finally:
        datasets.enable_progress_bars()


def corpus_text(corpus) -> dict[str, bytes]:
    return {name: split_bytes_via_datasets(corpus, name) for name in SPLITS}


@pytest.fixture
def offline_hub(monkeypatch):
    """No network: a Hub name fails at once (as with HF_HUB_OFFLINE=1) instead of retrying for seconds."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# --- sources ------------------------------------------------------------------------------------------------

def test_save_to_disk_dataset_dict_uses_its_own_splits(tmp_path, capsys):
    texts = {"train": records(3000, 1), "validation": records(400, 2), "test": records(500, 3)}
    dataset = datasets.DatasetDict({name: datasets.Dataset.from_dict({"text": t, "id": list(range(len(t)))})
                                    for name, t in texts.items()})
    save_to_disk(dataset, tmp_path / "saved")
    code, err = run_main(capsys, "hf", tmp_path / "saved", "--out", tmp_path / "c")
    assert code == 0, err
    want = {"train": joined(texts["train"]), "valid": joined(texts["validation"]),
            "test": joined(texts["test"])}
    assert corpus_text(tmp_path / "c") == want
    source = read_manifest(tmp_path / "c")["source"]
    assert source["kind"] == "hf" and source["name"] == str(tmp_path / "saved")
    assert source["loader"] == "load_from_disk" and source["config"] is None and source["revision"] is None
    assert source["splits_used"] == {"train": "train", "valid": "validation", "test": "test"}
    saved = datasets.load_from_disk(str(tmp_path / "saved"))
    assert source["fingerprint"] == {name: saved[name]._fingerprint for name in texts}
    assert source["records"]["validation"] == {"n_records": 400, "n_bytes": len(joined(texts["validation"]))}
    assert source["columns"] == ["text"] and source["separator"] == "\n"
    assert listing(tmp_path) == ["c", "saved"]  # no scratch or staging left


def test_parquet_folder_without_a_test_split_cuts_test_from_train(tmp_path):
    texts = {"train": records(4000, 1), "validation": records(300, 2)}
    (tmp_path / "pq").mkdir()
    for name, t in texts.items():  # two shards each: a split may span several files
        half = len(t) // 2
        for k, part in enumerate((t[:half], t[half:])):
            pq.write_table(pa.table({"content": part}), tmp_path / "pq" / f"{name}-{k:05d}-of-00002.parquet",
                           row_group_size=100)
    result = prepare_hf(HFSource(str(tmp_path / "pq")), tmp_path / "c", test_bytes=2_000)
    train = joined(texts["train"])
    assert corpus_text(tmp_path / "c") == {"train": train[:-2_000], "valid": joined(texts["validation"]),
                                           "test": train[-2_000:]}
    source = result.manifest["source"]
    assert source["columns"] == ["content"]  # the only string column
    assert source["splits_used"] == {"train": f"train (its first {len(train) - 2_000:,} bytes)",
                                     "valid": "validation", "test": "train (its last 2,000 bytes)"}
    assert source["builder"] == "parquet" and {k: len(v) for k, v in source["data_files"].items()} == \
        {"train": 2, "validation": 2}
    assert source["fingerprint_kind"] == "sha256 of the data files' names and bytes"
    fingerprint = source["fingerprint"]["train"]
    shard = tmp_path / "pq" / "train-00000-of-00002.parquet"
    pq.write_table(pa.table({"content": texts["train"][:10]}), shard)
    changed = prepare_hf(HFSource(str(tmp_path / "pq")), tmp_path / "c2", test_bytes=1_024)
    assert changed.manifest["source"]["fingerprint"]["train"] != fingerprint


def test_json_lines_columns_separator_and_held_out_from_train(tmp_path, capsys):
    rows = [{"title": f"title {i}", "body": None if i % 10 == 3 else f"body {i} ünïcode", "n": i}
            for i in range(3000)]
    (tmp_path / "jl").mkdir()
    for name, part in (("train", rows), ("test", rows[:200])):
        (tmp_path / "jl" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    code, err = run_main(capsys, "hf", tmp_path / "jl", "--column", "title", "--column", "body",
                         "--separator", r"\n\n", "--held_out_from_train", "--valid_bytes", "3K",
                         "--test_bytes", "1KiB", "--out", tmp_path / "c")
    assert code == 0, err
    text = "\n\n".join("\n\n".join(v for v in (r["title"], r["body"]) if v is not None) for r in rows)
    data = text.encode("utf-8")
    assert b"".join(corpus_text(tmp_path / "c").values()) == data  # the dataset's own test split not used
    assert corpus_text(tmp_path / "c")["test"] == data[-1024:]
    assert corpus_text(tmp_path / "c")["valid"] == data[-1024 - 3000:-1024]
    assert read_manifest(tmp_path / "c")["source"]["separator"] == "\n\n"


def test_a_builder_with_data_files_and_an_empty_separator(tmp_path, capsys):
    lines = [f"line {i}\n" for i in range(5000)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    code, err = run_main(capsys, "hf", "json", "--data_files", tmp_path / "a.jsonl", "--separator", "",
                         "--out", tmp_path / "c")
    assert code == 0, err
    data = "".join(lines).encode()
    n_held_out = int(len(data) * 0.05)
    assert corpus_text(tmp_path / "c") == {"train": data[:-2 * n_held_out], "test": data[-n_held_out:],
                                           "valid": data[-2 * n_held_out:-n_held_out]}
    source = read_manifest(tmp_path / "c")["source"]
    assert source["builder"] == "json" and source["data_files_given"] == [str(tmp_path / "a.jsonl")]
    code, err = run_main(capsys, "hf", "json", "--data_files", tmp_path / "a.jsonl", "--separator", "",
                         "--out", tmp_path / "c")
    assert code == 0 and "already holds this corpus" in err  # deterministic


# --- bad input ----------------------------------------------------------------------------------------------

@pytest.fixture
def jsonl_folder(tmp_path):
    (tmp_path / "jl").mkdir()
    (tmp_path / "jl" / "train.jsonl").write_text("".join(json.dumps({"body": f"row {i}", "n": i}) + "\n"
                                                         for i in range(2000)))
    return tmp_path / "jl"


@pytest.mark.parametrize("args, needles", [
    (["--column", "text"], ["no column 'text'", "its columns are body, n", "--column NAME"]),
    (["--column", "n"], ["column 'n' of", "holds int64, not text", "(body)"]),
    (["--split", "dev"], ["has no split 'dev'", "it has train", "--split"]),
])
def test_bad_column_or_split(tmp_path, capsys, jsonl_folder, args, needles):
    code, err = run_main(capsys, "hf", jsonl_folder, *args, "--out", tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, ["jl"], *needles)


def test_no_text_column_to_guess(tmp_path, capsys):
    dataset = datasets.Dataset.from_dict({"a": ["x"] * 10, "b": ["y"] * 10})
    save_to_disk(dataset, tmp_path / "saved")
    code, err = run_main(capsys, "hf", tmp_path / "saved", "--out", tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, ["saved"], "no column 'text' and 2 string columns (a, b",
                          "--column NAME")


@pytest.mark.parametrize("kind", ["saved, no records", "saved, empty records", "empty json lines file"])
def test_empty_dataset(tmp_path, capsys, kind):
    if kind.startswith("saved"):
        texts = [] if kind == "saved, no records" else ["", "", ""]
        features = datasets.Features({"text": datasets.Value("string")})
        save_to_disk(datasets.Dataset.from_dict({"text": texts}, features=features), tmp_path / "d")
    else:
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "train.jsonl").write_text("")
    code, err = run_main(capsys, "hf", tmp_path / "d", "--out", tmp_path / "c", "--separator", "")
    want = {"saved, no records": "holds an empty dataset (no records in",
            "saved, empty records": "of {d} holds no text (3 records, 0 bytes of text in column(s) text)",
            "empty json lines file": "{d} holds no text (0 records"}[kind]
    assert_failed_cleanly(code, err, tmp_path, ["d"], want.format(d=tmp_path / "d"))


def test_own_split_with_its_size_flag_is_refused(tmp_path, capsys):
    save_to_disk(datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": records(2000)}),
                                       "validation": datasets.Dataset.from_dict({"text": records(300, 1)})}),
                 tmp_path / "saved")
    code, err = run_main(capsys, "hf", tmp_path / "saved", "--valid_bytes", "2K", "--out", tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, ["saved"], "its own 'validation' split",
                          "--held_out_from_train")


def test_a_dataset_name_that_does_not_exist_offline(tmp_path, capsys, offline_hub):
    code, err = run_main(capsys, "hf", "nobody-here/no-such-dataset", "--out", tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, [], "'nobody-here/no-such-dataset'", "offline",
                          "a local directory")


def test_a_file_or_empty_folder_as_name(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "empty").mkdir()
    code, err = run_main(capsys, "hf", tmp_path / "a.jsonl", "--out", tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, ["a.jsonl", "empty"], "is a file",
                          f"hf json --data_files {tmp_path / 'a.jsonl'}")
    code, err = run_main(capsys, "hf", tmp_path / "empty", "--out", tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, ["a.jsonl", "empty"], "not found", "a local directory")


def test_a_corrupt_data_file(tmp_path, capsys):
    (tmp_path / "jl").mkdir()
    good = "".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(3000))
    (tmp_path / "jl" / "train.jsonl").write_text(good + '{"text": "unfinished\n')
    code, err = run_main(capsys, "hf", tmp_path / "jl", "--out", tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, ["jl"], "reading split 'train' of", "failed")


def test_bad_separator_escape_is_a_usage_error(tmp_path, capsys, jsonl_folder):
    with pytest.raises(SystemExit) as exit_info:
        run_main(capsys, "hf", jsonl_folder, "--separator", "\\x4", "--out", tmp_path / "c")
    assert exit_info.value.code == 2 and "bad backslash escape" in capsys.readouterr().err


# --- silently wrong inputs and misleading messages (issue 26 items 8 and 11) ------------------------------

def jsonl(path, n: int = 3000, text=lambda i: f"row {i} héllo") -> None:
    path.write_text("".join(json.dumps({"text": text(i)}) + "\n" for i in range(n)))


def test_a_builder_without_data_files_is_refused(tmp_path, capsys, monkeypatch):
    """`hf json` alone read whatever JSON lay in the current directory."""
    jsonl(tmp_path / "notes.jsonl")
    monkeypatch.chdir(tmp_path)
    code, err = run_main(capsys, "hf", "json", "--out", tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, ["notes.jsonl"], "json is a builder", "--data_files",
                          "current directory")


def test_the_manifest_records_each_data_file(tmp_path, capsys):
    """The manifest recorded only how many files each split had."""
    import hashlib

    jsonl(tmp_path / "a.jsonl", 2000)
    jsonl(tmp_path / "b.jsonl", 1000, lambda i: f"other {i}")
    code, err = run_main(capsys, "hf", "json", "--data_files", tmp_path / "*.jsonl", "--out", tmp_path / "c")
    assert code == 0, err
    files = read_manifest(tmp_path / "c")["source"]["data_files"]
    assert files == {"train": [{"path": str(tmp_path / name), "n_bytes": (tmp_path / name).stat().st_size,
                                "sha256": hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()}
                               for name in ("a.jsonl", "b.jsonl")]}


@pytest.mark.parametrize("builder, name, needles", [
    ("csv", "a.jsonl", ["a.jsonl", "JSON", "not csv", "hf json --data_files"]),
    ("csv", "a.data", ["a.data", "JSON", "not csv"]),  # no telling name: its first byte is '{'
    ("json", "a.csv", ["a.csv", "csv", "not json"]),
    ("parquet", "a.jsonl", ["a.jsonl", "not parquet"]),
])
def test_a_builder_that_does_not_match_the_files_is_refused(tmp_path, capsys, builder, name, needles):
    """`csv` on a JSON lines file made a corpus of raw {"text": ...} lines, the first taken as a header."""
    if name.endswith(".csv"):
        (tmp_path / name).write_text("text,n\n" + "".join(f"row {i},{i}\n" for i in range(3000)))
    else:
        jsonl(tmp_path / name)
    code, err = run_main(capsys, "hf", builder, "--data_files", tmp_path / name, "--out", tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, [name], *needles)


def test_a_repeated_column_is_refused(tmp_path, capsys):
    """`--column text --column text` wrote every record twice."""
    jsonl(tmp_path / "a.jsonl")
    code, err = run_main(capsys, "hf", "json", "--data_files", tmp_path / "a.jsonl", "--column", "text",
                         "--column", "text", "--out", tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, ["a.jsonl"], "--column text", "twice")


def test_records_of_empty_text_are_no_text(tmp_path, capsys):
    """40,000 empty records made a "corpus" of 39,999 separator bytes."""
    jsonl(tmp_path / "a.jsonl", 40_000, lambda i: "")
    code, err = run_main(capsys, "hf", "json", "--data_files", tmp_path / "a.jsonl", "--out", tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, ["a.jsonl"], "holds no text (40,000 records, 0 bytes of text")


def test_a_revision_of_local_data_is_refused(tmp_path, capsys, jsonl_folder):
    """--revision on a local folder was ignored."""
    code, err = run_main(capsys, "hf", jsonl_folder, "--revision", "v2", "--out", tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, ["jl"], "--revision", "Hub", "local")
    code, err = run_main(capsys, "hf", "json", "--data_files", jsonl_folder / "train.jsonl", "--revision",
                         "v2", "--out", tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, ["jl"], "--revision", "Hub", "local")


def test_a_data_files_glob_that_matches_nothing(tmp_path, capsys):
    code, err = run_main(capsys, "hf", "json", "--data_files", tmp_path / "nothing*.jsonl", "--out",
                         tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, [],
                          f"--data_files {tmp_path / 'nothing*.jsonl'} matches no file")


def test_a_revision_written_into_the_name(tmp_path, capsys, offline_hub):
    code, err = run_main(capsys, "hf", "owner/name@main", "--out", tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, [], "owner/name@main", "hf owner/name --revision main")


def test_held_out_cuts_larger_than_the_text_name_no_negative_size(tmp_path, capsys, jsonl_folder):
    """The message said "train -958,305"."""
    import re

    code, err = run_main(capsys, "hf", jsonl_folder, "--valid_bytes", "1M", "--out", tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, ["jl"], "valid 1,000,000", "more than the", "--valid_bytes")
    assert not re.search(r"-[0-9]", err), err


def test_a_separator_that_is_not_text_is_a_usage_error(tmp_path, capsys, jsonl_folder):
    """A lone surrogate (typed as \\ud800, or a non-UTF-8 byte in the command line) was a traceback."""
    for separator in ("\\ud800", "\udcff"):
        with pytest.raises(SystemExit) as exit_info:
            run_main(capsys, "hf", jsonl_folder, "--separator", separator, "--out", tmp_path / "c")
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "--separator" in err and "surrogate" in err, err
    assert listing(tmp_path) == ["jl"]
