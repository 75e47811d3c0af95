"""Expert-load and router statistics of MoE layers for metrics.jsonl (the keys the plot tool reads)."""

from __future__ import annotations

from typing import Sequence

import torch

from tml.model.config import MoEConfig
from tml.model.moe import MoE


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


def router_metrics(terms: torch.Tensor, cfg: MoEConfig, moes: Sequence[MoE]) -> dict[str, float | list[float]]:
    """The balancing terms that are in the loss, and the selection biases of auxiliary-loss-free balancing.

    Args:
        terms: [n_moe_layers, 3] each layer's terms before their coefficients, in ``MoE.ROUTER_TERMS`` order
            (switch, seq, z), averaged over the step's micro-batches and ranks
        cfg: the MoE config: a term is reported when its coefficient is non-zero, the biases when
            ``load_balance_coeff`` is
        moes: the model's MoE layers (their ``expert_bias`` buffers)
    Returns:
        ``moe/switch_loss``, ``moe/seq_loss``, ``moe/z_loss``  mean over layers of each enabled term (the first two
                                                                are 1 for uniform routing)
        ``moe/layer{i}/bias``                                   list of E floats, that layer's selection bias
        ``moe/bias_absmax``                                     mean over layers of max |bias|
    """
    if terms.numel() == 0:
        return {}
    out: dict[str, float | list[float]] = {}
    coeffs = (cfg.aux_loss_coeff, cfg.seq_aux_loss_coeff, cfg.z_loss_coeff)
    for j, (name, coeff) in enumerate(zip(MoE.ROUTER_TERMS, coeffs)):
        if coeff:
            out[f"moe/{name}_loss"] = float(terms[:, j].double().mean())
    if cfg.load_balance_coeff and moes:
        bias = torch.stack([m.expert_bias.detach().double().cpu() for m in moes])
        for i in range(bias.shape[0]):
            out[f"moe/layer{i}/bias"] = [float(v) for v in bias[i]]
        out["moe/bias_absmax"] = float(bias.abs().max(-1).values.mean())
    return out
