"""Every recipe writes what it prints to its log file, one line per step and no progress-bar residue in pipes;
metrics.jsonl is strict JSON (non-finite values as null, named in ``nonfinite``)."""

import json
import math
import subprocess
import sys

from conftest import ROOT, TINY, run_recipe
from handmade import write_dataset
from tml.train.metrics import from_strict_json, read_metrics, to_strict_json


def refuse(constant):
    raise ValueError(f"{constant} is not JSON")


def test_strict_json_round_trip():
    record = {"step": 3, "loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3, "load": [0.5, float("-inf")]}
    line = to_strict_json(record)
    assert json.loads(line, parse_constant=refuse) == {
        "step": 3, "loss": None, "grad_norm": None, "lr": 1e-3, "load": [0.5, None],
        "nonfinite": {"loss": "nan", "grad_norm": "inf", "load": [None, "-inf"]}}
    back = from_strict_json(line)
    assert math.isnan(back["loss"]) and back["grad_norm"] == math.inf and back["load"] == [0.5, -math.inf]
    assert to_strict_json({"step": 1, "loss": 2.0}) == '{"step": 1, "loss": 2.0}'  # no flag when all finite


def test_pretrain_and_sample_write_their_logs(tmp_path):
    data = write_dataset(tmp_path / "d", 12, 4)
    run = tmp_path / "run"
    # stdout and stderr are pipes here, as under nohup or a scheduler; step 2's loss is NaN (skipped, logged)
    proc = run_recipe(run, f"data.path={data}", "trainer.max_steps=3", "logger=default",
                      "logger.wandb.enabled=false", "trainer.fault.nan_at_step=2")
    log = (run / "pretrain.log").read_text()
    steps = [line for line in log.splitlines() if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["1/3", "2/3", "3/3"]  # one line per logged step
    assert all(line in log for line in proc.stdout.splitlines()) and "tml pretrain:" in log
    assert "\r" not in log + proc.stdout + proc.stderr  # no progress bar when not on a terminal
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=refuse) for line in lines]  # strict JSON
    assert records[1]["loss"] is None and records[1]["nonfinite"]["loss"] == "nan"
    assert math.isnan(read_metrics(run)[1]["loss"]) and math.isfinite(read_metrics(run)[2]["loss"])

    out = tmp_path / "sample"
    proc = subprocess.run([sys.executable, "recipes/sample.py", f"checkpoint={run}", "episode=0", "generate=false",
                           f"hydra.run.dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "sample.log").read_text()
    assert proc.stdout.strip() and all(line in log for line in proc.stdout.splitlines())
