"""The pretraining recipe run for real, as a user runs it: plain python, resume, torchrun with 2 processes."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import COMPARED, ROOT, metrics, run_recipe
from handmade import write_dataset
from tml.errors import ConfigError
from tml.train import config_from_dict, validate_config


def test_pretrain_learns_and_resumes_bitwise(synth_data, tmp_path):
    data = f"data.path={synth_data}"
    straight = tmp_path / "straight"
    run_recipe(straight, data, "trainer.max_steps=16", "trainer.save_every=8", "logger=default",
               f"data.val_path={synth_data}", "trainer.val_every=8", "data.val_batches=2")
    m = metrics(straight)
    assert [r["step"] for r in m] == list(range(1, 17))
    # Held-out loss at steps 8 and 16 only, per stream, on the same positions each time; it falls as training does.
    val = [r for r in m if "val/loss" in r]
    assert [r["step"] for r in val] == [8, 16] and val[0]["val/positions"] == val[1]["val/positions"] > 0
    assert val[1]["val/loss/text"] < val[0]["val/loss/text"] and val[1]["val/loss/audio"] < val[0]["val/loss/audio"]
    assert val[1]["val/loss"] == pytest.approx(val[1]["val/loss/text"] + val[1]["val/loss/audio"])
    # Loss falls for both streams (hand bound: clearly below the first step).
    assert m[-1]["loss/text"] < 0.8 * m[0]["loss/text"] and m[-1]["loss/audio"] < 0.95 * m[0]["loss/audio"]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in m)
    for i in range(2):  # per-layer expert load of both MoE layers, for the heatmap
        assert len(m[-1][f"moe/layer{i}/load"]) == 4 and sum(m[-1][f"moe/layer{i}/load"]) == pytest.approx(1.0)
        assert 1.0 <= m[-1][f"moe/layer{i}/max_over_mean"] <= 4.0
    # the one enabled balancing term (switch, coefficient 0.01 in model=tiny) is logged before its coefficient:
    # loss/aux sums coefficient * term over the 2 MoE layers, moe/switch_loss averages the term over them
    assert m[-1]["loss/aux"] == pytest.approx(0.01 * 2 * m[-1]["moe/switch_loss"], rel=1e-5)
    assert "moe/z_loss" not in m[-1] and "moe/bias_absmax" not in m[-1]
    assert (straight / "checkpoints" / "latest").read_text().strip() == "step_00000016"
    assert list((straight / "wandb").glob("offline-run-*")), "W&B offline files missing"
    assert (straight / "config.resolved.json").exists()

    resumed = tmp_path / "resumed"
    run_recipe(resumed, data, "trainer.max_steps=8", "trainer.save_every=8", "logger=none")
    proc = run_recipe(resumed, data, "trainer.max_steps=16", "trainer.save_every=8", "logger=none",
                      "trainer.resume=true")
    assert "resumed from" in proc.stdout
    r = metrics(resumed)
    assert [x["step"] for x in r] == list(range(1, 17))
    for a, b in zip(m, r):  # fp32 on CPU: bitwise equal
        assert {k: a[k] for k in COMPARED} == {k: b[k] for k in COMPARED}, a["step"]


def test_two_processes_average_gradients_like_one(tmp_path):
    # Every episode is the same, so each rank's batch equals the single process's batch: data-parallel averaging
    # of identical gradients must reproduce the single-process run (x + x = 2x and /2 are exact in fp32).
    data = write_dataset(tmp_path / "data", 8, 2, repeat_first=True)
    common = [f"data.path={data}", "trainer.max_steps=5", "logger=none", "data.loader.micro_batch_size=1"]
    run_recipe(tmp_path / "one", *common)
    run_recipe(tmp_path / "two", *common, "parallel=zero2", nproc=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["tokens"] for r in two] == [2 * r["tokens"] for r in one]
    for a, b in zip(one, two):
        for k in ("loss", "loss/text", "loss/audio", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (k, a["step"])
    state = tmp_path / "two" / "checkpoints" / "step_00000005"
    assert (state / "trainer_state_rank0.pt").exists() and (state / "trainer_state_rank1.pt").exists()


@pytest.mark.parametrize("override, key", [
    ({"model": {"moe": {"top_k": 9, "num_experts": 8}}}, "model.moe.top_k"),
    ({"data": {"layout": {"micro_turn_ms": 210}}}, "micro_turn_ms"),
    ({"data": {"layout": {"frame_width": 100}}}, "frame_width"),
    ({"trainer": {"precision": "fp16"}}, "trainer.precision"),
    ({"model": {"n_mels": 64}}, "model.n_mels"),
])
def test_impossible_configs_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        validate_config(config_from_dict(override))


def test_frame_geometry_follows_the_layout():
    """data.layout is the one source of frame geometry: the model's and the dMel tokenizer's copies follow an
    override of it; an override of only a copy is refused; a saved (resolved) config keeps its explicit values."""
    cfg = config_from_dict({"data": {"layout": {"n_mels": 64, "dmel_bins": 8, "frames_per_audio_position": 2,
                                                "mel_hop_ms": 20, "sample_rate": 24000, "patch_size": 16,
                                                "frame_height": 32, "frame_width": 32}}})
    validate_config(cfg)
    m, d = cfg.model, cfg.data.dmel
    assert (m.n_mels, m.dmel_bins, m.frames_per_audio_position, m.patch_size) == (64, 8, 2, 16)
    assert (d.n_mels, d.n_bins, d.sample_rate, d.hop_length) == (64, 8, 24000, 480)  # 20 ms at 24 kHz
    with pytest.raises(ConfigError, match="override data.layout instead of model.dmel_bins"):
        validate_config(config_from_dict({"model": {"dmel_bins": 8}}))
    saved = OmegaConf.to_container(OmegaConf.structured(config_from_dict({})), resolve=True)
    saved["model"]["n_mels"] = saved["data"]["dmel"]["n_mels"] = saved["data"]["layout"]["n_mels"] = 40
    assert config_from_dict(saved).data.dmel.n_mels == 40  # as a run's config.resolved.json: explicit, same values
    proc = subprocess.run([sys.executable, "recipes/pretrain.py", "--cfg", "job", "--resolve", "data.layout.n_mels=64"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    job = OmegaConf.create(proc.stdout)
    assert job.model.n_mels == job.data.dmel.n_mels == 64 and job.data.dmel.hop_length == 160


def test_recipe_fails_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, "recipes/pretrain.py", f"hydra.run.dir={tmp_path}", "model.moe.top_k=9"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "model.moe.top_k=9" in proc.stderr
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
