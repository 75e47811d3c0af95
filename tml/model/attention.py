"""RMSNorm, rotary position embedding with explicit per-position ids, and grouped-query attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim with a learned gain. [..., dim] -> [..., dim]."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation tables for explicit positions (they restart at 0 in every packed document).

    Args:
        position_ids: int [B, L].
    Returns:
        cos, sin: [B, 1, L, head_dim] in ``dtype`` (halves duplicated, for the rotate-half convention).
    """
    # Computed per call rather than cached in a buffer: it is tiny, and it stays correct for models built on
    # the meta device and materialised later.
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    angles = position_ids.to(torch.float32)[..., None] * inv_freq  # [B, L, head_dim/2], fp32 for long positions
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + head_dim/2) of ``x`` [B, H, L, head_dim] by the position angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Multi-head self-attention with grouped-query heads (``n_kv_heads`` divides ``n_heads``) and RoPE.

    The mask, not the module, decides causality and document boundaries.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: [B, L, dim]; cos, sin: [B, 1, L, head_dim] from ``rope_cos_sin``;
            mask: bool [B, 1, L, L], True where query i may attend key j (``Batch.attention_mask()``).
        Returns:
            [B, L, dim]
        """
        B, L, _ = x.shape
        q = self.wq(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(B, L, -1))

    def forward_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                       cache: "KVCache") -> torch.Tensor:
        """Streaming step: new positions ``x`` [B, T_new, dim] at absolute ``positions`` [T_new] attend to the
        cached past and causally to each other; their keys and values join ``cache``. Returns [B, T_new, dim]."""
        B, L, _ = x.shape
        q = self.wq(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v, mask = cache.extend(k, v, positions)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(B, L, -1))


class KVCache:
    """One layer's keys and values of past positions, for streaming inference.

    ``k``, ``v``: [B, n_kv_heads, T, head_dim]; ``positions``: long [T] (absolute session positions). With
    ``window`` > 0 a query attends only to the last ``window`` positions (its own included) and older entries are
    dropped, so memory and cost per step stay bounded however long the session runs.
    """

    def __init__(self, window: int = 0):
        self.window = window
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.positions is None else self.positions.numel()

    def extend(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append new keys/values; return the keys, values and mask [1, 1, T_new, T_all] the new queries use."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        self.positions = positions if self.positions is None else torch.cat([self.positions, positions])
        k_all, v_all, p_all = self.k, self.v, self.positions
        mask = p_all[None, :] <= positions[:, None]
        if self.window > 0:
            mask &= positions[:, None] - p_all[None, :] < self.window
            keep = self.positions > self.positions[-1] - self.window
            self.k, self.v, self.positions = self.k[:, :, keep], self.v[:, :, keep], self.positions[keep]
        return k_all, v_all, mask[None, None]
