"""Export a checkpoint as a self-contained directory: ``python -m tml.tools.export CHECKPOINT OUT_DIR [--eval
eval.json ...]`` (CHECKPOINT: ``RUN_DIR/checkpoints/step_XXXXXXXX``, its ``checkpoints`` dir or RUN_DIR).

OUT_DIR holds everything needed to load and run the model without the run dir or the data set:

    model.safetensors   fp32 weights of ``InteractionModel``
    config.json         its ``ModelConfig``
    run_config.json     the run's whole resolved config (layout, dMel, loader, trainer), dMel ranges pointing here
    layout.json         the micro-turn slot layout (config, length and a readable description)
    tokenizer.json      the text tokenizer the model was trained with
    dmel_ranges.json    per-channel dMel ranges, when the run used them (data.dmel.ranges_file)
    MODEL_CARD.md       the model card (with the evaluation results passed as --eval)

Files are world-readable (0644). Load with ``load_exported(OUT_DIR)`` (the model) or
``tml.eval.loading.load_run(OUT_DIR)`` (model, layout, tokenizers: what the recipes use, e.g.
``recipes/evaluate.py checkpoint=OUT_DIR``); start a new run from it with ``trainer.init_from=OUT_DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

from tml.train.checkpoint import checkpoint_state_dict, find_checkpoint

RANGES = "dmel_ranges.json"


def model_config_of(tag_dir: Path) -> dict:
    run_dir = Path(tag_dir).resolve().parents[1]
    path = run_dir / "config.resolved.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the checkpoint must sit in its run dir's checkpoints/")
    return json.loads(path.read_text())["model"]


def export(checkpoint: Path, out_dir: Path, evals: list[Path] = ()) -> Path:
    """Write the export directory (see the module docstring); returns ``OUT_DIR/model.safetensors``."""
    from safetensors.torch import save_file

    from tml.data.loader import read_manifest
    from tml.streams.layout import MicroTurnLayout
    from tml.tools.model_card import model_card
    from tml.train.config import config_from_dict

    run_dir, tag_dir = find_checkpoint(checkpoint)
    config = json.loads((run_dir / "config.resolved.json").read_text())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().clone() for k, v in checkpoint_state_dict(tag_dir).items()}  # clone: untie shared
    save_file(state, str(out_dir / "model.safetensors"), metadata={"source": str(tag_dir.resolve())})
    (out_dir / "config.json").write_text(json.dumps(config["model"], indent=2))
    data = Path(config["data"]["path"])
    manifest = read_manifest(data)
    shutil.copy(data / manifest.get("tokenizer", "tokenizer.json"), out_dir / "tokenizer.json")
    if config["data"]["dmel"].get("ranges_file"):
        shutil.copy(config["data"]["dmel"]["ranges_file"], out_dir / RANGES)
        config["data"]["dmel"]["ranges_file"] = RANGES  # relative to the export dir
    (out_dir / "run_config.json").write_text(json.dumps(config, indent=2))
    layout = MicroTurnLayout(config_from_dict(config).data.layout)
    (out_dir / "layout.json").write_text(json.dumps({"config": config["data"]["layout"], "length": layout.length,
                                                     "describe": layout.describe()}, indent=2))
    (out_dir / "MODEL_CARD.md").write_text(model_card(tag_dir, evals))
    os.chmod(out_dir, 0o755)
    for p in out_dir.iterdir():
        os.chmod(p, 0o644)  # a shared export: readable by everyone (safetensors writes 0600)
    return out_dir / "model.safetensors"


def load_exported(out_dir: Path):
    """An ``InteractionModel`` with the exported weights (eval mode)."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from tml.model import InteractionModel, ModelConfig

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                              json.loads((Path(out_dir) / "config.json").read_text())))
    model = InteractionModel(cfg)
    model.load_state_dict(load_file(str(Path(out_dir) / "model.safetensors")), strict=True)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--eval", type=Path, nargs="*", default=[], help="eval.json files for the model card")
    args = ap.parse_args(argv)
    print(export(args.checkpoint, args.out_dir, args.eval))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
