"""Portable checkpoints: an export directory alone loads and runs the model; trainer.init_from starts a new run from
it (weights only) and refuses weights of another shape with one clear line."""

import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_recipe
from handmade import write_dataset
from tml.model import InteractionModel
from tml.errors import ConfigError
from tml.train.checkpoint import checkpoint_state_dict, find_checkpoint, load_initial_weights
from tml.train.config import config_from_dict


def test_export_is_self_contained_and_init_from_starts_a_new_run(tmp_path):
    data = write_dataset(tmp_path / "d", 8, 4)
    run = tmp_path / "run"
    run_recipe(run, f"data.path={data}", "trainer.max_steps=2", "logger=none")
    (tmp_path / "eval.json").write_text(json.dumps({"metrics": {"turn_taking_latency_mean_s": 0.4321}}))
    export = tmp_path / "export"
    subprocess.run([sys.executable, "-m", "tml.tools.export", str(run), str(export), "--eval",
                    str(tmp_path / "eval.json")], cwd=ROOT, check=True, capture_output=True)
    names = {p.name for p in export.iterdir()}
    assert names == {"model.safetensors", "config.json", "run_config.json", "layout.json", "tokenizer.json",
                     "MODEL_CARD.md"}
    for p in export.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p  # readable by others (safetensors alone writes 0600)
    assert "turn_taking_latency_mean_s: 0.4321" in (export / "MODEL_CARD.md").read_text()
    assert json.loads((export / "layout.json").read_text())["length"] == 20
    trained = checkpoint_state_dict(find_checkpoint(run)[1])

    # A new run from the export: weights only. With a vanishing lr its step-1 weights are the export's, not a fresh
    # initialisation's (same seed), and its step count starts at 1.
    new = tmp_path / "new"
    proc = run_recipe(new, f"data.path={data}", "trainer.max_steps=1", "logger=none", f"trainer.init_from={export}",
                      "trainer.lr=1e-12")
    assert "initial weights from" in proc.stdout
    after = checkpoint_state_dict(find_checkpoint(new)[1])
    assert all(torch.allclose(after[k], trained[k], atol=1e-6) for k in trained)
    assert (new / "checkpoints" / "latest").read_text().strip() == "step_00000001"

    # Weights of another shape: a ConfigError naming the key and the tensors (printed as one line by the recipe,
    # tests/test_cli.py).
    config = json.loads((export / "run_config.json").read_text())
    config["model"]["dim"] = 32
    with pytest.raises(ConfigError, match=rf"trainer.init_from={export}: .* shapes differ \(embed.pad \[64\] there "
                                          rf"vs \[32\] here"):
        load_initial_weights(InteractionModel(config_from_dict(config).model), export)

    # The export alone: move the data set and the run away, then load and run it.
    os.rename(data, tmp_path / "gone_data")
    os.rename(run, tmp_path / "gone_run")
    from tml.eval.loading import load_run

    loaded = load_run(export)
    state = loaded.model.state_dict()
    assert all(torch.equal(state[k], trained[k]) for k in trained)
    assert loaded.layout.length == 20 and loaded.text.vocab_size == loaded.model.cfg.vocab_size
    assert isinstance(loaded.model, InteractionModel)
