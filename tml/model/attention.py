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
        if mask.all():  # e.g. one new position and no window: the mask-free kernel is several times faster
            mask = None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(B, L, -1))


class KVCache:
    """One layer's keys and values of past positions, for streaming inference.

    Stored in buffers that grow by doubling, so appending one position costs O(1) amortised instead of copying
    the whole past. ``window`` > 0: a query attends only to the last ``window`` positions (its own included) and
    older entries are dropped (compacted once the buffer holds two windows), so memory and cost per step stay
    bounded however long the session runs.
    """

    def __init__(self, window: int = 0):
        self.window = window
        self.length = 0
        self.k: torch.Tensor | None = None  # [B, n_kv_heads, capacity, head_dim]; first ``length`` are valid
        self.v: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None  # long [capacity]: absolute session position of each entry

    def __len__(self) -> int:
        return self.length

    def _reserve(self, like: torch.Tensor, positions: torch.Tensor, extra: int) -> None:
        need = self.length + extra
        if self.k is not None and need <= self.k.shape[2]:
            return
        cap = max(64, 2 * need)
        B, H, _, D = like.shape
        k, v = like.new_empty(B, H, cap, D), like.new_empty(B, H, cap, D)
        pos = positions.new_empty(cap)
        if self.k is not None:
            k[:, :, : self.length] = self.k[:, :, : self.length]
            v[:, :, : self.length] = self.v[:, :, : self.length]
            pos[: self.length] = self.pos[: self.length]
        self.k, self.v, self.pos = k, v, pos

    def extend(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append new keys/values [B, n_kv_heads, T_new, head_dim] at ``positions`` [T_new]; return the keys,
        values and mask [1, 1, T_new, T_all] the new queries use."""
        if self.window > 0 and self.length + k.shape[2] > 2 * self.window:
            keep = min(self.length, self.window)  # compact: the last window of entries moves to the front
            s = self.length - keep
            self.k[:, :, :keep] = self.k[:, :, s : self.length].clone()
            self.v[:, :, :keep] = self.v[:, :, s : self.length].clone()
            self.pos[:keep] = self.pos[s : self.length].clone()
            self.length = keep
        n = k.shape[2]
        self._reserve(k, positions, n)
        end = self.length + n
        self.k[:, :, self.length : end], self.v[:, :, self.length : end], self.pos[self.length : end] = k, v, positions
        self.length = end
        p_all = self.pos[:end]
        mask = p_all[None, :] <= positions[:, None]
        if self.window > 0:
            mask &= positions[:, None] - p_all[None, :] < self.window
        return self.k[:, :, :end], self.v[:, :, :end], mask[None, None]
