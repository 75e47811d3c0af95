"""recipes/sample.py for real: a checkpoint from the pretraining recipe speaks its side of an episode."""

import json
import subprocess
import sys

import torch

from conftest import ROOT, run_recipe
from tml.audio import read_wav


def test_sample_recipe_writes_wavs_text_png_metrics(synth_data, tmp_path):
    run = tmp_path / "run"
    run_recipe(run, f"data.path={synth_data}", "trainer.max_steps=2", "logger=none", "model.heads.audio=flow",
               "model.heads.flow.hidden_dim=64")
    out = tmp_path / "sample"
    proc = subprocess.run([sys.executable, "recipes/sample.py", f"checkpoint={run}", "episode=1", "max_turns=4",
                           "sampling.flow_steps=4", f"hydra.run.dir={out}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, sr = read_wav(out / "model.wav")
    dialogue, sr2 = read_wav(out / "dialogue.wav")
    assert sr == sr2 == 16000 and model.shape[0] == 1 and dialogue.shape == (2, 4 * 3200)  # 4 micro-turns of 0.2 s
    # the left channel is the recorded user, right the generated model (16-bit PCM round trip)
    assert model.abs().max() > 0 and torch.allclose(dialogue[1, : model.shape[1]], model[0, : 4 * 3200], atol=1e-4)
    # playback clock: micro-turn 0's output is heard from 0.2 s, so the first 3200 samples are silent
    assert model.shape[1] == 4 * 3200 and model[0, :3200].abs().max() == 0 and model[0, 3200:].abs().max() > 0
    lines = (out / "text.tsv").read_text().splitlines()
    assert lines[0] == "heard_at_s\tmicro_turn\tgenerated\treference" and len(lines) <= 1 + 4
    assert all(abs(float(line.split("\t")[0]) - 0.2 * (int(line.split("\t")[1]) + 1)) < 1e-9 for line in lines[1:])
    png = (out / "mels.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    m = json.loads((out / "metrics.json").read_text())
    assert m["head"] == "flow" and m["turns"] == 4
    assert {"loss/audio", "loss/audio_flow", "loss/text"} <= m["teacher_forced_losses"].keys()
    for key in ("generated_vs_reference", "one_step_vs_reference", "silence_vs_reference"):
        assert {"mel_l1", "spectral_convergence", "log_mel_corr"} <= m[key].keys()
    fast = tmp_path / "fast"
    proc = subprocess.run([sys.executable, "recipes/sample.py", f"checkpoint={run}/checkpoints", "episode=1",
                           "max_turns=4", "generate=false", f"hydra.run.dir={fast}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m_fast = json.loads((fast / "metrics.json").read_text())
    assert "generated_vs_reference" not in m_fast and not (fast / "model.wav").exists()
    assert m_fast["silence_vs_reference"] == m["silence_vs_reference"]  # same episode, same reference
    bad = subprocess.run([sys.executable, "recipes/sample.py", f"checkpoint={tmp_path}", f"hydra.run.dir={out}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "checkpoint=" in bad.stderr
