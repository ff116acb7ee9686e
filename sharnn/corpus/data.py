"""Byte corpora for SHA-RNN: memory-mapped splits and per-rank contiguous streams.

A prepared corpus (written by ``sharnn-prepare``, see ``sharnn/corpus/prepare.py``) is a directory::

    corpus/manifest.json        format, source, per-split byte count and sha256, row layout
    corpus/{train,valid,test}/  one ``datasets.Dataset`` per split (``save_to_disk``), column ``bytes``
                                of type binary; the rows, concatenated in order, are the split's bytes

``open_split`` memory-maps one split and exposes it as a ``ByteSplit``: reads copy only the bytes asked for,
straight out of zero-copy views of the Arrow buffers, so a rank never holds a whole split in private memory.

Training follows Smerity/sha-rnn (``utils.batchify``, ``utils.get_batch``, the ``train()`` loop of
``main.py``): the split is cut into S contiguous streams and every batch row continues exactly where the same
row of the previous batch stopped, so LSTM state and attention memory carry over. Under data parallelism there
are S = world_size * batch_size streams and rank r owns streams r*B .. r*B+B-1, so W ranks with batch B read
exactly the bytes that one process with batch W*B reads. Tensors here are batch-major ``[B, T]``; the model's
time-major ``(T, B)`` order is the trainer's business (one ``.t()``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import datasets
import numpy as np
import pyarrow as pa
import torch

FORMAT_NAME = "sharnn-byte-corpus"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "valid", "test")
BYTES_COLUMN = "bytes"

# The reference draws a sequence length around bptt with this standard deviation and never below this minimum.
BPTT_STD = 5
MIN_SEQ_LEN = 5
# Probability of using the full bptt as the base length (otherwise bptt / 2).
P_FULL_BPTT = 0.95
MIN_TRAIN_STREAM_BYTES = 3
"""A training stream (StreamLoader) needs an input, its target and one byte more: its epoch ends at L - 2."""
MIN_EVAL_STREAM_BYTES = 2
"""An evaluation stream (EvalStreams) needs an input and its target."""


class CorpusError(ValueError):
    """A directory is not a usable prepared corpus; the message says what to run to fix it."""


class CorpusChanged(CorpusError):
    """A split's bytes no longer hash to the sha256 its manifest records (``open_split(verify=True)``)."""


def _prepare_hint(corpus_dir: Path) -> str:
    return (f"prepare one with `sharnn-prepare demo --out {corpus_dir}` (or `sharnn-prepare enwik8 ...` / "
            f"`sharnn-prepare files PATH... ...`)")


def read_manifest(corpus_dir: str | Path) -> dict:
    """Read and check ``corpus_dir/manifest.json``; a ``CorpusError`` names the fix if it is not a corpus."""
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise CorpusError(f"corpus directory {corpus_dir} does not exist; {_prepare_hint(corpus_dir)}")
    path = corpus_dir / MANIFEST_NAME
    if not path.is_file():
        raise CorpusError(f"{corpus_dir} is not a prepared sharnn corpus (no {MANIFEST_NAME}); "
                          f"{_prepare_hint(corpus_dir)}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorpusError(f"cannot read {path} ({e}); re-create the corpus with "
                          f"sharnn-prepare ... --overwrite")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CorpusError(f"{path} is not a sharnn corpus manifest; {_prepare_hint(corpus_dir)}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CorpusError(f"{corpus_dir} has corpus format version {manifest.get('format_version')!r}, this "
                          f"sharnn reads version {FORMAT_VERSION}; re-create it with this version's "
                          f"sharnn-prepare ... --overwrite")
    return manifest


def _binary_chunk_view(arr: pa.Array) -> np.ndarray:
    """Zero-copy uint8 view of the bytes of all rows of one Arrow binary chunk, in row order.

    Arrow stores row i of a binary array at ``data[offsets[i]:offsets[i + 1]]`` with non-decreasing offsets,
    so the rows of a chunk, concatenated, are one contiguous slice of its data buffer.
    """
    if pa.types.is_binary(arr.type):
        offset_dtype = np.dtype(np.int32)
    elif pa.types.is_large_binary(arr.type):
        offset_dtype = np.dtype(np.int64)
    else:
        raise CorpusError(f"column {BYTES_COLUMN!r} has type {arr.type}, expected binary")
    if arr.null_count:
        raise CorpusError(f"column {BYTES_COLUMN!r} has null rows; the corpus is damaged")
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=offset_dtype, count=len(arr) + 1,
                            offset=arr.offset * offset_dtype.itemsize)
    if data_buf is None:
        return np.empty(0, dtype=np.uint8)
    return np.frombuffer(data_buf, dtype=np.uint8)[int(offsets[0]):int(offsets[-1])]


class ByteSplit:
    """A read-only byte sequence stored as consecutive chunks (zero-copy views of memory-mapped Arrow data).

    Build one with ``open_split`` (a prepared corpus) or ``ByteSplit.from_bytes`` (in memory, for tests).
    ``read`` and ``gather`` return fresh arrays holding only the requested bytes; reads may cross chunk
    boundaries.
    """

    def __init__(self, chunks: Sequence[np.ndarray], name: str = "", dataset: datasets.Dataset | None = None):
        """``chunks``: 1-D uint8 arrays whose concatenation is the split (not copied; empty ones skipped)."""
        self._chunks = []
        for chunk in chunks:
            if chunk.dtype != np.uint8 or chunk.ndim != 1:
                raise ValueError(f"chunks must be 1-D uint8 arrays, got {chunk.dtype} of shape {chunk.shape}")
            if len(chunk):
                self._chunks.append(chunk)
        # bounds[c] is the split position of chunk c's first byte; bounds[-1] is the split length.
        self._bounds = np.zeros(len(self._chunks) + 1, dtype=np.int64)
        np.cumsum([len(c) for c in self._chunks], out=self._bounds[1:])
        self._len = int(self._bounds[-1])
        self.name = name
        # Keeps the memory-mapped dataset (and so the mapping) alive as long as the split is used.
        self.dataset = dataset

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview | np.ndarray, name: str = "") -> ByteSplit:
        """An in-memory split holding ``data`` (a bytes-like object or a 1-D uint8 array; not copied)."""
        if isinstance(data, np.ndarray):
            if data.dtype != np.uint8:
                raise ValueError(f"expected a uint8 array, got {data.dtype}")
            array = data.reshape(-1)
        else:
            array = np.frombuffer(data, dtype=np.uint8)
        return cls([array], name=name)

    def byte_counts(self) -> np.ndarray:
        """How often each of the 256 byte values occurs in the split: int64 array of shape [256]."""
        counts = np.zeros(256, dtype=np.int64)
        for chunk in self._chunks:
            counts += np.bincount(chunk, minlength=256)
        return counts

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"ByteSplit(name={self.name!r}, n_bytes={self._len}, n_chunks={self.n_chunks})"

    @property
    def n_chunks(self) -> int:
        """Number of contiguous chunks the split is stored in (Arrow record batches for a prepared corpus)."""
        return len(self._chunks)

    def read(self, start: int, length: int) -> np.ndarray:
        """Bytes ``[start, start + length)`` as a new uint8 array of shape ``[length]``."""
        return self.gather(np.array([start], dtype=np.int64), length)[0]

    def gather(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Rows ``out[k] = split[starts[k] : starts[k] + length]`` as a new uint8 array, shape [n, length].

        One slice copy per row (no per-byte Python work); a row crossing chunk boundaries is copied piecewise.
        """
        starts = np.asarray(starts, dtype=np.int64)
        length = int(length)
        if starts.ndim != 1:
            raise ValueError(f"starts must be 1-D, got shape {starts.shape}")
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        out = np.empty((len(starts), length), dtype=np.uint8)
        if len(starts) == 0 or length == 0:
            return out
        if starts.min() < 0 or starts.max() + length > self._len:
            raise IndexError(f"read of {length} bytes at starts {starts.min()}..{starts.max()} is outside "
                             f"the split of {self._len} bytes")
        first = np.searchsorted(self._bounds, starts, side="right") - 1
        last = np.searchsorted(self._bounds, starts + (length - 1), side="right") - 1
        rel = starts - self._bounds[first]
        chunks = self._chunks
        for k, (c, c_last, r) in enumerate(zip(first.tolist(), last.tolist(), rel.tolist())):
            if c == c_last:
                out[k] = chunks[c][r:r + length]
            else:
                self._copy_across(out[k], c, r)
        return out

    def _copy_across(self, dst: np.ndarray, chunk: int, rel: int) -> None:
        """Fill ``dst`` from offset ``rel`` of chunk ``chunk`` on, continuing into the following chunks."""
        filled = 0
        while filled < len(dst):
            src = self._chunks[chunk]
            take = min(len(dst) - filled, len(src) - rel)
            dst[filled:filled + take] = src[rel:rel + take]
            filled += take
            chunk += 1
            rel = 0

    def iter_chunks(self) -> Iterator[np.ndarray]:
        """The stored chunks in order (views, not copies; read-only for a prepared corpus)."""
        return iter(self._chunks)

    def sha256(self) -> str:
        """Hex sha256 of the whole split (reads every byte once)."""
        h = hashlib.sha256()
        for chunk in self._chunks:
            h.update(memoryview(chunk))
        return h.hexdigest()


def open_split(corpus_dir: str | Path, split: str, verify: bool = False) -> ByteSplit:
    """Open ``corpus_dir/split`` of a prepared corpus read-only and memory-mapped.

    Checks the manifest and the split's byte count (cheap). ``verify=True`` also hashes every byte against the
    manifest's sha256 (one full read, about a second per GB). Raises ``CorpusError`` with the command to run
    when something is wrong.
    """
    corpus_dir = Path(corpus_dir)
    info = split_record(corpus_dir, split)
    split_dir = corpus_dir / split
    try:
        # keep_in_memory=False: always memory-map, even if HF_DATASETS_IN_MEMORY_MAX_SIZE is set.
        ds = datasets.load_from_disk(str(split_dir), keep_in_memory=False)
    except (FileNotFoundError, ValueError, OSError, pa.ArrowException) as e:
        raise CorpusError(f"cannot load split {split!r} from {split_dir} ({e}); the corpus is damaged: "
                          f"re-create it with sharnn-prepare ... --overwrite")
    if not isinstance(ds, datasets.Dataset) or BYTES_COLUMN not in ds.column_names:
        raise CorpusError(f"{split_dir} is not a sharnn byte split (no {BYTES_COLUMN!r} column); "
                          f"re-create the corpus with sharnn-prepare ... --overwrite")
    chunks = [_binary_chunk_view(arr) for arr in ds.data.table.column(BYTES_COLUMN).chunks]
    byte_split = ByteSplit(chunks, name=split, dataset=ds)
    if len(byte_split) != info["n_bytes"]:
        raise CorpusError(f"split {split!r} of {corpus_dir} holds {len(byte_split)} bytes but its manifest "
                          f"says {info['n_bytes']}; the corpus is damaged: re-create it with "
                          f"sharnn-prepare ... --overwrite")
    if verify:
        digest = byte_split.sha256()
        if digest != info["sha256"]:
            raise CorpusChanged(f"split {split!r} of {corpus_dir} has changed since sharnn-prepare wrote "
                              f"it: its {len(byte_split):,} bytes hash to sha256 {digest}, its manifest says "
                              f"{info['sha256']}. Re-create the corpus with sharnn-prepare ... --overwrite")
    return byte_split


def split_record(corpus_dir: str | Path, split: str) -> dict:
    """``{"n_bytes": int, "sha256": str}``: what the manifest of ``corpus_dir`` records for ``split``
    (``CorpusError`` if the manifest lacks the split or its entry is malformed). Reads no split data."""
    corpus_dir = Path(corpus_dir)
    manifest = read_manifest(corpus_dir)
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or split not in splits:
        present = sorted(splits) if isinstance(splits, dict) else []
        raise CorpusError(f"corpus {corpus_dir} has no split {split!r}; it has {present}")
    info = splits[split]
    n_bytes = info.get("n_bytes") if isinstance(info, dict) else None
    sha256 = info.get("sha256") if isinstance(info, dict) else None
    if not isinstance(n_bytes, int) or isinstance(n_bytes, bool) or n_bytes < 0:
        raise CorpusError(f"{corpus_dir / MANIFEST_NAME}: the entry of split {split!r} has no valid n_bytes "
                          f"(got {n_bytes!r}); the manifest is damaged: re-create the corpus with "
                          f"sharnn-prepare ... --overwrite")
    if not isinstance(sha256, str) or len(sha256) != 64:
        raise CorpusError(f"{corpus_dir / MANIFEST_NAME}: the entry of split {split!r} has no valid sha256 "
                          f"(got {sha256!r}); the manifest is damaged: re-create the corpus with "
                          f"sharnn-prepare ... --overwrite")
    return {"n_bytes": n_bytes, "sha256": sha256}


def corpus_record(corpus_dir: str | Path) -> dict[str, dict]:
    """``{split: {"n_bytes", "sha256"}}`` for every split the manifest of ``corpus_dir`` lists: what a
    checkpoint stores to recognise the corpus it was trained on. Reads no split data."""
    return {split: split_record(corpus_dir, split) for split in read_manifest(corpus_dir).get("splits", {})}


# Segment lengths are drawn in blocks of this many steps: one generator per block instead of one per step
# (seeding a generator costs ~20 us, a fifth of a loader step).
SEQ_LEN_BLOCK = 256


@functools.lru_cache(maxsize=4)
def _seq_len_block(bptt: int, seed: int, epoch: int, block: int) -> tuple[int, ...]:
    rng = np.random.default_rng([seed, epoch, block])
    uniform, normal = rng.random(SEQ_LEN_BLOCK), rng.standard_normal(SEQ_LEN_BLOCK)
    base = np.where(uniform < P_FULL_BPTT, float(bptt), bptt / 2.0)
    T = np.trunc(base + BPTT_STD * normal)  # int() of normal(base, 5): rounds toward zero
    return tuple(np.clip(T, MIN_SEQ_LEN, None).clip(None, bptt).astype(np.int64).tolist())


def draw_seq_len(bptt: int, seed: int, epoch: int, step_in_epoch: int) -> int:
    """The training segment length T for one step, as in Smerity/sha-rnn ``main.py``.

    Base length bptt with probability 0.95 else bptt / 2; T = int(normal(base, 5)), then at least 5 and at
    most bptt (the reference's ``max(5, ...)`` then ``min(..., bptt)``). The draws come from a generator
    seeded by (seed, epoch, step_in_epoch // SEQ_LEN_BLOCK) only, never from global random state, so every
    rank draws the same T and a resumed run draws what the uninterrupted run would have.
    """
    block, index = divmod(step_in_epoch, SEQ_LEN_BLOCK)
    return _seq_len_block(bptt, seed, epoch, block)[index]


def _expected_seq_len(bptt: int) -> float:
    """Mean of ``draw_seq_len(bptt, ...)``: a sum over the integer outcomes of the normal draw (10 sigma)."""
    def mean_for(base: float) -> float:
        def cdf(x: float) -> float:
            return 0.5 * (1.0 + math.erf((x - base) / (BPTT_STD * math.sqrt(2.0))))
        # int() truncates toward zero and floor() does not; they differ only below 0, where both clamp to 5.
        ks = range(math.floor(base - 10 * BPTT_STD), math.ceil(base + 10 * BPTT_STD) + 1)
        return sum((cdf(k + 1) - cdf(k)) * min(max(MIN_SEQ_LEN, k), bptt) for k in ks)
    return P_FULL_BPTT * mean_for(bptt) + (1 - P_FULL_BPTT) * mean_for(bptt / 2.0)


def _to_long(window: np.ndarray) -> torch.Tensor:
    """A contiguous int64 tensor copy of a uint8 array (numpy's cast is cheaper than torch slicing + copy)."""
    return torch.from_numpy(window.astype(np.int64))


class Batch(NamedTuple):
    """One training segment for this rank's streams."""

    inputs: torch.Tensor
    """[B, T] int64 bytes: stream[offset : offset + T] of each of this rank's streams."""
    targets: torch.Tensor
    """[B, T] int64 bytes: the byte after each input position, stream[offset + 1 : offset + T + 1]."""
    epoch: int
    """Epoch this segment belongs to (0-based)."""
    step_in_epoch: int
    """Index of this segment within its epoch (0-based)."""
    is_epoch_start: bool
    """True for the first segment of an epoch: the streams restart, so reset the carried state."""
    T: int
    """Segment length (equal on all ranks)."""
    offset: int
    """Position of inputs[:, 0] within each stream."""


# Keys of StreamLoader.state_dict() that describe the stream layout: a saved position means something only if
# they all match.
_LAYOUT_KEYS = ("batch_size", "world_size", "bptt", "seed", "vary_bptt", "split_bytes")


class StreamLoader:
    """Infinite truncated-BPTT segments over this rank's contiguous streams; deterministic and resumable.

    Layout: S = world_size * batch_size streams of L = len(split) // S bytes each (the remainder is dropped,
    as the reference's ``batchify``); stream s is split[s*L : (s+1)*L] and rank r owns streams r*B .. r*B+B-1.
    A cursor i starts at 0; each step yields inputs stream[i : i+T] and targets stream[i+1 : i+T+1] for every
    owned stream, then i += T. T comes from ``draw_seq_len(bptt, seed, epoch, step_in_epoch)`` (or is bptt
    when ``vary_bptt=False``) and is cut to L - 1 - i; the epoch ends once i >= L - 2 (the reference's
    ``while i < train_data.size(0) - 1 - 1``), and the next epoch starts again at i = 0. All ranks draw the
    same T and so reach the end of an epoch at the same step.
    """

    def __init__(self, split: ByteSplit, batch_size: int, bptt: int, rank: int, world_size: int, seed: int,
                 vary_bptt: bool = True):
        for name, value, minimum in (("batch_size", batch_size, 1), ("bptt", bptt, 1),
                                     ("world_size", world_size, 1), ("seed", seed, 0)):
            if int(value) != value or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        self.split = split
        self.batch_size = int(batch_size)
        self.bptt = int(bptt)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.vary_bptt = bool(vary_bptt)
        self.n_streams = self.world_size * self.batch_size
        self.stream_len = len(split) // self.n_streams
        if self.stream_len < MIN_TRAIN_STREAM_BYTES:
            raise ValueError(f"split of {len(split)} bytes is too small for {self.n_streams} streams "
                             f"(world_size {world_size} x batch_size {batch_size}): each stream needs at "
                             f"least {MIN_TRAIN_STREAM_BYTES} bytes; use a larger split or fewer streams")
        # Split position of the first byte of each of this rank's streams.
        self._stream_starts = (self.rank * self.batch_size + np.arange(self.batch_size, dtype=np.int64)) \
            * self.stream_len
        self.epoch = 0
        self.step_in_epoch = 0
        self.offset = 0

    def __iter__(self) -> StreamLoader:
        return self

    def __next__(self) -> Batch:
        i = self.offset
        T = draw_seq_len(self.bptt, self.seed, self.epoch, self.step_in_epoch) if self.vary_bptt \
            else self.bptt
        T = min(T, self.stream_len - 1 - i)
        window = self.split.gather(self._stream_starts + i, T + 1)  # [B, T+1] uint8
        batch = Batch(inputs=_to_long(window[:, :-1]), targets=_to_long(window[:, 1:]), epoch=self.epoch,
                      step_in_epoch=self.step_in_epoch, is_epoch_start=self.step_in_epoch == 0, T=T,
                      offset=i)
        self.offset = i + T
        self.step_in_epoch += 1
        if self.offset >= self.stream_len - 2:  # streams exhausted: the next call starts the next epoch
            self.epoch += 1
            self.step_in_epoch = 0
            self.offset = 0
        return batch

    def estimate_steps_per_epoch(self) -> int:
        """Approximate number of steps in an epoch, for progress bars and schedules that tolerate error.

        Exact when ``vary_bptt=False``; otherwise an estimate from the mean segment length (the actual count
        depends on the random lengths drawn).
        """
        span = self.stream_len - 2  # an epoch runs while the cursor is below L - 2
        mean_len = self.bptt if not self.vary_bptt else _expected_seq_len(self.bptt)
        if not self.vary_bptt:
            return math.ceil(span / mean_len)
        return max(1, round(span / mean_len))

    def state_dict(self) -> dict:
        """Position of the next segment plus the layout it is valid for; plain ints, rank-independent."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "offset": self.offset,
                "batch_size": self.batch_size, "world_size": self.world_size, "bptt": self.bptt,
                "seed": self.seed, "vary_bptt": self.vary_bptt, "split_bytes": len(self.split)}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the exact next byte of a saved position; refuse if the layout differs."""
        current = self.state_dict()
        missing = [k for k in ("epoch", "step_in_epoch", "offset") + _LAYOUT_KEYS if k not in state]
        if missing:
            raise ValueError(f"loader state is missing keys {missing}")
        differ = [f"{k} saved {state[k]!r}, now {current[k]!r}"
                  for k in _LAYOUT_KEYS if state[k] != current[k]]
        if differ:
            raise ValueError("cannot resume the data position: the stream layout differs from the saved one ("
                             + "; ".join(differ) + "), so the streams would not line up. Resume with the "
                             "same world size, batch size, bptt, seed and corpus split.")
        epoch, step, offset = int(state["epoch"]), int(state["step_in_epoch"]), int(state["offset"])
        if epoch < 0 or step < 0 or not 0 <= offset < self.stream_len - 2 or (step == 0) != (offset == 0):
            raise ValueError(f"invalid loader position epoch={epoch} step_in_epoch={step} offset={offset} "
                             f"for streams of {self.stream_len} bytes")
        self.epoch, self.step_in_epoch, self.offset = epoch, step, offset


class EvalSegment(NamedTuple):
    """One evaluation segment for this rank's streams."""

    inputs: torch.Tensor
    """[b, T] int64 bytes."""
    targets: torch.Tensor
    """[b, T] int64 bytes: the byte after each input position."""


class EvalStreams:
    """Evaluation segments: E = n_streams streams, independent of world size, divided among ranks.

    Layout: L = len(split) // E; stream s is split[s*L : (s+1)*L]; segments start at i = 0, bptt, 2*bptt, ...
    while i < L - 1 and have length T = min(bptt, L - 1 - i) (the reference's ``evaluate``).
    Rank r gets the contiguous streams ``rank_streams = range(r*E // W, (r+1)*E // W)``; rank sizes differ by
    at most one, and when W > E some ranks get no streams and yield nothing (they must still join any
    collective reduction, e.g. with a zero loss sum). Every rank with streams yields ``n_segments`` segments.
    Iterating again restarts.

    ``total_predictions`` = E * (L - 1) counts the targets over all ranks: bpc = (sum over ranks of summed
    cross-entropy in nats) / total_predictions / ln 2.
    """

    def __init__(self, split: ByteSplit, n_streams: int, bptt: int, rank: int, world_size: int):
        if n_streams < 1 or bptt < 1 or world_size < 1:
            raise ValueError(f"n_streams, bptt and world_size must be >= 1, got {n_streams}, {bptt}, "
                             f"{world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        self.split = split
        self.n_streams = int(n_streams)
        self.bptt = int(bptt)
        self.stream_len = len(split) // self.n_streams
        if self.stream_len < MIN_EVAL_STREAM_BYTES:
            raise ValueError(f"split of {len(split)} bytes is too small for {n_streams} evaluation streams: "
                             f"each stream needs at least {MIN_EVAL_STREAM_BYTES} bytes")
        n = self.n_streams
        self.rank_streams = range(rank * n // world_size, (rank + 1) * n // world_size)
        self._stream_starts = np.arange(self.rank_streams.start, self.rank_streams.stop, dtype=np.int64) \
            * self.stream_len
        self.n_segments = len(range(0, self.stream_len - 1, self.bptt))
        self.total_predictions = self.n_streams * (self.stream_len - 1)
        self.rank_predictions = len(self.rank_streams) * (self.stream_len - 1)

    def __len__(self) -> int:
        """Number of segments this rank yields (0 if it has no streams)."""
        return self.n_segments if len(self.rank_streams) else 0

    def __iter__(self) -> Iterator[EvalSegment]:
        if not len(self.rank_streams):
            return
        for i in range(0, self.stream_len - 1, self.bptt):
            T = min(self.bptt, self.stream_len - 1 - i)
            window = self.split.gather(self._stream_starts + i, T + 1)  # [b, T+1] uint8
            yield EvalSegment(_to_long(window[:, :-1]), _to_long(window[:, 1:]))
