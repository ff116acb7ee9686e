"""sharnn-prepare: the corpus contract, the enwik8 split, files/demo sources, and every kind of bad input.

CLI tests call ``main([...])`` in-process; one test runs ``python -m sharnn.corpus.prepare`` for the exit
code.
Nothing here touches the internet: downloads go to a closed local port or a local HTTP server.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import sysconfig
import threading
import zipfile
from pathlib import Path

import datasets
import pytest

from sharnn.corpus import prepare
from sharnn.corpus.data import SPLITS, open_split, read_manifest
from sharnn.corpus.prepare import (
    ENWIK8_BYTES,
    ROW_BYTES,
    demo_files,
    enwik8_split_sizes,
    held_out_split_sizes,
    main,
    parse_byte_count,
    prepare_enwik8,
    prepare_files,
    prepare_text8,
)
from tests.helpers import free_port, random_bytes


def split_bytes_via_datasets(corpus: Path, split: str) -> bytes:
    """What a user sees with plain `datasets`: the split's rows, concatenated."""
    return b"".join(datasets.load_from_disk(str(corpus / split))["bytes"])


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def run_main(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def tree_digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_failed_cleanly(code: int, err: str, parent: Path, before: list[str], *needles: str) -> None:
    """Non-zero exit, an `error:` line saying what is wrong, no traceback, nothing new left in `parent`."""
    assert code != 0
    assert err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert listing(parent) == before  # no corpus, no staging directory


# --- split rules --------------------------------------------------------------------------------------------

def test_enwik8_split_rule():
    assert enwik8_split_sizes(100_000_000) == (90_000_000, 5_000_000, 5_000_000)
    assert enwik8_split_sizes(20_000) == (18_000, 1_000, 1_000)
    assert enwik8_split_sizes(20_019) == (18_019, 1_000, 1_000)
    assert held_out_split_sizes(100_000) == (90_000, 5_000, 5_000)
    assert held_out_split_sizes(100_000, valid_bytes=2_000, test_bytes=3_000) == (95_000, 2_000, 3_000)


@pytest.mark.parametrize("text, n_bytes", [
    ("5000000", 5_000_000), ("5_000_000", 5_000_000), ("5M", 5_000_000), ("5m", 5_000_000),
    ("5MB", 5_000_000), ("90M", 90_000_000), ("1.5K", 1_500), ("2G", 2 * 10**9), ("64KiB", 65_536),
    ("1Mi", 2**20), ("0", 0),
    (" 7 k ", 7_000)])
def test_byte_counts_take_decimal_and_binary_suffixes(text, n_bytes):
    assert parse_byte_count(text) == n_bytes


@pytest.mark.parametrize("text, message", [
    ("lots", "expected a number of bytes"), ("5X", "expected a number of bytes"),
    ("1e6", "expected a number"), ("", "expected a number"), ("1.5", "not a whole number of bytes"),
    ("1.0001K", "not a whole number"),
    ("-5", "non-negative"), ("-5M", "non-negative")])
def test_byte_count_garbage_is_a_usage_error(tmp_path, capsys, text, message):
    (tmp_path / "a.txt").write_bytes(random_bytes(50_000))
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage error, exit code 2
        main(["files", str(tmp_path / "a.txt"), "--out", str(tmp_path / "c"), f"--test-bytes={text}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --test-bytes" in err and message in err, err
    assert listing(tmp_path) == ["a.txt"]


def test_the_readme_example_sizes_work(tmp_path, capsys):
    (tmp_path / "a.txt").write_bytes(random_bytes(30_000))
    code, _ = run_main(capsys, "files", tmp_path / "a.txt", "--out", tmp_path / "c", "--valid-bytes", "2K",
                       "--test_bytes", "1KiB")
    assert code == 0
    sizes = {name: info["n_bytes"] for name, info in read_manifest(tmp_path / "c")["splits"].items()}
    assert sizes == {"train": 30_000 - 2_000 - 1_024, "valid": 2_000, "test": 1_024}


# --- enwik8 -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def enwik8_stand_in(tmp_path_factory):
    """A raw 100,000,000-byte stand-in for enwik8 (random bytes) and the corpus the CLI prepares from it."""
    root = tmp_path_factory.mktemp("enwik8")
    raw = root / "enwik8"
    data = random_bytes(ENWIK8_BYTES, seed=1)
    raw.write_bytes(data)
    assert main(["enwik8", "--file", str(raw), "--out", str(root / "corpus"), "--no-checksum"]) == 0
    return raw, data, root / "corpus"


def test_enwik8_standard_split_on_a_100mb_stand_in(enwik8_stand_in):
    raw, data, corpus = enwik8_stand_in
    manifest = read_manifest(corpus)
    assert {name: manifest["splits"][name]["n_bytes"] for name in SPLITS} == \
        {"train": 90_000_000, "valid": 5_000_000, "test": 5_000_000}
    want = {"train": data[:90_000_000], "valid": data[90_000_000:95_000_000], "test": data[95_000_000:]}
    for name in SPLITS:
        assert manifest["splits"][name]["sha256"] == hashlib.sha256(want[name]).hexdigest()
        split = open_split(corpus, name)
        assert split.read(0, 1000).tobytes() == want[name][:1000]
        assert split.read(len(split) - 1000, 1000).tobytes() == want[name][-1000:]
    assert split_bytes_via_datasets(corpus, "valid") == want["valid"]
    assert manifest["source"]["kind"] == "enwik8"
    assert manifest["source"]["sha256"] == hashlib.sha256(data).hexdigest()


def test_enwik8_checks_the_payload_sha256(enwik8_stand_in, tmp_path, capsys):
    raw, _, _ = enwik8_stand_in
    code, err = run_main(capsys, "enwik8", "--zip", raw, "--out", tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, [], "sha256", prepare.ENWIK8_SHA256, "not the standard enwik8")


def test_enwik8_from_a_small_zip_with_the_scaled_rule(tmp_path):
    data = random_bytes(40_000, seed=2)
    archive = make_zip(tmp_path / "enwik8.zip", {"enwik8": data})
    result = prepare_enwik8(tmp_path / "c", archive, expected_bytes=len(data),
                            expected_sha256=hashlib.sha256(data).hexdigest())
    assert not result.unchanged
    assert [split_bytes_via_datasets(tmp_path / "c", name) for name in SPLITS] == \
        [data[:36_000], data[36_000:38_000], data[38_000:]]
    assert result.manifest["source"]["archive_sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert listing(tmp_path) == ["c", "enwik8.zip"]  # the extracted scratch copy is gone


def test_enwik8_zip_of_the_wrong_size(tmp_path, capsys):
    archive = make_zip(tmp_path / "enwik8.zip", {"enwik8": random_bytes(20_000)})
    code, err = run_main(capsys, "enwik8", "--zip", archive, "--out", tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, ["enwik8.zip"], "20,000 bytes", "expected 100,000,000")


def test_enwik8_zip_without_the_member(tmp_path, capsys):
    archive = make_zip(tmp_path / "enwik8.zip", {"readme.txt": b"hello", "data/enwik9": b"x"})
    code, err = run_main(capsys, "enwik8", "--zip", archive, "--out", tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, ["enwik8.zip"], "no member 'enwik8'", "readme.txt")


def test_enwik8_corrupt_zip(tmp_path, capsys):
    data = random_bytes(30_000)
    good = make_zip(tmp_path / "good.zip", {"enwik8": data}).read_bytes()
    start = good.index(b"enwik8") + len(b"enwik8") + 100  # inside the member's compressed data
    bad = bytearray(good)
    bad[start:start + 64] = bytes(64)
    (tmp_path / "bad.zip").write_bytes(bytes(bad))
    (tmp_path / "truncated.zip").write_bytes(good[:len(good) // 2])
    before = listing(tmp_path)
    prepare_kwargs = dict(expected_bytes=len(data), expected_sha256=None)
    with pytest.raises(prepare.PrepareError, match="corrupt or truncated zip"):
        prepare_enwik8(tmp_path / "c", tmp_path / "bad.zip", **prepare_kwargs)
    with pytest.raises(prepare.PrepareError, match="corrupt or truncated"):
        prepare_enwik8(tmp_path / "c", tmp_path / "truncated.zip", **prepare_kwargs)
    assert listing(tmp_path) == before
    code, err = run_main(capsys, "enwik8", "--zip", tmp_path / "truncated.zip", "--out", tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, before, "truncated")


def test_enwik8_missing_path(tmp_path, capsys):
    code, err = run_main(capsys, "enwik8", "--zip", tmp_path / "nope.zip", "--out", tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, [], "no such file", "nope.zip")


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}/enwik8.zip"  # nothing listens there


def test_enwik8_download_offline_is_a_clear_error(tmp_path, capsys):
    url = closed_port_url()
    code, err = run_main(capsys, "enwik8", "--url", url, "--timeout", "5", "--out", tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, [], f"could not download enwik8 from {url}", "--zip PATH",
                          prepare.ENWIK8_URL)


def test_enwik8_download_address_from_the_environment(tmp_path, capsys, monkeypatch):
    url = closed_port_url()
    monkeypatch.setenv(prepare.ENWIK8_URL_ENV, url)
    code, err = run_main(capsys, "enwik8", "--timeout", "5", "--out", tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, [], f"from {url}")


def test_enwik8_download_checks_the_archive_size(tmp_path, capsys):
    payload = make_zip(tmp_path / "served.zip", {"enwik8": b"not quite"}).read_bytes()
    (tmp_path / "served.zip").unlink()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/enwik8.zip"
        code, err = run_main(capsys, "enwik8", "--url", url, "--out", tmp_path / "c")
    finally:
        server.shutdown()
        server.server_close()
    assert_failed_cleanly(code, err, tmp_path, [], f"has {len(payload):,} bytes", "expected 36,445,475")


# --- text8 and wikitext-103 -------------------------------------------------------------------------------

def text8_like(n: int, seed: int = 0) -> bytes:
    import numpy as np

    letters = np.frombuffer(b" abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    return letters[np.random.default_rng(seed).integers(0, len(letters), n)].tobytes()


def test_text8_standard_split_from_a_zip_and_a_raw_file(tmp_path, capsys):
    data = text8_like(40_000)
    archive = make_zip(tmp_path / "text8.zip", {"text8": data})
    result = prepare_text8(tmp_path / "c", archive, expected_bytes=len(data))
    assert [split_bytes_via_datasets(tmp_path / "c", name) for name in SPLITS] == \
        [data[:36_000], data[36_000:38_000], data[38_000:]]
    source = result.manifest["source"]
    assert source["kind"] == "text8" and source["sha256"] == hashlib.sha256(data).hexdigest()
    (tmp_path / "text8").write_bytes(data)
    assert prepare_text8(tmp_path / "c", tmp_path / "text8", expected_bytes=len(data)).unchanged
    code, err = run_main(capsys, "text8", "--zip", archive, "--out", tmp_path / "c2")  # not 10^8 bytes
    assert_failed_cleanly(code, err, tmp_path, ["c", "text8", "text8.zip"], "40,000 bytes",
                          "expected 100,000,000", "this is not text8", prepare.TEXT8.url)


def test_text8_checks_its_alphabet(tmp_path):
    data = bytearray(text8_like(40_000))
    data[1234], data[30_000] = ord("A"), ord("\n")
    (tmp_path / "text8").write_bytes(bytes(data))
    with pytest.raises(prepare.PrepareError) as error:
        prepare_text8(tmp_path / "c", tmp_path / "text8", expected_bytes=len(data))
    assert "hold 2 bytes outside its alphabet ' abcdefghijklmnopqrstuvwxyz' ('\\n', 'A')" in str(error.value)
    assert "this is not text8" in str(error.value)
    assert listing(tmp_path) == ["text8"]


def test_text8_download_offline_is_a_clear_error(tmp_path, capsys):
    url = closed_port_url()
    code, err = run_main(capsys, "text8", "--url", url, "--timeout", "5", "--out", tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, [], f"could not download text8 from {url}", prepare.TEXT8.url)


WIKITEXT = {"train": " = Valkyria = \n \n Senjō no Valkyria 3 \n" * 300, "valid": " = Homarus = \n \n" * 100,
            "test": " = Robert Boulter = \n \n" * 80}


def wikitext_files() -> dict[str, bytes]:
    return {f"wikitext-103-raw/wiki.{split}.raw": text.encode() for split, text in WIKITEXT.items()}


@pytest.mark.parametrize("layout", ["zip", "directory"])
def test_wikitext103_splits_are_the_raw_files(tmp_path, capsys, layout):
    if layout == "zip":
        where = make_zip(tmp_path / "wikitext-103-raw-v1.zip", wikitext_files())
    else:
        where = tmp_path / "unzipped"
        for name, data in wikitext_files().items():
            (where / name).parent.mkdir(parents=True, exist_ok=True)
            (where / name).write_bytes(data)
    code, err = run_main(capsys, "wikitext-103", "--zip", where, "--out", tmp_path / "c")
    assert code == 0, err
    assert {name: split_bytes_via_datasets(tmp_path / "c", name) for name in SPLITS} == \
        {name: text.encode() for name, text in WIKITEXT.items()}
    source = read_manifest(tmp_path / "c")["source"]
    assert source["kind"] == "wikitext-103" and source["files"]["valid"] == "wiki.valid.raw"
    assert listing(tmp_path) == sorted(["c", where.name])  # no extracted copies left


def test_wikitext103_bad_inputs(tmp_path, capsys):
    files = wikitext_files()
    del files["wikitext-103-raw/wiki.test.raw"]
    archive = make_zip(tmp_path / "partial.zip", files)
    code, err = run_main(capsys, "wikitext-103", "--zip", archive, "--out", tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, ["partial.zip"], "has no wiki.test.raw",
                          "wikitext-103-raw-v1.zip")
    (tmp_path / "junk.bin").write_bytes(b"not a zip")
    code, err = run_main(capsys, "wikitext-103", "--zip", tmp_path / "junk.bin", "--out", tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, ["junk.bin", "partial.zip"],
                          "neither a directory nor a readable zip")
    url = closed_port_url()
    code, err = run_main(capsys, "wikitext-103", "--url", url, "--timeout", "5", "--out", tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, ["junk.bin", "partial.zip"],
                          f"could not download wikitext-103 from {url}", prepare.WIKITEXT103_URL)


def test_wikitext103_from_a_datasets_copy(tmp_path, capsys):
    """--hub NAME reads a `datasets` copy laid out as the Hub's (train/validation/test, lines with their
    newline); a local stand-in here, as there is no network."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "wikitext").mkdir()
    for split, hub_split in (("train", "train"), ("valid", "validation"), ("test", "test")):
        lines = WIKITEXT[split].splitlines(keepends=True)
        shard = tmp_path / "wikitext" / f"{hub_split}-00000-of-00001.parquet"
        pq.write_table(pa.table({"text": lines}), shard)
    code, err = run_main(capsys, "wikitext-103", "--hub", tmp_path / "wikitext", "--out", tmp_path / "c")
    assert code == 0, err
    assert {name: split_bytes_via_datasets(tmp_path / "c", name) for name in SPLITS} == \
        {name: text.encode() for name, text in WIKITEXT.items()}
    source = read_manifest(tmp_path / "c")["source"]
    assert source["kind"] == "hf" and source["separator"] == ""
    assert source["splits_used"] == {"train": "train", "valid": "validation", "test": "test"}


# --- files and demo -----------------------------------------------------------------------------------------

def test_round_trip_contract_rows_concatenate_to_the_split_bytes(tmp_path, capsys):
    data = random_bytes(3 * ROW_BYTES + 12_345, seed=3)
    (tmp_path / "in.bin").write_bytes(data)
    code, _ = run_main(capsys, "files", tmp_path / "in.bin", "--out", tmp_path / "c", "--valid-bytes", 5_000,
                       "--test-bytes", "7_000")
    assert code == 0
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    n_train = len(data) - 12_000
    want = {"train": data[:n_train], "valid": data[n_train:n_train + 5_000], "test": data[n_train + 5_000:]}
    for name in SPLITS:
        ds = datasets.load_from_disk(str(tmp_path / "c" / name))
        rows = ds["bytes"]
        assert b"".join(rows) == want[name]
        assert all(len(r) == ROW_BYTES for r in rows[:-1]) and 0 < len(rows[-1]) <= ROW_BYTES
        info = manifest["splits"][name]
        assert info == {"n_bytes": len(want[name]), "n_rows": len(rows),
                        "sha256": hashlib.sha256(want[name]).hexdigest()}
    assert manifest["format"] == "sharnn-byte-corpus" and manifest["format_version"] == 1
    assert manifest["layout"]["row_bytes"] == ROW_BYTES and manifest["tool_version"]
    assert manifest["source"]["kind"] == "files" and manifest["source"]["n_bytes"] == len(data)
    assert listing(tmp_path) == ["c", "in.bin"]


def test_files_reads_directories_recursively_in_sorted_order(tmp_path):
    tree = {"d/b.txt": b"B" * 3000, "d/a/z.txt": b"Z" * 3000, "d/a/b/c.txt": b"C" * 3000,
            "d/a.txt": b"A" * 3000, "d/empty/.keep": b"", "solo.txt": b"S" * 3000}
    for name, content in tree.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    prepare_files([tmp_path / "solo.txt", tmp_path / "d"], tmp_path / "c", valid_bytes=1024, test_bytes=1024)
    # Sorted by path components, as sorted(Path): a directory's files stay together (d/a/... before d/a.txt).
    want = tree["solo.txt"] + tree["d/a/b/c.txt"] + tree["d/a/z.txt"] + tree["d/a.txt"] + tree["d/b.txt"]
    got = b"".join(split_bytes_via_datasets(tmp_path / "c", name) for name in SPLITS)
    assert got == want
    assert split_bytes_via_datasets(tmp_path / "c", "test") == want[-1024:]
    assert read_manifest(tmp_path / "c")["source"]["n_files"] == 6


def test_files_never_reads_the_output_corpus_back_in(tmp_path, capsys, caplog):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_bytes(random_bytes(50_000))
    assert run_main(capsys, "files", tmp_path / "d", "--out", tmp_path / "d" / "corpus")[0] == 0
    code, err = run_main(capsys, "files", tmp_path / "d", "--out", tmp_path / "d" / "corpus")
    assert code == 0 and "already holds this corpus" in err
    assert f"skipped {tmp_path / 'd' / 'corpus'}: the output directory" in caplog.messages


def test_files_skips_older_corpora_inside_the_inputs_and_says_so(tmp_path, capsys, caplog):
    """`files D --out D/c2` next to an older corpus D/c1 reads only D's text, not D/c1's Arrow and JSON."""
    text = {"d/a.txt": random_bytes(20_000, seed=1), "d/sub/b.txt": random_bytes(20_000, seed=2)}
    for name, content in text.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    d = tmp_path / "d"
    prepare_files([d], d / "sub" / "c1")
    prepare_files([d], d / "c2")  # D/sub/c1 skipped
    code, err = run_main(capsys, "files", d, d / "sub" / "c1", "--out", d / "c3")
    assert code == 0
    want = text["d/a.txt"] + text["d/sub/b.txt"]
    for corpus in (d / "c2", d / "c3"):
        assert b"".join(split_bytes_via_datasets(corpus, name) for name in SPLITS) == want
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")]
    assert skipped == [f"skipped {d / 'sub' / 'c1'}: a sharnn corpus (manifest.json), not text",  # into c2
                       f"skipped {d / 'c2'}: a sharnn corpus (manifest.json), not text",  # into c3
                       f"skipped {d / 'sub' / 'c1'}: a sharnn corpus (manifest.json), not text",
                       f"skipped {d / 'sub' / 'c1'}: a sharnn corpus (manifest.json), not text"]  # named
    assert read_manifest(d / "c3")["source"]["skipped"] == [s[len("skipped "):] for s in skipped[1:]]


def test_demo_is_the_first_8_mib_of_the_stdlib_sources(tmp_path, capsys):
    files = demo_files()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = [f.relative_to(stdlib).parts for f in files]
    assert files and all(f.suffix == ".py" for f in files) and parts == sorted(parts)
    assert not any({"site-packages", "test", "tests"} & set(p) for p in parts)
    code, _ = run_main(capsys, "demo", "--out", tmp_path / "demo")
    assert code == 0
    manifest = read_manifest(tmp_path / "demo")
    want = b"".join(f.read_bytes() for f in files)[:prepare.DEMO_BYTES]
    assert manifest["total_bytes"] == len(want) == prepare.DEMO_BYTES  # this stdlib has more than 8 MiB
    assert b"".join(split_bytes_via_datasets(tmp_path / "demo", name) for name in SPLITS) == want
    assert manifest["source"]["kind"] == "demo"
    before = tree_digest(tmp_path / "demo")
    code, err = run_main(capsys, "demo", "--out", tmp_path / "demo")  # deterministic: the same corpus again
    assert code == 0 and "already holds this corpus" in err
    assert tree_digest(tmp_path / "demo") == before  # not rewritten


# --- bad input for files / output directories ---------------------------------------------------------------

def test_files_missing_path(tmp_path, capsys):
    (tmp_path / "a.txt").write_bytes(random_bytes(50_000))
    code, err = run_main(capsys, "files", tmp_path / "a.txt", tmp_path / "missing.txt", "--out",
                         tmp_path / "c")
    assert_failed_cleanly(code, err, tmp_path, ["a.txt"], "no such file or directory", "missing.txt")


def test_files_empty_input(tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "emptydir").mkdir()
    before = listing(tmp_path)
    empty_file, empty_dir = tmp_path / "empty.txt", tmp_path / "emptydir"
    for inputs in ([empty_file], [empty_dir], [empty_file, empty_dir]):
        code, err = run_main(capsys, "files", *inputs, "--out", tmp_path / "c")
        assert_failed_cleanly(code, err, tmp_path, before, "input is empty")


def test_files_splits_too_small(tmp_path, capsys):
    (tmp_path / "a.txt").write_bytes(random_bytes(10_000))
    before = listing(tmp_path)
    code, err = run_main(capsys, "files", tmp_path / "a.txt", "--out", tmp_path / "c")  # 5% = 500 bytes
    assert_failed_cleanly(code, err, tmp_path, before, "at least 1,024 bytes", "valid 500", "--valid_bytes")
    code, err = run_main(capsys, "files", tmp_path / "a.txt", "--out", tmp_path / "c", "--valid-bytes", 5000,
                         "--test-bytes", 5000)
    assert_failed_cleanly(code, err, tmp_path, before, "train 0")
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage error, exit code 2
        main(["files", str(tmp_path / "a.txt"), "--out", str(tmp_path / "c"), "--valid-bytes", "-5"])
    assert exit_info.value.code == 2
    assert "non-negative" in capsys.readouterr().err


def test_out_is_a_file(tmp_path, capsys):
    (tmp_path / "a.txt").write_bytes(random_bytes(50_000))
    (tmp_path / "out").write_bytes(b"precious")
    code, err = run_main(capsys, "files", tmp_path / "a.txt", "--out", tmp_path / "out", "--overwrite")
    assert_failed_cleanly(code, err, tmp_path, ["a.txt", "out"], "is a file")
    assert (tmp_path / "out").read_bytes() == b"precious"


def test_out_is_a_non_corpus_directory(tmp_path, capsys):
    (tmp_path / "a.txt").write_bytes(random_bytes(50_000))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_bytes(b"precious")
    for extra in ([], ["--overwrite"]):  # never deleted, not even with --overwrite
        code, err = run_main(capsys, "files", tmp_path / "a.txt", "--out", tmp_path / "out", *extra)
        assert_failed_cleanly(code, err, tmp_path, ["a.txt", "out"], "holds what is not a corpus")
        assert listing(tmp_path / "out") == ["notes.txt"]


def test_out_may_be_an_empty_directory_or_need_new_parents(tmp_path):
    (tmp_path / "a.txt").write_bytes(random_bytes(50_000))
    (tmp_path / "empty").mkdir()
    prepare_files([tmp_path / "a.txt"], tmp_path / "empty")
    prepare_files([tmp_path / "a.txt"], tmp_path / "new" / "deeper" / "c")
    for corpus in (tmp_path / "empty", tmp_path / "new" / "deeper" / "c"):
        assert listing(corpus) == ["manifest.json", "test", "train", "valid"]


def test_failure_removes_new_parent_directories(tmp_path, capsys):
    code, err = run_main(capsys, "files", tmp_path / "missing", "--out", tmp_path / "new" / "c")
    assert_failed_cleanly(code, err, tmp_path, [], "no such file")
    (tmp_path / "empty.txt").write_bytes(b"")
    code, err = run_main(capsys, "files", tmp_path / "empty.txt", "--out", tmp_path / "new" / "c")
    assert_failed_cleanly(code, err, tmp_path, ["empty.txt"], "empty")  # staging happened, then was undone


def test_existing_corpus_identical_different_and_overwrite(tmp_path, capsys):
    (tmp_path / "a.txt").write_bytes(random_bytes(50_000, seed=1))
    (tmp_path / "b.txt").write_bytes(random_bytes(50_000, seed=2))
    out = tmp_path / "c"
    assert run_main(capsys, "files", tmp_path / "a.txt", "--out", out)[0] == 0
    original = tree_digest(out)

    code, err = run_main(capsys, "files", tmp_path / "a.txt", "--out", out)  # identical: exit 0, untouched
    assert code == 0 and "already holds this corpus" in err
    assert tree_digest(out) == original

    code, err = run_main(capsys, "files", tmp_path / "b.txt", "--out", out)  # different: refused
    assert_failed_cleanly(code, err, tmp_path, ["a.txt", "b.txt", "c"], "different corpus", "--overwrite")
    assert tree_digest(out) == original

    code, err = run_main(capsys, "files", tmp_path / "b.txt", "--out", out, "--overwrite")  # replaced
    assert code == 0 and listing(tmp_path) == ["a.txt", "b.txt", "c"]
    replaced = b"".join(split_bytes_via_datasets(out, name) for name in SPLITS)
    assert replaced == (tmp_path / "b.txt").read_bytes()


@pytest.mark.parametrize("damage", ["drop n_bytes", "n_bytes text", "drop split", "splits list"])
def test_existing_corpus_with_a_damaged_manifest(tmp_path, capsys, damage):
    (tmp_path / "a.txt").write_bytes(random_bytes(50_000, seed=1))
    out = tmp_path / "c"
    prepare_files([tmp_path / "a.txt"], out)
    manifest = json.loads((out / "manifest.json").read_text())
    if damage == "drop n_bytes":
        del manifest["splits"]["valid"]["n_bytes"]
    elif damage == "n_bytes text":
        manifest["splits"]["valid"]["n_bytes"] = "2500"
    elif damage == "drop split":
        del manifest["splits"]["test"]
    else:
        manifest["splits"] = list(manifest["splits"].values())
    (out / "manifest.json").write_text(json.dumps(manifest))
    damaged = tree_digest(out)
    want = {"drop n_bytes": "split 'valid' has no n_bytes",
            "n_bytes text": "split 'valid' has n_bytes '2500'", "drop split": "no entry for split 'test'",
            "splits list": "'splits' is list"}[damage]
    code, err = run_main(capsys, "files", tmp_path / "a.txt", "--out", out)
    assert_failed_cleanly(code, err, tmp_path, ["a.txt", "c"], "manifest.json is damaged", want,
                          "--overwrite")
    assert tree_digest(out) == damaged
    code, err = run_main(capsys, "files", tmp_path / "a.txt", "--out", out, "--overwrite")
    assert code == 0 and read_manifest(out)["splits"]["valid"]["n_bytes"] == 2_500


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_write_leaves_nothing_behind(tmp_path, capsys, monkeypatch, existing):
    (tmp_path / "a.txt").write_bytes(random_bytes(50_000, seed=1))
    (tmp_path / "b.txt").write_bytes(random_bytes(50_000, seed=2))
    out = tmp_path / "c"
    if existing:
        prepare_files([tmp_path / "a.txt"], out)
    before, original = listing(tmp_path), tree_digest(out) if existing else None
    from sharnn.corpus import writer

    real_write_split = writer.write_split
    calls = []

    def write_then_interrupt(*args, **kwargs):
        calls.append(real_write_split(*args, **kwargs))
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(writer, "write_split", write_then_interrupt)
    code, err = run_main(capsys, "files", tmp_path / "b.txt", "--out", out, "--overwrite")
    assert code == 130 and len(calls) == 2
    assert_failed_cleanly(1, err, tmp_path, before, "interrupted")
    if existing:
        assert tree_digest(out) == original  # the old corpus is intact
