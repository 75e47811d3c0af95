"""Checkpoints: DeepSpeed's own (model, optimizer, lr schedule, ZeRO partitions) plus a small per-rank trainer
state (step, data-loader cursor, RNG states) that DeepSpeed does not keep per rank.

Layout under ``RUN_DIR/checkpoints``: ``step_00000020/`` (DeepSpeed files and ``trainer_state_rank{r}.pt``) and
DeepSpeed's ``latest`` file naming the newest tag. The per-rank state is written before DeepSpeed writes
``latest``, so ``latest`` never points at a checkpoint without it.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint to resume from is missing or incomplete; the message names the path."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(engine, ckpt_dir: Path, step: int, loader_state: dict, rank: int) -> Path:
    """Save a complete, resumable checkpoint of ``step`` on every rank (collective: all ranks call it)."""
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "loader": loader_state, "rng": rng_state()}, tag_dir / f"trainer_state_rank{rank}.pt")
    torch.distributed.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag)
    return tag_dir


def latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.exists() else None


def load_checkpoint(engine, ckpt_dir: Path, rank: int) -> dict:
    """Load the newest checkpoint into ``engine``; return this rank's trainer state (step, loader, rng)."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        raise CheckpointError(f"trainer.resume=true but {ckpt_dir} holds no checkpoint ('latest' file missing); "
                              f"start without trainer.resume or point hydra.run.dir at the run to resume")
    state_file = ckpt_dir / tag / f"trainer_state_rank{rank}.pt"
    if not state_file.exists():
        raise CheckpointError(f"{state_file} is missing: the checkpoint was written by a different number of ranks "
                              f"or is incomplete")
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt_dir / tag}")
    return torch.load(state_file, weights_only=False)


def find_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """A run dir, its ``checkpoints`` dir or one ``step_XXXXXXXX`` dir -> (run dir, step dir). The run dir is the
    one holding ``config.resolved.json``; without a step dir, the newest checkpoint (``latest``) is taken."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / "latest").exists():
        path = path / latest_tag(path)
    run_dir = path.parent.parent
    if not (path / "mp_rank_00_model_states.pt").exists() or not (run_dir / "config.resolved.json").exists():
        raise CheckpointError(f"checkpoint={path}: expected RUN_DIR, RUN_DIR/checkpoints or "
                              f"RUN_DIR/checkpoints/step_XXXXXXXX of a pretrain run (with mp_rank_00_model_states.pt "
                              f"and RUN_DIR/config.resolved.json)")
    return run_dir, path


def load_model_weights(model: torch.nn.Module, step_dir: Path) -> None:
    """Load a DeepSpeed checkpoint's module weights into a plain model (inference: no engine, no optimizer)."""
    state = torch.load(step_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    module = state.get("module")
    if not module or any(t.numel() == 0 for t in module.values()):
        raise CheckpointError(f"{step_dir} holds no full module weights (ZeRO-3 partitions them): gather them with "
                              f"DeepSpeed's zero_to_fp32.py first")
    model.load_state_dict({k: v.float() for k, v in module.items()})
