"""PNG plots of a run from its ``metrics.jsonl`` alone: ``python -m tml.tools.plot RUN_DIR [--out DIR]``.

Writes ``loss.png`` (total and per stream), ``lr.png``, ``throughput.png`` (tokens/s and MFU) and, when the run
logged ``moe/layer{i}/load``, ``expert_load.png`` (heatmap of the last record) and ``expert_load_time.png``
(max over mean load per layer over steps), and ``router.png`` when it logged balancing terms (``moe/switch_loss``,
``moe/seq_loss``, ``moe/z_loss``, ``moe/bias_absmax``). Default output: ``RUN_DIR/plots``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from tml.train.figures import expert_load_figure, load_matrix, plt
from tml.train.metrics import read_metrics


def _lines(records: list[dict], keys: list[str], title: str, ylabel: str, log: bool = False):
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        pts = [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
        if pts:
            ax.plot(*zip(*pts), label=k)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def throughput_figure(records: list[dict]):
    """tokens/s, and MFU on a second axis (dashed) when logged."""
    fig = _lines(records, ["tokens_per_s"], "throughput", "tokens/s")
    if any("mfu" in r for r in records):
        ax2 = fig.axes[0].twinx()
        ax2.plot([r["step"] for r in records if "mfu" in r], [r["mfu"] for r in records if "mfu" in r], "C1--")
        ax2.set_ylabel("MFU (dashed)")
        fig.tight_layout()  # again, with the twin axis: its label sits right of the plot and was cut off
    return fig


def plot_run(run_dir: Path, out: Path | None = None) -> list[Path]:
    """Write the PNGs; return their paths."""
    records = read_metrics(run_dir)
    out = Path(out or Path(run_dir) / "plots")
    out.mkdir(parents=True, exist_ok=True)
    figs = {"loss": _lines(records, [k for k in ("loss", "loss/text", "loss/audio", "loss/text_words", "loss/aux")
                                     if any(k in r for r in records)], "loss per stream", "loss"),
            "lr": _lines(records, ["lr"], "learning rate", "lr"),
            "throughput": throughput_figure(records)}
    with_load = [r for r in records if load_matrix(r) is not None]
    if with_load:
        figs["expert_load"] = expert_load_figure(load_matrix(with_load[-1]), f"expert load, step {with_load[-1]['step']}")
        layers = load_matrix(with_load[-1]).shape[0]
        figs["expert_load_time"] = _lines(with_load, [f"moe/layer{i}/max_over_mean" for i in range(layers)],
                                          "expert load imbalance", "max / mean load")
    router = [k for k in ("moe/switch_loss", "moe/seq_loss", "moe/z_loss", "moe/bias_absmax")
              if any(k in r for r in records)]
    if router:
        figs["router"] = _lines(records, router, "router balancing (terms before coefficients)", "value")
    paths = []
    for name, fig in figs.items():
        paths.append(out / f"{name}.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    for p in plot_run(args.run_dir, args.out):
        print(p)


if __name__ == "__main__":
    main()
