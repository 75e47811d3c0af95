"""Model card of a checkpoint: ``python -m tml.tools.model_card CHECKPOINT [--out FILE] [--eval EVAL_JSON ...]``.

Reads the run dir around CHECKPOINT (``RUN_DIR/checkpoints/step_XXXXXXXX``): ``config.resolved.json``,
``manifest.json``, ``metrics.jsonl``, any ``eval*.json`` and the ``--eval`` files (``recipes/evaluate.py`` writes
``eval.json`` into its own run dir); writes ``MODEL_CARD.md`` into CHECKPOINT unless
``--out`` is given. Parameter counts come from the config on the meta device; training compute is the number of
positions processed up to the checkpoint times ``flops_per_token``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tml.model import InteractionModel, ModelConfig, param_counts
from tml.model.flops import flops_per_token
from tml.train.checkpoint import MARKER
from tml.train.metrics import read_metrics


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:g}"


def model_card(tag_dir: Path, evals: list[Path] = ()) -> str:
    """The card's markdown. Evaluation results: ``evals`` (eval.json files, e.g. ``recipes/evaluate.py``'s) plus any
    ``eval*.json`` in the run dir."""
    tag_dir = Path(tag_dir).resolve()
    run_dir = tag_dir.parents[1]
    for need in (run_dir / "config.resolved.json", tag_dir / MARKER):
        if not need.exists():
            raise FileNotFoundError(f"{need} not found: pass a complete checkpoint dir RUN_DIR/checkpoints/step_*")
    config = json.loads((run_dir / "config.resolved.json").read_text())
    step = json.loads((tag_dir / MARKER).read_text())["step"]
    mcfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), config["model"]))
    with torch.device("meta"):
        counts = param_counts(InteractionModel(mcfg))
    manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").exists() else {}
    records = []
    if (run_dir / "metrics.jsonl").exists():
        records = read_metrics(run_dir)
    records = [r for r in records if r["step"] <= step]
    loader, t = config["data"]["loader"], config["trainer"]
    seq_len = loader["seq_len"]
    positions = step * seq_len * loader["micro_batch_size"] * t["grad_accum_steps"] * manifest.get("world_size", 1)
    fpt = flops_per_token(mcfg, seq_len)
    m, moe = config["model"], config["model"]["moe"]
    data = manifest.get("data", {})
    lines = [
        f"# Model card: tml interaction model, {tag_dir.name}", "",
        "## Model",
        f"- Architecture: full-duplex interaction model (tml): {m['n_layers']} transformer layers, dim {m['dim']}, "
        f"{m['n_heads']} heads ({m.get('n_kv_heads') or m['n_heads']} KV), MoE FFN with {moe['num_experts']} experts "
        f"(top-{moe['top_k']}, hidden {moe['hidden_dim']}), {m.get('dense_layers', 0)} dense layers; dMel bag input "
        f"({m['n_mels']} mels x {m['dmel_bins']} bins, {m['frames_per_audio_position']} frames per position), "
        f"{m['patch_size']}x{m['patch_size']} hMLP patches, text vocabulary {m['vocab_size']}; text and dMel heads.",
        f"- Parameters: {_fmt(counts['total'])} total, {_fmt(counts['active'])} active per token.",
        "", "## Training",
        f"- Steps: {step} (row length {seq_len}, {loader['micro_batch_size']} rows x {t['grad_accum_steps']} "
        f"accumulation x {manifest.get('world_size', 1)} ranks per step), precision {t['precision']}, "
        f"peak lr {t['lr']}.",
        f"- Compute: {positions:,} positions x {_fmt(fpt)} FLOPs/position = {positions * fpt:.3e} FLOPs "
        f"(6 x active matmul parameters + attention, PaLM convention).",
    ]
    if records:
        last = records[-1]
        lines.append(f"- Final training loss (step {last['step']}): total {last['loss']:.4f}, text "
                     f"{last['loss/text']:.4f}, audio {last['loss/audio']:.4f}.")
    if manifest:
        lines.append(f"- Code: git {manifest.get('git_commit')}{' (with uncommitted changes)' if manifest.get('git_dirty') else ''}; "
                     f"torch {manifest['packages'].get('torch')}, deepspeed {manifest['packages'].get('deepspeed')}.")
    lines += ["", "## Data",
              f"- Path: {data.get('path', config['data']['path'])}; manifest sha256 {data.get('manifest_sha256')}.",
              f"- Size: {data.get('episodes')} episodes, {data.get('hours')} hours, {len(data.get('shards', {}))} shards.",
              f"- Sources: {', '.join(map(str, data.get('sources') or [])) or 'not recorded'}.",
              f"- Licence: {data.get('license') or 'not recorded'}."]
    evals = [Path(p) for p in evals] + sorted(run_dir.glob("eval*.json"))
    lines += ["", "## Evaluation"]
    for p in evals:
        result = json.loads(p.read_text())
        result = result.get("metrics", result)  # recipes/evaluate.py writes {"metrics", "per_episode"}
        lines.append(f"- From {p}:")
        lines += [f"  - {k}: {v}" for k, v in result.items()]
    if not evals:
        lines.append("- No evaluation results given (pass --eval RUN_DIR/eval.json of recipes/evaluate.py).")
    lines += ["", "## Intended use and limits",
              "- A research checkpoint for studying full-duplex speech/text/vision interaction models and training "
              "methods. Not for deployment: it has no safety tuning or evaluation for harm.",
              "- Trained only on the data above; a model trained on synthetic espeak-ng dialogues learns the "
              "statistics of synthetic speech, not natural conversation.",
              "- Audio is predicted as dMel bins; turning it into a waveform needs a vocoder (lossy).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="write a model card for a tml checkpoint")
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--eval", type=Path, nargs="*", default=[], help="eval.json files of recipes/evaluate.py")
    args = ap.parse_args(argv)
    out = args.out or args.checkpoint / "MODEL_CARD.md"
    out.write_text(model_card(args.checkpoint, args.eval))
    print(out)


if __name__ == "__main__":
    main()
