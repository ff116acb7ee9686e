"""What every command's command line shares: bad input exits non-zero without a traceback, console scripts
point at the entry points, counts are checked, and the old and canonical option spellings parse the same."""

from __future__ import annotations

import configparser
import importlib

import pytest

from tests.helpers import REPO


def test_console_scripts_point_at_entry_points():
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    scripts = dict(line.split(" = ") for line in parser["options.entry_points"]["console_scripts"].split("\n")
                   if line.strip())
    for name in ("sharnn-eval", "sharnn-export", "sharnn-generate", "sharnn-import"):
        module, func = scripts[name].split(":")
        assert callable(getattr(importlib.import_module(module), func)), name


@pytest.mark.parametrize("module, flag", [("train.eval_command", "--streams"),
                                          ("sharnn.generate", "--mem-len")])
@pytest.mark.parametrize("value, message", [("x", "expected a whole number, got 'x'"),
                                            ("0", "must be >= 1, got 0")])
def test_count_arguments_are_checked_by_both_clis(module, flag, value, message, capsys):
    parser = importlib.import_module(module).build_parser()
    args = ["model", "--data", "d"] if module == "train.eval_command" else ["model", "--prompt", "a"]
    with pytest.raises(SystemExit) as e:
        parser.parse_args([*args, flag, value])
    assert e.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err


# -------------------------------------------------------------------------------- option spellings
# Underscores are the canonical spelling (as sharnn-train's); the hyphenated (and older) ones stay aliases.
SPELLINGS = [
    ("train.eval_command", ["m", "--data", "d", "--bptt", "64", "--mem_len", "8", "40", "--max_segments", "3",
                        "--timeout_s", "5"],
     [["m", "--data", "d", "--seg-len", "64", "--mem-len", "8", "40", "--max-segments", "3",
       "--timeout-s", "5"],
      ["m", "--data", "d", "--seg_len", "64", "--mem_len", "8", "40", "--max_segments", "3",
       "--timeout_s", "5"]]),
    ("train.export", ["s", "--out", "o", "--from_zero", "--mem_len", "64", "--onnx_batch", "2"],
     [["s", "--out", "o", "--from-zero", "--mem-len", "64", "--onnx-batch", "2"]]),
    ("sharnn.generate", ["m", "--prompt_file", "p", "--top_k", "5", "--top_p", "0.9", "--mem_len", "8",
                         "--prompt_chunk", "4"],
     [["m", "--prompt-file", "p", "--top-k", "5", "--top-p", "0.9", "--mem-len", "8",
       "--prompt-chunk", "4"]]),
    ("sharnn.convert", ["f", "--out", "o", "--mem_len", "40"], [["f", "--out", "o", "--mem-len", "40"]]),
    ("sharnn.corpus.prepare", ["files", "a", "--out", "o", "--valid_bytes", "2000", "--test_bytes", "3000"],
     [["files", "a", "--out", "o", "--valid-bytes", "2000", "--test-bytes", "3000"]]),
    ("sharnn.corpus.prepare", ["enwik8", "--out", "o", "--no_checksum"],
     [["enwik8", "--out", "o", "--no-checksum"]]),
]


@pytest.mark.parametrize("module, canonical, olds", SPELLINGS, ids=[s[0] for s in SPELLINGS])
def test_old_and_canonical_spellings_parse_the_same(module, canonical, olds, capsys):
    parser = importlib.import_module(module).build_parser()
    want = vars(parser.parse_args(canonical))
    seen = ("bptt", "mem_len", "top_k", "valid_bytes", "no_checksum", "from_zero")
    assert all(want[k] not in (None, False) for k in seen if k in want)  # the options were taken
    for old in olds:
        assert vars(parser.parse_args(old)) == want
    sub = [canonical[0]] if module == "sharnn.corpus.prepare" else []
    with pytest.raises(SystemExit):
        parser.parse_args([*sub, "--help"])
    shown = capsys.readouterr().out
    for arg in canonical:
        if arg.startswith("--"):
            assert arg in shown
    assert "--mem-len N" not in shown and "--top-k TOP_K" not in shown  # --help names one spelling


def test_option_errors_name_the_spelling_typed(capsys):
    parser = importlib.import_module("sharnn.generate").build_parser()
    for flag in ("--mem_len", "--mem-len"):
        with pytest.raises(SystemExit):
            parser.parse_args(["m", flag, "0"])
        assert f"argument {flag}: must be >= 1, got 0" in capsys.readouterr().err
    assert parser.parse_args(["m", "--mem", "5"]).mem_len == 5  # an abbreviation of one option, not ambiguous
