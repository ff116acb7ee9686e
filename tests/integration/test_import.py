"""sharnn-import (sharnn/convert.py): the reference's state dicts and pickled checkpoints become sharnn models
that reproduce the reference fixture; code in a pickle never runs; bad inputs."""

from __future__ import annotations

import pytest

from tests.unit import test_import as unit
from tests.unit.test_import import ORIGINAL

pytestmark = pytest.mark.usefixtures("one_thread")
PRINTED = {"valid": 3.395, "test": 3.326}  # main.log: the original's last two lines (3 decimals)
PRINTED_STREAMS = 8  # the original's min(100, batch_size) validation streams and its 8 test streams
PRINTED_BPTT = 64

imported_original = unit.imported_original  # the unit tests' fixture
vocab_sources = unit.vocab_sources  # the unit tests' fixture


@pytest.mark.slow
def test_imported_model_scores_what_the_original_printed(imported_original, tmp_path):
    """sharnn-eval on the original's own texts, streams and segments gives the bpc the original printed.

    The streams are the same: the original's extra `<eos>` at the end of test.txt (the text does not end with
    a line break) is the 20,001st token, which its batchify trims to 8 x 2,500. The original then divides the
    loss summed over a stream's 2,499 predictions by its 2,500 tokens, sharnn by the 2,499 bytes predicted, so
    the original's number is sharnn's x 2499/2500, 0.0013 bpc lower here: inside the 0.002 asked, and the
    scaled number matches the printed one to its rounding (0.0005)."""
    import json

    from sharnn.corpus.prepare import prepare_files
    from train.eval_command import main

    corpus = tmp_path / "corpus"
    prepare_files([ORIGINAL / "train.bytes", ORIGINAL / "valid.bytes", ORIGINAL / "test.bytes"], corpus,
                  valid_bytes=20_000, test_bytes=20_000)
    for split, printed in PRINTED.items():
        out = tmp_path / f"{split}.json"
        assert main([str(imported_original), "--data", str(corpus), "--split", split, "--streams",
                     str(PRINTED_STREAMS), "--bptt", str(PRINTED_BPTT), "--json", str(out)]) == 0
        bpc = json.loads(out.read_text())["bpc"]
        stream_len = 20_000 // PRINTED_STREAMS
        assert abs(bpc - printed) <= 0.002, (split, bpc)
        assert abs(bpc * (stream_len - 1) / stream_len - printed) <= 0.0005 + 1e-6, (split, bpc)
