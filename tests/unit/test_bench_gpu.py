"""`python -m bench.gpu`, the GPU acceptance command, on a machine without a GPU: it must not pass (every
check skipped with its reason, exit status 3), a failed or crashed check fails it, its arguments and record;
and the checks' own logic on CPU stand-ins: the LSTM's computed dtype and kernel, gradient fidelity under bf16
autocast at a tiny shape, the two attention formulations timed and compared, the step profile, and the
trainer's throughput and resume runs at the tiny preset."""

from __future__ import annotations

import json
import time

import pytest
import torch

from bench import gpu
from tests.helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
TINY = tiny_config(d_model=32, d_ff=128, mem_len=24, attn="all")


# ------------------------------------------------------------------------------------------ the command
def test_without_a_gpu_every_check_is_skipped_with_its_reason_and_nothing_passes(tmp_path, monkeypatch,
                                                                                  capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu, "RESULTS", tmp_path / "results")
    record_path = tmp_path / "record.json"
    assert gpu.main(["--json", str(record_path), "--work", str(tmp_path / "work")]) == 3
    out = capsys.readouterr().out
    assert "NOT ACCEPTED: 9 check(s) skipped" in out and out.count("SKIPPED") == len(gpu.CHECKS)
    record = json.loads(record_path.read_text())
    assert [c["name"] for c in record["checks"]] == gpu.NAMES
    assert all(c["status"] == "skipped" and c["reason"].startswith("no CUDA GPU: torch ")
               for c in record["checks"])
    assert record["exit_status"] == 3 and record["verdict"].startswith("NOT ACCEPTED")
    versions = record["versions"]
    assert versions["torch"] == torch.__version__
    assert {"cuda", "cudnn", "deepspeed", "accelerate", "driver"} <= set(versions)
    assert record["attention"]["default"] == "written"
    # without --json no record is written where there is no GPU, and nothing was run
    assert gpu.main(["--work", str(tmp_path / "work")]) == 3
    assert not (tmp_path / "results").exists() and not (tmp_path / "work").exists()


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """bench.gpu believes a GPU is there (nothing is run on it: the checks are replaced)."""
    monkeypatch.setattr(gpu, "no_gpu_reason", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(gpu, "RESULTS", tmp_path / "results")


def fake_checks(monkeypatch, **runs):
    checks = [gpu.Check(name, run, name) for name, run in runs.items()]
    monkeypatch.setattr(gpu, "CHECKS", checks)
    monkeypatch.setattr(gpu, "NAMES", [c.name for c in checks])


def test_a_failed_or_crashed_check_fails_the_command_and_the_record_says_which(fake_gpu, monkeypatch,
                                                                                tmp_path):
    def crash(ctx):
        raise KeyError("perf/mfu")

    fake_checks(monkeypatch, good=lambda ctx: gpu.Outcome("passed", "", {"x": 1.5}),
                bad=lambda ctx: gpu.Outcome("failed", "too slow"), crashed=crash)
    assert gpu.main(["--work", str(tmp_path / "w")]) == 1
    (path,) = (tmp_path / "results").glob("*-gpu-nvidia-h100-80gb-hbm3.json")  # the default record path
    record = json.loads(path.read_text())
    status = {c["name"]: (c["status"], c["reason"]) for c in record["checks"]}
    assert status["good"] == ("passed", "") and status["bad"] == ("failed", "too slow")
    assert status["crashed"][0] == "failed" and status["crashed"][1].startswith("KeyError: 'perf/mfu'")
    assert record["verdict"] == "FAILED: bad, crashed" and record["checks"][0]["results"] == {"x": 1.5}


def test_every_check_passing_accepts_and_a_left_out_check_does_not(fake_gpu, monkeypatch, tmp_path):
    fake_checks(monkeypatch, a=lambda ctx: gpu.Outcome("passed"), b=lambda ctx: gpu.Outcome("passed"))
    assert gpu.main(["--work", str(tmp_path / "w"), "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["verdict"] == "ACCEPTED: every check passed"
    assert gpu.main(["--work", str(tmp_path / "w"), "--only", "a", "--json", str(tmp_path / "r.json")]) == 3
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["checks"][1] == {"name": "b", "status": "skipped", "reason": "not selected (--only)",
                                   "results": {}, "seconds": 0.0}


def test_checks_past_the_budget_fail_as_not_run(fake_gpu, monkeypatch, tmp_path):
    fake_checks(monkeypatch, slow=lambda ctx: (time.sleep(0.3), gpu.Outcome("passed"))[1],
                late=lambda ctx: gpu.Outcome("passed"))
    argv = ["--work", str(tmp_path / "w"), "--budget_s", "0.2", "--json", str(tmp_path / "r.json")]
    assert gpu.main(argv) == 1
    late = json.loads((tmp_path / "r.json").read_text())["checks"][1]
    assert late["status"] == "failed" and late["reason"] == "not run: the 0.2 s budget was spent"


def test_arguments(tmp_path, capsys):
    assert gpu.main(["--list"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == gpu.NAMES
    for argv, message in ((["--only", "nope"], "invalid choice"),
                          (["--budget_s", "0"], "--budget_s must be > 0"),
                          (["--data", str(tmp_path)], "not a prepared corpus")):
        with pytest.raises(SystemExit) as info:
            gpu.main(argv)
        assert info.value.code == 2 and message in capsys.readouterr().err


def test_record_path_names_the_gpu_and_never_overwrites(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu, "RESULTS", tmp_path)
    first = gpu.default_record_path("NVIDIA H200", "2026-12-07")
    assert first.name == "2026-12-07-gpu-nvidia-h200.json"
    first.write_text("{}")
    assert gpu.default_record_path("NVIDIA H200", "2026-12-07").name == "2026-12-07-gpu-nvidia-h200-2.json"


def test_exit_status_and_verdict_of_parts():
    Outcome = gpu.Outcome
    assert gpu.exit_status({"a": Outcome("passed"), "b": Outcome("passed")}) == 0
    assert gpu.exit_status({"a": Outcome("passed"), "b": Outcome("skipped", "no bf16")}) == 3
    assert gpu.exit_status({"a": Outcome("failed", "x"), "b": Outcome("skipped", "y")}) == 1
    assert gpu.exit_status({}) == 3
    parts = [gpu.part("fp32", []), gpu.part("bf16", [], skipped="this GPU has no bf16")]
    assert gpu.verdict(parts) == ("skipped", "bf16: this GPU has no bf16")
    assert gpu.verdict(parts + [gpu.part("fp16", ["slow", "wrong"])]) == ("failed", "fp16: slow; wrong")


# ------------------------------------------------------------------------------ the checks on CPU stand-ins
def test_lstm_case_reads_the_dtype_the_kernel_computed_in_and_the_kernel(monkeypatch):
    """On a CPU, bf16 autocast: oneDNN's RNN op receives bf16, as the README promises for CPUs; with another
    promise the case fails and says what was computed."""
    import train.distributed

    case = gpu.lstm_case(CPU, "bf16", "autocast", d_model=16, T=4, B=2)
    assert case["status"] == "passed", case
    assert case["computed"] == ["bfloat16"] and case["promised"] == "bfloat16"
    # oneDNN's RNN op where the CPU has bf16 instructions; without them torch's step-by-step LSTM, in bf16
    native = train.distributed.native_cpu_matmul("bf16")
    assert any("mkldnn_rnn_layer" in op for op in case["rnn_ops"]) == native, case["rnn_ops"]
    assert gpu.lstm_case(CPU, "fp32", "autocast", d_model=16, T=4, B=2)["computed"] == ["float32"]
    monkeypatch.setattr(train.distributed, "promised_lstm_dtype", lambda *a: torch.float32)
    broken = gpu.lstm_case(CPU, "bf16", "autocast", d_model=16, T=4, B=2)
    assert broken["status"] == "failed"
    assert "computed in bfloat16, the README promises float32" in broken["reason"]


def test_compare_gradients_holds_each_limit():
    torch.manual_seed(0)
    ref = {"w": torch.randn(400, 50)}
    noisy = ref["w"] + 0.2 * ref["w"].std() * torch.randn(400, 50)  # cosine ~0.98
    zeroed = ref["w"].clone()
    zeroed.view(-1)[: 400 * 50 // 50] = 0  # 2% exact zeros
    cases = {"same": ref["w"].clone(), "scaled": ref["w"] * 1.15, "noisy": noisy, "zeroed": zeroed,
             "inf": ref["w"].clone().index_fill_(0, torch.tensor([3]), float("inf"))}
    rows = {name: gpu.compare_gradients(ref, {"w": g})[0] for name, g in cases.items()}
    assert rows["same"]["passed"] and rows["same"]["cosine"] == 1.0 and rows["same"]["zeros"] == 0
    assert rows["scaled"]["problems"] == ["norm ratio 1.150 outside 0.9-1.1"]
    assert len(rows["noisy"]["problems"]) == 1 and rows["noisy"]["problems"][0].startswith("cosine 0.98")
    assert rows["zeroed"]["problems"] == ["2.0% exact zeros where fp32's gradient is not zero (limit 1%)"]
    assert "not finite" in rows["inf"]["problems"] and not rows["inf"]["passed"]


def test_gradient_fidelity_under_bf16_autocast_on_a_cpu(monkeypatch):
    """The paper check's procedure at a tiny shape on a CPU (bf16 autocast, where the LSTM computes in bf16):
    every LSTM weight of every block compared, within the limits; a low-precision path that flushes small
    gradients to zero is caught."""
    (bf16,) = gpu.gradient_fidelity(CPU, TINY, B=2, T=8, precisions=("bf16",))
    assert bf16["status"] == "passed", bf16["reason"]
    names = [r["name"] for r in bf16["lstm_weights"]]
    assert names == [f"blocks.{i}.lstm.{w}" for i in range(TINY.n_layer) for w in gpu.LSTM_WEIGHTS]
    assert all(r["cosine"] > 0.99 for r in bf16["lstm_weights"]) and bf16["loss_scale"] == 1.0
    real = gpu.model_gradients

    def flushing(model, x, y, state, device, precision):
        grads, info = real(model, x, y, state, device, precision)
        if precision != "fp32":
            for name, g in grads.items():
                if ".lstm.weight_hh" in name:
                    g[g.abs() < g.abs().median()] = 0  # half the entries: an fp16 underflow, say
        return grads, info

    monkeypatch.setattr(gpu, "model_gradients", flushing)
    (broken,) = gpu.gradient_fidelity(CPU, TINY, B=2, T=8, precisions=("bf16",))
    assert broken["status"] == "failed" and "blocks.0.lstm.weight_hh_l0" in broken["reason"]
    assert "exact zeros" in broken["reason"] and "blocks.0.lstm.weight_ih_l0" not in broken["reason"]


def test_attention_report_times_both_formulations_and_compares_them_on_a_cpu():
    """Each formulation timed as the model runs it (the CPU under "torch": the CUDA code path), SDPA's
    operators seen only in its own case, the two agreeing without dropout."""
    parts = gpu.attention_report(CPU, B=2, T=6, M=10, C=16, repeats=2)
    assert [p["name"] for p in parts] == ["bf16", "fp32"]
    for p in parts:
        written, sdpa = p["cases"]
        assert written["impl"] == "written" and not written["sdpa_ops"] and written["ms"] > 0
        assert sdpa["impl"] == "sdpa" and "aten::scaled_dot_product_attention" in sdpa["sdpa_ops"]
        limit = gpu.AGREEMENT[p["name"]]
        assert all(v < limit for k, v in p["agreement"].items() if k != "precision"), p["agreement"]
    from sharnn import kernels

    assert kernels.get_attention_impl() == "written" and kernels.get_cpu_kernels() == "fast"  # restored


def test_choose_default():
    assert gpu.choose_default({"written": 3.0, "sdpa": 9.0}, "written")[0]
    ok, why = gpu.choose_default({"written": 3.2, "sdpa": 3.0}, "written")
    assert ok and "within 10%" in why
    ok, why = gpu.choose_default({"written": 4.0, "sdpa": 3.0}, "written")
    assert not ok and "make 'sdpa' the default" in why


def test_step_profile_finds_the_lstm_on_a_cpu():
    profile = gpu.step_profile(CPU, TINY, B=2, T=8, precision="fp32", steps=1)
    assert 0 < profile["lstm_ms_per_step"] <= profile["busy_ms_per_step"]
    assert profile["bound"].startswith("the LSTM recurrences take") and profile["top_ops"]


def test_throughput_summary_and_its_threshold():
    rows = [{"step": 10, "perf/bytes_per_s": 50_000.0, "perf/step_time_s": 0.5, "perf/mfu": 0.1,
             "perf/memory_bytes": 7},
            {"step": 20, "perf/bytes_per_s": 160_000.0, "perf/step_time_s": 0.1, "perf/mfu": 0.3,
             "perf/memory_bytes": 9},
            {"step": 30, "perf/bytes_per_s": 120_000.0, "perf/step_time_s": 0.15, "perf/mfu": 0.2,
             "perf/memory_bytes": 8},
            {"step": 30, "val/bpc": 5.0}]
    summary = gpu.throughput_summary(rows, measured_steps=20)  # steps 11-30: the first interval left out
    assert summary["steps"] == 20 and summary["peak_memory_bytes"] == 9
    assert summary["bytes_per_s"] == round((160_000 * 1.0 + 120_000 * 1.5) / 2.5)
    assert summary["mfu"] == round((0.3 * 1.0 + 0.2 * 1.5) / 2.5, 4)
    assert gpu.throughput_verdict("NVIDIA H100 80GB HBM3", 149_999)[0] is False
    assert gpu.throughput_verdict("NVIDIA H200", 150_000)[0] is True
    ok, why = gpu.throughput_verdict("NVIDIA A10", 20_000)
    assert ok and "no threshold" in why
    with pytest.raises(ValueError, match="no perf/bytes_per_s"):
        gpu.throughput_summary([{"step": 1, "train/loss": 5.0}], 20)


def test_resume_verdict():
    whole = {1: 5.5, 2: 5.4, 3: 5.3, 4: 5.2}
    assert gpu.resume_verdict(whole, {3: 5.3, 4: 5.2}, (3, 4))[0] == []
    problems, numbers = gpu.resume_verdict(whole, {3: 5.3 * (1 + 1e-7), 4: 5.2}, (3, 4))
    assert problems == [] and numbers["bitwise"] is False  # within 1e-6: accepted, reported
    problems, _ = gpu.resume_verdict(whole, {3: 5.301, 4: 5.2}, (3, 4))
    assert problems == ["step 3: loss 5.301 after resuming, 5.3 uninterrupted"]
    assert gpu.resume_verdict(whole, {4: 5.2}, (3, 4))[0] == ["no loss logged at step 3"]


def test_train_commands_parse_as_the_trainer_reads_them(tmp_path):
    from train.config import parse_args

    cmd = gpu.train_command(gpu.accelerate_launch(29999), tmp_path / "data", tmp_path / "out", "--batch_size",
                            "64", "--lr_scaling", "linear", "--max_steps", "30", "--warmup_steps", "5")
    assert cmd[1:3] == ["--config_file", str(gpu.REPO / "launch" / "single_gpu.yaml")] or \
        cmd[3:5] == ["--config_file", str(gpu.REPO / "launch" / "single_gpu.yaml")]
    cfg, _ = parse_args(cmd[cmd.index("train") + 1:])
    assert (cfg.batch_size, cfg.lr_scaling, cfg.max_steps, cfg.precision) == (64, "linear", 30, "bf16")
    assert not cfg.test_at_end and not cfg.attention_report and cfg.sample_bytes == 0
