"""sharnn-prepare: turn raw bytes into a prepared corpus directory, which ``sharnn.corpus.data.open_split``
maps.

    sharnn-prepare enwik8 [--zip PATH] --out DIR   standard enwik8 split: 90M / 5M / 5M bytes
    sharnn-prepare files PATH... --out DIR         files/directories, concatenated; last bytes: valid, test
    sharnn-prepare demo --out DIR                  the first 8 MiB of the Python standard library's *.py files

Layout of the output (see ``sharnn/corpus/data.py``): ``DIR/{train,valid,test}`` each hold one
``datasets.Dataset``
saved with ``save_to_disk``, one ``bytes`` column of type binary holding rows of ``ROW_BYTES`` bytes (the last
row of a split may be shorter), so each split's rows concatenated in order are exactly that split's bytes:

    >>> ds = datasets.load_from_disk("DIR/valid"); b"".join(ds["bytes"])[:100]

``DIR/manifest.json`` records the source, each split's byte count and sha256, the row layout and the versions.
A corpus is written into a temporary sibling directory and renamed into place at the end, so a failure or an
interrupt leaves nothing half-written behind.
"""

from __future__ import annotations

import argparse
import decimal
import hashlib
import http.client
import logging
import os
import platform
import re
import sys
import sysconfig
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from sharnn import cli
from sharnn.corpus.data import (
    MANIFEST_NAME,
    CorpusError,
)
from sharnn.corpus.hf import HFSource, prepare_hf
from sharnn.corpus.writer import (
    _SOURCE_FILE,
    DEFAULT_HELD_OUT_FRACTION,
    ROW_BYTES,
    SEPARATOR_HINT,
    PrepareError,
    PrepareResult,
    _sha256,
    check_out,
    check_split_sizes,
    is_corpus_dir,
    map_file,
    write_corpus,
    write_corpus_parts,
)
from sharnn.io import atomic, signals

log = logging.getLogger(__name__)

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_URL_ENV = "SHARNN_ENWIK8_URL"
"""Environment variable that overrides the download address (a mirror, or a local server in tests)."""
ENWIK8_MEMBER = "enwik8"
ENWIK8_BYTES = 100_000_000
ENWIK8_ZIP_BYTES = 36_445_475
# sha256 of enwik8.zip and of the extracted enwik8 as published by several independent projects (download
# scripts and benchmark READMEs that pin them). The archive digest is only checked on download: mirrors may
# re-pack the zip; the extracted bytes are what must match.
ENWIK8_ZIP_SHA256 = "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc"
ENWIK8_SHA256 = "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"

DEMO_BYTES = 8 * 2**20
"""The demo corpus is the first 8 MiB of the concatenated standard-library sources."""
_COPY_BLOCK = 16 * 2**20








# ----------------------------------------------------------------------------------------------------
# Split rules


def enwik8_split_sizes(total: int) -> tuple[int, int, int]:
    """(train, valid, test) byte counts for enwik8's rule: the last 5% is test, the 5% before it valid.

    For the real file (100,000,000 bytes) this is the standard 90,000,000 / 5,000,000 / 5,000,000; smaller
    stand-ins scale down the same way.
    """
    held_out = total // 20
    return total - 2 * held_out, held_out, held_out


def held_out_split_sizes(total: int, valid_bytes: int | None = None,
                         test_bytes: int | None = None) -> tuple[int, int, int]:
    """(train, valid, test) byte counts for ``files``: the last ``test_bytes`` are test, the ``valid_bytes``
    before them valid (default 5% each, as enwik8), the rest train.

    Raises ``PrepareError`` if a split gets fewer than ``MIN_SPLIT_BYTES``.
    """
    default_held_out = int(total * DEFAULT_HELD_OUT_FRACTION)
    valid = default_held_out if valid_bytes is None else valid_bytes
    test = default_held_out if test_bytes is None else test_bytes
    sizes = (total - valid - test, valid, test)
    check_split_sizes(total, sizes)
    return sizes




# ----------------------------------------------------------------------------------------------------
# Writing




















# ----------------------------------------------------------------------------------------------------
# Sources




@dataclass
class InputFiles:
    """What ``collect_files`` found: the files to read, in order, and the directories it left out."""

    files: list[Path]
    skipped: list[str]
    """One line per directory not read, naming it and why (a sharnn corpus, the output directory)."""


def collect_files(paths: Sequence[str | Path], out: Path | None = None) -> InputFiles:
    """Regular files named by ``paths``, in the given order.

    A directory expands to all files below it (hidden ones included), sorted by path components as ``sorted``
    sorts ``Path`` objects: ``a/b/c``, ``a/z``, ``a.txt``. Left out: directories that hold a sharnn corpus
    (its Arrow and JSON files are not text; an input named on the command line included) and ``out``, the
    corpus being written.
    """
    out_resolved = out.resolve() if out is not None else None
    files: list[Path] = []
    skipped: list[str] = []

    def leave_out(directory: Path) -> bool:
        if out_resolved is not None and directory.resolve() == out_resolved:
            skipped.append(f"{directory}: the output directory")
            return True
        if is_corpus_dir(directory):
            skipped.append(f"{directory}: a sharnn corpus ({MANIFEST_NAME}), not text")
            return True
        return False

    for raw in paths:
        path = Path(raw)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            if leave_out(path):
                continue
            found = []
            for parent, dirnames, filenames in os.walk(path, followlinks=True):
                dirnames[:] = [d for d in dirnames if not leave_out(Path(parent, d))]  # prune
                found.extend(Path(parent, f) for f in filenames)
            files.extend(sorted(p for p in found if p.is_file()))
        elif not path.exists():
            raise PrepareError(f"no such file or directory: {path}")
        else:
            raise PrepareError(f"{path} is neither a regular file nor a directory")
    return InputFiles(files, skipped)


def _concat_files(files: Sequence[Path], dest: Path, max_bytes: int | None = None) -> int:
    """Concatenate ``files`` into ``dest`` (at most ``max_bytes``); returns the byte count written."""
    total = 0
    limit = max_bytes if max_bytes is not None else float("inf")
    with open(dest, "wb") as out, tqdm(unit="B", unit_scale=True, desc="reading files", disable=None,
                                       leave=False) as bar:
        for path in files:
            if total >= limit:
                break
            with open(path, "rb") as f:
                while total < limit:
                    block = f.read(int(min(_COPY_BLOCK, limit - total)))
                    if not block:
                        break
                    out.write(block)
                    total += len(block)
                    bar.update(len(block))
    return total




def _prepare_from_files(files: Sequence[Path], out: Path, source: dict, overwrite: bool,
                        valid_bytes: int | None, test_bytes: int | None, max_bytes: int | None,
                        row_bytes: int = ROW_BYTES) -> PrepareResult:
    existing = check_out(out)
    # An --out inside an input directory must not feed its previous corpus back in (collect_files prunes it;
    # this also catches a file named directly).
    files = [f for f in files if not f.resolve().is_relative_to(out.resolve())]
    with atomic.staging_dir(out) as tmp:
        n_bytes = _concat_files(files, tmp / _SOURCE_FILE, max_bytes)
        if n_bytes == 0:
            raise PrepareError(f"the input is empty: {len(files)} file(s), 0 bytes. Pass files that hold "
                               f"data.")
        data = map_file(tmp / _SOURCE_FILE)
        sizes = held_out_split_sizes(n_bytes, valid_bytes, test_bytes)
        source = dict(source, n_files=len(files), n_bytes=n_bytes)
        return write_corpus(tmp, out, data, sizes, source, existing, overwrite, row_bytes)


def prepare_files(paths: Sequence[str | Path], out: str | Path, valid_bytes: int | None = None,
                  test_bytes: int | None = None, overwrite: bool = False,
                  row_bytes: int = ROW_BYTES) -> PrepareResult:
    """Prepare a corpus from local files/directories (see ``collect_files``), bytes concatenated in order.

    ``row_bytes`` only changes how the bytes are cut into dataset rows (tests use small rows for many chunks).
    """
    inputs = collect_files(paths, out=Path(out))
    for line in inputs.skipped:
        log.warning("skipped %s", line)
    source = {"kind": "files", "inputs": [str(Path(p).absolute()) for p in paths]}
    if inputs.skipped:
        source["skipped"] = inputs.skipped
    return _prepare_from_files(inputs.files, Path(out), source, overwrite, valid_bytes, test_bytes, None,
                               row_bytes)


def demo_files() -> list[Path]:
    """The standard library's ``*.py`` files, sorted by path, without site-packages and test directories."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    found = []
    for parent, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = [d for d in dirnames if d not in skip]  # prune: site-packages can be large
        found.extend(Path(parent, f) for f in filenames if f.endswith(".py"))
    return sorted(p for p in found if p.is_file())


def prepare_demo(out: str | Path, overwrite: bool = False, max_bytes: int = DEMO_BYTES) -> PrepareResult:
    """Prepare the demo corpus: the first ``max_bytes`` of this Python's standard-library sources."""
    files = demo_files()
    source = {"kind": "demo", "python": platform.python_version(), "stdlib": sysconfig.get_paths()["stdlib"],
              "max_bytes": max_bytes}
    return _prepare_from_files(files, Path(out), source, overwrite, None, None, max_bytes)


@dataclass(frozen=True)
class ArchiveCorpus:
    """A standard corpus published as one file inside a zip archive (enwik8, text8), split 90% / 5% / 5%."""

    name: str
    url: str
    """The official download address (``--url`` or ``url_env`` override it: a mirror, a local server)."""
    url_env: str
    member: str
    """The archive member holding the corpus, also the name of the extracted file."""
    n_bytes: int
    sha256: str | None
    """Of the extracted bytes, when pinned."""
    zip_bytes: int | None = None
    zip_sha256: str | None = None
    allowed_bytes: bytes | None = None
    """When set, the only byte values the corpus may hold (text8: a-z and space)."""


ENWIK8 = ArchiveCorpus("enwik8", ENWIK8_URL, ENWIK8_URL_ENV, ENWIK8_MEMBER, ENWIK8_BYTES, ENWIK8_SHA256,
                       ENWIK8_ZIP_BYTES, ENWIK8_ZIP_SHA256)
TEXT8 = ArchiveCorpus("text8", "http://mattmahoney.net/dc/text8.zip", "SHARNN_TEXT8_URL", "text8",
                      100_000_000, None, allowed_bytes=b" abcdefghijklmnopqrstuvwxyz")
"""text8: the first 10^8 bytes of enwik9 reduced to lowercase letters and single spaces (Mahoney). Its digest
is not pinned here (no source this code could check it against offline); its size and alphabet are checked."""


def download(url: str, dest: Path, timeout: float, corpus: ArchiveCorpus | str = ENWIK8,
             official_url: str | None = None) -> None:
    """Fetch ``url`` into ``dest``; network failures become a ``PrepareError`` that says to use ``--zip``."""
    name = corpus.name if isinstance(corpus, ArchiveCorpus) else corpus
    official_url = official_url or (corpus.url if isinstance(corpus, ArchiveCorpus) else url)
    log.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as f:
            length = response.headers.get("Content-Length")
            with tqdm(total=int(length) if length else None, unit="B", unit_scale=True, desc="download",
                      disable=None, leave=False) as bar:
                while block := response.read(2**20):
                    f.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise PrepareError(f"could not download {name} from {url} ({reason}). This machine may be offline or "
                           f"the site unreachable: download {official_url} elsewhere, copy it here and pass "
                           f"--zip PATH.")


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _extract_member(zip_path: Path, member_name: str, dest: Path, expected_bytes: int | None,
                    corpus_name: str, official_url: str) -> None:
    """Extract ``member_name`` of ``zip_path`` into ``dest`` (zipfile checks its CRC-32 while reading)."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            try:
                member = archive.getinfo(member_name)
            except KeyError:
                names = archive.namelist()
                raise PrepareError(f"{zip_path} has no member {member_name!r} (it has: "
                                   f"{', '.join(names[:5]) or 'nothing'}{' ...' if len(names) > 5 else ''}); "
                                   f"pass the {Path(official_url).name} from {official_url}")
            if expected_bytes is not None and member.file_size != expected_bytes:
                raise PrepareError(f"member {member_name!r} of {zip_path} has {member.file_size:,} bytes, "
                                   f"expected {expected_bytes:,}; this is not {corpus_name}: pass the "
                                   f"{Path(official_url).name} from {official_url}")
            with archive.open(member) as src, open(dest, "wb") as f, \
                    tqdm(total=member.file_size, unit="B", unit_scale=True, desc="unzip", disable=None,
                         leave=False) as bar:
                while block := src.read(_COPY_BLOCK):
                    f.write(block)
                    bar.update(len(block))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error) as e:
        raise PrepareError(f"{zip_path} is a corrupt or truncated zip archive ({e}); download {official_url} "
                           f"again and pass it with --zip")


def _check_alphabet(data: np.ndarray, corpus: ArchiveCorpus, path: Path) -> None:
    counts = np.zeros(256, dtype=np.int64)
    for pos in range(0, len(data), _COPY_BLOCK):
        counts += np.bincount(data[pos:pos + _COPY_BLOCK], minlength=256)
    allowed = np.zeros(256, dtype=bool)
    allowed[list(corpus.allowed_bytes)] = True
    other = np.flatnonzero(counts * ~allowed)
    if len(other):
        shown = ", ".join(repr(bytes([b]))[1:] for b in other[:8])
        raise PrepareError(f"the {corpus.name} bytes from {path} hold {int(counts[other].sum()):,} bytes "
                           f"outside its alphabet {corpus.allowed_bytes.decode()!r} ({shown}"
                           f"{' ...' if len(other) > 8 else ''}); this is not {corpus.name}: pass the "
                           f"{Path(corpus.url).name} from {corpus.url}")


def prepare_archive_corpus(corpus: ArchiveCorpus, out: str | Path, path: str | Path | None = None,
                           url: str | None = None, overwrite: bool = False, timeout: float = 60.0,
                           expected_bytes: int | None = None,
                           expected_sha256: str | None = "pinned") -> PrepareResult:
    """Prepare ``corpus`` (enwik8, text8) with the standard split (``enwik8_split_sizes``: 90% / 5% / 5%).

    ``path`` is the zip archive or the raw extracted file; without it the archive is downloaded from ``url``
    (default ``$corpus.url_env`` or ``corpus.url``) and, where pinned, its size and sha256 are checked. Always
    checked: the extracted bytes number ``expected_bytes`` (default ``corpus.n_bytes``), hash to
    ``expected_sha256`` (default the pinned digest; None: not checked) and keep to the corpus's alphabet.
    ``expected_bytes``/``expected_sha256`` exist for stand-ins and tests.
    """
    out = Path(out)
    expected_bytes = corpus.n_bytes if expected_bytes is None else expected_bytes
    expected_sha256 = corpus.sha256 if expected_sha256 == "pinned" else expected_sha256
    archive_name = Path(corpus.url).name
    source: dict = {"kind": corpus.name}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise PrepareError(f"no such file: {path}; download {corpus.url} and pass its path with --zip")
        if not path.is_file():
            raise PrepareError(f"{path} is not a file; pass {archive_name} or the extracted {corpus.member} "
                               f"file with --zip")
        source["path"] = str(path.absolute())
    existing = check_out(out)
    with atomic.staging_dir(out) as tmp:
        if path is None:
            url = url or os.environ.get(corpus.url_env) or corpus.url
            path = tmp / archive_name
            download(url, path, timeout, corpus)
            size = path.stat().st_size
            if corpus.zip_bytes is not None and size != corpus.zip_bytes:
                raise PrepareError(f"the archive downloaded from {url} has {size:,} bytes, expected "
                                   f"{corpus.zip_bytes:,}; download {corpus.url} elsewhere and pass "
                                   f"--zip PATH")
            digest = _file_sha256(path)
            if corpus.zip_sha256 is not None and digest != corpus.zip_sha256:
                raise PrepareError(f"the archive downloaded from {url} has sha256 {digest}, expected "
                                   f"{corpus.zip_sha256}; download {corpus.url} elsewhere and pass "
                                   f"--zip PATH")
            source["url"] = url
        if zipfile.is_zipfile(path):
            raw = tmp / _SOURCE_FILE
            _extract_member(path, corpus.member, raw, expected_bytes, corpus.name, corpus.url)
            source["archive_sha256"] = _file_sha256(path)
        else:
            raw = path
            size = raw.stat().st_size
            if size != expected_bytes:
                raise PrepareError(f"{raw} is neither a readable zip archive (corrupt or truncated?) nor a "
                                   f"raw {corpus.name} file of {expected_bytes:,} bytes (it has {size:,}); "
                                   f"pass the {archive_name} from {corpus.url}")
        data = map_file(raw)
        digest = _sha256(data, f"sha256 {corpus.name}")
        if expected_sha256 is not None and digest != expected_sha256:
            raise PrepareError(f"the {corpus.name} bytes from {path} have sha256 {digest}, expected "
                               f"{expected_sha256}; this is not the standard {corpus.name}: pass the "
                               f"{archive_name} from {corpus.url} (or --no_checksum for a deliberate "
                               f"stand-in)")
        if corpus.allowed_bytes is not None:
            _check_alphabet(data, corpus, path)
        source.update(sha256=digest, n_bytes=len(data))
        return write_corpus(tmp, out, data, enwik8_split_sizes(len(data)), source, existing, overwrite)


def prepare_enwik8(out: str | Path, path: str | Path | None = None, url: str | None = None,
                   overwrite: bool = False, timeout: float = 60.0, expected_bytes: int = ENWIK8_BYTES,
                   expected_sha256: str | None = ENWIK8_SHA256) -> PrepareResult:
    """Prepare enwik8 with its standard split: 90,000,000 / 5,000,000 / 5,000,000 bytes.

    ``path`` is ``enwik8.zip`` or the raw extracted ``enwik8``; without it the archive is downloaded (see
    ``prepare_archive_corpus``: the archive's and the extracted bytes' size and sha256 are checked).
    """
    return prepare_archive_corpus(ENWIK8, out, path, url, overwrite, timeout, expected_bytes, expected_sha256)


def prepare_text8(out: str | Path, path: str | Path | None = None, url: str | None = None,
                  overwrite: bool = False, timeout: float = 60.0,
                  expected_bytes: int = TEXT8.n_bytes) -> PrepareResult:
    """Prepare text8 with its standard split: 90,000,000 / 5,000,000 / 5,000,000 bytes (as enwik8).

    ``path`` is ``text8.zip`` or the raw extracted ``text8``; without it ``TEXT8.url`` is downloaded. Checked:
    the size (``expected_bytes``, 10^8) and that every byte is a lowercase letter or a space.
    """
    return prepare_archive_corpus(TEXT8, out, path, url, overwrite, timeout, expected_bytes, None)


# wikitext-103 (raw, characters as published, no <unk>): Merity et al. 2016.
WIKITEXT103_URL = "https://wikitext.smerity.com/wikitext-103-raw-v1.zip"
WIKITEXT103_URL_ENV = "SHARNN_WIKITEXT103_URL"
WIKITEXT103_HUB_NAME = "Salesforce/wikitext"
WIKITEXT103_HUB_CONFIG = "wikitext-103-raw-v1"
WIKITEXT_FILES = {"train": "wiki.train.raw", "valid": "wiki.valid.raw", "test": "wiki.test.raw"}


def _find_wikitext_files(names: Sequence[str], where: str) -> dict[str, str]:
    """The one name ending in each of ``WIKITEXT_FILES``, at any depth (``wikitext-103-raw/wiki.*.raw``)."""
    found = {}
    for split, file_name in WIKITEXT_FILES.items():
        matches = [n for n in names if n == file_name or n.endswith("/" + file_name)]
        if len(matches) != 1:
            raise PrepareError(f"{where} has {'no' if not matches else len(matches)} {file_name} "
                               f"({', '.join(matches[:3])}); pass the directory or zip holding "
                               f"wikitext-103's {', '.join(WIKITEXT_FILES.values())} (the "
                               f"wikitext-103-raw-v1.zip from {WIKITEXT103_URL})")
        found[split] = matches[0]
    return found


def prepare_wikitext103(out: str | Path, path: str | Path | None = None, url: str | None = None,
                        overwrite: bool = False, timeout: float = 60.0) -> PrepareResult:
    """Prepare wikitext-103 (raw) with its standard splits: the bytes of ``wiki.train.raw``,
    ``wiki.valid.raw`` and ``wiki.test.raw``, each whole.

    ``path`` is a directory or a zip holding the three files (at any depth, as ``wikitext-103-raw-v1.zip``
    holds them under ``wikitext-103-raw/``); without it the zip is downloaded from ``url`` (default
    ``$SHARNN_WIKITEXT103_URL`` or ``WIKITEXT103_URL``). No digests are pinned: the manifest records them.
    For the Hub's copy of the dataset see ``prepare_wikitext103_hub``.
    """
    out = Path(out)
    source: dict = {"kind": "wikitext-103"}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise PrepareError(f"no such file or directory: {path}; download {WIKITEXT103_URL} and pass it "
                               f"(or the directory it unzips to) with --zip")
        source["path"] = str(path.absolute())
    existing = check_out(out)
    with atomic.staging_dir(out) as tmp:
        if path is None:
            url = url or os.environ.get(WIKITEXT103_URL_ENV) or WIKITEXT103_URL
            path = tmp / Path(WIKITEXT103_URL).name
            download(url, path, timeout, "wikitext-103", WIKITEXT103_URL)
            source["url"] = url
        scratch = []
        if path.is_dir():
            names = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
            files = {split: path / name for split, name in _find_wikitext_files(names, str(path)).items()}
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                members = _find_wikitext_files(archive.namelist(), str(path))
            files = {}
            for split, member in members.items():
                files[split] = tmp / f"_{split}.raw"
                scratch.append(files[split].name)
                _extract_member(path, member, files[split], None, "wikitext-103", WIKITEXT103_URL)
            source["archive_sha256"] = _file_sha256(path)
        else:
            raise PrepareError(f"{path} is neither a directory nor a readable zip archive (corrupt or "
                               f"truncated?); pass the wikitext-103-raw-v1.zip from {WIKITEXT103_URL} or the "
                               f"directory it unzips to")
        for split, file in files.items():
            if file.stat().st_size == 0:
                raise PrepareError(f"{file} is empty; pass wikitext-103's "
                                   f"{', '.join(WIKITEXT_FILES.values())}")
        parts = {split: map_file(file) for split, file in files.items()}
        source["files"] = {split: WIKITEXT_FILES[split] for split in files}
        return write_corpus_parts(tmp, out, parts, source, existing, overwrite, scratch=scratch)


def prepare_wikitext103_hub(out: str | Path, overwrite: bool = False,
                            name: str = WIKITEXT103_HUB_NAME) -> PrepareResult:
    """wikitext-103 (raw) from the Hub's ``Salesforce/wikitext``, config ``wikitext-103-raw-v1``: its
    train/validation/test splits, records (the raw files' lines, each with its newline) joined with nothing.

    Whether these join back to the raw files byte for byte depends on how the Hub's copy stores blank lines,
    which was not checked here (no network): prefer the raw zip (``prepare_wikitext103``) for numbers
    comparable with papers.
    ``name`` may name a mirror on the Hub (same config) or a local copy (a directory: its default config).
    """

    config = None if Path(name).is_dir() else WIKITEXT103_HUB_CONFIG
    return prepare_hf(HFSource(name=name, config=config, separator=""), out, overwrite=overwrite)


# ----------------------------------------------------------------------------------------------------
# Command line


_BYTE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_BYTE_COUNT = re.compile(r"(?P<number>\d[\d_]*(?:\.\d+)?)\s*(?P<unit>[kmgt]i?)?b?", re.IGNORECASE)


def parse_byte_count(text: str) -> int:
    """A byte count as people write it: ``5000000``, ``5_000_000``, ``5M``, ``5MB``, ``1.5K``, ``64KiB``.

    K, M, G, T are decimal (10^3, 10^6, 10^9, 10^12: enwik8's 90M / 5M / 5M), Ki, Mi, Gi, Ti binary
    (2^10 ...); letters in either case, an optional trailing B. Raises ``ValueError`` with a message for
    anything else, a negative number, or a fraction of a byte (``1.5`` or ``1.0001K``).
    """
    match = _BYTE_COUNT.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"expected a number of bytes such as 5000000, 5_000_000, 5M (10^6) or 64KiB (2^16), "
                         f"got {text!r}")
    value = decimal.Decimal(match["number"].replace("_", "")) * _BYTE_UNITS[(match["unit"] or "").lower()]
    if value != value.to_integral_value():
        raise ValueError(f"{text!r} is not a whole number of bytes ({value})")
    return int(value)


def _byte_count(text: str) -> int:
    """argparse type for ``parse_byte_count``."""
    if text.strip().startswith("-"):
        raise argparse.ArgumentTypeError(f"expected a non-negative number of bytes, got {text}")
    try:
        return parse_byte_count(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None




def _escaped_text(text: str) -> str:
    """argparse type: text with Python's backslash escapes (``\\n``, ``\\t``, ``\\x00``) resolved; it must be
    text UTF-8 can write (no lone surrogate: ``\\ud800``, or a byte of the command line that is not UTF-8)."""
    try:
        value = text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as e:
        raise argparse.ArgumentTypeError(f"bad backslash escape in {text!r} ({e.reason})") from None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} holds {value[e.start]!r}, a lone surrogate, which UTF-8 "
                                         f"cannot write: {SEPARATOR_HINT}") from None
    return value


def _add_held_out_sizes(parser: argparse.ArgumentParser, of_what: str) -> None:
    parser.add_argument(*cli.spellings("--valid_bytes"), type=_byte_count, default=None, metavar="N",
                        help="valid split size in bytes, e.g. 5M (= 5,000,000: K/M/G are decimal, "
                             f"KiB/MiB/GiB binary; default 5%% of {of_what})")
    parser.add_argument(*cli.spellings("--test_bytes"), type=_byte_count, default=None, metavar="N",
                        help="test split size in bytes, as --valid_bytes")


def _add_download_args(parser: argparse.ArgumentParser, what: str, url_env: str, url: str) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--zip", dest="path", type=Path, metavar="PATH",
                       help=f"local {what} (default: download it)")
    where.add_argument("--file", dest="path", type=Path, metavar="PATH", help="same as --zip")
    parser.add_argument("--url", default=None, help=f"download address when no --zip is given (default: "
                                                    f"${url_env} or {url})")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="download timeout in seconds (default 60)")


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="sharnn-prepare", description="Prepare a byte corpus (train/valid/test) for sharnn training.",
        epilog="Each subcommand writes DIR/{train,valid,test} (datasets saved with save_to_disk) and "
               "DIR/manifest.json. Run `sharnn-prepare COMMAND -h` for its options.")
    common = cli.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="corpus directory to create (must be new, empty, or hold a sharnn corpus)")
    common.add_argument("--overwrite", action="store_true",
                        help="replace a different corpus already in --out (never a non-corpus directory)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    enwik8 = sub.add_parser("enwik8", parents=[common], help="enwik8 with the standard 90M/5M/5M split",
                            description="enwik8 with the standard split: first 90,000,000 bytes train, "
                                        "next 5,000,000 valid, last 5,000,000 test. Checks the extracted "
                                        f"file's size ({ENWIK8_BYTES:,} bytes) and sha256; a download is "
                                        f"also checked for the archive's size ({ENWIK8_ZIP_BYTES:,} bytes) "
                                        "and sha256.")
    _add_download_args(enwik8, "enwik8.zip or extracted enwik8 file", ENWIK8_URL_ENV, ENWIK8_URL)
    enwik8.add_argument(*cli.spellings("--no_checksum"), action="store_true",
                        help="do not check the extracted file's sha256 (its size is still checked); for "
                             "stand-ins")

    text8 = sub.add_parser("text8", parents=[common], help="text8 with the standard 90M/5M/5M split",
                           description="text8 (enwik9's first 10^8 bytes as lowercase letters and spaces) "
                                       "with the standard split, as enwik8: first 90,000,000 bytes train, "
                                       "next 5,000,000 valid, last 5,000,000 test. Checks the extracted "
                                       f"file's size ({TEXT8.n_bytes:,} bytes) and alphabet (a-z and space).")
    _add_download_args(text8, "text8.zip or extracted text8 file", TEXT8.url_env, TEXT8.url)

    wikitext = sub.add_parser("wikitext-103", parents=[common],
                              help="wikitext-103 (raw) with its standard train/valid/test files",
                              description="wikitext-103 (raw): wiki.train.raw, wiki.valid.raw and "
                                          "wiki.test.raw become train, valid and test, byte for byte. From "
                                          "the wikitext-103-raw-v1.zip, the directory it unzips to, a "
                                          f"download, or with --hub the Hub's {WIKITEXT103_HUB_NAME} "
                                          f"({WIKITEXT103_HUB_CONFIG}; its lines joined with nothing, which "
                                          "may not reproduce the raw files' blank lines exactly).")
    _add_download_args(wikitext, "wikitext-103-raw-v1.zip or the directory it unzips to",
                       WIKITEXT103_URL_ENV, WIKITEXT103_URL)
    wikitext.add_argument("--hub", nargs="?", const=WIKITEXT103_HUB_NAME, default=None, metavar="NAME",
                          help=f"read the `datasets` copy instead (default {WIKITEXT103_HUB_NAME}, config "
                               f"{WIKITEXT103_HUB_CONFIG}; needs the network or the datasets cache)")

    files = sub.add_parser("files", parents=[common], help="any local files or directories, concatenated",
                           description="Concatenate files (directories recursively, sorted by path) in the "
                                       "given order; the last --test_bytes become test, the --valid_bytes "
                                       "before them valid, the rest train.")
    files.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or directories")
    _add_held_out_sizes(files, "the input")

    _add_hf_parser(sub, common)
    sub.add_parser("demo", parents=[common], help="built-in demo corpus: Python standard library sources",
                   description=f"The first {DEMO_BYTES // 2**20} MiB of this Python's standard-library *.py "
                               "files (sorted, no tests), split like `files`. Needs no download.")
    return parser


def _add_hf_parser(sub, common: cli.ArgumentParser) -> None:
    hf = sub.add_parser("hf", parents=[common], help="the text of any `datasets` dataset, streamed",
                        description="The text column(s) of a `datasets` dataset, UTF-8, records joined "
                                    "with --separator, read in bounded memory (streaming=True; a "
                                    "save_to_disk directory memory-mapped). NAME: a Hub dataset (needs the "
                                    "network or the datasets cache), a local directory (save_to_disk, or a "
                                    "folder of parquet/JSON lines/CSV/text files) or a builder with "
                                    "--data_files (`hf json --data_files a.jsonl`). The dataset's own "
                                    "validation and test splits are used when it has them; a missing one is "
                                    "cut from the end of --split's text, as `files` does.")
    hf.add_argument("name", metavar="NAME", help="Hub name, local directory, or builder (json, parquet, csv, "
                                                 "text) with --data_files")
    hf.add_argument("--config", default=None, help="the dataset's configuration (default: its default)")
    hf.add_argument("--split", default="train", help="the split that becomes train (default train)")
    hf.add_argument("--column", dest="columns", action="append", default=None, metavar="NAME",
                    help="text column, repeat for several (joined with the separator within a record); "
                         "default: text, or the only string column")
    hf.add_argument("--separator", type=_escaped_text, default="\n",
                    help="written between records, with backslash escapes: '\\n' (the default), "
                         "'\\n\\n', '' for none")
    hf.add_argument(*cli.spellings("--data_files"), action="append", default=None, metavar="FILE",
                    help="a data file (or glob) for a builder NAME; repeat for several")
    hf.add_argument("--revision", default=None, help="Hub revision: branch, tag or commit")
    hf.add_argument(*cli.spellings("--held_out_from_train"), action="store_true",
                    help="cut valid and test from the end of --split even when the dataset has its own")
    _add_held_out_sizes(hf, "--split's text; only for a split the dataset lacks")


@signals.command
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sharnn-prepare`` and ``python -m sharnn.corpus.prepare``; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "enwik8":
            result = prepare_enwik8(args.out, args.path, url=args.url, overwrite=args.overwrite,
                                    timeout=args.timeout,
                                    expected_sha256=None if args.no_checksum else ENWIK8_SHA256)
        elif args.command == "text8":
            result = prepare_text8(args.out, args.path, url=args.url, overwrite=args.overwrite,
                                   timeout=args.timeout)
        elif args.command == "wikitext-103" and args.hub is not None:
            if args.path is not None or args.url is not None:
                raise PrepareError("--hub reads the datasets copy: it takes no --zip/--file/--url; drop them")
            result = prepare_wikitext103_hub(args.out, overwrite=args.overwrite, name=args.hub)
        elif args.command == "wikitext-103":
            result = prepare_wikitext103(args.out, args.path, url=args.url, overwrite=args.overwrite,
                                         timeout=args.timeout)
        elif args.command == "hf":
            source = HFSource(name=args.name, config=args.config, split=args.split,
                              columns=tuple(args.columns or ()), separator=args.separator,
                              data_files=tuple(args.data_files or ()), revision=args.revision,
                              use_dataset_splits=not args.held_out_from_train)
            result = prepare_hf(source, args.out, valid_bytes=args.valid_bytes, test_bytes=args.test_bytes,
                                overwrite=args.overwrite)
        elif args.command == "files":
            result = prepare_files(args.paths, args.out, valid_bytes=args.valid_bytes,
                                   test_bytes=args.test_bytes, overwrite=args.overwrite)
        else:
            result = prepare_demo(args.out, overwrite=args.overwrite)
    except (PrepareError, CorpusError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except atomic.DiskFull as e:  # names the disk and the space needed; the temporary is gone
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e}; nothing was written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    sizes = ", ".join(f"{name} {info['n_bytes']:,}" for name, info in result.manifest["splits"].items())
    if result.unchanged:
        print(f"{result.out} already holds this corpus (identical sha256): {sizes} bytes; nothing to do",
              file=sys.stderr)
    else:
        print(f"wrote {result.out}: {sizes} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
