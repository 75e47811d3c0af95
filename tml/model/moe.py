"""Token-choice top-k mixture of SwiGLU experts, dropless, computed with ``torch.nn.functional.grouped_mm``.

Parameter layout (fixed: DeepSpeed AutoEP and Hugging Face MoE checkpoints expect it)::

    MoE
      gate            nn.Linear(dim, num_experts, bias=False)   the router
      experts         GroupedExperts: w1, w3 [E, hidden, dim], w2 [E, dim, hidden]   (out x in, like nn.Linear)
      shared_experts  SwiGLU(dim, num_shared_experts * hidden)  optional, always on
    attributes num_experts, top_k

``MoE.forward`` keeps the plain ``[B, T, dim] -> [B, T, dim]`` signature so AutoEP can swap the module for its
expert-parallel layer; the step's router statistics are left on the module instead (``last_aux_loss``,
``last_expert_counts``) and collected by the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tml.model.config import MoEConfig
from tml.model.mlp import SwiGLU
from tml.streams.layout import ConfigError


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's backward rejects
    broadcast (stride-0) gradients, e.g. the one ``out.sum().backward()`` produces."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _expert_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per-expert ``x_e @ w[e].T`` for rows grouped by expert. x [N, in], w [E, out, in], offs int32 [E] -> [N, out]."""
    return _ContiguousGrad.apply(F.grouped_mm(x, w.transpose(-2, -1), offs=offs))


class GroupedExperts(nn.Module):
    """``num_experts`` SwiGLU experts stored as 3-D weights, applied to tokens already sorted by expert."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        nn.init.normal_(self.w1, std=std)
        nn.init.normal_(self.w3, std=std)
        nn.init.normal_(self.w2, std=std if out_std is None else out_std)

    def forward(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: [N, dim] tokens sorted by expert; rows offs[e-1]:offs[e] go to expert e.
            offs: int32 [E] cumulative token counts (offs[-1] == N).
        Returns:
            [N, dim]
        """
        h = F.silu(_expert_mm(x, self.w1, offs)) * _expert_mm(x, self.w3, offs)
        return _expert_mm(h, self.w2, offs)


class MoE(nn.Module):
    """Router + dropless grouped experts (+ optional shared expert). [B, T, dim] -> [B, T, dim].

    After each forward:
      last_aux_loss       scalar: aux_loss_coeff * switch load-balancing loss + z_loss_coeff * router z-loss
      last_expert_counts  long [E]: tokens routed to each expert (sums to tokens * top_k)
    Both cover every position of the input, packing padding included: the module sees no mask, so that its
    signature stays the one AutoEP replaces.
    """

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.dim, self.hidden_dim = dim, cfg.hidden_dim
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.score_func, self.route_norm, self.route_scale = cfg.score_func, cfg.route_norm, cfg.route_scale
        self.aux_loss_coeff, self.z_loss_coeff = cfg.aux_loss_coeff, cfg.z_loss_coeff
        self.gate = nn.Linear(dim, cfg.num_experts, bias=False)
        self.experts = GroupedExperts(cfg.num_experts, dim, cfg.hidden_dim)
        self.shared_experts = SwiGLU(dim, cfg.num_shared_experts * cfg.hidden_dim) if cfg.num_shared_experts else None
        self.last_aux_loss: torch.Tensor | None = None
        self.last_expert_counts: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pick top_k experts per token.

        Args:
            x: [N, dim]
        Returns:
            weights: fp32 [N, top_k] routing weights (after optional renormalisation and route_scale)
            experts: long [N, top_k] chosen expert ids (distinct per token)
            probs:   fp32 [N, E] per-token routing distribution (sums to 1; for the load-balancing loss)
            logits:  fp32 [N, E] router logits (for the z-loss)
        """
        logits = self.gate(x).float()  # routing decisions in fp32: bf16 ties and rounding flip top-k choices
        scores = logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()
        weights, experts = scores.topk(self.top_k, dim=-1)
        if self.route_norm:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * self.route_scale
        probs = scores if self.score_func == "softmax" else scores / (scores.sum(-1, keepdim=True) + 1e-20)
        return weights, experts, probs, logits

    def _router_losses(self, counts: torch.Tensor, probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Switch-style balance loss ``E * sum_e f_e * P_e`` (f_e: fraction of the N*top_k assignments that went
        to e, no gradient; P_e: mean routing probability of e), which is 1 when routing is uniform, plus the
        ST-MoE z-loss ``mean(logsumexp(logits)^2)``; each times its coefficient."""
        n = probs.shape[0]
        if n == 0:
            return probs.sum()  # zero that still depends on the router
        loss = probs.new_zeros(())
        if self.aux_loss_coeff:
            f = counts.to(probs.dtype) / (n * self.top_k)
            loss = loss + self.aux_loss_coeff * self.num_experts * (f * probs.mean(0)).sum()
        if self.z_loss_coeff:
            loss = loss + self.z_loss_coeff * torch.logsumexp(logits, dim=-1).square().mean()
        return loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, dim] -> [B, T, dim]."""
        if (x.element_size() * self.dim) % 16 or (x.element_size() * self.hidden_dim) % 16:
            raise ConfigError(f"model.dim={self.dim} and model.moe.hidden_dim={self.hidden_dim} must be multiples of "
                              f"{16 // x.element_size()} for {x.dtype} activations: grouped_mm needs row strides "
                              f"that are multiples of 16 bytes")
        shape = x.shape
        x = x.reshape(-1, self.dim)
        weights, experts, probs, logits = self.route(x)

        # Sort the N*top_k (token, expert) assignments by expert; stable, so the order is deterministic.
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)
        # scatter_add rather than bincount: no host sync on GPU (bincount must read the max first).
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        offs = counts.cumsum(0).to(torch.int32)

        y = self.experts(x[order // self.top_k], offs)  # [N*top_k, dim] in expert order
        y = y.new_empty(y.shape).index_copy(0, order, y)  # back to (token, k) order
        out = (y.view(-1, self.top_k, self.dim) * weights.unsqueeze(-1).to(y.dtype)).sum(1)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)

        self.last_aux_loss = self._router_losses(counts, probs, logits)
        self.last_expert_counts = counts
        return out.view(shape)
