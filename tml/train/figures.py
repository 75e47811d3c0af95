"""Figures shared by W&B logging and ``tml.tools.plot``: dMel predictions vs targets, expert-load heatmaps."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def dmel_frames(codes: torch.Tensor) -> np.ndarray:
    """[N positions, frames, n_mels] bin ids -> [n_mels, N * frames] image (time left to right, low mels down)."""
    return codes.reshape(-1, codes.shape[-1]).T.cpu().numpy()


def dmel_figure(pred: torch.Tensor, target: torch.Tensor, title: str = ""):
    """Teacher-forced dMel prediction (argmax bins) above its target; both [N, frames, n_mels]."""
    fig, axes = plt.subplots(2, 1, figsize=(8, 4.5), sharex=True)
    top = int(max(pred.max(), target.max()))  # one colour scale for both
    for ax, codes, name in zip(axes, (pred, target), ("predicted (argmax)", "target")):
        ax.imshow(dmel_frames(codes), origin="lower", aspect="auto", interpolation="nearest", cmap="magma",
                  vmin=0, vmax=top)
        ax.set_ylabel(f"{name}\nmel channel")
    axes[-1].set_xlabel("mel frame (10 ms)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def load_matrix(record: dict) -> np.ndarray | None:
    """[n_layers, E] from ``moe/layer{i}/load`` keys of one metrics record, or None when absent."""
    rows, i = [], 0
    while f"moe/layer{i}/load" in record:
        rows.append(record[f"moe/layer{i}/load"])
        i += 1
    return np.asarray(rows, dtype=float) if rows else None


def expert_load_figure(loads: np.ndarray, title: str = "expert load"):
    """Heatmap of [n_layers, E] load fractions (each row sums to 1; 1/E everywhere is balanced)."""
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * loads.shape[1], 1.2 + 0.45 * loads.shape[0]))
    im = ax.imshow(loads, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="fraction of tokens")
    fig.tight_layout()
    return fig
