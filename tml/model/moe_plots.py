"""Heatmap of per-layer expert load over training steps, from metrics.jsonl records."""

from __future__ import annotations

import re
from pathlib import Path

_LOAD_KEY = re.compile(r"^moe/layer(\d+)/load$")


def plot_expert_load(records: list[dict], path: str | Path) -> Path:
    """One heatmap per MoE layer (x: logged step, y: expert, colour: fraction of routed tokens), stacked vertically,
    written to ``path`` (PNG/PDF by suffix). ``records`` are metrics.jsonl lines as dicts; those without
    ``moe/layer{i}/load`` keys are skipped. Raises ValueError when no record has them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = sorted({int(m.group(1)) for r in records for k in r if (m := _LOAD_KEY.match(k))})
    if not layers:
        raise ValueError("no moe/layer{i}/load keys in the records: was the run an MoE model with metrics logging?")
    steps = [r["step"] for r in records if f"moe/layer{layers[0]}/load" in r]
    fig, axes = plt.subplots(len(layers), 1, figsize=(8, 1.6 + 1.4 * len(layers)), squeeze=False, sharex=True)
    for ax, i in zip(axes[:, 0], layers):
        load = np.array([r[f"moe/layer{i}/load"] for r in records if f"moe/layer{i}/load" in r]).T  # [E, steps]
        im = ax.imshow(load, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0,
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, load.shape[0] - 0.5, -0.5))
        ax.set_ylabel(f"layer {i}\nexpert")
        fig.colorbar(im, ax=ax, label="load")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("MoE expert load (fraction of routed tokens)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
