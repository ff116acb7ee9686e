"""Config resolution (preset -> YAML -> flags), the lr schedule, and the DeepSpeed config filling."""


import pytest
import torch

from train.config import TrainConfig, lr_at, parse_args, preset
from train.distributed import fill_deepspeed_config
from train.step import draw_resets


def fill(ds: dict, cfg: TrainConfig, world_size: int) -> None:
    fill_deepspeed_config(ds, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, world_size=world_size,
                          clip=cfg.clip, precision=cfg.precision, optimizer=cfg.optimizer)


def test_flags_override_yaml_override_preset(tmp_path):
    yml = tmp_path / "run.yaml"
    yml.write_text("lr: 0.5\nbatch_size: 3\nmodel:\n  mem_len: 77\n")
    cfg, flags = parse_args(["--preset", "small", "--config", str(yml), "--batch_size", "5", "--max_steps",
                             "240"])
    assert (cfg.lr, cfg.batch_size, cfg.max_steps, cfg.model.mem_len) == (0.5, 5, 240, 77)
    assert cfg.model.d_model == preset("small").model.d_model  # the rest of the preset stays
    assert flags.preset == "small" and not flags.dry_run


def test_model_fields_from_the_command_line():
    cfg, _ = parse_args(["--preset", "tiny", "--model.attn", "all", "--model.d_model", "64"])
    assert cfg.model.attn == "all" and cfg.model.d_model == 64


@pytest.mark.parametrize("argv,needle", [
    (["--preset", "nope"], "unknown preset"),
    (["--batch_size", "0"], "batch_size"),
    (["--max_steps", "10", "--warmup_steps", "50"], "warmup_steps"),
    (["--model.attn", "middle"], "attn"),
])
def test_bad_values_exit_with_a_message(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    text = str(e.value.code) + capsys.readouterr().err
    assert needle in text


def test_bad_yaml_keys_are_named(tmp_path):
    yml = tmp_path / "bad.yaml"
    yml.write_text("learning_rate: 1\n")
    with pytest.raises(SystemExit, match="learning_rate"):
        parse_args(["--config", str(yml)])


def test_paper_preset_is_the_papers_recipe():
    cfg = preset("paper")
    m = cfg.model
    assert (m.d_model, m.d_ff, m.n_layer, m.attn, m.mem_len) == (1024, 4096, 4, "penultimate", 5000)
    assert (cfg.batch_size, cfg.bptt, cfg.lr, cfg.warmup_steps, cfg.clip, cfg.seed, cfg.epochs) == \
        (16, 1024, 2e-3, 800, 0.25, 5512, 32)
    assert (cfg.weight_decay, cfg.min_trust, cfg.eval_streams, cfg.test_streams) == (1.2e-6, 0.25, 16, 8)
    assert (m.dropout, m.dropouth, m.dropouti) == (0.1, 0.1, 0.1)
    # 218d748's README: stage 2 passes --warmup 800 and restarts the step count, so the lr ramps up again
    stage2 = preset("paper-stage2")
    assert (stage2.lr, stage2.seed, stage2.epochs, stage2.warmup_steps) == (1e-3, 125, 5, 800)
    # the reference validates on min(100, batch) streams: 8 for paper-all's batch of 8
    paper_all = preset("paper-all")
    assert (paper_all.model.attn, paper_all.batch_size, paper_all.eval_streams) == ("all", 8, 8)
    assert preset("lstm").model.attn == "none"
    for name in ("paper", "paper-stage2", "paper-all", "lstm"):
        cfg = preset(name)
        # the reference validates at epoch ends only, never drops its state mid-epoch, and has a zero output
        # bias
        assert (cfg.eval_every, cfg.state_reset_prob, cfg.output_bias_init) == (0, 0.0, "zeros"), name


def test_lr_schedule_warmup_constant_cooldown():
    cfg = TrainConfig(warmup_steps=4, max_steps=20, cooldown_steps=5)
    lrs = [lr_at(s, 1.0, cfg) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4:15] == [1.0] * 11
    assert lrs[15] == 1.0 and lrs[19] == pytest.approx(0.2) and lrs == sorted(lrs[:15]) + lrs[15:]


def test_lr_scaling_is_explicit():
    cfg = TrainConfig(lr=1e-3, batch_size=16, lr_scaling="sqrt", lr_reference_batch=16)
    assert cfg.effective_lr(4) == pytest.approx(2e-3)
    assert TrainConfig(lr=1e-3, lr_scaling="linear").effective_lr(2) == pytest.approx(2e-3)
    assert TrainConfig(lr=1e-3).effective_lr(8) == 1e-3


def test_deepspeed_auto_values_come_from_the_run_config():
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
          "zero_optimization": {"stage": 0}}
    cfg = TrainConfig(batch_size=3, grad_accum=2, clip=0.25, precision="fp16")
    fill(ds, cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.25
    assert ds["fp16"]["enabled"] is True and ds["bf16"]["enabled"] is False


def test_deepspeed_value_that_disagrees_is_refused():
    with pytest.raises(SystemExit, match="gradient_clipping"):
        fill({"gradient_clipping": 1.0}, TrainConfig(clip=0.25), world_size=1)


@pytest.mark.parametrize("stage,precision,optimizer,ok", [
    (0, "fp32", "lamb", True), (0, "fp16", "lamb", True), (0, "bf16", "lamb", False),
    (1, "fp32", "lamb", False), (2, "fp32", "lamb", False), (2, "bf16", "adamw", True),
    (3, "fp32", "adamw", False),
])
def test_deepspeed_combinations(stage, precision, optimizer, ok):
    ds = {"zero_optimization": {"stage": stage}}
    cfg = TrainConfig(precision=precision, optimizer=optimizer)
    if ok:
        fill(ds, cfg, world_size=2)
    else:
        with pytest.raises(SystemExit):
            fill(ds, cfg, world_size=2)


def test_state_resets_are_drawn_from_seed_and_step():
    draws = [draw_resets(5, s, 0.3) for s in range(200)]
    assert draws == [draw_resets(5, s, 0.3) for s in range(200)]
    rate = sum(h for h, _ in draws) / len(draws)
    assert 0.15 < rate < 0.45 and draws != [draw_resets(6, s, 0.3) for s in range(200)]
    assert not any(any(d) for d in (draw_resets(5, s, 0.0) for s in range(50)))


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_bf16_instructions_warns(native, monkeypatch):
    from train.distributed import check_precision

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda native=native: native, raising=False)
    line = check_precision("bf16", torch.device("cpu"))
    assert line.startswith("precision bf16: LSTM forward/backward checked")
    assert ("warning: this CPU has no bf16 matrix instructions" in line) is (not native)
    assert "Use --precision fp32" in line or native


def test_yaml_values_are_typed_as_the_same_flags_would_be(tmp_path):
    yml = tmp_path / "run.yaml"
    yml.write_text("lr: 1e-3\nvary_bptt: false\nmax_steps: null\ncpu_kernels: fast\ndata: -corpus\n"
                   "epochs: 2\nmodel:\n  dropout: 0\n")
    cfg, _ = parse_args(["--config", str(yml)])
    flagged, _ = parse_args(["--lr", "1e-3", "--no_vary_bptt", "--max_steps", "None", "--cpu_kernels", "fast",
                             "--data=-corpus", "--epochs", "2", "--model.dropout", "0"])
    assert cfg == flagged
    assert (cfg.lr, cfg.vary_bptt, cfg.max_steps, cfg.data) == (0.001, False, None, "-corpus")
    assert type(cfg.epochs) is float and type(cfg.model.dropout) is float


def test_checks_see_the_yaml_and_the_flags_together(tmp_path):
    yml = tmp_path / "run.yaml"
    yml.write_text("warmup_steps: 2000\nlr: -1\n")
    # alone, the file's warmup_steps exceeds the preset's max_steps (900) and its lr is negative: the flags
    # fix both, and the checks run once, on the resolved config
    cfg, _ = parse_args(["--config", str(yml), "--max_steps", "3000", "--lr", "0.1"])
    assert (cfg.warmup_steps, cfg.max_steps, cfg.lr) == (2000, 3000, 0.1)
    with pytest.raises(SystemExit, match=f"^error: {yml}: lr must be a finite number > 0, got -1.0$"):
        parse_args(["--config", str(yml), "--max_steps", "3000"])
    with pytest.raises(SystemExit, match="^error: lr must be a finite number > 0, got -2.0$"):  # the flag's
        parse_args(["--config", str(yml), "--max_steps", "3000", "--lr", "-2"])


def test_value_checks_are_one_error_line(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--batch_size", "0"])
    assert e.value.code == "error: batch_size must be >= 1, got 0"
    assert capsys.readouterr().err == ""  # not tyro's box
