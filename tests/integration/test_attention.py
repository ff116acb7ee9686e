"""sharnn.attention_report: the captured weights are the ones the model uses, capturing changes nothing and
leaves
nothing behind, the report's numbers, the trainer's TensorBoard records (read back with TensorBoard's reader
from the shared tiny run) and `sharnn-eval --attention_report` (its PNGs and JSON read back)."""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers import exits_with
from tests.unit.test_attention import TEXT

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------ the trainer's records
@pytest.mark.slow  # the shared trained run, as its other users
def test_trainer_logs_the_attention_report(trained):
    """The shared tiny run (10 steps, validation at step 10, attention in block 0 of 2, memory 512, bptt 64)
    wrote the report's image, histogram, entropy and text: read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((trained / "tensorboard").rglob("events.out.tfevents.*"))
    accs = []
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0,
                                                      "images": 0})
        acc.Reload()
        accs.append(acc)
    acc = next(a for a in accs if "attention/entropy" in a.Tags()["scalars"])
    (entropy,) = acc.Scalars("attention/entropy")
    assert entropy.step == 10 and 0 < entropy.value <= math.log2(512)
    (image,) = acc.Images("attention/weights/block0")
    assert (image.step, image.height, image.width) == (10, 64, 512)  # queries x (memory + segment)
    import io

    from matplotlib.image import imread

    pixels = imread(io.BytesIO(image.encoded_image_string), format="png")
    assert pixels.shape[:2] == (64, 512) and pixels[0, 511, :3].sum() == 0  # query 0 cannot see key 511
    (hist,) = acc.Histograms("attention/distance/block0")
    value = hist.histogram_value
    assert list(value.bucket_limit) == [0, 1, 3, 7, 15, 31, 63, 127, 255, 511]
    assert sum(value.bucket) == pytest.approx(1.0, rel=1e-5) and 0 < value.sum < 511
    (text,) = acc.Tensors("attention/reads/text_summary")
    markdown = text.tensor_proto.string_val[0].decode()
    assert "448 in memory, a segment of 64" in markdown and "bytes back: `" in markdown
    assert f"entropy {entropy.value:.2f} bits" in markdown


# ----------------------------------------------------------------------------- sharnn-eval --attention_report
@pytest.mark.slow  # the shared trained run, as its other users
def test_eval_attention_report_writes_pictures_and_numbers(trained, tmp_path, capsys):
    from matplotlib.image import imread

    from train.eval_command import main

    text = tmp_path / "notes.txt"
    text.write_bytes(TEXT * 3)  # 1500 bytes: a full 448-byte memory and a 64-byte segment
    out = tmp_path / "report"
    assert main([str(trained), "--attention_report", str(out), "--text", str(text)]) == 0
    assert "attention report:" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["attention.png", "distance.png", "report.json",
                                                     "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert (report["start"], report["segment_len"], report["n_memory"]) == (448, 64, 448)
    assert report["entropy_unit"] == "bits" and list(report["layers"]) == ["0"]
    layer = report["layers"]["0"]
    assert sum(b["mass"] for b in layer["distance_bins"]) == pytest.approx(1.0, rel=1e-5)
    assert report["entropy_bits"] == pytest.approx(layer["entropy_bits"])
    assert 0 < layer["entropy_bits"] <= layer["uniform_entropy_bits"]
    for q in layer["queries"]:  # every listed key lies before (or at) its query, with the byte of the text
        for key in q["top"]:
            assert 0 <= key["distance"] == 448 + q["query"] - key["key"]
            assert key["byte"] == (TEXT * 3)[key["key"]]
    for name in ("attention.png", "distance.png"):
        pixels = imread(out / name)
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 500 and pixels.std() > 0
    assert "**Block 0**" in (out / "report.md").read_text()
    # Again into the same directory: an earlier report is replaced as a whole; one with a file added is
    # refused (tests/*/test_output_paths.py: the rule for every output)
    assert main([str(trained), "--attention_report", str(out), "--text", str(text), "--bptt", "32"]) == 0
    assert json.loads((out / "report.json").read_text())["segment_len"] == 32
    (out / "mine.txt").write_text("x")
    exits_with(main, [str(trained), "--attention_report", str(out), "--text", str(text)], "mine.txt")
    assert (out / "mine.txt").exists()
