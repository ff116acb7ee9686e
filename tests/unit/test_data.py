"""sharnn.corpus.data: byte splits, the per-rank training stream layout, resume, evaluation layout, memory
mapping.

The reference for the layout is Smerity/sha-rnn: ``utils.batchify``, ``utils.get_batch`` and the ``train()``
and ``evaluate()`` loops of ``main.py``, re-implemented below as plainly as possible.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from sharnn.corpus.data import (
    ByteSplit,
    CorpusError,
    EvalStreams,
    StreamLoader,
    draw_seq_len,
    open_split,
    read_manifest,
)
from sharnn.corpus.prepare import prepare_files
from tests.helpers import random_array, random_bytes

# --- the reference, written out -----------------------------------------------------------------------------

def ref_batchify(data: np.ndarray, bsz: int) -> torch.Tensor:
    """Smerity/sha-rnn utils.batchify: [L, bsz], column b is the b-th contiguous part."""
    data = torch.from_numpy(data.astype(np.int64))
    nbatch = data.size(0) // bsz
    data = data.narrow(0, 0, nbatch * bsz)
    return data.view(bsz, -1).t().contiguous()


def ref_get_batch(source: torch.Tensor, i: int, seq_len: int):
    seq_len = min(seq_len, len(source) - 1 - i)
    return source[i:i + seq_len], source[i + 1:i + 1 + seq_len]


def ref_seq_len(bptt: int, seed: int, epoch: int, step: int) -> int:
    """main.py's draw, with np.random replaced by generators seeded from (seed, epoch, block of 256 steps)."""
    rng = np.random.default_rng([seed, epoch, step // 256])
    uniform, normal = rng.random(256)[step % 256], rng.standard_normal(256)[step % 256]
    bptt_ = bptt if uniform < 0.95 else bptt / 2.
    seq_len = max(5, int(bptt_ + 5 * normal))
    return min(seq_len, bptt)


def ref_train_segments(data: np.ndarray, bsz: int, bptt: int, seed: int, n_epochs: int,
                       vary_bptt: bool = True):
    """(epoch, batch, data [T, bsz], targets [T, bsz]) in main.py's train() order."""
    train_data = ref_batchify(data, bsz)
    for epoch in range(n_epochs):
        batch, i = 0, 0
        while i < train_data.size(0) - 1 - 1:
            seq_len = ref_seq_len(bptt, seed, epoch, batch) if vary_bptt else bptt
            x, y = ref_get_batch(train_data, i, seq_len)
            yield epoch, batch, x, y
            batch += 1
            i += seq_len


def ref_eval_segments(data: np.ndarray, bsz: int, bptt: int):
    source = ref_batchify(data, bsz)
    for i in range(0, source.size(0) - 1, bptt):
        yield ref_get_batch(source, i, bptt)


# --- ByteSplit ----------------------------------------------------------------------------------------------

def test_gather_across_chunk_boundaries_matches_flat_bytes():
    flat = random_array(10_000)
    cuts = [0, 0, 7, 8, 1000, 1001, 1001, 4096, 9000, 10_000]  # includes empty and 1-byte chunks
    split = ByteSplit([flat[a:b] for a, b in zip(cuts[:-1], cuts[1:])])
    assert len(split) == len(flat) and split.n_chunks == 7
    rng = np.random.default_rng(1)
    for length in (1, 2, 5, 700, 3000, 9000, 10_000):
        starts = rng.integers(0, len(flat) - length + 1, size=13)
        starts[0] = len(flat) - length  # the very end
        got = split.gather(starts, length)
        assert got.dtype == np.uint8 and got.shape == (13, length)
        np.testing.assert_array_equal(got, np.stack([flat[s:s + length] for s in starts]))
    for boundary in cuts[1:-1]:
        for start in range(max(0, boundary - 3), min(len(flat) - 4, boundary + 2)):
            np.testing.assert_array_equal(split.read(start, 4), flat[start:start + 4])
    assert split.sha256() == ByteSplit.from_bytes(flat.tobytes()).sha256()


def test_gather_rejects_reads_outside_the_split():
    split = ByteSplit.from_bytes(b"abcdef")
    assert bytes(split.read(4, 2)) == b"ef"
    with pytest.raises(IndexError):
        split.read(5, 2)
    with pytest.raises(IndexError):
        split.gather(np.array([0, -1]), 1)
    assert split.gather(np.array([], dtype=np.int64), 3).shape == (0, 3)


@pytest.fixture(scope="module")
def small_rows_corpus(tmp_path_factory):
    """A prepared corpus cut into 64-byte rows, so its splits have many Arrow chunks."""
    root = tmp_path_factory.mktemp("small_rows")
    data = random_array(300_000, seed=2)
    (root / "input.bin").write_bytes(data.tobytes())
    prepare_files([root / "input.bin"], root / "corpus", valid_bytes=20_000, test_bytes=10_000, row_bytes=64)
    return root / "corpus", data


def test_open_split_reads_across_arrow_chunks(small_rows_corpus):
    corpus, data = small_rows_corpus
    split = open_split(corpus, "train", verify=True)
    train = data[:270_000]
    assert len(split) == len(train)
    assert split.n_chunks > 5  # datasets writes record batches of a few rows: boundaries are really crossed
    bounds = np.cumsum([len(c) for c in split.iter_chunks()])[:-1]
    starts = np.concatenate([bounds - 1, bounds - 50, bounds - 64 * 100 - 7])
    starts = starts[starts >= 0]
    for length in (2, 51, 64 * 250):
        ok = starts[starts + length <= len(train)]
        np.testing.assert_array_equal(split.gather(ok, length), np.stack([train[s:s + length] for s in ok]))
    np.testing.assert_array_equal(open_split(corpus, "valid").read(0, 20_000), data[270_000:290_000])
    np.testing.assert_array_equal(open_split(corpus, "test").read(0, 10_000), data[290_000:])


def test_open_split_errors_name_the_fix(small_rows_corpus, tmp_path):
    with pytest.raises(CorpusError, match="does not exist.*sharnn-prepare"):
        open_split(tmp_path / "nope", "train")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CorpusError, match="not a prepared sharnn corpus.*sharnn-prepare demo --out"):
        open_split(tmp_path / "plain", "train")
    corpus, _ = small_rows_corpus
    with pytest.raises(CorpusError, match="no split 'dev'"):
        open_split(corpus, "dev")
    # A corpus whose data does not match its manifest is reported as damaged.
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "train").symlink_to(corpus / "train")
    manifest = read_manifest(corpus)
    manifest["splits"]["train"]["n_bytes"] += 1
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorpusError, match="damaged.*--overwrite"):
        open_split(damaged, "train")
    manifest["splits"]["train"]["n_bytes"] -= 1
    manifest["splits"]["train"]["sha256"] = "0" * 64
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    open_split(damaged, "train")  # the cheap check passes...
    with pytest.raises(CorpusError, match="sha256"):
        open_split(damaged, "train", verify=True)  # ...the full one does not
    manifest["format_version"] = 999
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorpusError, match="format version 999"):
        open_split(damaged, "train")


def _rss_anon_bytes() -> int:
    """Private resident memory of this process (Linux): RssAnon excludes page cache of mapped files."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_open_split_memory_maps_instead_of_copying(tmp_path):
    n = 96 * 2**20
    (tmp_path / "input.bin").write_bytes(random_bytes(n, seed=3))
    prepare_files([tmp_path / "input.bin"], tmp_path / "corpus", valid_bytes=2**20, test_bytes=2**20)
    gc.collect()
    arrow_before, anon_before = pa.total_allocated_bytes(), _rss_anon_bytes()
    split = open_split(tmp_path / "corpus", "train")
    assert len(split) == n - 2 * 2**20
    assert split.dataset.cache_files  # backed by the .arrow files on disk
    assert all(not chunk.flags.writeable for chunk in split.iter_chunks())  # views of read-only mappings
    loader = StreamLoader(split, batch_size=4, bptt=2**16, rank=0, world_size=1, seed=0, vary_bptt=False)
    epoch_bytes = 0
    while True:  # touch every byte of the split once
        batch = next(loader)
        epoch_bytes += batch.inputs.numel()
        if loader.epoch == 1:
            break
    assert epoch_bytes > 0.99 * len(split)
    arrow_growth = pa.total_allocated_bytes() - arrow_before
    anon_growth = _rss_anon_bytes() - anon_before
    # A copied split (keep_in_memory, np.concatenate of the chunks, ...) would add ~94 MB to one of these.
    assert arrow_growth < 2**20, arrow_growth
    assert anon_growth < 24 * 2**20, anon_growth


# --- StreamLoader -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vary_bptt", [True, False])
def test_single_rank_matches_reference_batchify_and_get_batch(vary_bptt):
    data = random_array(4_003, seed=4)
    bsz, bptt, seed = 7, 23, 11
    loader = StreamLoader(ByteSplit.from_bytes(data), bsz, bptt, rank=0, world_size=1, seed=seed,
                          vary_bptt=vary_bptt)
    n_ref = 0
    for epoch, step, x, y in ref_train_segments(data, bsz, bptt, seed, n_epochs=3, vary_bptt=vary_bptt):
        batch = next(loader)
        assert (batch.epoch, batch.step_in_epoch, batch.is_epoch_start, batch.T) == \
            (epoch, step, step == 0, len(x))
        assert torch.equal(batch.inputs, x.t()) and torch.equal(batch.targets, y.t())
        n_ref += 1
    assert n_ref > 3 * 20
    assert next(loader).epoch == 3 and loader.offset > 0  # and it goes on into the next epoch


@pytest.mark.parametrize("world_size,batch_size", [(2, 3), (3, 2), (4, 1)])
def test_ranks_together_read_exactly_the_bytes_of_one_process(world_size, batch_size):
    split = ByteSplit.from_bytes(random_array(5_000, seed=5))
    single = StreamLoader(split, world_size * batch_size, bptt=31, rank=0, world_size=1, seed=7)
    ranks = [StreamLoader(split, batch_size, bptt=31, rank=r, world_size=world_size, seed=7)
             for r in range(world_size)]
    for _ in range(2 * single.estimate_steps_per_epoch() + 5):  # over an epoch boundary
        whole = next(single)
        parts = [next(loader) for loader in ranks]
        assert {p.T for p in parts} == {whole.T}  # every rank draws the same length...
        assert {(p.epoch, p.step_in_epoch, p.is_epoch_start) for p in parts} == \
            {(whole.epoch, whole.step_in_epoch, whole.is_epoch_start)}  # ...and ends epochs together
        assert torch.equal(torch.cat([p.inputs for p in parts]), whole.inputs)
        assert torch.equal(torch.cat([p.targets for p in parts]), whole.targets)
        assert all(p.inputs.shape == (batch_size, whole.T) for p in parts)
    assert whole.epoch >= 1


def test_each_rank_owns_its_contiguous_streams():
    data = random_array(6_000, seed=6)
    world_size, batch_size, bptt = 3, 2, 40
    stream_len = len(data) // (world_size * batch_size)
    for rank in range(world_size):
        loader = StreamLoader(ByteSplit.from_bytes(data), batch_size, bptt, rank, world_size, seed=0,
                              vary_bptt=False)
        got = torch.cat([next(loader).inputs for _ in range(3)], dim=1)  # consecutive segments continue
        for row in range(batch_size):
            start = (rank * batch_size + row) * stream_len
            assert got[row].tolist() == data[start:start + 3 * bptt].tolist()


def test_batch_tensors_are_contiguous_int64_with_next_byte_targets():
    data = np.arange(1000, dtype=np.int64).astype(np.uint8)
    batch = next(StreamLoader(ByteSplit.from_bytes(data), 4, 16, 0, 1, seed=0))
    assert batch.inputs.dtype == batch.targets.dtype == torch.int64
    assert batch.inputs.is_contiguous() and batch.targets.is_contiguous()
    assert batch.inputs.shape == batch.targets.shape == (4, batch.T)
    assert torch.equal(batch.targets[:, :-1], batch.inputs[:, 1:])
    last_targets = data[np.arange(4) * 250 + batch.T].astype(np.int64)  # streams are 250 bytes long
    assert torch.equal(batch.targets[:, -1], torch.from_numpy(last_targets))


@pytest.mark.parametrize("stream_len,expected_lens", [(23, [5, 5, 5, 5, 2]), (22, [5, 5, 5, 5]), (3, [2])])
def test_epoch_boundary_cuts_the_last_segment_and_restarts(stream_len, expected_lens):
    batch_size = 2
    data = random_array(batch_size * stream_len + 1, seed=8)  # one byte of remainder is dropped
    loader = StreamLoader(ByteSplit.from_bytes(data), batch_size, bptt=5, rank=0, world_size=1, seed=0,
                          vary_bptt=False)
    assert loader.estimate_steps_per_epoch() == len(expected_lens)  # exact for a fixed bptt
    for epoch in range(2):
        batches = [next(loader) for _ in expected_lens]
        assert [b.T for b in batches] == expected_lens
        assert [b.is_epoch_start for b in batches] == [True] + [False] * (len(expected_lens) - 1)
        assert [b.epoch for b in batches] == [epoch] * len(expected_lens)
        assert [b.offset for b in batches] == list(np.cumsum([0] + expected_lens[:-1]))
        last = batches[-1]
        end = last.offset + last.T  # position of the last target in the stream
        assert end == (stream_len - 1 if sum(expected_lens) == stream_len - 1 else sum(expected_lens))
        assert last.targets[1, -1].item() == data[stream_len + end]  # row 1 is stream 1
    third = next(loader)
    assert third.is_epoch_start and third.epoch == 2 and third.offset == 0


def test_seq_len_is_the_reference_draw_shared_by_all_ranks():
    lens = [draw_seq_len(70, seed=3, epoch=e, step_in_epoch=s) for e in range(3) for s in range(400)]
    assert lens == [ref_seq_len(70, 3, e, s) for e in range(3) for s in range(400)]
    assert min(lens) >= 5 and max(lens) == 70
    assert any(n < 45 for n in lens) and sum(n == 70 for n in lens) > 400  # the bptt/2 branch and the clamp
    assert lens != [draw_seq_len(70, seed=4, epoch=e, step_in_epoch=s) for e in range(3) for s in range(400)]
    np.random.seed(0)
    first = draw_seq_len(70, 3, 0, 0)
    np.random.seed(1)
    assert draw_seq_len(70, 3, 0, 0) == first  # global random state plays no part


def test_estimate_steps_per_epoch_is_close():
    split = ByteSplit.from_bytes(random_array(200_000, seed=9))
    loader = StreamLoader(split, 2, bptt=97, rank=0, world_size=1, seed=1)
    n_steps = 0
    while next(loader).epoch == 0:
        n_steps += 1
    assert abs(loader.estimate_steps_per_epoch() - n_steps) <= 0.03 * n_steps


def _run(loader: StreamLoader, n: int):
    return [next(loader) for _ in range(n)]


def _assert_same_batches(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a.epoch, a.step_in_epoch, a.is_epoch_start, a.T, a.offset) == \
            (b.epoch, b.step_in_epoch, b.is_epoch_start, b.T, b.offset)
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)


@pytest.mark.parametrize("stop_after", [0, 1, 9, 31])
def test_resume_continues_at_the_same_bytes(stop_after):
    split = ByteSplit.from_bytes(random_array(3_000, seed=10))
    make = lambda rank: StreamLoader(split, 3, bptt=29, rank=rank, world_size=2, seed=5)  # noqa: E731
    straight = make(0)
    want = _run(straight, stop_after + 40)[stop_after:]  # ~2 epochs: the resumed part crosses a boundary
    interrupted = make(0)
    _run(interrupted, stop_after)
    state = json.loads(json.dumps(interrupted.state_dict()))  # survives serialisation: plain values only
    assert all(type(v) in (int, bool) for v in state.values())
    resumed = make(0)
    resumed.load_state_dict(state)
    _assert_same_batches(_run(resumed, 40), want)
    # The state is rank-independent (fit for accelerate's main-process-only custom state): rank 1 resumes too.
    other = make(1)
    other.load_state_dict(state)
    _assert_same_batches(_run(other, 40), _run(make(1), stop_after + 40)[stop_after:])


@pytest.mark.parametrize("change", ["world_size", "batch_size", "bptt", "split_bytes", "seed", "vary_bptt"])
def test_resume_refuses_a_different_layout(change):
    data = random_array(3_000, seed=11)
    kwargs = dict(batch_size=2, bptt=20, rank=0, world_size=2, seed=1, vary_bptt=True)
    saved = StreamLoader(ByteSplit.from_bytes(data), **kwargs)
    _run(saved, 5)
    state = saved.state_dict()
    split = ByteSplit.from_bytes(data)
    if change == "split_bytes":
        split = ByteSplit.from_bytes(data[:-100])
    elif change == "vary_bptt":
        kwargs["vary_bptt"] = False
    else:
        kwargs[change] += 1
    fresh = StreamLoader(split, **kwargs)
    with pytest.raises(ValueError, match=f"{change} saved"):
        fresh.load_state_dict(state)
    assert fresh.state_dict()["offset"] == 0  # left untouched


def test_loader_rejects_impossible_layouts():
    split = ByteSplit.from_bytes(bytes(100))
    with pytest.raises(ValueError, match="too small"):
        StreamLoader(split, batch_size=20, bptt=8, rank=0, world_size=2, seed=0)  # 2-byte streams
    with pytest.raises(ValueError, match="rank"):
        StreamLoader(split, 2, 8, rank=2, world_size=2, seed=0)
    with pytest.raises(ValueError, match="seed"):
        StreamLoader(split, 2, 8, rank=0, world_size=1, seed=-1)


# --- EvalStreams --------------------------------------------------------------------------------------------

def test_eval_single_rank_matches_reference_evaluate():
    data = random_array(5_011, seed=12)
    streams = EvalStreams(ByteSplit.from_bytes(data), n_streams=16, bptt=40, rank=0, world_size=1)
    got = list(streams)
    want = list(ref_eval_segments(data, 16, 40))
    assert len(got) == len(want) == streams.n_segments == len(streams)
    for (x, y), (rx, ry) in zip(got, want):
        assert torch.equal(x, rx.t()) and torch.equal(y, ry.t())
    assert got[-1].inputs.shape[1] < 40  # the last segment is shorter
    assert streams.total_predictions == sum(y.numel() for _, y in got) == 16 * (len(data) // 16 - 1)
    assert list(streams)[0].inputs.equal(got[0].inputs)  # iterating again restarts


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8, 11])
def test_eval_layout_does_not_depend_on_world_size(world_size):
    split = ByteSplit.from_bytes(random_array(3_001, seed=13))
    n_streams = 8
    single = list(EvalStreams(split, n_streams, bptt=64, rank=0, world_size=1))
    ranks = [EvalStreams(split, n_streams, bptt=64, rank=r, world_size=world_size)
             for r in range(world_size)]
    assert [s for r in ranks for s in r.rank_streams] == list(range(n_streams))  # a contiguous partition
    sizes = [len(r.rank_streams) for r in ranks]
    assert max(sizes) - min(sizes) <= 1
    per_rank = [list(r) for r in ranks]
    for r, segments in zip(ranks, per_rank):
        assert len(segments) == len(r) == (r.n_segments if len(r.rank_streams) else 0)  # empty ranks: nothing
    for k, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([seg[k].inputs for seg in per_rank if seg]), x)
        assert torch.equal(torch.cat([seg[k].targets for seg in per_rank if seg]), y)
    assert {r.total_predictions for r in ranks} == {ranks[0].total_predictions}
    assert sum(y.numel() for seg in per_rank for _, y in seg) == ranks[0].total_predictions
    assert sum(r.rank_predictions for r in ranks) == ranks[0].total_predictions
