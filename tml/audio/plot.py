"""Pictures of log-mel spectrograms, stacked on one time axis (PNG through matplotlib's Agg backend)."""

from __future__ import annotations

from pathlib import Path

import torch


def plot_mels(path: str | Path, panels: list[tuple[str, torch.Tensor]], hop_s: float = 0.01, lo: float = -7.0,
              hi: float = 2.0, title: str = "") -> None:
    """Write a PNG with one row per (label, log10 mel [frames, n_mels]) panel, time in seconds, same colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = max(m.shape[0] for _, m in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(min(4 + frames * hop_s * 1.2, 30), 2.2 * len(panels)),
                             sharex=True, squeeze=False)
    for ax, (label, mel) in zip(axes[:, 0], panels):
        im = ax.imshow(mel.float().clamp(lo, hi).T.numpy(), origin="lower", aspect="auto", vmin=lo, vmax=hi,
                       extent=(0, mel.shape[0] * hop_s, 0, mel.shape[1]), cmap="magma")
        ax.set_ylabel(f"{label}\nmel channel")
    axes[-1, 0].set_xlabel("time (s)")
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="log10 mel power")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=80)
    plt.close(fig)
