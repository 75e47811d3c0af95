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
