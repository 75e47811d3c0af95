"""Export a checkpoint for inference: ``python -m tml.tools.export CHECKPOINT OUT_DIR`` writes
``OUT_DIR/model.safetensors`` (fp32 state dict of ``InteractionModel``) and ``OUT_DIR/config.json`` (its
``ModelConfig``). Load with ``load_exported(OUT_DIR)``. CHECKPOINT is ``RUN_DIR/checkpoints/step_XXXXXXXX``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def checkpoint_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a checkpoint (gathered from ZeRO partitions when there are any)."""
    tag_dir = Path(tag_dir)
    if list(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    files = sorted(tag_dir.glob("mp_rank_00_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{tag_dir} holds no mp_rank_00_model_states.pt: not a tml checkpoint dir "
                                f"(pass RUN_DIR/checkpoints/step_XXXXXXXX)")
    return {k: v.float() for k, v in torch.load(files[0], map_location="cpu", weights_only=False)["module"].items()}


def model_config_of(tag_dir: Path) -> dict:
    run_dir = Path(tag_dir).resolve().parents[1]
    path = run_dir / "config.resolved.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the checkpoint must sit in its run dir's checkpoints/")
    return json.loads(path.read_text())["model"]


def export(tag_dir: Path, out_dir: Path) -> Path:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().clone() for k, v in checkpoint_state_dict(tag_dir).items()}  # clone: untie shared
    save_file(state, str(out_dir / "model.safetensors"), metadata={"source": str(Path(tag_dir).resolve())})
    (out_dir / "config.json").write_text(json.dumps(model_config_of(tag_dir), indent=2))
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
    ap = argparse.ArgumentParser(description="export a tml checkpoint to safetensors + config.json")
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out_dir", type=Path)
    args = ap.parse_args(argv)
    print(export(args.checkpoint, args.out_dir))


if __name__ == "__main__":
    main()
