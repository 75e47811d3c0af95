"""Strict configs: unknown keys are refused (also with +) naming the nearest key; config and data errors print one
line, no traceback, exit 2 and leave no run dir."""

import subprocess
import sys

import pytest

from conftest import ROOT
from tml.cli import unknown_key_message
from tml.train import config_from_dict
from tml.train.config import PretrainConfig, validate_config
from tml.errors import ConfigError

GROUPS = ("model", "data", "trainer", "parallel", "logger", "launcher")


@pytest.mark.parametrize("key, nearest", [
    ("trainer.max_step", "did you mean trainer.max_steps?"),
    ("data.loader.seq_lenn", "did you mean data.loader.seq_len?"),
    ("mdoel.dim", "did you mean model.dim?"),
    ("trainer.foo", "the keys of trainer are: audio_loss_weight,"),
    ("foo", "the keys are: data, launcher, logger, model, parallel, trainer"),
])
def test_unknown_keys_name_the_nearest_valid_key(key, nearest):
    assert nearest in unknown_key_message(key, f"+{key}=5", PretrainConfig, GROUPS)


@pytest.mark.parametrize("key", ["trainer.max_steps", "data.loader.seq_len", "model.moe.top_k", "model", "launcher",
                                 "logger.wandb.entity"])
def test_valid_keys_and_groups_pass(key):
    assert unknown_key_message(key, f"{key}=1", PretrainConfig, GROUPS) is None


@pytest.mark.parametrize("seq_len, fix", [(1990, "use 1980 or 2000"), (1010, "use 1000 or 1020")])
def test_seq_len_must_be_whole_micro_turns(seq_len, fix):
    with pytest.raises(ConfigError, match=f"data.loader.seq_len={seq_len} is not a multiple.*20 positions.*{fix}"):
        validate_config(config_from_dict({"data": {"loader": {"seq_len": seq_len}}}))


@pytest.mark.parametrize("override, message", [
    ("+trainer.foo=5", "+trainer.foo=5: trainer.foo is not a config key"),
    ("trainer.max_step=5", "did you mean trainer.max_steps?"),
    ("data.loader.seq_len=1990", "use 1980 or 2000"),
    ("model.moe.top_k=9", "model.moe.top_k=9 > model.moe.num_experts=8"),
    ("trainer.precision=fp8", "trainer.precision='fp8': choose fp32 or bf16"),
    ("data.path=/nonexistent/set", "/nonexistent/set/manifest.json not found"),
])
def test_config_errors_are_one_line_without_traceback_and_leave_no_run_dir(tmp_path, override, message):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "recipes/pretrain.py", f"hydra.run.dir={run}", override], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not run.exists()


def test_a_config_error_keeps_a_run_dir_that_holds_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = subprocess.run([sys.executable, "recipes/pretrain.py", f"hydra.run.dir={tmp_path}", "model.moe.top_k=9"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and (tmp_path / "notes.txt").read_text() == "mine"
