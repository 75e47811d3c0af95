"""AdamW with decoupled weight decay on matrices only, and a linear-warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from typing import Callable

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and expert tensors (ndim >= 2) except embeddings; none on norms/biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup_steps: int, decay_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warmup to 1, cosine down to
    ``min_lr_ratio`` at ``decay_steps``, constant after."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / (decay_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
