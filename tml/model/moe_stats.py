"""Expert-load statistics of MoE layers for metrics.jsonl (the keys the plot tool reads)."""

from __future__ import annotations

import torch


def expert_load_metrics(counts: torch.Tensor) -> dict[str, float | list[float]]:
    """Per-layer load from routed-assignment counts.

    Args:
        counts: [n_moe_layers, E] tokens routed to each expert (any dtype; summed over micro-batches and ranks)
    Returns:
        ``moe/layer{i}/load``           list of E floats, fraction of the layer's routed tokens per expert (sums to 1)
        ``moe/layer{i}/max_over_mean``  max load / mean load (1.0 = perfectly balanced, E = all on one expert)
        ``moe/layer{i}/entropy``        entropy of the load in nats (log E = balanced, 0 = all on one expert)
        ``moe/max_load``                mean over layers of max_over_mean
    Layers are numbered among MoE layers (0 = first MoE layer). Empty when there is no MoE layer.
    """
    if counts.numel() == 0:
        return {}
    counts = counts.detach().double().cpu()
    load = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    max_over_mean = load.max(-1).values * load.shape[-1]
    entropy = -(load * load.clamp(min=1e-300).log()).sum(-1)
    out: dict[str, float | list[float]] = {}
    for i in range(load.shape[0]):
        out[f"moe/layer{i}/load"] = [float(v) for v in load[i]]
        out[f"moe/layer{i}/max_over_mean"] = float(max_over_mean[i])
        out[f"moe/layer{i}/entropy"] = float(entropy[i])
    out["moe/max_load"] = float(max_over_mean.mean())
    return out
