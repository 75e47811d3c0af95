"""Parameter accounting: total, and active per token (an MoE layer runs top_k of its num_experts experts)."""

from __future__ import annotations

from torch import nn

from tml.model.moe import MoE


def param_counts(model: nn.Module) -> dict[str, int]:
    """``{"total": all parameters, "active": parameters one token uses}``. Shared (tied) parameters count once.
    Works on the meta device, so big configs can be sized without memory."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for m in model.modules():
        if isinstance(m, MoE):
            per_expert = sum(p.numel() for p in m.experts.parameters()) // m.num_experts
            inactive += (m.num_experts - m.top_k) * per_expert
    return {"total": total, "active": total - inactive}
