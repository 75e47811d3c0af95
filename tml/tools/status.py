"""Where a pretraining run is, from its files alone (no process, no W&B): ``python -m tml.tools.status RUN_DIR``.

For a person checking a job from a login node. Reads ``metrics.jsonl`` (step, throughput, non-finite skips, bad
samples, per-rank busy time), ``config.resolved.json`` (max_steps), ``manifest.json`` (one entry under ``resumes``
per restart: requeues, manual resumes) and ``checkpoints/`` (the newest complete checkpoint). ``--json`` prints
the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from tml.train.checkpoint import MARKER, checkpoint_steps, damage, latest_tag

RECENT = 20  # throughput and ETA: mean over this many last steps


def _ago(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h {s % 3600 // 60}m" if s >= 3600 else f"{s // 60}m {s % 60}s" if s >= 60 else f"{s}s"


def run_status(run_dir: Path, now: float | None = None) -> dict:
    """The run's state as a dict (see the module docstring). Raises FileNotFoundError when ``run_dir`` is no run."""
    run_dir, now = Path(run_dir), time.time() if now is None else now
    metrics_path = run_dir / "metrics.jsonl"
    if not (run_dir / "config.resolved.json").exists():
        raise FileNotFoundError(f"{run_dir / 'config.resolved.json'} not found: RUN_DIR must be a run dir written by "
                                f"recipes/pretrain.py (it appears once the run has started)")
    max_steps = json.loads((run_dir / "config.resolved.json").read_text())["trainer"]["max_steps"]
    records = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()] \
        if metrics_path.exists() else []
    last = records[-1] if records else {}
    step = last.get("step", 0)
    recent = records[-RECENT:]
    step_s = statistics.fmean(r["step_time_s"] for r in recent) if recent else None
    out = {"run_dir": str(run_dir), "step": step, "max_steps": max_steps,
           "updated_s_ago": now - metrics_path.stat().st_mtime if metrics_path.exists() else None,
           "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in recent) if recent else None,
           "step_time_s": step_s,
           "eta_s": (max_steps - step) * step_s if step_s is not None else None,
           "nonfinite_skipped": last.get("nonfinite_skipped", 0),
           "bad_samples": last.get("data/bad_samples", 0), "loss": last.get("loss")}
    if "rank_busy_s" in last:
        busy = [statistics.fmean(r["rank_busy_s"][i] for r in recent) for i in range(len(last["rank_busy_s"]))]
        out["rank_busy_s"] = busy
        out["slowest_rank"] = max(range(len(busy)), key=busy.__getitem__)
    manifest = run_dir / "manifest.json"
    out["restarts"] = len(json.loads(manifest.read_text()).get("resumes", [])) if manifest.exists() else 0

    ckpt_dir = run_dir / "checkpoints"
    out["checkpoint"] = None
    tag = latest_tag(ckpt_dir)
    if tag is not None:
        tag_dir = ckpt_dir / tag
        why = damage(tag_dir)
        out["checkpoint"] = {"path": str(tag_dir), "step": int(tag.split("_")[1]), "complete": why is None,
                             "problem": why, "age_s": now - (tag_dir / MARKER).stat().st_mtime if why is None else None,
                             "bytes": sum(json.loads((tag_dir / MARKER).read_text())["files"].values())
                             if why is None else None}
    out["older_checkpoints"] = [s for s in checkpoint_steps(ckpt_dir) if tag is None or s < int(tag.split("_")[1])]
    out["save_in_progress"] = sorted(p.name for p in (ckpt_dir / ".tmp").iterdir()) if (ckpt_dir / ".tmp").is_dir() \
        else []
    if step >= max_steps and out["checkpoint"] and out["checkpoint"]["step"] == max_steps:
        out["state"] = "finished"
    elif out["updated_s_ago"] is not None and step_s is not None and out["updated_s_ago"] < max(60.0, 10 * step_s):
        out["state"] = "running"
    else:
        out["state"] = "not running (stopped, waiting in the queue, starting up, or stalled)"
    return out


def format_status(s: dict) -> str:
    lines = [f"run          {s['run_dir']}", f"state        {s['state']}"
             + (f", last step {_ago(s['updated_s_ago'])} ago" if s["updated_s_ago"] is not None else "")]
    pct = 100 * s["step"] / max(s["max_steps"], 1)
    lines.append(f"step         {s['step']} / {s['max_steps']} ({pct:.1f}%)"
                 + (f", loss {s['loss']:.4f}" if s["loss"] is not None else ""))
    c = s["checkpoint"]
    if c is None:
        lines.append("checkpoint   none yet")
    elif c["complete"]:
        lines.append(f"checkpoint   step {c['step']} ({c['path']}), {c['bytes'] / 1e6:.1f} MB, "
                     f"saved {_ago(c['age_s'])} ago")
    else:
        lines.append(f"checkpoint   step {c['step']} is DAMAGED: {c['problem']} (a resume falls back to an older one)")
    if s["older_checkpoints"]:
        lines.append(f"older        steps {', '.join(map(str, s['older_checkpoints']))}")
    if s["save_in_progress"]:
        lines.append(f"unpublished  {', '.join(s['save_in_progress'])} in checkpoints/.tmp (a save in progress, or "
                     f"one that was interrupted: never read)")
    if s["step_time_s"] is not None:
        lines.append(f"throughput   {s['tokens_per_s']:,.0f} tokens/s, {s['step_time_s']:.3f} s/step "
                     f"(mean of the last {min(RECENT, s['step'])} logged steps)")
        lines.append(f"ETA          {_ago(s['eta_s'])} ({s['max_steps'] - s['step']} steps at that pace)")
    lines.append(f"restarts     {s['restarts']} (requeues and resumes, from manifest.json)")
    lines.append(f"non-finite   {s['nonfinite_skipped']} steps skipped")
    lines.append(f"bad samples  {s['bad_samples']} (rank 0's loader)")
    if "rank_busy_s" in s and len(s["rank_busy_s"]) > 1:
        busy = s["rank_busy_s"]
        lines.append(f"slowest rank {s['slowest_rank']}: {busy[s['slowest_rank']]:.3f} s of own work per step, median "
                     f"over ranks {statistics.median(busy):.3f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args(argv)
    try:
        s = run_status(args.run_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(s, indent=2) if args.json else format_status(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
