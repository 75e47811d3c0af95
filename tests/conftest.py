import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A small real synthetic data set (espeak-ng speech, video, BPE), made once per test session."""
    out = tmp_path_factory.mktemp("synth") / "data"
    subprocess.run([sys.executable, "-m", "data_prep.synth_dialogues", "--out", str(out), "--episodes", "12",
                    "--seed", "3", "--shard-size", "3"], cwd=ROOT, check=True, capture_output=True, timeout=600)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A real pretrain run of a tiny model (1 layer, dim 64, 2 steps on hand-made data), trained once per test session:
    the checkpoint the evaluate, converse and serve tests load."""
    from handmade import write_dataset

    root = tmp_path_factory.mktemp("tiny_run")
    data = write_dataset(root / "data", 4, 2)
    run = root / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "recipes/pretrain.py", f"data.path={data}", f"hydra.run.dir={run}",
                    "trainer.max_steps=2", "logger=none", "model.dim=64", "model.n_layers=1", "model.moe.hidden_dim=64",
                    "model.moe.num_experts=4", "data.loader.seq_len=200"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)
    return run
