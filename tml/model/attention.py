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

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, dim] -> rotated queries [B, H, L, D], rotated keys and values [B, H_kv, L, D]."""
        B, L, _ = x.shape
        q = self.wq(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: [B, L, dim]; cos, sin: [B, 1, L, head_dim] from ``rope_cos_sin``;
            mask: bool [B, 1, L, L], True where query i may attend key j (``Batch.attention_mask()``).
        Returns:
            [B, L, dim]
        """
        B, L, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(B, L, -1))

    def forward_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: "KVCache",
                       layer: int) -> torch.Tensor:
        """Streaming step: new positions ``x`` [B, T_new, dim] (their slots and mask prepared by
        ``cache.prepare``) attend to the cached past and causally to each other; their keys and values join
        ``cache`` as layer ``layer``. Returns [B, T_new, dim]."""
        B, L, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        k, v, mask = cache.write(layer, k, v)
        if k.dtype != q.dtype:
            out = half_cache_attention(q, k, v, cache.bias)
        elif L == 1:
            out = decode_attention(q, k, v, cache.bias)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(B, L, -1))

    def decode_position(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, bias: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The compiled decode step's attention (``InteractionModel.decode_position``): one new position per row
        x [B, 1, dim] against this layer's cache k_cache, v_cache [B, H_kv, S, D], which it only reads (``bias``:
        ``attend_cache_and_new``). Returns ([B, 1, dim], the position's key and value [B, H_kv, 1, D] in the cache's
        dtype, for the caller to store)."""
        q, k, v = self._qkv(x, cos, sin)
        k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
        out = attend_cache_and_new(q, k_cache, v_cache, bias, k, v)
        return self.wo(out.transpose(1, 2).reshape(x.shape[0], 1, -1)), k, v


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Attention of one query per row: q [B, H, 1, D] over k, v [B, H_kv, S, D] (grouped heads: query head h reads
    kv head h // (H / H_kv), as ``enable_gqa``), ``bias`` float [B, 1, 1, S] (0 or -inf, ``KVCache.bias``) or None.
    Returns [B, H, 1, D], SDPA's result up to float rounding.

    Why not SDPA: at one query the step is two matrix-vector products over the whole cache, bound by memory reads,
    and the flash kernel's tiling reads it ~1.5x slower than two batched matmuls (bench/streaming.py, tiny at 16
    sessions). The query heads of one kv head are stacked as rows, so each key is read once, not once per head."""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    scores = (q.reshape(B, Hkv, H // Hkv, D) @ k.transpose(-1, -2)).mul_(D**-0.5)  # [B, H_kv, H / H_kv, S]
    if bias is not None:
        scores.add_(bias)
    return (scores.softmax(-1) @ v).view(B, H, 1, D)


def half_cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
                         ) -> torch.Tensor:
    """Attention over a half-precision cache (``KVCache(dtype=torch.bfloat16)``, ``SessionConfig.cache_dtype``):
    q [B, H, T, D] in the activations' dtype over k, v [B, H_kv, S, D] in the cache's, ``bias`` [B, 1, T, S] in the
    cache's dtype (0 or -inf, ``KVCache.bias``) or None. Returns [B, H, T, D] in q's dtype.

    The query is rounded to the cache's dtype and SDPA's flash kernel runs in it (products summed in fp32 inside,
    the output rounded once): for one query it reads a bfloat16 cache near the read bandwidth, where two batched
    matmuls over it (``decode_attention``'s) run at half that (bench/streaming.py, tiny at 16 sessions)."""
    out = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=bias, enable_gqa=k.shape[1] != q.shape[1])
    return out.to(q.dtype)


def attend_cache_and_new(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, bias: torch.Tensor,
                         k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
    """One query per row over a cache it only reads, plus its own new key: q [B, H, 1, D] in the activations' dtype;
    k_cache, v_cache [B, H_kv, S, D] in the cache's dtype, without the new position; ``bias`` [B, 1, 1, S] in the
    cache's dtype (0 / -inf: the slots the query may see, its own slot excluded, ``KVCache.prepare(before_write=True)``); k_new, v_new
    [B, H_kv, 1, D] as the cache will store them. Returns [B, H, 1, D] in q's dtype: attention over the cache and the
    new key together, equal to ``decode_attention`` / ``half_cache_attention`` after the write up to float rounding.

    Why: the compiled decode step (``SessionConfig.compile``) must not write the cache inside its graph (with the
    in-place writes inside, a compiled tiny step ran 4.5x slower than eager; its time matches a copy of the cache per
    call), so the cache's share comes from SDPA's CPU flash kernel with its log-sum-exp and the new key's share is
    merged in. CPU only (that kernel)."""
    B, H, _, D = q.shape
    Hkv = k_cache.shape[1]
    qg = q.reshape(B, Hkv, H // Hkv, D).to(k_cache.dtype)  # a kv head's query heads as rows: each key read once
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qg, k_cache, v_cache, attn_mask=bias)[:2]
    lse = lse.unsqueeze(-1)  # [B, H_kv, G, 1] fp32
    s_new = (qg.float() * k_new.float()).sum(-1, keepdim=True) * D**-0.5
    top = torch.maximum(lse, s_new)
    w_cache, w_new = (lse - top).exp(), (s_new - top).exp()
    out = torch.where(w_cache > 0, out.float(), 0.0)  # nothing visible in the cache: its output is undefined
    out = (w_cache * out + w_new * v_new.float()) / (w_cache + w_new)
    return out.reshape(B, H, 1, D).to(q.dtype)


class RopeTable:
    """``rope_cos_sin`` for streaming: the tables for positions [0, n) computed once (bitwise the same values) and
    looked up per step; they grow by doubling when a session passes n."""

    def __init__(self, head_dim: int, theta: float, dtype: torch.dtype = torch.float32, n: int = 4096):
        self.head_dim, self.theta, self.dtype = head_dim, theta, dtype
        self.cos = self.sin = torch.zeros(0, head_dim)
        self._build(n, "cpu")

    def _build(self, n: int, device) -> None:
        cos, sin = rope_cos_sin(torch.arange(n, device=device)[None], self.head_dim, self.theta, self.dtype)
        self.cos, self.sin = cos[0, 0], sin[0, 0]  # [n, head_dim]

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions long [B, T] -> cos, sin [B, 1, T, head_dim] (as ``rope_cos_sin``)."""
        last = int(positions.max())
        if last >= self.cos.shape[0] or self.cos.device != positions.device:
            self._build(max(2 * (last + 1), self.cos.shape[0]), positions.device)
        return self.cos[positions][:, None], self.sin[positions][:, None]


class ContextFullError(RuntimeError):
    """A full-context session reached its position limit."""


class KVCache:
    """Keys and values of past positions for every layer of ``B`` streaming sessions (rows), in slots.

    Each row has its own length: ``pos[b, s]`` is the absolute session position held in slot ``s`` of row ``b``
    (-1 = empty), shared by all layers, and a query attends to the slots whose position is at most its own (and,
    with ``window``, within the window). ``prepare(positions)`` places a step's new positions and builds the mask once
    per forward; each layer then only ``write``s its keys and values. Where a position lives:

    * full context (``window == 0``): slot = position; the buffers start at ``capacity`` slots and grow by doubling
      when a row passes them (offline generation of unknown length).
    * window (``window > 0``): the first ``sinks`` positions keep slots 0..sinks-1 for good (attention sinks,
      Xiao et al. 2023); later positions go round a ring of the remaining slots, so a session of any length
      never reallocates or copies. A query at position p sees positions ``p - window + 1 .. p`` plus the sinks.
      The ring holds a window plus the longest chunk written at once, so a chunk never overwrites keys its own
      earlier queries still need; ``capacity`` sizes it up front (a longer chunk grows it once).

    ``dtype``: what keys and values are stored in (None: the activations' dtype). A cache in another dtype than the
    activations (bfloat16 under a float32 model) is attended by ``half_cache_attention``.
    """

    def __init__(self, n_layers: int, window: int = 0, sinks: int = 0, capacity: int = 0,
                 dtype: torch.dtype | None = None):
        if window < 0 or sinks < 0 or (sinks and sinks >= window):
            raise ValueError(f"KVCache: window={window}, sinks={sinks}: need window >= 0 and sinks < window "
                             f"(sinks need a window)")
        self.n_layers, self.window, self.sinks, self.capacity = n_layers, window, sinks, capacity
        self.dtype = dtype
        self.k: torch.Tensor | None = None  # [n_layers, B, n_kv_heads, capacity, head_dim]
        self.v: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None  # long [B, capacity]: absolute position in each slot, -1 = empty
        self.end = 0  # slots [0, end) are the only ones ever written (attention reads no further)
        self.rows = 0
        # Set by prepare() for the layers' writes: slots long [B, T] (or [T] when all rows share them), mask.
        self.slots: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        # the mask as float 0 / -inf [B, 1, T, S]: when T == 1 (decode_attention), and in a cache of another dtype than
        # the activations for every T, in the cache's dtype (half_cache_attention)
        self.bias: torch.Tensor | None = None

    def __len__(self) -> int:
        """Most positions any row holds (what memory is spent on)."""
        return 0 if self.pos is None else int((self.pos >= 0).sum(1).max())

    def _slots(self, positions: torch.Tensor, capacity: int) -> torch.Tensor:
        if not self.window:
            return positions
        ring = capacity - self.sinks
        return torch.where(positions < self.sinks, positions, self.sinks + (positions - self.sinks) % ring)

    def _allocate(self, B: int, H: int, D: int, dtype: torch.dtype, device, capacity: int) -> None:
        """(Re)allocate ``capacity`` slots, moving held entries to their slots in the new buffers."""
        k = torch.zeros(self.n_layers, B, H, capacity, D, dtype=dtype, device=device)
        v = torch.zeros_like(k)
        pos = torch.full((B, capacity), -1, dtype=torch.long, device=device)
        if self.k is not None:
            b, s = (self.pos >= 0).nonzero(as_tuple=True)
            new = self._slots(self.pos[b, s], capacity)
            k[:, b, :, new], v[:, b, :, new], pos[b, new] = self.k[:, b, :, s], self.v[:, b, :, s], self.pos[b, s]
            self.end = int(new.max()) + 1 if new.numel() else 0
        self.k, self.v, self.pos, self.capacity, self.rows = k, v, pos, capacity, B

    def prepare(self, positions: torch.Tensor, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                before_write: bool = False) -> None:
        """Place new absolute ``positions`` (long [B, T]) in their slots (allocating on first use) and build the mask
        [B, 1, T, S] their queries attend with (None when every query may see every slot: the mask-free kernel is
        faster). Every layer's ``write`` of this forward then uses them.

        ``before_write`` (one position per row, ``attend_cache_and_new``: the cache is read before the new keys are
        stored): only ``bias`` [B, 1, 1, capacity], over every slot of the ring (one shape from the session's first
        position on, for a compiled step), each query's own slot excluded."""
        B, T = positions.shape
        need = self.sinks + self.window + T - 1 if self.window else int(positions.max()) + 1
        if self.k is None:
            if self.rows and self.rows != B:
                raise ValueError(f"KVCache holds {self.rows} rows, got {B}: use keep() / add_rows()")
            cap = max(self.capacity, need if self.window else 2 * need)
            self._allocate(B, n_kv_heads, head_dim, self.dtype or dtype, positions.device, cap)
        elif self.rows != B:
            raise ValueError(f"KVCache holds {self.rows} rows, got {B}: use keep() / add_rows()")
        elif need > self.capacity:
            self._allocate(B, n_kv_heads, head_dim, self.k.dtype, positions.device,
                           need if self.window else max(need, 2 * self.capacity))
        slots = self._slots(positions, self.capacity)
        self.pos.scatter_(1, slots, positions)
        self.end = max(self.end, int(slots.max()) + 1)
        qp = positions[:, :, None]  # [B, T, 1]
        self.slots = slots[0] if B == 1 or bool((slots == slots[:1]).all()) else slots
        if before_write:
            self.mask, self.bias = None, self._bias(self._visible(self.pos[:, None, :], qp, own=False)[:, None])
            return
        mask = self._visible(self.pos[:, None, : self.end], qp, own=True)  # [B, T, S]
        self.mask = None if bool(mask.all()) else mask[:, None]
        self.bias = None
        if self.mask is not None and (T == 1 or self.k.dtype != dtype):
            # the mask as the scores' bias, in the cache's dtype, once per forward rather than per layer: one query's
            # (decode_attention), and every forward's over a cache in another dtype (half_cache_attention)
            self.bias = self._bias(self.mask)

    def _visible(self, kp: torch.Tensor, qp: torch.Tensor, own: bool) -> torch.Tensor:
        """bool [B, T, S]: which slots (holding positions kp [B, 1, S], -1 = empty) a query at qp [B, T, 1] attends:
        earlier positions (and its own where ``own``) within the window, plus the sinks."""
        mask = (kp >= 0) & ((kp <= qp) if own else (kp < qp))
        if self.window:
            mask &= (qp - kp < self.window) | (kp < self.sinks)
        return mask

    def _bias(self, mask: torch.Tensor) -> torch.Tensor:
        """A bool mask as the scores' additive bias in the cache's dtype: 0 where True, -inf where False."""
        return torch.zeros(mask.shape, dtype=self.k.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store layer ``layer``'s new keys/values [B, n_kv_heads, T, head_dim] in the prepared slots (rounded to the
        cache's dtype); return its keys and values [B, n_kv_heads, S, head_dim] and the prepared mask."""
        kl, vl = self.k[layer], self.v[layer]
        if self.slots.ndim == 1:  # every row writes the same slots: one copy per tensor
            kl.index_copy_(2, self.slots, k.to(kl.dtype))
            vl.index_copy_(2, self.slots, v.to(vl.dtype))
        else:
            idx = self.slots[:, None, :, None].expand_as(k)
            kl.scatter_(2, idx, k.to(kl.dtype))
            vl.scatter_(2, idx, v.to(vl.dtype))
        return kl[:, :, : self.end], vl[:, :, : self.end], self.mask

    def write_layers(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store every layer's new keys and values [n_layers, B, n_kv_heads, T, head_dim] (in the cache's dtype) in the
        prepared slots at once (the compiled decode step returns them instead of writing them)."""
        if self.slots.ndim == 1:
            self.k.index_copy_(3, self.slots, k)
            self.v.index_copy_(3, self.slots, v)
        else:
            idx = self.slots[None, :, None, :, None].expand_as(k)
            self.k.scatter_(3, idx, k)
            self.v.scatter_(3, idx, v)

    def keep(self, rows: list[int]) -> None:
        """Keep only these sessions (rows), in this order. Keeping the first rows (the sessions that end are the last
        ones, as in an evaluation that batches its longest episodes first) is a view: no copy of the cache."""
        self.rows = len(rows)
        if self.k is None:
            return
        if rows == list(range(len(rows))):
            self.k, self.v, self.pos = self.k[:, : len(rows)], self.v[:, : len(rows)], self.pos[: len(rows)]
        else:
            idx = torch.tensor(rows, dtype=torch.long, device=self.k.device)
            self.k, self.v, self.pos = self.k[:, idx], self.v[:, idx], self.pos[idx]

    def select(self, rows: list[int]) -> "KVCache":
        """A cache holding copies of these rows (write it back with ``put``)."""
        sub = KVCache(self.n_layers, self.window, self.sinks, self.capacity, self.dtype)
        sub.rows = len(rows)
        if self.k is not None:
            idx = torch.tensor(rows, dtype=torch.long, device=self.k.device)
            sub.k, sub.v, sub.pos, sub.end = self.k[:, idx], self.v[:, idx], self.pos[idx], self.end
        return sub

    def put(self, rows: list[int], sub: "KVCache") -> None:
        """Write ``sub`` (from ``select(rows)``, then extended) back into these rows."""
        if self.k is None:
            raise ValueError("KVCache.put: this cache has no rows yet; extend all sessions first")
        if sub.capacity != self.capacity:  # the subset grew: grow the rest the same way first
            _, B, H, _, D = self.k.shape
            self._allocate(B, H, D, self.k.dtype, self.k.device, sub.capacity)
        idx = torch.tensor(rows, dtype=torch.long, device=self.k.device)
        self.k[:, idx], self.v[:, idx], self.pos[idx] = sub.k, sub.v, sub.pos
        self.end = max(self.end, sub.end)

    def add_rows(self, n: int) -> None:
        """Append ``n`` empty sessions (rows)."""
        self.rows += n
        if self.k is not None:
            L, B, H, S, D = self.k.shape
            self.k = torch.cat([self.k, self.k.new_zeros(L, n, H, S, D)], 1)
            self.v = torch.cat([self.v, self.v.new_zeros(L, n, H, S, D)], 1)
            self.pos = torch.cat([self.pos, self.pos.new_full((n, S), -1)])
