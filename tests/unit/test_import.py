"""sharnn-import (sharnn/convert.py): the reference's state dicts and pickled checkpoints become sharnn models
that reproduce the reference fixture; code in a pickle never runs; bad inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from sharnn.io.pretrained import load_model
from tests.helpers import FIXTURES, exits_with
from tests.unit.test_fidelity import FIXTURE, fixture, run_segments

pytestmark = pytest.mark.usefixtures("one_thread")


class RefOverparam(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.l1 = nn.Linear(d, 2 * d)


class RefAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qs, self.ks, self.vs = (nn.Parameter(torch.zeros(1, 1, d)) for _ in range(3))
        self.qkvs = nn.Parameter(torch.zeros(1, 3, d))
        self.r_gate = nn.Parameter(torch.ones(1, 1, d))
        self.q, self.qln, self.vq = nn.Linear(d, d), nn.LayerNorm(d), RefOverparam(d)


class RefBoom(nn.Module):
    def __init__(self, d, d_ff):
        super().__init__()
        self.linear1 = nn.Linear(d, d_ff)


class RefBlock(nn.Module):
    def __init__(self, d, d_ff, use_attn):
        super().__init__()
        self.attn = RefAttention(d) if use_attn else None
        for name in ("lnstart", "lnmid", "lnmem", "lnff", "lnxff", "lnout"):
            setattr(self, name, nn.LayerNorm(d))
        self.rnn, self.ff = nn.LSTM(d, d), RefBoom(d, d_ff)


class RefSHARNN(nn.Module):
    """A stand-in with the reference's attribute names (Smerity/sha-rnn model.py); its code is not needed."""

    def __init__(self, d=32, d_ff=128, n_layer=4):
        super().__init__()
        self.encoder = nn.Embedding(256, d)
        self.blocks = nn.ModuleList(RefBlock(d, d_ff, i == n_layer - 2) for i in range(n_layer))
        self.decoder = nn.Linear(d, 256)
        self.decoder.weight = self.encoder.weight


class RefCriterion(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("tail_vectors", torch.zeros(0, 32))


def _plant_marker(path):
    Path(path).write_text("the pickle ran code")


class Malicious:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_plant_marker, (str(self.marker),))


def assert_reproduces_fixture(model_dir: Path) -> None:
    info, _, expected, tokens = fixture("penultimate")
    model = load_model(model_dir)
    assert model.cfg.mem_len == info["max_positions"] == 40 and model.cfg.attn == "penultimate"
    with torch.no_grad():
        for i, (logits, _, _) in enumerate(run_segments(model, tokens.long(), info["segments"])):
            torch.testing.assert_close(logits, expected[f"seg{i}.logits"], atol=1e-4, rtol=0)


def test_import_reference_state_dict(tmp_path):
    from sharnn.convert import main

    assert main([str(FIXTURE), "--prefix", "penultimate.weights.", "--mem-len", "40", "--out",
                 str(tmp_path / "m")]) == 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "config.json",
                                                                   "model.safetensors"]
    assert_reproduces_fixture(tmp_path / "m")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_import_pickled_model_and_criterion_safely(tmp_path, zip_format):
    from sharnn.convert import main

    _, weights, _, _ = fixture("penultimate")
    ref = RefSHARNN()
    ref.load_state_dict(weights)
    path = tmp_path / "ENWIK8.pt"
    torch.save([ref, RefCriterion()], path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)  # the file really holds pickled modules
    assert main([str(path), "--mem-len", "40", "--out", str(tmp_path / "m")]) == 0
    assert_reproduces_fixture(tmp_path / "m")


def test_import_never_runs_code_from_the_pickle(tmp_path):
    from sharnn.convert import main

    marker = tmp_path / "marker"
    _, weights, _, _ = fixture("penultimate")
    torch.save({"state_dict": weights, "extra": Malicious(marker)}, tmp_path / "ckpt.pt")
    assert main([str(tmp_path / "ckpt.pt"), "--mem-len", "40", "--out", str(tmp_path / "m")]) == 0
    assert not marker.exists()
    assert_reproduces_fixture(tmp_path / "m")
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), tmp_path / "script.pt")
    exits_with(main, [str(tmp_path / "script.pt"), "--out", str(tmp_path / "s")], "TorchScript")


def test_import_bad_inputs(tmp_path, random_model):
    from sharnn.convert import main

    exits_with(main, [str(tmp_path / "nope.pt"), "--out", str(tmp_path / "m")], "is not a file")
    (tmp_path / "notes.txt").write_text("hello")
    exits_with(main, [str(tmp_path / "notes.txt"), "--out", str(tmp_path / "m")], "cannot read")
    exits_with(main, [str(random_model / "model.safetensors"), "--out", str(tmp_path / "m")],
               "sharnn's naming")
    exits_with(main, [str(FIXTURE), "--out", str(tmp_path / "m")], "--prefix")
    exits_with(main, [str(FIXTURE), "--prefix", "nothing.", "--out", str(tmp_path / "m")], "'nothing.'")
    _, weights, _, _ = fixture("penultimate")
    del weights["blocks.1.rnn.weight_hh_l0"]
    torch.save(weights, tmp_path / "partial.pt")
    exits_with(main, [str(tmp_path / "partial.pt"), "--out", str(tmp_path / "m")],
               "lack: blocks.1.lstm.weight_hh_l0", "incomplete")
    assert not (tmp_path / "m").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "partial.pt"]


# ---------------------------------------------------------------- a model the original code really trained
ORIGINAL = FIXTURES / "original_trained"
CORPUS_CACHE = "corpus.3b42f53ca4de297750b0b8fb8307357d.data"


def original_train_txt(data: bytes) -> str:
    """The original's text format, as its data/enwik8/prep_enwik8.py writes it."""
    return " ".join(str(c) if c != 10 else "\n" for c in data)


@pytest.fixture(scope="module")
def vocab_sources(tmp_path_factory) -> dict[str, Path]:
    """The three files a user may hold: the raw training bytes, the original's train.txt, its corpus cache."""
    import lzma

    d = tmp_path_factory.mktemp("vocab")
    (d / "train.txt").write_text(original_train_txt((ORIGINAL / "train.bytes").read_bytes()))
    (d / CORPUS_CACHE).write_bytes(lzma.decompress((ORIGINAL / f"{CORPUS_CACHE}.xz").read_bytes()))
    return {"raw bytes": ORIGINAL / "train.bytes", "train.txt": d / "train.txt",
            "corpus cache": d / CORPUS_CACHE}


@pytest.mark.parametrize("text, order", [
    (b"ba\nab", b"ba\n"),          # counts 2, 2, 2 (one <eos> per line, the last line's without a byte 10)
    (b"ba\nab\n", b"ba\n"),        # ends with a line break: no extra <eos>
    (b"aab", b"ab\n"),             # no line break at all: <eos> once, at the end
    (b"\n\nzzy", b"\nzy"),         # <eos> x3 first; ties (none here) would keep first appearance
    (b"cbbcaa", b"cba\n"),         # a tie of three: order of first appearance
])
def test_vocab_rules_on_small_texts(tmp_path, text, order):
    from sharnn.convert import read_original_vocab

    (tmp_path / "raw").write_bytes(text)
    (tmp_path / "train.txt").write_text(original_train_txt(text) if b" " not in text else "")
    raw = read_original_vocab(tmp_path / "raw")
    assert raw.kind == "raw bytes" and raw.byte_of_id == tuple(order)
    if len(set(text)) > 1:  # the original's format needs a space to be told apart from raw bytes
        as_text = read_original_vocab(tmp_path / "train.txt")
        assert as_text.kind == "train.txt" and as_text.byte_of_id == tuple(order)


def test_three_vocabulary_sources_give_the_same_map(vocab_sources, tmp_path):
    import zipfile

    from sharnn.convert import ENWIK8_HELD_OUT, read_original_vocab
    from sharnn.io.safe_pickle import safe_torch_load

    maps = {kind: read_original_vocab(path) for kind, path in vocab_sources.items()}
    assert {kind: v.kind for kind, v in maps.items()} == {kind: kind for kind in maps}
    cache = safe_torch_load(vocab_sources["corpus cache"])
    want = tuple(10 if w == "<eos>" else int(w) for w in cache.dictionary.idx2word)
    assert len(want) == 86 and all(v.byte_of_id == want for v in maps.values())
    # the original's data directory, and enwik8.zip split as prep_enwik8.py does (held-out tail not counted)
    assert read_original_vocab(vocab_sources["train.txt"].parent).byte_of_id == want
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("enwik8", (ORIGINAL / "train.bytes").read_bytes() + b"\0" * ENWIK8_HELD_OUT)
    assert read_original_vocab(tmp_path / "enwik8.zip").byte_of_id == want
    # a corpus cache in torch's legacy format (the original ran on torch 1.x), classes named as the original's
    legacy = tmp_path / "legacy.data"
    torch.save(_Corpus(list(cache.dictionary.idx2word)), legacy, _use_new_zipfile_serialization=False)
    assert read_original_vocab(legacy).byte_of_id == want


class _Dictionary:
    def __init__(self, idx2word):
        self.idx2word, self.word2idx = idx2word, {w: i for i, w in enumerate(idx2word)}


class _Corpus:
    def __init__(self, idx2word):
        self.dictionary, self.train = _Dictionary(idx2word), torch.zeros(3, dtype=torch.long)


@pytest.fixture(scope="module")
def imported_original(vocab_sources, tmp_path_factory) -> Path:
    from sharnn.convert import main

    out = tmp_path_factory.mktemp("original") / "model"
    assert main([str(ORIGINAL / "ref.pt"), "--vocab", str(vocab_sources["corpus cache"]),
                 "--out", str(out)]) == 0
    return out


def test_imported_rows_follow_the_bytes_and_keep_the_original_probabilities(imported_original, vocab_sources,
                                                                            tmp_path):
    from safetensors.torch import load_file

    from sharnn.convert import UNSEEN_BYTE_BIAS, main, read_original_vocab, read_reference_file

    ref = read_reference_file(ORIGINAL / "ref.pt")
    byte_of_id = list(read_original_vocab(vocab_sources["raw bytes"]).byte_of_id)
    unseen = sorted(set(range(256)) - set(byte_of_id))
    model = load_model(imported_original)
    assert model.cfg.vocab_size == 256 and len(unseen) == 170
    assert torch.equal(model.embed.weight[byte_of_id], ref["encoder.weight"])
    assert torch.equal(model.out_bias[byte_of_id], ref["decoder.bias"])
    assert not model.embed.weight[unseen].any() and (model.out_bias[unseen] == UNSEEN_BYTE_BIAS).all()
    # the same model whichever of the three files gave the vocabulary
    for kind in ("raw bytes", "train.txt"):
        assert main([str(ORIGINAL / "ref.pt"), "--vocab", str(vocab_sources[kind]),
                     "--out", str(tmp_path / kind)]) == 0
        got = load_file(tmp_path / kind / "model.safetensors")
        want = load_file(imported_original / "model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # on the test text: every byte the original knew gets the original's probability (a softmax over its 86
    # logits), every other byte below 1e-9
    text = torch.tensor(list((ORIGINAL / "test.bytes").read_bytes()[:512])).view(-1, 1)
    with torch.no_grad():
        logits, _, _ = model(text)
    log_p = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(log_p[..., byte_of_id], torch.log_softmax(logits[..., byte_of_id], dim=-1),
                               atol=1e-5, rtol=1e-6)  # float rounding only: sums over 256 vs 86
    assert log_p[..., unseen].exp().max() < 1e-9


def test_import_original_bad_vocabularies(vocab_sources, tmp_path):
    import zipfile

    from sharnn.convert import main

    ckpt, out = str(ORIGINAL / "ref.pt"), str(tmp_path / "m")
    files = ("train.txt", "corpus cache", "raw training bytes")
    exits_with(main, [ckpt, "--out", out], "86 rows, not 256", "--vocab", *files)
    exits_with(main, [ckpt, "--vocab", str(tmp_path / "nope"), "--out", out], "is not a file", *files)
    exits_with(main, [ckpt, "--vocab", str(ORIGINAL / "valid.bytes"), "--out", out],
               "raw bytes", "symbols, but the checkpoint's embedding has 86 rows")
    exits_with(main, [ckpt, "--vocab", ckpt, "--out", out], "holding a list",
               "not the original's corpus cache")
    (tmp_path / "bad.txt").write_text("32 101 300 \n 32")
    exits_with(main, [ckpt, "--vocab", str(tmp_path / "bad.txt"), "--out", out], "'300'", *files)
    (tmp_path / "empty").write_bytes(b"")
    exits_with(main, [ckpt, "--vocab", str(tmp_path / "empty"), "--out", out], "is empty")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("text8", b"abc")
    exits_with(main, [ckpt, "--vocab", str(tmp_path / "other.zip"), "--out", out], "neither enwik8", "text8")
    exits_with(main, [ckpt, "--vocab", str(vocab_sources["train.txt"]), "--train_bytes", "100", "--out", out],
               "--train_bytes applies to raw training bytes")
    exits_with(main, [ckpt, "--vocab", str(ORIGINAL / "train.bytes"), "--train_bytes", "10000000", "--out",
                      out], "197,320 bytes", "--train_bytes")
    exits_with(main, [ckpt, "--train_bytes", "100", "--out", out], "--train_bytes goes with --vocab")
    assert not (tmp_path / "m").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "empty", "other.zip"]


class _FullCorpus:
    """The original's data.Corpus as its main.py caches it: the dictionary and the three texts' ids."""

    def __init__(self, idx2word, train, valid, test):
        self.dictionary, self.train, self.valid, self.test = _Dictionary(idx2word), train, valid, test


def renumbered_cache(vocab_sources, path: Path, order) -> Path:
    """A self-consistent corpus cache of the same texts whose ids follow `order` (a permutation of the right
    idx2word): what a cache of another corpus with as many symbols looks like to the checkpoint."""
    from sharnn.io.safe_pickle import safe_torch_load

    cache = safe_torch_load(vocab_sources["corpus cache"])
    words = [cache.dictionary.idx2word[i] for i in order]
    new_id = torch.tensor([words.index(w) for w in cache.dictionary.idx2word])
    torch.save(_FullCorpus(words, new_id[cache.train], new_id[cache.valid], new_id[cache.test]), path)
    return path


def test_import_scores_the_vocabulary_and_refuses_one_of_another_corpus(vocab_sources, tmp_path, capsys):
    """Issue 26: a corpus cache whose symbol count matches but whose numbering is another corpus's was
    accepted without a word, and the imported model scored 6.747 bpc on the original's test text where the
    original printed 3.326 (3.327 as sharnn-eval counts). sharnn-import scores the imported model on the
    vocabulary's own text at once and refuses a vocabulary with which the checkpoint does worse than that
    text's own byte frequencies."""
    from sharnn.convert import main

    ckpt, whole_test = str(ORIGINAL / "ref.pt"), ["--score_bytes", "20K"]  # the original's test split
    assert main([ckpt, "--vocab", str(vocab_sources["corpus cache"]), *whole_test, "--out",
                 str(tmp_path / "m")]) == 0
    err = capsys.readouterr().err
    assert "3.327 bits per byte on the test split of the corpus cache" in err, err
    assert "(20,000 bytes), below the 4.536 bits per byte of that text's own byte frequencies" in err, err
    assert "vocabulary: checked" in err, err
    card = (tmp_path / "m" / "README.md").read_text()
    assert "checked: the imported model scores 3.327 bits per byte" in card, card

    wrong = renumbered_cache(vocab_sources, tmp_path / "corpus.other.data", list(range(86))[::-1])
    exits_with(main, [ckpt, "--vocab", str(wrong), *whole_test, "--out", str(tmp_path / "w")],
               "does not fit", "6.747 bits per byte on the test split", "worse than the 4.536",
               "train.txt, corpus cache or raw training bytes of the run")
    exits_with(main, [ckpt, "--vocab", str(wrong), "--out", str(tmp_path / "w")],  # the default: 8 KiB
               "does not fit", "(8,192 bytes), worse than the")
    assert not (tmp_path / "w").exists()


def test_import_without_a_text_to_score_says_the_vocabulary_was_taken_on_trust(vocab_sources, tmp_path,
                                                                               capsys):
    from sharnn.convert import main

    ckpt, cache = str(ORIGINAL / "ref.pt"), str(vocab_sources["corpus cache"])
    assert main([ckpt, "--vocab", cache, "--score_bytes", "0", "--out", str(tmp_path / "m")]) == 0
    err = capsys.readouterr().err
    assert "taken on trust" in err and "--score_bytes 0" in err, err
    assert "taken on trust" in (tmp_path / "m" / "README.md").read_text()


def test_import_uses_and_checks_the_checkpoints_own_vocabulary(imported_original, vocab_sources, tmp_path,
                                                               capsys):
    """A checkpoint that carries its vocabulary (here the dictionary saved beside the weights) needs no
    --vocab, and a --vocab that disagrees with it is refused."""
    from sharnn.convert import main, read_reference_file
    from sharnn.io.safe_pickle import safe_torch_load

    idx2word = list(safe_torch_load(vocab_sources["corpus cache"]).dictionary.idx2word)
    torch.save({"state_dict": read_reference_file(ORIGINAL / "ref.pt"), "dictionary": _Dictionary(idx2word)},
               tmp_path / "with_vocab.pt")
    assert main([str(tmp_path / "with_vocab.pt"), "--out", str(tmp_path / "m")]) == 0
    assert "vocabulary: the checkpoint's own: carried by the checkpoint itself" in capsys.readouterr().err
    want, got = load_model(imported_original).state_dict(), load_model(tmp_path / "m").state_dict()
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    wrong = renumbered_cache(vocab_sources, tmp_path / "corpus.other.data", list(range(86))[::-1])
    exits_with(main, [str(tmp_path / "with_vocab.pt"), "--vocab", str(wrong), "--out", str(tmp_path / "w")],
               "carries its own vocabulary", "differs", "drop --vocab")
    assert not (tmp_path / "w").exists()


def test_import_train_bytes_takes_size_suffixes(tmp_path):
    """Issue 26: --train_bytes refused the suffixes sharnn-prepare takes (10G, 64KiB)."""
    from sharnn.convert import main

    ckpt, out = str(ORIGINAL / "ref.pt"), str(tmp_path / "m")
    exits_with(main, [ckpt, "--vocab", str(ORIGINAL / "train.bytes"), "--train_bytes", "10G", "--out", out],
               "197,320 bytes", "10,000,000,000", "--train_bytes")
    assert main([ckpt, "--vocab", str(ORIGINAL / "train.bytes"), "--train_bytes", "197.32K", "--out",
                 out]) == 0


def test_256_rows_numbered_by_frequency_get_a_warning(tmp_path, capsys):
    """A checkpoint the original trained on a text holding all 256 bytes has 256 rows, numbered by frequency
    rather than by value: taken as bytes without --vocab, it now gets a warning (its output bias falls with
    the row number, as frequency numbering makes it fall); random weights do not."""
    from sharnn.convert import main

    _, weights, _, _ = fixture("penultimate")
    weights["decoder.bias"] = torch.linspace(2.0, -6.0, 256) + 0.3 * torch.randn(256)
    torch.save(weights, tmp_path / "by_frequency.pt")
    assert main([str(tmp_path / "by_frequency.pt"), "--out", str(tmp_path / "m")]) == 0
    err = capsys.readouterr().err
    assert "warning: bytes by value" in err and "falls with the row number" in err and "--vocab" in err, err
    assert main([str(FIXTURE), "--prefix", "penultimate.weights.", "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert "vocabulary: bytes by value: its 256 rows taken as bytes 0-255 by value\n" in err, err


def test_import_refuses_an_out_that_holds_what_it_reads(tmp_path):
    """The output rule with the import's inputs: --out the checkpoint's own folder names the checkpoint it
    would hold, and nothing there changes."""
    import shutil

    from sharnn.convert import main

    folder = tmp_path / "original"
    folder.mkdir()
    shutil.copy(ORIGINAL / "ref.pt", folder / "ref.pt")
    message = exits_with(main, [str(folder / "ref.pt"), "--out", str(folder)], "--out", "checkpoint")
    assert "ref.pt" in message and sorted(p.name for p in folder.iterdir()) == ["ref.pt"]
