"""Bring state dicts in the reference's naming (Smerity/sha-rnn model.py) into `SHARNN`.

Reference -> sharnn names (per block i):
    encoder.weight -> embed.weight (the reference ties decoder.weight to it)    decoder.bias -> out_bias
    lnstart/lnmem/lnmid/lnff/lnxff -> ln_start/ln_mem/ln_mid/ln_ff/ln_xff      rnn.* -> lstm.*
    ff.linear1 -> boom.proj      attn.qs/ks/vs -> attn.q_gate/k_gate/v_gate (1x1xd -> d)
    attn.q -> attn.query         attn.qln -> attn.query_ln
    attn.vq.l1 -> attn.v_overparam.proj
Ignored (held by the reference, never read by its forward): lnout, attn.qkvs, attn.r_gate, and
lnmem/lnmid of blocks without attention.

`sharnn-import` (`main` below) turns a file written by the reference code into an exported sharnn model
(model.safetensors + config.json) that `sharnn-eval`, `sharnn-generate` and `sharnn.io.pretrained.load_model`
take. It reads a state dict in the reference's naming (safetensors, or torch.save'd) or the reference's own
checkpoint, a pickled `[model, criterion]` list (its `model_save`). Pickles are read with the restricted
unpickler of `sharnn.io.safe_pickle`: tensors and containers only, every other class the file names an inert
stub
that records the pickled `_parameters`, `_buffers` and `_modules`; nothing from the file is executed.

A model the original code trained does not number bytes 0..255: its `data.Corpus` reads `train.txt` (every
byte a decimal token, a real line break for byte 10), adds `<eos>` at the end of every line (so byte 10
becomes `<eos>`, and a text not ending in a line break gets one more at its end), counts the tokens of the
training file and numbers them by falling frequency, ties in order of first appearance (a stable sort).
Its embedding, tied output and output bias have one row per id, none for bytes the training text lacks.
`read_original_vocab` rebuilds that id -> byte map from the original's `train.txt`, its corpus cache
(`corpus.<md5>.data`, a pickled `Corpus`, read with the same restricted unpickler) or the raw training bytes
(a file, or enwik8.zip split as the original's prep_enwik8.py does), and `to_byte_order` puts the rows in byte
order: 256 rows, zero embeddings for the bytes never seen and an output bias of UNSEEN_BYTE_BIAS for them.

A vocabulary of the right size may still be another text's numbering. Before anything is written,
`check_vocab` scores the imported model on the vocabulary's own text (a corpus cache's test split, the start
of train.txt or of the raw bytes) and refuses it when the model does worse than that text's byte frequencies,
which any model trained on such text beats. What could not be checked (no text, `--score_bytes 0`) is said
in the output and in the model card as "taken on trust". The cache's `<md5>` name is of the original's
`--data` string, not of the text, so it checks nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pickle
import re
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sharnn import cli
from sharnn.config import ModelConfig
from sharnn.io import atomic, signals
from sharnn.io.rundir import EXPORT_FILES
from sharnn.io.safe_pickle import PickledObject, safe_torch_load

_BLOCK_RENAMES = {
    "lnstart": "ln_start", "lnmem": "ln_mem", "lnmid": "ln_mid", "lnff": "ln_ff", "lnxff": "ln_xff",
    "rnn": "lstm", "ff.linear1": "boom.proj",
    "attn.qs": "attn.q_gate", "attn.ks": "attn.k_gate", "attn.vs": "attn.v_gate",
    "attn.qln": "attn.query_ln", "attn.q": "attn.query", "attn.vq.l1": "attn.v_overparam.proj",
}
UNUSED_IN_REFERENCE = ("lnout", "attn.qkvs", "attn.r_gate")


def infer_config(ref: dict[str, Tensor], mem_len: int = 5000) -> ModelConfig:
    """Read the architecture off a reference state dict (sizes, blocks, attention placement)."""
    if "encoder.weight" not in ref:
        raise ValueError("not a SHA-RNN reference state dict: no 'encoder.weight' key")
    vocab, d = ref["encoder.weight"].shape
    blocks = sorted({int(m.group(1)) for k in ref if (m := re.match(r"blocks\.(\d+)\.", k))})
    n_layer = len(blocks)
    if not blocks or blocks != list(range(n_layer)) or "blocks.0.ff.linear1.weight" not in ref:
        raise ValueError(f"not a complete SHA-RNN reference state dict: blocks {blocks}, "
                         f"{'with' if 'blocks.0.ff.linear1.weight' in ref else 'without'} "
                         "'blocks.0.ff.linear1.weight'")
    d_ff = ref["blocks.0.ff.linear1.weight"].shape[0]
    with_attn = tuple(i for i in blocks if f"blocks.{i}.attn.q.weight" in ref)
    if with_attn == tuple(range(n_layer)):
        attn = "all"
    elif with_attn == (n_layer - 2,):
        attn = "penultimate"
    elif not with_attn:
        attn = "none"
    else:
        raise ValueError(f"attention in blocks {with_attn} is not a placement sharnn knows "
                         "('penultimate', 'all', 'none')")
    return ModelConfig(vocab_size=vocab, d_model=d, d_ff=d_ff, n_layer=n_layer, attn=attn, mem_len=mem_len)


def from_reference(ref: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """A sharnn state dict from a reference one; unused reference tensors are dropped."""
    out: dict[str, Tensor] = {}
    for key, value in ref.items():
        if key == "encoder.weight":
            out["embed.weight"] = value
        elif key == "decoder.bias":
            out["out_bias"] = value
        elif key == "decoder.weight":
            if not torch.equal(value, ref["encoder.weight"]):
                raise ValueError("decoder.weight differs from encoder.weight: sharnn ties them, "
                                 "so an untied reference model cannot be converted")
        else:
            leaves = "weight|bias|weight_ih_l0|weight_hh_l0|bias_ih_l0|bias_hh_l0"
            m = re.match(rf"blocks\.(\d+)\.(.+)\.({leaves})$", key)
            gate = re.match(r"blocks\.(\d+)\.(attn\.(?:qs|ks|vs|qkvs|r_gate))$", key)
            if gate:
                i, name, leaf = gate.group(1), gate.group(2), None
            elif m:
                i, name, leaf = m.groups()
            else:
                raise ValueError(f"unexpected key {key!r} in the reference state dict")
            if name in UNUSED_IN_REFERENCE:
                continue
            if name in ("lnmem", "lnmid") and int(i) not in cfg.attn_layers:
                continue
            if name not in _BLOCK_RENAMES:
                raise ValueError(f"unexpected key {key!r} in the reference state dict")
            new = f"blocks.{i}.{_BLOCK_RENAMES[name]}"
            out[new if leaf is None else f"{new}.{leaf}"] = value.reshape(-1) if leaf is None else value
    return out


def load_reference(model: torch.nn.Module, ref: dict[str, Tensor]) -> None:
    """Load a reference state dict into `model`, strictly: every tensor the model holds must be given."""
    converted = from_reference(ref, model.cfg)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(f"reference state dict does not fit this model: missing {missing}, "
                         f"unexpected {unexpected}")


# ------------------------------------------------------------------ reading the reference's files safely
def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{")


def _module_tensors(obj: PickledObject, prefix: str = "") -> dict[str, Tensor]:
    """The state dict of a pickled nn.Module: its `_parameters` and persistent `_buffers`, recursively."""
    out: dict[str, Tensor] = {}
    skip = getattr(obj, "_non_persistent_buffers_set", None) or set()
    for attr in ("_parameters", "_buffers"):
        for name, t in (getattr(obj, attr, None) or {}).items():
            if isinstance(t, Tensor) and not (attr == "_buffers" and name in skip):
                out[prefix + name] = t
    for name, child in (getattr(obj, "_modules", None) or {}).items():
        if isinstance(child, PickledObject):
            out.update(_module_tensors(child, f"{prefix}{name}."))
    return out


def _state_dict_of(obj, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, (list, tuple)) and obj:  # the reference's model_save: [model, criterion(, optimizer)]
        obj = obj[0]
    if isinstance(obj, PickledObject):
        if not isinstance(getattr(obj, "_parameters", None), dict):
            raise ValueError(f"{path} holds a pickled {obj.pickled_name}, which is not an nn.Module")
        return _module_tensors(obj)
    if isinstance(obj, dict):
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return dict(obj)
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj:
                return _state_dict_of(obj[key], path)
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict or a pickled [model, criterion]")


def read_reference_file(path: str | Path, prefix: str = "") -> dict[str, Tensor]:
    """A state dict in the reference's naming from a safetensors file, a torch.save'd state dict or the
    reference's pickled [model, criterion] (read safely), keys under `prefix` only (prefix removed)."""
    return read_reference(path, prefix)[0]


def read_reference(path: str | Path, prefix: str = "") -> tuple[dict[str, Tensor], OriginalVocab | None]:
    """`read_reference_file`'s state dict, and the original's vocabulary when the file carries one (a
    dictionary with `idx2word` saved beside the weights, see `_carried_vocab`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is not a file; give a checkpoint written by the reference code (a state "
                         "dict saved with torch.save or safetensors, or its pickled [model, criterion])")
    carried = None
    try:
        if _is_safetensors(path):
            tensors = load_file(path)
        else:
            obj = safe_torch_load(path)
            tensors, carried = _state_dict_of(obj, path), _carried_vocab(obj, path)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, TypeError,
            AttributeError, KeyError, IndexError, OSError) as e:
        raise ValueError(f"cannot read {path} as a safetensors or torch.save file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); give a reference state dict or "
                         "pickled [model, criterion]") from None
    if prefix:
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not tensors:
            raise ValueError(f"{path} holds no tensor whose name starts with {prefix!r}")
    if "encoder.weight" not in tensors and "module.encoder.weight" in tensors:  # saved from nn.DataParallel
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    if "encoder.weight" not in tensors:
        names = sorted(tensors)
        tops = sorted({k.split(".")[0] for k in names})
        if "embed.weight" in tensors:
            hint = ("it is already in sharnn's naming: load it with sharnn.io.pretrained (it needs its "
                    "config.json beside it) rather than importing it")
        else:
            hint = (f"its top-level names are {tops[:10]}; if the weights sit under a prefix, pass --prefix "
                    "(e.g. --prefix model.)")
        raise ValueError(f"{path} is not a SHA-RNN reference state dict (no 'encoder.weight'): {hint}")
    # sharnn computes in fp32: bring half-precision reference weights over as fp32 (exactly representable).
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous()
            for k, v in tensors.items()}, carried


# ------------------------------------------------------------------ the original's vocabulary -> bytes
EOS = "<eos>"
LINE_BREAK = 10
"""The byte the original turns into `<eos>`: its train.txt writes byte 10 as a real line break."""
UNSEEN_BYTE_BIAS = -1e4
"""Output bias of a byte the original never saw. Its embedding row is zero, so this is its logit whatever the
context: e^-10000 is 0 in fp32 beside any logit a trained model gives (probability far below 1e-9), so the
bytes the original knew keep exactly the original's probabilities. Finite, so fp16 and bf16 copies hold
it too."""
ENWIK8_HELD_OUT = 10_000_000
"""The original's prep_enwik8.py keeps all of enwik8 but its last 2 x 5,000,000 bytes as training text."""
VOCAB_FILES = ("the original's train.txt (or the data directory holding it), its corpus cache "
               "(corpus.<md5>.data, written where main.py ran) or the raw training bytes (a file, or "
               "enwik8.zip)")
_CHUNK = 1 << 20
_TORCH_LEGACY_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save's magic number, pickled (legacy)


@dataclasses.dataclass(frozen=True)
class OriginalVocab:
    """The original code's token ids as bytes, rebuilt from its training text."""

    byte_of_id: tuple[int, ...]
    """byte_of_id[i] is the byte the original's token id i stands for (10 for `<eos>`)."""
    kind: str
    """The source it was read from: "train.txt", "corpus cache", "raw bytes" or "checkpoint" (the
    checkpoint's own)."""
    path: Path
    train_bytes: int | None = None
    """Raw bytes only: the training text is the file's first `train_bytes` (None: as
    `_raw_training_chunks` takes it)."""

    def describe(self) -> str:
        if self.kind == "checkpoint":
            return f"the vocabulary {self.path} carries"
        return f"the {self.kind} {self.path}"


def _byte_of_word(word: str, path: Path, where: str = "--vocab") -> int:
    """The byte a token of the original's train.txt format stands for."""
    if word == EOS:
        return LINE_BREAK
    if re.fullmatch(r"0|[1-9][0-9]{0,2}", word) and int(word) < 256 and int(word) != LINE_BREAK:
        return int(word)
    problem = ("byte 10 is written as a line break, never as a token" if word == str(LINE_BREAK) else
               "every token must be a byte value 0-255 in decimal, or <eos>")
    raise ValueError(f"{where} {path}: its vocabulary holds the token {word[:20]!r}: not the original's "
                     f"byte-level format ({problem}, as data/enwik8/prep_enwik8.py writes). Pass "
                     f"{VOCAB_FILES}")


def _vocab_of_words(words: list[str], kind: str, path: Path, where: str = "--vocab") -> OriginalVocab:
    if not words:
        raise ValueError(f"{where} {path}: the {kind} holds no tokens. Pass {VOCAB_FILES}")
    return OriginalVocab(tuple(_byte_of_word(w, path, where) for w in words), kind, path)


def _carried_vocab(obj, path: Path, depth: int = 0) -> OriginalVocab | None:
    """The original's vocabulary when a checkpoint carries one: an object (its data.Dictionary or Corpus, or a
    plain dict) holding `idx2word`, a list of tokens, anywhere in the first levels of what the file holds.
    The reference's own `model_save` stores none; a training script may have saved one beside the weights."""
    if depth > 4 or isinstance(obj, Tensor):
        return None
    fields = obj if isinstance(obj, dict) else vars(obj) if isinstance(obj, PickledObject) else {}
    words = fields.get("idx2word")
    if isinstance(words, list) and words and all(isinstance(w, str) for w in words):
        return _vocab_of_words(words, "checkpoint", path, where="the vocabulary carried by")
    if isinstance(obj, (list, tuple)):
        children = list(obj)
    else:  # a module's tensors are no vocabulary: skip them
        children = [v for k, v in fields.items() if k not in ("_parameters", "_buffers", "_pickled_args")]
    for child in children:
        if (found := _carried_vocab(child, path, depth + 1)) is not None:
            return found
    return None


def vocab_from_train_txt(path: Path) -> OriginalVocab:
    """As the original's data.Corpus: each line's tokens, then `<eos>`, counted; ids by falling count, ties in
    order of first appearance (Counter keeps first appearances in order; sorted() is stable)."""
    counts: collections.Counter[str] = collections.Counter()
    try:
        with open(path, encoding="utf-8") as f:  # text mode, universal newlines: as the original opens it
            for line in f:
                counts.update(line.split())
                counts[EOS] += 1
    except UnicodeDecodeError:
        raise ValueError(f"--vocab {path} starts like the original's train.txt but is not text. Pass "
                         f"{VOCAB_FILES}") from None
    by_frequency = sorted(counts.items(), key=lambda item: item[1], reverse=True)
    return _vocab_of_words([word for word, _ in by_frequency], "train.txt", path)


def vocab_from_corpus_cache(path: Path) -> OriginalVocab:
    """The dictionary of the original's pickled data.Corpus, read without running code from the file."""
    try:
        corpus = safe_torch_load(path, mmap=True)  # its token tensors (800 MB for enwik8) are not needed
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, TypeError, AttributeError,
            KeyError, IndexError, OSError, ValueError) as e:
        raise ValueError(f"--vocab {path}: cannot read it as the original's corpus cache "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Pass "
                         f"{VOCAB_FILES}") from None
    dictionary = getattr(corpus, "dictionary", None)
    idx2word = getattr(dictionary, "idx2word", None)
    if not (isinstance(corpus, PickledObject) and isinstance(idx2word, list)
            and all(isinstance(w, str) for w in idx2word)):
        what = corpus.pickled_name if isinstance(corpus, PickledObject) else type(corpus).__name__
        raise ValueError(f"--vocab {path} is a torch.save file holding a {what}, not the original's corpus "
                         f"cache (a pickled data.Corpus with dictionary.idx2word). Pass {VOCAB_FILES}")
    word2idx = getattr(dictionary, "word2idx", None)
    if isinstance(word2idx, dict) and any(word2idx.get(w) != i for i, w in enumerate(idx2word)):
        raise ValueError(f"--vocab {path}: the corpus cache's word2idx and idx2word disagree; it is damaged. "
                         "Pass the run's train.txt or raw training bytes instead")
    return _vocab_of_words(idx2word, "corpus cache", path)


def _raw_training_chunks(path: Path, train_bytes: int | None) -> Iterator[np.ndarray]:
    """The training bytes in pieces: a plain file's first `train_bytes` (default all), or enwik8.zip's
    `enwik8` without its last ENWIK8_HELD_OUT bytes, as the original's prep_enwik8.py splits it."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            info = z.getinfo("enwik8")
            n = info.file_size - ENWIK8_HELD_OUT if train_bytes is None else train_bytes
            if not 0 < n <= info.file_size:
                raise ValueError(f"--vocab {path}: its enwik8 holds {info.file_size:,} bytes; cannot take "
                                 f"{n:,} of them as training text (see --train_bytes)")
            with z.open(info) as f:
                while n > 0 and (piece := f.read(min(_CHUNK, n))):
                    n -= len(piece)
                    yield np.frombuffer(piece, dtype=np.uint8)
        return
    size = path.stat().st_size
    n = size if train_bytes is None else train_bytes
    if not 0 < n <= size:
        raise ValueError(f"--vocab {path} holds {size:,} bytes; cannot take {n:,} of them as training text"
                         + (" (see --train_bytes)" if train_bytes else f". Pass {VOCAB_FILES}"))
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for start in range(0, n, _CHUNK):
        yield np.asarray(data[start:min(start + _CHUNK, n)])


def vocab_from_raw_bytes(path: Path, train_bytes: int | None = None) -> OriginalVocab:
    """The original's numbering simulated on raw training bytes: every byte a token, byte 10 the end of a
    line (`<eos>`), one more `<eos>` at the end if the text does not end with byte 10; ids by falling count,
    ties by first appearance."""
    counts = np.zeros(256, dtype=np.int64)
    first_seen = np.full(256, -1, dtype=np.int64)
    offset, last = 0, None
    for chunk in _raw_training_chunks(path, train_bytes):
        present = np.bincount(chunk, minlength=256)
        for value in np.flatnonzero((present > 0) & (first_seen < 0)):  # at most 256 times in all
            first_seen[value] = offset + int(np.argmax(chunk == value))
        counts += present
        offset, last = offset + len(chunk), int(chunk[-1])
    if last != LINE_BREAK:  # the last line's <eos>, after the last byte
        counts[LINE_BREAK] += 1
        if first_seen[LINE_BREAK] < 0:
            first_seen[LINE_BREAK] = offset
    order = sorted(np.flatnonzero(counts).tolist(), key=lambda b: (-counts[b], first_seen[b]))
    return OriginalVocab(tuple(order), "raw bytes", path, train_bytes)


def _looks_like_train_txt(head: bytes) -> bool:
    """The original's format: decimal tokens separated by spaces, line breaks for byte 10."""
    return re.fullmatch(rb"[0-9 \n]+", head) is not None and b" " in head


def read_original_vocab(path: str | Path, train_bytes: int | None = None) -> OriginalVocab:
    """The original's id -> byte map from whichever of its three sources `path` is (told apart by content)."""
    path = Path(path)
    if path.is_dir() and (path / "train.txt").is_file():  # the original's --data directory
        path = path / "train.txt"
    if not path.is_file():
        raise ValueError(f"--vocab {path} is not a file. Pass {VOCAB_FILES}")
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            kind = "corpus cache"
        elif "enwik8" in names:
            kind = "raw bytes"
        else:
            raise ValueError(f"--vocab {path} is a zip holding neither enwik8 nor a torch.save'd corpus "
                             f"cache (it holds {', '.join(names[:5]) or 'nothing'}). Pass {VOCAB_FILES}")
    elif head[:1] == b"\x80" and head[2:14] == _TORCH_LEGACY_MAGIC:
        kind = "corpus cache"
    elif _looks_like_train_txt(head):
        kind = "train.txt"
    else:
        kind = "raw bytes"
    if train_bytes is not None and kind != "raw bytes":
        raise ValueError(f"--train_bytes applies to raw training bytes; --vocab {path} is a {kind}")
    if kind == "corpus cache":
        return vocab_from_corpus_cache(path)
    if kind == "train.txt":
        return vocab_from_train_txt(path)
    if not head:
        raise ValueError(f"--vocab {path} is empty. Pass {VOCAB_FILES}")
    return vocab_from_raw_bytes(path, train_bytes)


def to_byte_order(ref: dict[str, Tensor], vocab: OriginalVocab) -> dict[str, Tensor]:
    """A reference state dict whose vocabulary rows follow the original's ids -> the same with 256 rows in
    byte order: zero embeddings and an output bias of UNSEEN_BYTE_BIAS for the bytes the original never
    saw."""
    rows = ref["encoder.weight"].shape[0]
    if rows != len(vocab.byte_of_id):
        raise ValueError(f"--vocab {vocab.path} ({vocab.kind}) gives the original's vocabulary "
                         f"{len(vocab.byte_of_id)} symbols, but the checkpoint's embedding has {rows} rows: "
                         "it is not the training text of this checkpoint. Pass the train.txt, corpus cache "
                         "or raw training bytes of the run that wrote it")
    index = torch.tensor(vocab.byte_of_id)
    out = dict(ref)
    for key, fill in (("encoder.weight", 0.0), ("decoder.weight", 0.0), ("decoder.bias", UNSEEN_BYTE_BIAS)):
        if key in ref:
            spread = ref[key].new_full((256, *ref[key].shape[1:]), fill)
            spread[index] = ref[key]
            out[key] = spread
    return out


# ------------------------------------------------------------------ checking the vocabulary against its text
SCORE_BYTES = 8192
"""Default bytes of the vocabulary's own text the imported model is scored on (8 streams of 1 KiB): a wrong
numbering costs bits per byte, not hundredths (the fixture's checkpoint: 3.3 against 6.7), so a little text
tells; at the paper's size it takes seconds on a GPU (used when there is one), about 10 s on 8 CPU cores."""
SCORE_STREAMS, SCORE_BPTT = 8, 64
"""How that text is scored: as the original's test evaluation (8 streams; segments of its bptt, 64 in the
fixture's run), state carried."""
FREQUENCY_NUMBERED_SPEARMAN = 0.8
"""A 256-row checkpoint imported without --vocab whose output bias falls with the row number at least this
closely (Spearman) looks numbered by frequency, as the original numbers its symbols: a warning says so."""


@dataclasses.dataclass(frozen=True)
class VocabCheck:
    """What sharnn-import could check of the vocabulary it was given, for its output and the model card."""

    verdict: str
    """"checked" (the imported model beats the byte frequencies of the vocabulary's own text), "the
    checkpoint's own" (carried by the checkpoint, nothing to score it on) or "taken on trust"."""
    detail: str
    """The evidence, one clause: what was scored and the numbers, or why nothing was."""
    bpc: float | None = None
    """The imported model's bits per byte on `text` (None: not scored)."""
    text: str = ""
    """What was scored: "the test split of the corpus cache PATH (20,000 bytes)"."""
    warning: bool = False
    """Whether `detail` warns of something the user should look at (the import went ahead)."""


def vocab_text(vocab: OriginalVocab, n: int) -> tuple[np.ndarray, str] | None:
    """Up to `n` bytes of the text the vocabulary was counted on, and what they are: a corpus cache's test
    split (else valid, else train) decoded through its own dictionary, train.txt's first tokens, the raw
    training bytes' first `n`. None when the source holds no text to score (a checkpoint's own vocabulary)."""
    if n <= 0 or vocab.kind == "checkpoint":
        return None
    if vocab.kind == "corpus cache":
        corpus = safe_torch_load(vocab.path, mmap=True)  # read already once: its tensors are mapped, not read
        for split in ("test", "valid", "train"):
            ids = getattr(corpus, split, None)
            if isinstance(ids, Tensor) and ids.dim() == 1 and ids.numel() >= 2 * SCORE_STREAMS:
                ids = ids[:n].numpy()
                if ((ids < 0) | (ids >= len(vocab.byte_of_id))).any():
                    raise ValueError(f"--vocab {vocab.path}: the corpus cache's {split} split holds ids "
                                     "outside its dictionary; it is damaged. Pass the run's train.txt or raw "
                                     "training bytes instead")
                return np.asarray(vocab.byte_of_id, dtype=np.uint8)[ids], \
                    f"the {split} split of the corpus cache {vocab.path}"
        return None
    if vocab.kind == "train.txt":
        out: list[int] = []
        with open(vocab.path, encoding="utf-8") as f:
            for line in f:
                out += [_byte_of_word(w, vocab.path) for w in line.split()] + [LINE_BREAK]
                if len(out) >= n:
                    break
        return np.asarray(out[:n], dtype=np.uint8), f"the start of the train.txt {vocab.path}"
    pieces, got = [], 0
    for chunk in _raw_training_chunks(vocab.path, vocab.train_bytes):
        pieces.append(chunk[:n - got])
        got += len(pieces[-1])
        if got >= n:
            break
    return np.concatenate(pieces), f"the start of the raw training bytes {vocab.path}"


@torch.no_grad()
def score_bpc(model: torch.nn.Module, data: np.ndarray) -> float:
    """Bits per byte of `model` on `data`: SCORE_STREAMS streams, segments of SCORE_BPTT, state carried, every
    stream's first byte unpredicted (as sharnn-eval)."""
    import math

    from sharnn.corpus.data import ByteSplit, EvalStreams

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    total, state = torch.zeros((), dtype=torch.float64, device=device), None
    streams = EvalStreams(ByteSplit.from_bytes(data), SCORE_STREAMS, SCORE_BPTT, 0, 1)
    try:
        for x, y in streams:
            x, y = x.to(device).t(), y.to(device).t()  # (T, b): time-major
            _, loss, state = model(x, state, targets=y)
            total += loss.double() * y.numel()
    finally:
        model.to("cpu")
    return total.item() / streams.total_predictions / math.log(2)


def unigram_bpc(data: np.ndarray) -> float:
    """The entropy of `data`'s own byte frequencies, in bits per byte: what an output bias alone can reach on
    it, and what any model trained on such text beats."""
    counts = np.bincount(data, minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two equally long vectors (ties get their mean rank)."""
    def ranks(x: np.ndarray) -> np.ndarray:
        _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        ends = np.cumsum(counts)
        return ((ends - (counts - 1) / 2.0))[inverse]

    ra, rb = ranks(np.asarray(a, dtype=np.float64)), ranks(np.asarray(b, dtype=np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def check_vocab(model: torch.nn.Module, vocab: OriginalVocab, source: str | Path, n_bytes: int) -> VocabCheck:
    """Score the imported `model` on its vocabulary's own text: with the right vocabulary a trained model
    beats that text's byte frequencies (the original's fixture: 3.327 bpc against 4.536); with another
    corpus's numbering it does worse (6.747). ValueError when it does worse; "taken on trust" when there is
    no text."""
    if vocab.kind == "checkpoint" and n_bytes:
        return VocabCheck("the checkpoint's own", "carried by the checkpoint itself, which holds no text to "
                                                  "score it on")
    sample = vocab_text(vocab, n_bytes)
    if sample is None or len(sample[0]) < 2 * SCORE_STREAMS:
        why = ("not scored (--score_bytes 0)" if not n_bytes else
               f"{vocab.describe()} holds no text to score the imported model on")
        return VocabCheck("taken on trust", f"{why}: nothing confirms that its numbering is the one the "
                                            "checkpoint was trained with")
    data, what = sample
    what = f"{what} ({len(data):,} bytes)"
    bpc, baseline = score_bpc(model, data), unigram_bpc(data)
    seen = np.asarray(sorted(vocab.byte_of_id))
    agreement = _spearman(model.out_bias.detach().numpy()[seen], np.bincount(data, minlength=256)[seen])
    evidence = (f"the imported model scores {bpc:.3f} bits per byte on {what}, "
                f"{'below' if bpc < baseline else 'worse than'} the {baseline:.3f} bits per byte of that "
                f"text's own byte frequencies (its output bias against those frequencies: Spearman "
                f"{agreement:+.2f})")
    if bpc >= baseline:
        raise ValueError(f"--vocab {vocab.path} ({vocab.kind}) does not fit {source}: {evidence}; any model "
                         "trained on that text beats its byte frequencies, so the vocabulary numbers the "
                         "symbols otherwise than the run that wrote the checkpoint. Pass the train.txt, "
                         "corpus cache or raw training bytes of the run that wrote it (--score_bytes 0 "
                         "imports it unchecked, recorded as taken on trust); nothing was written")
    return VocabCheck("checked", evidence, bpc, what)


def check_byte_rows(bias: Tensor) -> VocabCheck:
    """A 256-row checkpoint imported without a vocabulary is taken as bytes by value; one whose output bias
    falls with the row number (as the original's frequency numbering makes it fall) gets a warning."""
    falls = _spearman(bias.numpy(), -np.arange(len(bias)))
    detail = "its 256 rows taken as bytes 0-255 by value"
    if falls < FREQUENCY_NUMBERED_SPEARMAN:
        return VocabCheck("bytes by value", detail)
    return VocabCheck("bytes by value", f"{detail}, although its output bias falls with the row number "
                      f"(Spearman {falls:+.2f}) as in a model the original code trained, which numbers its "
                      f"symbols by falling frequency: if it is one, import it again with --vocab "
                      f"({VOCAB_FILES})", warning=True)


@dataclasses.dataclass(frozen=True)
class Imported:
    """What `import_reference` wrote."""

    config: ModelConfig
    ignored: list[str]
    """The reference tensors left out: held by the reference, never read by its forward."""
    vocab: OriginalVocab | None
    """The vocabulary whose ids were put in byte order: --vocab's, or the one the checkpoint carries."""
    check: VocabCheck
    """What was checked of it (or of the 256 rows taken as bytes)."""


def import_reference(path: str | Path, out: str | Path, mem_len: int = 5000, prefix: str = "",
                     overwrite: bool = False, vocab: OriginalVocab | None = None,
                     score_bytes: int = SCORE_BYTES) -> Imported:
    """Convert a reference checkpoint into an exported sharnn model directory (with its model card). With
    `vocab` (the original's ids as bytes, see `read_original_vocab`) or a vocabulary the checkpoint carries,
    the vocabulary rows are put in byte order and the model is scored on up to `score_bytes` of the
    vocabulary's own text (`check_vocab`) before anything is written."""
    from sharnn.io import hub
    from sharnn.io.pretrained import build_model, check_output_dir, check_state_dict, save_state_dict

    check_output_dir(out, overwrite)
    ref, carried = read_reference(path, prefix)
    if carried is not None and vocab is not None and carried.byte_of_id != vocab.byte_of_id:
        mine, theirs = carried.byte_of_id, vocab.byte_of_id
        at = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        raise ValueError(f"{path} carries its own vocabulary ({len(mine)} symbols), and --vocab "
                         f"{vocab.path} ({vocab.kind}, {len(theirs)} symbols) differs from it from id {at} "
                         "on; drop --vocab: the checkpoint's own vocabulary is the one it was trained with")
    vocab = vocab or carried
    metadata = {"source": str(path), "converted_from": "Smerity/sha-rnn reference naming"}
    if vocab is not None:
        ref = to_byte_order(ref, vocab)
    elif ref["encoder.weight"].shape[0] != 256:
        raise ValueError(f"{path}: its embedding has {ref['encoder.weight'].shape[0]} rows, not 256: a model "
                         "the original code trained numbers the symbols of its training text by frequency, "
                         f"not bytes by value. Pass --vocab with {VOCAB_FILES}")
    cfg = infer_config(ref, mem_len=mem_len)
    converted = from_reference(ref, cfg)
    check_state_dict(cfg, converted, where=f"the tensors of {path} (in sharnn's naming)",
                     hint="the architecture was read off the file's own tensors, so the file is "
                          "incomplete or not a SHA-RNN of the reference code")
    model = build_model(cfg, converted)
    if vocab is None:
        check = check_byte_rows(model.out_bias.detach())
        vocabulary = f"{check.verdict}: {check.detail}"
    else:
        check = check_vocab(model, vocab, path, score_bytes)
        metadata["original_vocab"] = json.dumps({"kind": vocab.kind, "path": str(vocab.path),
                                                 "byte_of_id": list(vocab.byte_of_id),
                                                 "check": dataclasses.asdict(check)})
        vocabulary = f"{vocab.describe()}, {check.verdict}: {check.detail}"
    provenance = hub.Provenance(
        corpus={"source": {"kind": "the training text of the original code (Smerity/sha-rnn)",
                           "imported from": str(path), "vocabulary": vocabulary}},
        test_note="not measured" if check.bpc is None else
        f"{check.bpc:.3f} bits per byte on {check.text}, scored by sharnn-import ({SCORE_STREAMS} streams, "
        f"segments of {SCORE_BPTT} bytes)")
    metadata[hub.PROVENANCE_KEY] = provenance.to_json()
    card = hub.model_card(cfg, model.num_params(), provenance)
    ignored = [k for k in ref if k != "decoder.weight" and _renamed(k) not in converted]
    save_state_dict(converted, cfg, out, overwrite=overwrite, metadata=metadata, card=card)
    return Imported(cfg, ignored, vocab, check)


def _renamed(key: str) -> str:
    """The sharnn name of a reference key (for reporting only)."""
    if key == "encoder.weight":
        return "embed.weight"
    if key == "decoder.bias":
        return "out_bias"
    m = re.match(r"blocks\.(\d+)\.(.+?)(\.(?:weight|bias|weight_ih_l0|weight_hh_l0|bias_ih_l0|bias_hh_l0))?$",
                 key)
    if not m or m.group(2) not in _BLOCK_RENAMES:
        return ""
    return f"blocks.{m.group(1)}.{_BLOCK_RENAMES[m.group(2)]}{m.group(3) or ''}"


def _byte_count(text: str) -> int:
    """argparse type: a byte count as sharnn-prepare takes them (5000000, 5M, 64KiB)."""
    from sharnn.corpus.prepare import _byte_count as prepare_byte_count  # imports datasets: only when given

    return prepare_byte_count(text)


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="sharnn-import",
        description="Convert a checkpoint of the reference code (Smerity/sha-rnn) into an exported sharnn "
                    "model (OUT/model.safetensors + OUT/config.json) that sharnn-eval and sharnn-generate "
                    "take. "
                    "Accepts a state dict in the reference's naming (safetensors or torch.save) or the "
                    "reference's pickled [model, criterion] file, read without running code from it. A model "
                    "the original code trained numbers its symbols by frequency in its training text: pass "
                    "--vocab.")
    parser.add_argument("source", type=Path, help="the reference checkpoint file")
    parser.add_argument("--out", type=Path, required=True, help="directory to write the sharnn model to")
    parser.add_argument(*cli.spellings("--mem_len"), type=int, default=5000,
                        help="attention memory length to record (the reference used 5000; "
                             "default %(default)s)")
    parser.add_argument("--prefix", default="",
                        help="take only the tensors whose names start with this and strip it "
                             "(e.g. 'model.' for a state dict nested in a training checkpoint)")
    parser.add_argument("--vocab", type=Path, metavar="PATH",
                        help="for a model the original code trained: where its vocabulary comes from, "
                             f"{VOCAB_FILES}; its ids are mapped back to bytes")
    parser.add_argument(*cli.spellings("--train_bytes"), type=_byte_count, metavar="N",
                        help="with raw bytes as --vocab: the training text is their first N bytes, e.g. 90M "
                             "(default: the whole file; enwik8.zip: all but the last 10,000,000, as "
                             "prep_enwik8.py)")
    parser.add_argument(*cli.spellings("--score_bytes"), type=_byte_count, default=SCORE_BYTES, metavar="N",
                        help="score the imported model on the first N bytes of the vocabulary's own text (a "
                             "corpus cache's test split) before writing it, refusing a vocabulary with which "
                             "it does worse than that text's byte frequencies (default %(default)s; 0: do "
                             "not score, the model card then says the vocabulary was taken on trust)")
    parser.add_argument("--overwrite", action="store_true", help="replace an exported model already in --out")
    return parser


@signals.command
def main(argv: list[str] | None = None) -> int:
    """Entry point of `sharnn-import` and `python -m sharnn.convert`; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.mem_len < 1:
        raise SystemExit(f"error: --mem_len must be >= 1, got {args.mem_len}")
    if args.train_bytes is not None and args.vocab is None:
        raise SystemExit("error: --train_bytes goes with --vocab (raw training bytes)")
    try:  # the output rule, with what the import reads: --out may be neither, nor lie inside either
        atomic.check_output(args.out, "--out", kind="dir", what="exported model",
                            is_ours=atomic.holds_only(EXPORT_FILES),
                            inputs=[("checkpoint", args.source), ("vocabulary (--vocab)", args.vocab)],
                            overwrite=args.overwrite)
    except atomic.OutputRefused as e:
        raise SystemExit(f"error: {e}") from None
    try:
        vocab = None if args.vocab is None else read_original_vocab(args.vocab, args.train_bytes)
        done = import_reference(args.source, args.out, args.mem_len, args.prefix, args.overwrite, vocab,
                                args.score_bytes)
    except ValueError as e:  # includes sharnn.io.pretrained.ModelError
        raise SystemExit(f"error: {e}") from None
    arch = ", ".join(f"{k}={getattr(done.config, k)}"
                     for k in ("d_model", "d_ff", "n_layer", "attn", "mem_len"))
    print(f"imported {args.source} ({arch}) to {args.out}", file=sys.stderr)
    if done.vocab is not None:
        print(f"the original's {len(done.vocab.byte_of_id)} symbols ({done.vocab.describe()}) put in byte "
              f"order; the {256 - len(done.vocab.byte_of_id)} bytes it never saw get output bias "
              f"{UNSEEN_BYTE_BIAS:g}", file=sys.stderr)
    print(f"{'warning' if done.check.warning else 'vocabulary'}: {done.check.verdict}: {done.check.detail}",
          file=sys.stderr)
    if done.ignored:
        print(f"left out {len(done.ignored)} reference tensors its forward never reads: "
              f"{', '.join(done.ignored)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
