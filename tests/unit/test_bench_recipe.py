"""python -m bench.recipe: variants (flags, git revisions) over seeds, paired by seed."""

from __future__ import annotations

import pytest


def test_recipe_variants_and_paired_statistics():
    from bench.recipe import Variant, summarize

    v = Variant.parse("after+unigram@HEAD:--output_bias_init unigram --seed 3")
    assert (v.name, v.rev, v.flags) == ("after+unigram", "HEAD",
                                        ["--output_bias_init", "unigram", "--seed", "3"])
    assert Variant.parse("plain") == Variant("plain") and Variant.parse("x:--a 1").flags == ["--a", "1"]
    # grouping by variant, a missing value dropped, the requested pair (statistics: tests/*/test_bench.py)
    runs = [{"variant": n, "seed": s, "m": x} for n, s, x in
            [("a", 1, 2.0), ("b", 1, 2.1), ("a", 2, 2.4), ("b", 2, 2.3), ("a", 3, 2.2), ("b", 3, None)]]
    s = summarize(runs, ["a", "b"], [("a", "b")], lambda r: r["m"])
    assert s["variants"]["b"]["values"] == {1: 2.1, 2: 2.3} and s["variants"]["a"]["n"] == 3
    assert s["paired"]["a - b"]["values"] == pytest.approx({1: -0.1, 2: 0.1})


def test_recipe_refuses_bad_arguments(small_corpus, tmp_path, capsys):
    import bench.recipe

    data = ["--data", str(small_corpus)]
    for argv, message in ([["--data", str(tmp_path)], "not a prepared corpus"],
                          [data + ["--variant", "a", "--variant", "a:--seed 2"], "variant names must differ"],
                          [data + ["--variant", "a", "--pair", "a:b"], "unknown variant"],
                          [data + ["--variant", "a", "--pair", "ab"], "expected A:B"],
                          [data + ["--variant", "@HEAD"], "empty name"],
                          [data + ["--seeds", "0"], "must be >= 1"]):
        with pytest.raises(SystemExit) as e:
            bench.recipe.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
