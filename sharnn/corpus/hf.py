"""sharnn-prepare hf: the text of any ``datasets`` dataset as a sharnn byte corpus, in bounded memory.

    sharnn-prepare hf NAME [--config C] [--split train] [--column text] [--separator '\\n'] --out DIR

NAME is a Hub dataset (``Salesforce/wikitext --config wikitext-103-raw-v1``; needs the network, or the
``datasets`` cache when offline), a local directory (a ``save_to_disk`` directory, or a folder of parquet /
JSON lines / CSV / text files, whose splits ``datasets`` infers from the file names), or a builder with its
files (``json --data_files a.jsonl``). Each record's text column(s) are encoded to UTF-8 and the records
joined with the separator (default a newline; several columns of one record are joined with it too).

Nothing is loaded whole: Hub names and data files are read with ``streaming=True``, a ``save_to_disk``
directory through ``load_from_disk(...).to_iterable_dataset()`` (memory-mapped), and the bytes go to a scratch
file in the staging directory, which ``sharnn.corpus.prepare.write_corpus`` cuts into the corpus splits
through a
memory map. Private memory stays at one batch of records (``BATCH_ROWS``) whatever the dataset's size
(tests/integration/test_prepare_hf.py prepares a dataset larger than its process's memory limit).

Splits: the dataset's ``--split`` (default ``train``) is the training text. A dataset's own validation and
test splits (named ``validation``/``valid``/``val``/``dev`` and ``test``) are used as they are; a held-out
split the dataset lacks, or both with ``--held_out_from_train``, is cut from the end of the training text:
the last ``--test_bytes`` are test, the ``--valid_bytes`` before them valid (default 5% each, as ``files``).

The manifest's ``source`` records what was read: ``name``, ``config``, ``revision`` (the Hub commit when
known), the splits used, the columns and separator, the record counts and a ``fingerprint`` per split:
``datasets``' own ``_fingerprint`` for a ``save_to_disk`` directory; for streamed files, which have none, the
sha256 of the data files' names and bytes when local, or of their names and origin (the Hub revision or the
server's etag) when remote (``fingerprint_kind`` says which).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

import datasets
import huggingface_hub
import numpy as np
import pyarrow as pa
from datasets.data_files import EmptyDatasetError
from datasets.exceptions import DatasetGenerationError, DatasetNotFoundError
from datasets.packaged_modules import _EXTENSION_TO_MODULE, _PACKAGED_DATASETS_MODULES
from tqdm import tqdm

from sharnn.corpus.writer import (
    DEFAULT_HELD_OUT_FRACTION,
    SEPARATOR_HINT,
    PrepareError,
    PrepareResult,
    check_out,
    check_split_sizes,
    map_file,
    write_corpus_parts,
)
from sharnn.io import atomic

BATCH_ROWS = 64
"""Records read per batch: the only text held in memory at a time."""
VALID_SPLIT_NAMES = ("validation", "valid", "val", "dev")
TEST_SPLIT_NAMES = ("test",)
DEFAULT_COLUMN = "text"
_STRING_TYPES = ("string", "large_string")
log = logging.getLogger(__name__)
_HINT = ("NAME is a Hub dataset (needs the network, or the datasets cache when offline), a local directory "
         "(save_to_disk, or a folder of parquet/JSON lines/CSV/text files) or a builder with --data_files "
         "(`hf json --data_files a.jsonl`)")


@dataclass(frozen=True)
class HFSource:
    """What ``prepare_hf`` reads: a dataset, its split(s), its text column(s) and how records are joined."""

    name: str
    """Hub name, local directory (``save_to_disk`` or data files), or a builder used with ``data_files``."""
    config: str | None = None
    """The dataset's configuration (``wikitext-103-raw-v1``); None: its default."""
    split: str = "train"
    """The split whose text is the training text."""
    columns: tuple[str, ...] = ()
    """Text columns, joined with ``separator`` within a record; empty: ``text``, or the only string column."""
    separator: str = "\n"
    """Written between records (and between the columns of one record)."""
    data_files: tuple[str, ...] = ()
    """Files for a builder (``json``, ``parquet``, ``csv``, ``text``), as ``load_dataset(data_files=...)``."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); None: the default branch."""
    use_dataset_splits: bool = True
    """Use the dataset's own validation/test splits when it has them (False: cut both from the training
    text)."""

    def __post_init__(self) -> None:
        repeated = sorted({c for c in self.columns if self.columns.count(c) > 1})
        if repeated:
            raise PrepareError(f"--column {repeated[0]} is given twice: every record's text would be written "
                               "twice; name each column once")
        try:
            self.separator.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PrepareError(f"--separator {self.separator!r} is not text UTF-8 can write "
                               f"({e.reason}): {SEPARATOR_HINT}") from None



@dataclass
class _Opened:
    """A dataset opened for streaming: its splits, and what identifies it for the manifest."""

    splits: dict[str, datasets.IterableDataset]
    identity: dict
    fingerprints: dict[str, str] = field(default_factory=dict)
    fingerprint_kind: str = ""


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """``datasets``' progress bars only on a terminal (as ``sharnn.corpus.prepare.write_split``), and none of
    its
    error logs: every failure reaches the user as one ``error:`` line from us instead."""
    quiet = not sys.stderr.isatty() and not datasets.utils.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    if quiet:
        datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if quiet:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _reading(split: str, source: HFSource) -> Iterator[None]:
    """Turns what reading a split's records raises into a ``PrepareError`` naming the split."""
    try:
        yield
    except KeyError as e:
        raise PrepareError(f"a record of split {split!r} of {source.name} has no column {e}; choose with "
                           f"--column NAME")
    except UnicodeEncodeError as e:
        raise PrepareError(f"split {split!r} of {source.name} holds text that is not valid Unicode ({e}); "
                           f"clean the dataset first")
    except (DatasetGenerationError, ValueError, OSError, pa.ArrowException) as e:
        raise PrepareError(f"reading split {split!r} of {source.name} failed ({_first_line(e)}); check that "
                           f"its files are complete and of the format their names say")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


HUB_CONNECT_TIMEOUT = 5.0
"""Seconds to wait for the Hub's endpoint to accept a connection before treating the machine as offline."""
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip")
_FORMAT_NAMES = {"json": "JSON", "csv": "CSV", "parquet": "Parquet", "arrow": "Arrow", "text": "text"}
_BINARY_BUILDERS = ("parquet", "arrow", "hdf5", "lance", "webdataset")
"""Builders of binary files: the `text` builder reads any other file as lines, but not these."""


def _is_builder(name: str) -> bool:
    """Whether NAME is one of `datasets`' packaged builders (json, csv, parquet, text...) rather than a local
    directory or a Hub dataset."""
    return name in _PACKAGED_DATASETS_MODULES and not os.path.isdir(name)


def _is_remote(pattern: str) -> bool:
    return "://" in pattern


def _file_format(path: str) -> tuple[str | None, str]:
    """The builder a data file's name says it is for (datasets' own table of extensions), else its first bytes
    (Parquet's magic number; JSON's opening brace or bracket); and which of the two told."""
    name = path.lower()
    for suffix in _COMPRESSION:
        if name.endswith(suffix):
            name = name[:-len(suffix)]
            break
    else:
        suffix = ""
    ext = os.path.splitext(name)[1]
    if ext in _EXTENSION_TO_MODULE:
        return _EXTENSION_TO_MODULE[ext][0], "its name"
    if suffix:  # compressed: its first bytes say nothing
        return None, ""
    with contextlib.suppress(OSError), open(path, "rb") as f:
        head = f.read(4096)
        if head.startswith(b"PAR1"):
            return "parquet", "its first bytes"
        if head.lstrip()[:1] in (b"{", b"["):
            return "json", "its first bytes"
    return None, ""


def _check_source(source: HFSource) -> None:
    """Refuse, before anything is read, what `datasets` would read silently wrong: a builder without files (it
    reads the current directory), files of another format than the builder's, a --revision of local data, a
    --data_files pattern that matches nothing, a revision written into NAME."""
    name = source.name
    if "@" in name and not os.path.exists(name) and not _is_builder(name):
        repo, _, revision = name.partition("@")
        raise PrepareError(f"{name}: a revision goes in --revision, not in NAME: `sharnn-prepare hf {repo} "
                           f"--revision {revision}`")
    builder = name if _is_builder(name) else None
    is_local = os.path.isdir(name) or builder is not None
    if builder is not None and not source.data_files:
        example = f"sharnn-prepare hf {name} --data_files a.{'jsonl' if name == 'json' else name}"
        raise PrepareError(f"{name} is a builder: give the files it reads with --data_files (`{example}`); "
                           f"without them `datasets` reads whatever {name} files lie in the current "
                           "directory")
    if source.revision is not None and is_local:
        raise PrepareError(f"--revision picks a version of a dataset on the Hub; {name} is local data "
                           f"({'a builder with --data_files' if builder else 'a directory'}), which has no "
                           "revisions: drop --revision")
    if not is_local:
        return
    for pattern in source.data_files:
        if _is_remote(pattern):
            continue
        where = pattern if builder or os.path.isabs(pattern) else os.path.join(name, pattern)
        files = sorted(f for f in glob.glob(where, recursive=True) if os.path.isfile(f))
        if not files:
            raise PrepareError(f"--data_files {pattern} matches no file"
                               + ("" if where == pattern else f" in {name}")
                               + "; check the path (a relative one starts in the current directory"
                               + ("" if builder else f", or in {name} for a directory NAME") + ")")
        for file in files if builder else ():
            found, told_by = _file_format(file)
            wrong = found is not None and found != builder and not (builder == "text" and found not in
                                                                    _BINARY_BUILDERS)
            if builder == "parquet" and found is None:
                wrong, told_by = True, "its first bytes"
            if wrong:
                what = _FORMAT_NAMES.get(found, found) if found else "not Parquet (no PAR1 magic number)"
                fix = (f"`sharnn-prepare hf {found} --data_files {file}`" if found else
                       "the builder of its format")
                raise PrepareError(f"--data_files {file} is {what} (by {told_by}), not {builder}: the "
                                   f"{builder} builder would read it as something it is not; pass its "
                                   f"builder, {fix}")


@contextlib.contextmanager
def _hub_or_cache(source: HFSource) -> Iterator[str | None]:
    """For a Hub dataset: when the Hub cannot be reached (a connection within HUB_CONNECT_TIMEOUT), read the
    `datasets` cache only (offline mode for this call), instead of retrying for half a minute; yields why the
    Hub was not reached (None: it was, or nothing is fetched from it)."""
    offline = datasets.config.HF_HUB_OFFLINE or huggingface_hub.constants.HF_HUB_OFFLINE
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                              "ALL_PROXY", "all_proxy"))
    local = os.path.isdir(source.name) or _is_builder(source.name)
    if offline or proxied or local:  # behind a proxy only the HTTP client knows the way
        yield None
        return
    url = urlsplit(huggingface_hub.constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=HUB_CONNECT_TIMEOUT).close()
    except OSError as e:
        why = f"{huggingface_hub.constants.ENDPOINT}: {e.strerror or e}"
    else:
        yield None
        return
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield why
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _is_save_to_disk_dir(path: Path) -> bool:
    return (path / datasets.config.DATASET_STATE_JSON_FILENAME).is_file() or \
        (path / datasets.config.DATASETDICT_JSON_FILENAME).is_file()


def _saved_data_files(state_json: Path) -> list:
    with contextlib.suppress(OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return json.loads(state_json.read_text()).get("_data_files") or []
    return [None]  # unreadable: let load_from_disk say what is wrong


def _open_saved(source: HFSource) -> _Opened:
    """A ``save_to_disk`` directory: memory-mapped, streamed through ``to_iterable_dataset``."""
    if source.config is not None or source.data_files or source.revision is not None:
        raise PrepareError(f"{source.name} is a save_to_disk directory: it has no --config, --data_files or "
                           f"--revision; drop them")
    states = sorted(Path(source.name).rglob(datasets.config.DATASET_STATE_JSON_FILENAME))
    empty = [str(state.parent) for state in states if not _saved_data_files(state)]
    if empty:
        # datasets saves an empty Dataset without data files and then cannot load it (an IndexError).
        raise PrepareError(f"the save_to_disk directory {source.name} holds an empty dataset (no records in "
                           f"{', '.join(empty)}); give a dataset with text")
    try:
        loaded = datasets.load_from_disk(source.name, keep_in_memory=False)
    except (FileNotFoundError, ValueError, OSError, pa.ArrowException) as e:
        raise PrepareError(f"cannot load the save_to_disk directory {source.name} ({_first_line(e)}); "
                           f"save it again with Dataset.save_to_disk")
    # A single Dataset is the training text, whatever its split was called.
    by_split = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {source.split: loaded}
    return _Opened(splits={name: ds.to_iterable_dataset() for name, ds in by_split.items()},
                   identity={"loader": "load_from_disk", "path": str(Path(source.name).absolute()),
                             "config": None, "revision": None},
                   fingerprints={name: ds._fingerprint for name, ds in by_split.items()},
                   fingerprint_kind="datasets _fingerprint of each split")


def _file_records(files: Sequence[str], origins: Sequence[tuple]) -> list[dict]:
    """What the manifest says of each data file: its path, size and sha256 when local; its address and origin
    (the Hub revision or the server's etag) when remote."""
    records = []
    for name, origin in zip(files, origins or [None] * len(files)):
        if os.path.isfile(name):
            with open(name, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            records.append({"path": str(name), "n_bytes": os.path.getsize(name), "sha256": digest})
        else:
            records.append({"path": str(name), "origin": repr(origin)})
    return records


def _files_fingerprint(records: Sequence[dict]) -> tuple[str, bool]:
    """sha256 over the data files' names and bytes (local files) or names and origin metadata (remote files);
    the flag says whether every file was local."""
    h = hashlib.sha256()
    all_local = True
    for record in records:
        h.update(os.path.basename(record["path"]).encode() + b"\0")
        if "sha256" in record:
            h.update(bytes.fromhex(record["sha256"]))
        else:
            all_local = False
            h.update(record["origin"].encode() + b"\0")
    return h.hexdigest(), all_local


def _open_streaming(source: HFSource) -> _Opened:
    """A Hub name, a folder of data files, or a builder with ``data_files``: ``streaming=True``."""
    if os.path.isfile(source.name):
        raise PrepareError(f"{source.name} is a file: pass its builder and the file, e.g. `sharnn-prepare hf "
                           f"json --data_files {source.name}` (or parquet, csv, text), or its directory")
    with _hub_or_cache(source) as unreachable:
        try:
            builder = datasets.load_dataset_builder(source.name, source.config, revision=source.revision,
                                                    data_files=list(source.data_files) or None)
            splits = builder.as_streaming_dataset()
        except (DatasetNotFoundError, EmptyDatasetError, FileNotFoundError, ConnectionError) as e:
            if unreachable:
                raise PrepareError(f"cannot reach the Hugging Face Hub ({unreachable}) and the datasets "
                                   f"cache holds no copy of {source.name!r}: connect this machine to the "
                                   "network (or check HF_ENDPOINT), or give a local directory or a builder "
                                   "with --data_files") from None
            if isinstance(e, ConnectionError):
                raise PrepareError(f"cannot reach dataset {source.name!r} on the Hub ({_first_line(e)}); "
                                   f"this machine may be offline: {_HINT}") from None
            raise PrepareError(f"dataset {source.name!r} not found ({_first_line(e)}). {_HINT}") from None
        except StopIteration:  # the json builder reads the first file to infer features: it was empty
            raise PrepareError(f"{source.name} holds no text (0 records in its first data file); give a "
                               f"dataset with text") from None
        except (ValueError, OSError, ImportError, NotImplementedError) as e:
            raise PrepareError(f"cannot load dataset {source.name!r} ({_first_line(e)}). {_HINT}") from None
    is_local = os.path.isdir(source.name) or source.name in _PACKAGED_DATASETS_MODULES
    identity = {"loader": "load_dataset(streaming=True)", "builder": builder.name,
                "config": builder.config.name,
                # For a Hub dataset, `datasets` passes the commit it resolved the revision to as the hash.
                "revision": None if is_local else builder.hash}
    if os.path.isdir(source.name):
        identity["path"] = str(Path(source.name).absolute())
    fingerprints, kinds, records = {}, set(), {}
    data_files = builder.config.data_files or {}
    for name, files in data_files.items():
        records[str(name)] = _file_records(list(files), getattr(files, "origin_metadata", []))
        fingerprints[str(name)], local = _files_fingerprint(records[str(name)])
        kinds.add("names and bytes" if local else "names and origin (Hub revision or etag)")
    identity["data_files"] = records
    return _Opened(splits={str(name): stream for name, stream in splits.items()}, identity=identity,
                   fingerprints=fingerprints,
                   fingerprint_kind=f"sha256 of the data files' {' / '.join(sorted(kinds)) or 'names'}")


def _choose_columns(source: HFSource, features: datasets.Features | None,
                    first: dict | None) -> tuple[str, ...]:
    """The text columns to read, checked against the split's features (or its first batch, when a streamed
    dataset does not know its features)."""
    if features is not None:
        types = {name: getattr(feature, "dtype", type(feature).__name__)
                 for name, feature in features.items()}
    else:
        types = {name: "string" if all(isinstance(v, (str, type(None))) for v in values) else "other"
                 for name, values in (first or {}).items()}
    text_columns = [name for name, dtype in types.items() if dtype in _STRING_TYPES]
    columns = source.columns
    if not columns:
        if DEFAULT_COLUMN in types:
            columns = (DEFAULT_COLUMN,)
        elif len(text_columns) == 1:
            columns = (text_columns[0],)
        else:
            raise PrepareError(f"split {source.split!r} of {source.name} has no column {DEFAULT_COLUMN!r} "
                               f"and {len(text_columns)} string columns "
                               f"({', '.join(text_columns) or 'none'}; all: {', '.join(types) or 'none'}); "
                               f"choose with --column NAME")
    for column in columns:
        if column not in types:
            raise PrepareError(f"split {source.split!r} of {source.name} has no column {column!r}; its "
                               f"columns are {', '.join(types) or 'none'} "
                               f"(string: {', '.join(text_columns) or 'none'}); choose with --column NAME")
        if types[column] not in _STRING_TYPES:
            raise PrepareError(f"column {column!r} of {source.name} holds {types[column]}, not text; choose "
                               f"a string column with --column ({', '.join(text_columns) or 'it has none'})")
    return tuple(columns)


def _write_split_text(stream: datasets.IterableDataset, split: str, source: HFSource,
                      columns: tuple[str, ...], out) -> tuple[int, int, int]:
    """Append the split's records, joined with the separator, to the open file ``out``; returns (records,
    bytes written, bytes of text: the records' own, separators not counted). Holds one batch of ``BATCH_ROWS``
    records at a time."""
    separator = source.separator.encode("utf-8")
    n_records = n_bytes = n_text = 0
    with _reading(split, source), \
            tqdm(unit="B", unit_scale=True, desc=f"reading {split}", disable=None, leave=False) as bar:
        for batch in stream.iter(batch_size=BATCH_ROWS):
            records = []
            for row in range(len(batch[columns[0]])):
                values = [batch[c][row] for c in columns]
                if any(not isinstance(v, (str, type(None))) for v in values):
                    bad = next(c for c, v in zip(columns, values) if not isinstance(v, (str, type(None))))
                    raise PrepareError(f"record {n_records + row} of split {split!r} of {source.name} "
                                       f"has a {type(batch[bad][row]).__name__} in column {bad!r}, not "
                                       f"text; choose string columns with --column")
                texts = [v.encode("utf-8") for v in values if v is not None]
                n_text += sum(len(t) for t in texts)
                records.append(separator.join(texts))
            if not records:
                continue
            block = separator.join(records)
            if n_records:
                block = separator + block
            out.write(block)
            n_records += len(records)
            n_bytes += len(block)
            bar.update(len(block))
    return n_records, n_bytes, n_text


def _held_out_splits(source: HFSource, available: Sequence[str], valid_bytes: int | None,
                     test_bytes: int | None) -> dict[str, str | None]:
    """Which of the dataset's splits become valid and test (None: cut from the training text)."""
    chosen: dict[str, str | None] = {}
    for role, names, size, flag in (("valid", VALID_SPLIT_NAMES, valid_bytes, "--valid_bytes"),
                                    ("test", TEST_SPLIT_NAMES, test_bytes, "--test_bytes")):
        own = next((n for n in names if n in available and n != source.split), None)
        if not source.use_dataset_splits:
            own = None
        if own is not None and size is not None:
            raise PrepareError(f"{source.name} has its own {own!r} split, used as {role}; {flag} only sizes "
                               f"a split cut from the training text: drop {flag}, or pass "
                               f"--held_out_from_train to cut both held-out splits from {source.split!r}")
        chosen[role] = own
    return chosen


def prepare_hf(source: HFSource, out: str | Path, valid_bytes: int | None = None,
               test_bytes: int | None = None, overwrite: bool = False) -> PrepareResult:
    """Prepare a corpus from a ``datasets`` dataset (see the module docstring for what is read and how)."""
    out = Path(out)
    existing = check_out(out)
    with _quiet_datasets():
        return _prepare_hf(source, out, valid_bytes, test_bytes, overwrite, existing)


def _prepare_hf(source: HFSource, out: Path, valid_bytes: int | None, test_bytes: int | None, overwrite: bool,
                existing: dict | None) -> PrepareResult:
    _check_source(source)
    local = Path(source.name)
    is_saved = local.is_dir() and _is_save_to_disk_dir(local)
    opened = _open_saved(source) if is_saved else _open_streaming(source)
    if source.split not in opened.splits:
        raise PrepareError(f"{source.name} has no split {source.split!r}; it has "
                           f"{', '.join(opened.splits) or 'none'}: choose one with --split")
    held_out = _held_out_splits(source, list(opened.splits), valid_bytes, test_bytes)
    roles = [("train", source.split), ("valid", held_out["valid"]), ("test", held_out["test"])]
    columns: tuple[str, ...] | None = None
    counts: dict[str, dict] = {}
    with atomic.staging_dir(out) as tmp:
        text: dict[str, np.ndarray] = {}  # each split read: its text, memory-mapped from a scratch file
        for role, split in roles:
            if split is None:
                continue
            stream = opened.splits[split]
            if columns is None:
                with _reading(split, source):
                    first = None if stream.features is not None else \
                        next(iter(stream.iter(batch_size=1)), None)
                if stream.features is None and first is None:
                    raise PrepareError(f"split {split!r} of {source.name} holds no text (0 records); give a "
                                       f"dataset with text, or choose another --split")
                columns = _choose_columns(source, stream.features, first)
            log.info("reading %s split %r of %s", role, split, source.name)
            with open(tmp / _scratch_name(role), "wb") as scratch:
                n_records, n_bytes, n_text = _write_split_text(stream, split, source, columns, scratch)
            if n_text == 0:
                raise PrepareError(f"split {split!r} of {source.name} holds no text ({n_records:,} records, "
                                   f"0 bytes of text in column(s) {', '.join(columns)}"
                                   + (f", only the {n_bytes:,} separators between them" if n_bytes else "")
                                   + "); choose another --split or --column")
            counts[split] = {"n_records": n_records, "n_bytes": n_bytes}
            text[role] = map_file(tmp / _scratch_name(role))
        parts, used = _cut_held_out(text, source.split, held_out, valid_bytes, test_bytes)
        record = {"kind": "hf", "name": source.name, **opened.identity, "splits_used": used,
                  "columns": list(columns), "separator": source.separator, "records": counts,
                  "fingerprint": {split: opened.fingerprints.get(split) for split in counts},
                  "fingerprint_kind": opened.fingerprint_kind,
                  "n_bytes": sum(len(t) for t in text.values())}
        if source.data_files:
            record["data_files_given"] = list(source.data_files)
        return write_corpus_parts(tmp, out, parts, record, existing, overwrite,
                                  scratch=[_scratch_name(role) for role in text])


def _cut_held_out(text: dict[str, np.ndarray], split: str, held_out: dict[str, str | None],
                  valid_bytes: int | None, test_bytes: int | None) -> tuple[dict[str, np.ndarray], dict]:
    """The corpus splits from the text read (``text``: train, and the dataset's own valid/test where it has
    them): a held-out split the dataset lacks is cut from the end of the training text, as ``files`` cuts
    them (the last test bytes, the valid bytes before them; default 5% each). Returns the splits and a
    description of where each came from, for the manifest."""
    n_train = len(text["train"])
    default_cut = int(n_train * DEFAULT_HELD_OUT_FRACTION)
    cut_valid = 0 if "valid" in text else default_cut if valid_bytes is None else valid_bytes
    cut_test = 0 if "test" in text else default_cut if test_bytes is None else test_bytes
    n_kept = n_train - cut_valid - cut_test
    check_split_sizes(sum(len(t) for t in text.values()),
                       (n_kept, len(text["valid"]) if "valid" in text else cut_valid,
                        len(text["test"]) if "test" in text else cut_test))
    parts = {"train": text["train"][:n_kept],
             "valid": text["valid"] if "valid" in text else text["train"][n_kept:n_kept + cut_valid],
             "test": text["test"] if "test" in text else text["train"][n_train - cut_test:]}
    used = {"train": split if n_kept == n_train else f"{split} (its first {n_kept:,} bytes)",
            "valid": held_out["valid"] or f"{split} (the {cut_valid:,} bytes before test)",
            "test": held_out["test"] or f"{split} (its last {cut_test:,} bytes)"}
    return parts, used


def _scratch_name(role: str) -> str:
    return f"_text-{role}.bin"
