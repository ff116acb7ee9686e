"""The corpus writer shared by every source (sharnn.corpus.prepare: files, archives, the demo;
sharnn.corpus.hf: any `datasets` dataset): split sizes, the splits as `datasets` rows, the manifest with
sha256, an atomic rename into place, and the checks of an existing output."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.metadata
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import datasets
import numpy as np
import pyarrow as pa
from datasets.table import InMemoryTable
from tqdm import tqdm

from sharnn.corpus.data import (
    BYTES_COLUMN,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SPLITS,
    open_split,
)
from sharnn.io import atomic

log = logging.getLogger(__name__)


ROW_BYTES = 64 * 1024
"""Bytes per dataset row. 64 KiB keeps the row count small (about 1,500 rows for enwik8) and a row a handy
unit to look at, while reads go through whole Arrow record batches anyway (see
``sharnn.corpus.data.ByteSplit``)."""


_MAX_ARROW_CHUNK_BYTES = 256 * 2**20  # per array handed to datasets; binary arrays have int32 offsets


MIN_SPLIT_BYTES = 1024
"""Every split must hold at least this many bytes."""


DEFAULT_HELD_OUT_FRACTION = 0.05
"""Default valid and test share of ``files``/``demo`` corpora, as enwik8's 5M / 5M of 100M."""


_SOURCE_FILE = "_source.bin"  # scratch file inside the staging directory, removed before the rename


class PrepareError(Exception):
    """Bad input: the message says what is wrong and what to do. ``main`` prints it as ``error: ...``."""


@dataclass
class PrepareResult:
    """What a ``prepare_*`` call did."""

    out: Path
    manifest: dict
    unchanged: bool
    """True when ``out`` already held the identical corpus and nothing was written."""


def _tool_version() -> str:
    try:
        return importlib.metadata.version("sharnn")
    except importlib.metadata.PackageNotFoundError:  # running from a checkout that was not pip-installed
        import sharnn
        return getattr(sharnn, "__version__", "unknown")


def check_split_sizes(total: int, sizes: tuple[int, int, int]) -> None:
    if sizes[0] < 0:  # the held-out splits are cut from the input: they asked for more than there is
        raise PrepareError(
            f"the input has {total:,} bytes, but valid {sizes[1]:,} and test {sizes[2]:,} bytes are to be "
            f"held out of it: {sizes[1] + sizes[2]:,} bytes, more than the {total:,} there are, and train "
            f"needs at least {MIN_SPLIT_BYTES:,} more. Give more input or smaller --valid_bytes / "
            "--test_bytes.")
    small = [f"{name} {n:,}" for name, n in zip(SPLITS, sizes) if n < MIN_SPLIT_BYTES]
    if small:
        raise PrepareError(
            f"the input has {total:,} bytes, which gives splits train {sizes[0]:,} / valid {sizes[1]:,} / "
            f"test {sizes[2]:,} bytes, but every split needs at least {MIN_SPLIT_BYTES:,} bytes (too small: "
            f"{', '.join(small)}). Give more input or smaller --valid_bytes / --test_bytes.")


def _sha256(data: np.ndarray, desc: str = "") -> str:
    h = hashlib.sha256()
    with tqdm(total=len(data), unit="B", unit_scale=True, desc=desc or "sha256", disable=None,
              leave=False) as bar:
        for pos in range(0, len(data), 64 * 2**20):
            block = data[pos:pos + 64 * 2**20]
            h.update(memoryview(block))
            bar.update(len(block))
    return h.hexdigest()


def _rows_table(data: np.ndarray, row_bytes: int) -> pa.Table:
    """A one-column binary table over ``data`` (zero-copy): rows of ``row_bytes``, the last one shorter."""
    n_rows = -(-len(data) // row_bytes)
    rows_per_chunk = max(1, _MAX_ARROW_CHUNK_BYTES // row_bytes)
    chunks = []
    for row0 in range(0, n_rows, rows_per_chunk):
        row1 = min(n_rows, row0 + rows_per_chunk)
        byte0, byte1 = row0 * row_bytes, min(len(data), row1 * row_bytes)
        offsets = np.minimum(np.arange(row0, row1 + 1, dtype=np.int64) * row_bytes, byte1) - byte0
        chunks.append(pa.Array.from_buffers(pa.binary(), row1 - row0,
                                            [None, pa.py_buffer(offsets.astype(np.int32)),
                                             pa.py_buffer(data[byte0:byte1])]))
    return pa.table({BYTES_COLUMN: pa.chunked_array(chunks, type=pa.binary())})


def write_split(data: np.ndarray, path: Path, sha256: str, row_bytes: int = ROW_BYTES) -> dict:
    """Save ``data`` (1-D uint8, may be a memmap) as a ``datasets.Dataset`` at ``path``.

    ``sha256`` is the digest of ``data``; it doubles as the dataset fingerprint, which spares ``datasets``
    from hashing the whole table itself. Returns the split's manifest entry.
    """
    features = datasets.Features({BYTES_COLUMN: datasets.Value("binary")})
    info = datasets.DatasetInfo(description="sharnn byte corpus split: the rows of column 'bytes', "
                                            "concatenated in order, are the split's bytes", features=features)
    ds = datasets.Dataset(InMemoryTable(_rows_table(data, row_bytes)), info=info, fingerprint=sha256[:32])
    # datasets' own progress bar only on a terminal, like ours (tqdm disable=None).
    quiet = not sys.stderr.isatty() and not datasets.utils.are_progress_bars_disabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        ds.save_to_disk(str(path))
    finally:
        if quiet:
            datasets.enable_progress_bars()
    return {"n_bytes": int(len(data)), "n_rows": len(ds), "sha256": sha256}


def check_out(out: Path) -> dict | None:
    """Refuse output paths we must not write to (the rule every command follows,
    sharnn.io.atomic.check_output: no link, root, mount point, current or home directory, nor anything that is
    not a corpus); return the manifest if ``out`` already holds a corpus."""
    try:
        atomic.check_output(out, "--out", kind="dir", what="corpus", is_ours=is_corpus_dir)
    except atomic.OutputRefused as e:
        raise PrepareError(str(e)) from None
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out} is a file, not a directory; choose a directory path (it is created)")
    if not out.is_dir() or not any(out.iterdir()):
        return None
    with contextlib.suppress(OSError, UnicodeDecodeError, json.JSONDecodeError):
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        if isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME:
            return manifest  # a corpus, possibly of another format version: replaceable with --overwrite
    raise PrepareError(f"--out {out} is a non-empty directory that is not a sharnn corpus (no "
                       f"{MANIFEST_NAME}); refusing to write into it. Choose a new or empty directory.")


def manifest_problem(manifest: dict) -> str | None:
    """What is wrong with a corpus manifest's split entries (each needs a whole ``n_bytes`` and a ``sha256``
    string), or None."""
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        return f"its 'splits' is {type(splits).__name__}, not a mapping of split entries"
    for name in SPLITS:
        entry = splits.get(name)
        if not isinstance(entry, dict):
            return f"it has no entry for split {name!r}"
        n_bytes = entry.get("n_bytes")
        if not isinstance(n_bytes, int) or isinstance(n_bytes, bool) or n_bytes < 0:
            return (f"split {name!r} has no n_bytes" if n_bytes is None
                    else f"split {name!r} has n_bytes {n_bytes!r}, not a byte count")
        if not isinstance(entry.get("sha256"), str):
            return f"split {name!r} has no sha256"
    return None


def _same_corpus(manifest: dict, splits: dict) -> bool:
    old = manifest.get("splits", {})
    return manifest.get("format_version") == FORMAT_VERSION and set(old) == set(splits) and all(
        old[name].get("sha256") == new["sha256"] and old[name].get("n_bytes") == new["n_bytes"]
        for name, new in splits.items())


def write_corpus(tmp: Path, out: Path, data: np.ndarray, sizes: tuple[int, int, int], source: dict,
                 existing: dict | None, overwrite: bool, row_bytes: int = ROW_BYTES) -> PrepareResult:
    """Write ``data`` cut into (train, valid, test) ``sizes`` in staging dir ``tmp``, then move it to ``out``
    (``write_corpus_parts`` does the work)."""
    if sum(sizes) != len(data):
        raise ValueError(f"split sizes {sizes} do not add up to the {len(data)} bytes of data")
    check_split_sizes(len(data), sizes)
    bounds = np.cumsum((0,) + tuple(sizes))
    parts = {name: data[bounds[k]:bounds[k + 1]] for k, name in enumerate(SPLITS)}
    return write_corpus_parts(tmp, out, parts, source, existing, overwrite, row_bytes)


def write_corpus_parts(tmp: Path, out: Path, parts: dict[str, np.ndarray], source: dict,
                       existing: dict | None, overwrite: bool, row_bytes: int = ROW_BYTES,
                       scratch: Sequence[str] = (_SOURCE_FILE,)) -> PrepareResult:
    """Write each split's bytes (``parts``: train, valid, test; 1-D uint8, may be memory maps) in staging dir
    ``tmp``, then move it to ``out``.

    ``existing`` is the manifest already at ``out`` (from ``check_out``): an identical corpus is left alone
    (unless ``overwrite``), a different or damaged one is replaced only with ``overwrite``. Every split is
    read back and compared with the source's sha256 before the rename. The ``scratch`` files in ``tmp`` are
    removed before the rename.
    """
    total = sum(len(parts[name]) for name in SPLITS)
    check_split_sizes(total, tuple(len(parts[name]) for name in SPLITS))
    digests = {name: _sha256(parts[name], f"sha256 {name}") for name in SPLITS}
    if existing is not None and (problem := manifest_problem(existing)) is not None:
        if not overwrite:
            raise PrepareError(f"--out {out} holds a sharnn corpus whose {MANIFEST_NAME} is damaged "
                               f"({problem}); pass --overwrite to replace it, or choose another --out.")
    elif existing is not None:
        same = _same_corpus(existing, {n: {"sha256": digests[n], "n_bytes": len(parts[n])} for n in SPLITS})
        if same and not overwrite:
            return PrepareResult(out=out, manifest=existing, unchanged=True)
        if not same and not overwrite:
            old_source = existing.get("source")
            source_kind = old_source.get("kind", "?") if isinstance(old_source, dict) else "?"
            raise PrepareError(f"--out {out} already holds a different corpus (source: {source_kind}); pass "
                               f"--overwrite to replace it, or choose another --out.")
    splits = {}
    for name in SPLITS:
        part = parts[name]
        log.info("writing %s: %s bytes", name, f"{len(part):,}")
        splits[name] = write_split(part, tmp / name, digests[name], row_bytes)
    for name in scratch:
        (tmp / name).unlink(missing_ok=True)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tool": "sharnn-prepare",
        "tool_version": _tool_version(),
        "datasets_version": datasets.__version__,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "total_bytes": int(total),
        "layout": {"column": BYTES_COLUMN, "dtype": "binary", "row_bytes": row_bytes,
                   "contract": "each split's rows, concatenated in order, are exactly that split's bytes; "
                               "the last row may be shorter"},
        "splits": splits,
    }
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    _check_written(tmp, manifest)
    atomic.replace_dir(tmp, out)
    return PrepareResult(out=out, manifest=manifest, unchanged=False)


def _check_written(corpus_dir: Path, manifest: dict) -> None:
    for name, info in manifest["splits"].items():
        if open_split(corpus_dir, name).sha256() != info["sha256"]:
            raise PrepareError(f"internal error: split {name!r} read back from {corpus_dir} does not match "
                               f"its source bytes; please report this")


def is_corpus_dir(path: Path) -> bool:
    """True when ``path`` holds a sharnn corpus manifest (of any format version, damaged entries or not)."""
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME


def map_file(path: Path) -> np.ndarray:
    """Read-only memory map of a whole file as uint8 (the page cache holds it, not this process)."""
    return np.memmap(path, dtype=np.uint8, mode="r")


SEPARATOR_HINT = ("give characters, or escapes of whole characters such as '\\n' or '\\u00e9' (a lone "
                  "surrogate such as '\\ud800', or a byte that is not UTF-8, is no character)")
