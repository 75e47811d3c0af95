"""tml.tools.status on a run dir built by hand: every number it prints is checked against the files' contents."""

import json
import subprocess
import sys

from conftest import ROOT
from tml.tools.status import run_status


def make_run(run, steps_done=6, max_steps=10):
    run.mkdir()
    (run / "config.resolved.json").write_text(json.dumps({"trainer": {"max_steps": max_steps}}))
    (run / "manifest.json").write_text(json.dumps({"resumes": [{"host": "a"}, {"host": "b"}]}))
    recs = [{"step": s, "loss": 5.0 - s / 10, "step_time_s": 2.0 if s > 2 else 9.0, "tokens_per_s": 100.0 * s,
             "nonfinite_skipped": int(s >= 4), "data/bad_samples": 3, "rank_busy_s": [0.1, 1.5]}
            for s in range(1, steps_done + 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    for step in (2, 4):
        d = run / "checkpoints" / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / "model.pt").write_bytes(b"x" * 1000)
        (d / "complete.json").write_text(json.dumps({"step": step, "world_size": 2, "files": {"model.pt": 1000}}))
    (run / "checkpoints" / "latest").write_text("step_00000004")
    (run / "checkpoints" / ".tmp" / "step_00000006").mkdir(parents=True)


def test_status_from_files_alone(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    s = run_status(run)
    assert s["step"] == 6 and s["max_steps"] == 10 and s["state"] == "running"
    assert s["step_time_s"] == (9 + 9 + 4 * 2) / 6 and s["eta_s"] == 4 * s["step_time_s"]
    assert s["tokens_per_s"] == 350.0 and s["restarts"] == 2
    assert s["nonfinite_skipped"] == 1 and s["bad_samples"] == 3 and s["slowest_rank"] == 1
    assert s["checkpoint"]["step"] == 4 and s["checkpoint"]["complete"] and s["checkpoint"]["bytes"] == 1000
    assert s["older_checkpoints"] == [2] and s["save_in_progress"] == ["step_00000006"]

    (run / "checkpoints" / "step_00000004" / "model.pt").write_bytes(b"x" * 10)  # truncated
    s = run_status(run, now=run.joinpath("metrics.jsonl").stat().st_mtime + 3600)
    assert not s["checkpoint"]["complete"] and "has 10 bytes, 1000 were written" in s["checkpoint"]["problem"]
    assert s["state"].startswith("not running")

    out = subprocess.run([sys.executable, "-m", "tml.tools.status", str(run)], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert "step         6 / 10 (60.0%)" in out and "DAMAGED" in out and "slowest rank 1" in out
    assert "restarts     2" in out and "step_00000006 in checkpoints/.tmp" in out
    bad = subprocess.run([sys.executable, "-m", "tml.tools.status", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "config.resolved.json not found" in bad.stderr
