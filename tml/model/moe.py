"""Token-choice top-k mixture of SwiGLU experts, dropless, computed with ``torch.nn.functional.grouped_mm``.

Parameter layout (fixed: DeepSpeed AutoEP and Hugging Face MoE checkpoints expect it)::

    MoE
      gate            nn.Linear(dim, num_experts, bias=False)   the router
      experts         GroupedExperts: w1, w3 [E, hidden, dim], w2 [E, dim, hidden]   (out x in, like nn.Linear)
      shared_experts  SwiGLU(dim, num_shared_experts * hidden)  optional, always on
    attributes num_experts, top_k

``MoE.forward(x, token_mask)`` returns only the ``[B, T, dim]`` output, like the expert-parallel layer AutoEP can swap
in for it; the step's router statistics are left on the module instead (``last_aux_loss``, ``last_expert_counts``,
``last_router_terms``) and collected by the model. ``token_mask`` (True = real token) is an argument, not state, so an
activation-checkpointing recompute in backward sees the same packing padding as the forward: padding never counts in
balancing losses or load statistics.

Where the experts run is the job of a token dispatcher the MoE is given (``MoE.dispatcher``): by default
``local_experts`` (every expert on this rank). The model knows nothing else about parallelism: expert parallelism
(``tml.parallel.expert``) keeps only this rank's share of ``experts`` and gives the MoE a dispatcher that sends rows to
their expert's rank and back.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tml.errors import ConfigError
from tml.model.config import MoEConfig
from tml.model.mlp import SwiGLU


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's backward rejects
    broadcast (stride-0) gradients, e.g. the one ``out.sum().backward()`` produces."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class _GatherRows(torch.autograd.Function):
    """``src.index_select(0, idx)`` for an index without repeats. Its backward is a plain ``index_copy`` into zeros
    instead of autograd's accumulating scatter (``index_add``), which is several times slower on CPU."""

    @staticmethod
    def forward(ctx, src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.n = src.shape[0]
        return src.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        return grad.new_zeros(ctx.n, *grad.shape[1:]).index_copy_(0, idx, grad.contiguous()), None


def _expert_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per-expert ``x_e @ w[e].T`` for rows grouped by expert. x [N, in], w [E, out, in], offs int32 [E] -> [N, out]."""
    return _ContiguousGrad.apply(F.grouped_mm(x, w.transpose(-2, -1), offs=offs))


def _megablocks_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Same contract as ``_expert_mm`` on MegaBlocks' CUDA grouped GEMM (``grouped_gemm.ops.gmm``)."""
    from grouped_gemm.ops import gmm  # requirements/gpu.txt

    sizes = torch.diff(offs.long(), prepend=offs.new_zeros(1).long()).cpu()
    return gmm(x, w, sizes, trans_b=True)


def require_megablocks() -> None:
    """Raise ConfigError with the install hint when MegaBlocks' grouped GEMM package (grouped_gemm) is missing."""
    try:
        from grouped_gemm.ops import gmm  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"model.moe.expert_backend=megablocks needs MegaBlocks' grouped GEMM package ({e}); install "
                          f"it on a CUDA machine with `make setup-gpu` (requirements/gpu.txt), or set "
                          f"model.moe.expert_backend=grouped_mm") from None


def _valid(shape: torch.Size, token_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """fp32 [B, T]: 1 for real tokens, 0 for packing padding (all 1 without a mask)."""
    return torch.ones(shape, device=device) if token_mask is None else token_mask.to(device).float()


class GroupedExperts(nn.Module):
    """``num_experts`` SwiGLU experts stored as 3-D weights, applied to tokens already sorted by expert."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, backend: str = "grouped_mm"):
        super().__init__()
        self.num_experts = num_experts
        self.mm = _megablocks_mm if backend == "megablocks" else _expert_mm
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        nn.init.normal_(self.w1, std=std)
        nn.init.normal_(self.w3, std=std)
        nn.init.normal_(self.w2, std=std if out_std is None else out_std)

    def forward(self, x: torch.Tensor, offs: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: [N, dim] tokens sorted by expert; rows offs[e-1]:offs[e] go to expert e.
            offs: int32 [E] cumulative token counts (offs[-1] == N).
            scale: optional [N] per-row factor on the hidden activation (the routing weight; the experts are linear
                after it, so this equals scaling the output, on the narrower tensor when hidden < dim)
        Returns:
            [N, dim]
        """
        h = F.silu(self.mm(x, self.w1, offs)) * self.mm(x, self.w3, offs)
        if scale is not None:
            h = h * scale.unsqueeze(-1).to(h.dtype)
        return self.mm(h, self.w2, offs)


Dispatcher = Callable[[GroupedExperts, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def local_experts(experts: GroupedExperts, xs: torch.Tensor, counts: torch.Tensor,
                  scale: torch.Tensor | None = None) -> torch.Tensor:
    """The default token dispatcher: every expert lives on this rank, so the rows go straight through ``experts``.

    A dispatcher's contract (``MoE.dispatcher``):
        experts: the MoE's ``GroupedExperts`` (under expert parallelism, this rank's share of them)
        xs: [M, dim] rows sorted by global expert id
        counts: long [E] rows per global expert (sums to M)
        scale: optional [M] routing weight per row, applied to that row's expert output
    Returns:
        [M, dim] expert outputs in the order of ``xs``
    """
    return experts(xs, counts.cumsum(0).to(torch.int32), scale)


class MoE(nn.Module):
    """Router + dropless grouped experts (+ optional shared expert). [B, T, dim] -> [B, T, dim].

    After each forward (``token_mask``: optional bool [B, T], True = real token; None = all real):
      last_aux_loss       scalar: the enabled balancing losses (switch, sequence-level, z-loss), times coefficients
      last_expert_counts  long [E]: real (unmasked) tokens routed to each expert, before any capacity dropping
                          (sums to real tokens * top_k)
      last_router_terms   fp32 [3]: the enabled balancing terms before their coefficients (ROUTER_TERMS order)
    Masked positions are still computed (their output is discarded by the losses) but never counted.
    ``dispatcher`` runs the expert-sorted rows through the experts (``local_experts`` unless parallelism swaps it).
    """

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.dim, self.hidden_dim = dim, cfg.hidden_dim
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.score_func, self.route_norm, self.route_scale = cfg.score_func, cfg.route_norm, cfg.route_scale
        self.aux_loss_coeff, self.z_loss_coeff = cfg.aux_loss_coeff, cfg.z_loss_coeff
        self.seq_aux_loss_coeff, self.load_balance_coeff = cfg.seq_aux_loss_coeff, cfg.load_balance_coeff
        self.n_groups, self.topk_groups, self.capacity_factor = cfg.n_groups, cfg.topk_groups, cfg.capacity_factor
        if cfg.expert_backend == "megablocks":
            require_megablocks()
        self.gate = nn.Linear(dim, cfg.num_experts, bias=False)
        self.experts = GroupedExperts(cfg.num_experts, dim, cfg.hidden_dim, cfg.expert_backend)
        self.shared_experts = SwiGLU(dim, cfg.num_shared_experts * cfg.hidden_dim) if cfg.num_shared_experts else None
        # Selection-only bias of auxiliary-loss-free balancing; a buffer (not trained, saved in checkpoints).
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
        # Where the experts run (see local_experts); tml.parallel.expert swaps in its all-to-all dispatcher.
        self.dispatcher: Dispatcher = local_experts
        self.last_aux_loss: torch.Tensor | None = None
        self.last_expert_counts: torch.Tensor | None = None
        self.last_router_terms: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pick top_k experts per token.

        Args:
            x: [N, dim]
        Returns:
            weights: fp32 [N, top_k] routing weights (after optional renormalisation and route_scale)
            experts: long [N, top_k] chosen expert ids (distinct per token)
            probs:   fp32 [N, E] per-token routing distribution (sums to 1; for the load-balancing losses)
            logits:  fp32 [N, E] router logits (for the z-loss)
        """
        return self.route_logits(self.gate(x).float())  # fp32: bf16 ties and rounding flip top-k choices

    def route_logits(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``route`` from fp32 router logits [N, E]."""
        scores = logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()
        with torch.no_grad():  # selection only: the weights below come from the unbiased scores
            select = scores + self.expert_bias
            if self.n_groups > 1:
                groups = select.view(-1, self.n_groups, self.num_experts // self.n_groups)
                group_score = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(-1)  # [N, G]
                keep = torch.zeros_like(group_score, dtype=torch.bool)
                keep.scatter_(1, group_score.topk(self.topk_groups, dim=-1).indices, True)
                select = groups.masked_fill(~keep[..., None], float("-inf")).view_as(select)
            experts = select.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
        if self.route_norm:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * self.route_scale
        probs = scores if self.score_func == "softmax" else scores / (scores.sum(-1, keepdim=True) + 1e-20)
        return weights, experts, probs, logits

    ROUTER_TERMS = ("switch", "seq", "z")  # the balancing terms, in the order of ``last_router_terms``

    def _set_router_stats(self, experts: torch.Tensor, probs: torch.Tensor, logits: torch.Tensor,
                          valid: torch.Tensor) -> None:
        """Balancing losses over the real tokens, their expert counts and the terms' values, left on the module.

        Args:
            experts: long [B, T, top_k]; probs, logits: fp32 [B, T, E]; valid: fp32 [B, T] (1 = real token)
        Sets:
            last_aux_loss: scalar, sum of the enabled terms times their coefficients:
              switch   ``E * sum_e f_e * P_e`` over the whole batch (f_e: fraction of the top_k assignments that
                       went to e, no gradient; P_e: mean routing probability of e); 1 when routing is uniform
              seq      the same inside each row, averaged over rows with real tokens (DeepSeek-V3)
              z        ST-MoE ``mean(logsumexp(logits)^2)``
            last_expert_counts: long [E] assignments of real tokens per expert
            last_router_terms: fp32 [3] the enabled terms' values before their coefficients, in ROUTER_TERMS order
              (0 where disabled or without real tokens); detached, for the metrics
        """
        assign = torch.zeros_like(probs).scatter_(-1, experts, 1.0) * valid[..., None]  # [B, T, E]
        counts = assign.sum((0, 1)).round().long()
        n = valid.sum()
        loss = probs.sum() * 0.0  # zero that still depends on the router (an empty batch still backprops)
        terms = [loss.detach()] * 3
        if n > 0 and self.aux_loss_coeff:
            f = assign.sum((0, 1)) / (n * self.top_k)
            p = (probs * valid[..., None]).sum((0, 1)) / n
            terms[0] = self.num_experts * (f * p).sum()
            loss = loss + self.aux_loss_coeff * terms[0]
        if n > 0 and self.seq_aux_loss_coeff:
            n_row = valid.sum(1)  # [B]
            rows = n_row > 0
            f = assign.sum(1)[rows] / (n_row[rows, None] * self.top_k)
            p = (probs * valid[..., None]).sum(1)[rows] / n_row[rows, None]
            terms[1] = self.num_experts * (f * p).sum(-1).mean()
            loss = loss + self.seq_aux_loss_coeff * terms[1]
        if n > 0 and self.z_loss_coeff:
            terms[2] = (torch.logsumexp(logits, dim=-1).square() * valid).sum() / n
            loss = loss + self.z_loss_coeff * terms[2]
        self.last_aux_loss, self.last_expert_counts = loss, counts
        self.last_router_terms = torch.stack(terms).detach()

    def observe_router_logits(self, logits: torch.Tensor, shape: torch.Size,
                              token_mask: torch.Tensor | None = None) -> None:
        """Set the router statistics (``last_aux_loss``, ``last_expert_counts``, ``last_router_terms``) from router
        logits [N, E] of a layer that replaced this one (DeepSpeed AutoEP routes the same way from the same gate
        weights); ``shape`` is the input's [B, T, dim], ``token_mask`` as in ``forward``."""
        valid = _valid(shape[:-1], token_mask, logits.device)
        _, experts, probs, logits = self.route_logits(logits.float())
        E = self.num_experts
        self._set_router_stats(experts.view(*shape[:-1], self.top_k), probs.view(*shape[:-1], E),
                               logits.view(*shape[:-1], E), valid)

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor) -> None:
        """Auxiliary-loss-free balancing step: raise the bias of under-loaded experts and lower that of over-loaded
        ones by ``load_balance_coeff`` (sign of the deviation from the mean load). ``counts`` [E] must be the same on
        every rank (summed over data-parallel ranks), so the biases stay identical."""
        if self.load_balance_coeff:
            counts = counts.to(self.expert_bias)
            self.expert_bias += self.load_balance_coeff * torch.sign(counts.mean() - counts)

    def _capacity_keep(self, flat_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
        """bool [N*top_k] over the expert-sorted assignments: the first ``capacity`` of each expert, or None when
        dropless."""
        if not self.capacity_factor:
            return None
        capacity = math.ceil(self.capacity_factor * flat_sorted.numel() / self.num_experts)
        starts = counts.cumsum(0) - counts
        rank_in_expert = torch.arange(flat_sorted.numel(), device=flat_sorted.device) - starts[flat_sorted]
        return rank_in_expert < capacity

    def _dispatch_gather(self, x: torch.Tensor, weights: torch.Tensor, order: torch.Tensor,
                         counts: torch.Tensor) -> torch.Tensor:
        """CPU: gather each kept (token, k) assignment's token in expert order, run the experts with the routing weight
        folded in, and ``index_add`` the rows back onto their tokens (deterministic on CPU, and one pass over the
        [M, dim] expert outputs).

        Args:
            x: [N, dim]; weights: fp32 [N, top_k]; order: long [M] kept assignments (flat token * top_k + k) sorted
            by expert (capacity-dropped ones left out); counts: long [E] kept assignments per expert
        Returns:
            [N, dim] routing-weighted sum of each token's expert outputs
        """
        token = order // self.top_k
        xs = x.index_select(0, token)
        scale = weights.reshape(-1).index_select(0, order)
        ys = self.dispatcher(self.experts, xs, counts, scale)
        return x.new_zeros(x.shape[0], self.dim).index_add(0, token, ys)

    def _dispatch_permute(self, x: torch.Tensor, weights: torch.Tensor, order: torch.Tensor,
                          counts: torch.Tensor) -> torch.Tensor:
        """GPU: the same result as ``_dispatch_gather`` without accumulating scatters (``index_add`` uses atomics on
        CUDA, so its sums are not reproducible): each token is repeated top_k times and permuted into expert order,
        whose backward is a sum over the copies and an inverse permutation. Same arguments and result."""
        x_rep = x.unsqueeze(1).expand(-1, self.top_k, -1).reshape(-1, self.dim)
        y = self.dispatcher(self.experts, _GatherRows.apply(x_rep, order), counts, None)  # [M, dim] in expert order
        n_assign = x.shape[0] * self.top_k
        full = y.new_zeros(n_assign, self.dim) if order.numel() < n_assign else y.new_empty(y.shape)
        y = full.index_copy(0, order, y)  # back to (token, k) order
        return (y.view(-1, self.top_k, self.dim) * weights.unsqueeze(-1).to(y.dtype)).sum(1)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, dim], token_mask: optional bool [B, T] (True = real token, False = packing padding) -> [B, T, dim]."""
        if (x.element_size() * self.dim) % 16 or (x.element_size() * self.hidden_dim) % 16:
            raise ConfigError(f"model.dim={self.dim} and model.moe.hidden_dim={self.hidden_dim} must be multiples of "
                              f"{16 // x.element_size()} for {x.dtype} activations: grouped_mm needs row strides "
                              f"that are multiples of 16 bytes")
        shape = x.shape
        valid = _valid(shape[:-1], token_mask, x.device)
        x = x.reshape(-1, self.dim)
        weights, experts, probs, logits = self.route(x)

        # Sort the N*top_k (token, expert) assignments by expert; stable, so the order is deterministic.
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)
        # scatter_add rather than bincount: no host sync on GPU (bincount must read the max first).
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        keep = self._capacity_keep(flat[order], counts)
        if keep is not None:  # drop over-capacity assignments: they contribute zero
            order = order[keep]
            counts = torch.zeros_like(counts).scatter_add_(0, flat[order], torch.ones_like(order))

        dispatch = self._dispatch_gather if x.device.type == "cpu" else self._dispatch_permute
        out = dispatch(x, weights, order, counts)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)

        E = self.num_experts
        self._set_router_stats(experts.view(*shape[:-1], self.top_k), probs.view(*shape[:-1], E),
                               logits.view(*shape[:-1], E), valid)
        return out.view(shape)

    # Tokens up to which decode on CPU runs each chosen expert as plain matvecs/matmuls on its weight slices (a loop
    # over the experts present); above it the grouped GEMMs of the training dispatch. Measured on CPU (bench/
    # streaming.py): the loop is much cheaper for one session's position; at 16 the two cost about the same.
    DECODE_LOOP_MAX = 16
    # Multiply-adds per expert matrix (tokens x experts x dim x hidden) up to which decode on CPU runs every expert on
    # every token as three batched matmuls and zeroes the unchosen ones by their routing weight (``_decode_dense``):
    # the tiny config's layer at up to 16 tokens (2.1M), cheaper than looping over its 8 experts (tiny at 16
    # sessions: the MoE's share of a step ~3x smaller). Larger layers read and multiply far more than their top_k.
    DECODE_DENSE_MAX = 2_500_000

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Inference forward [B, T, dim] -> [B, T, dim] for streaming: the same routing and experts as ``forward``
        (equal up to float rounding), without router statistics. On CPU a few tokens (a micro-turn's output
        positions) run each chosen expert's SwiGLU as ``F.linear`` on views of its weights, one expert after another
        (a small layer: every expert on every token, ``DECODE_DENSE_MAX``): no weight copies, no sort-and-dispatch
        machinery; more tokens take the training dispatch."""
        shape = x.shape
        x = x.reshape(-1, self.dim)
        if self.dispatcher is not local_experts or self.capacity_factor:  # the training path, statistics and all
            return self.forward(x.view(shape))
        weights, experts, _, _ = self.route(x)  # [N, top_k]
        cpu = x.device.type == "cpu"
        if cpu and self.decodes_dense(x.shape[0]):
            out = self._decode_dense(x, weights, experts)
            return (out if self.shared_experts is None else out + self.shared_experts(x)).view(shape)
        if cpu and x.shape[0] == 1:  # one session's output position
            out = self._decode_one(x, weights, experts)
            return (out if self.shared_experts is None else out + self.shared_experts(x)).view(shape)
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)  # assignments (token * top_k + k) in expert order, as in forward
        if cpu and x.shape[0] <= self.DECODE_LOOP_MAX:
            out = self._decode_loop(x, weights, flat, order)
        else:
            counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device)
            counts.scatter_add_(0, flat, torch.ones_like(flat))
            dispatch = self._dispatch_gather if x.device.type == "cpu" else self._dispatch_permute
            out = dispatch(x, weights, order, counts)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)

    def decodes_dense(self, tokens: int) -> bool:
        """Whether ``decode`` on CPU runs ``tokens`` tokens as every expert on every token (``DECODE_DENSE_MAX``)."""
        return tokens * self.num_experts * self.dim * self.hidden_dim <= self.DECODE_DENSE_MAX

    def _decode_dense(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, as three plain matmuls over all experts side by side: x [N, dim]; weights
        fp32 [N, top_k] and experts long [N, top_k] (the routing). Each expert's hidden activation is scaled by the
        token's routing weight for it (0 where not chosen), so the last matmul's sum over the experts' hidden units
        is the routed output [N, dim] (``_dispatch_gather``'s, up to float rounding).

        w1, w3 [E, hidden, dim] read as one [E * hidden, dim] matrix and w2 [E, dim, hidden] as its transpose
        [E * hidden, dim] are views in the layout ``InteractionModel.decode_layout`` gives a layer that decodes dense
        (w1, w3 row-major, w2 column-major per expert); any other layout is copied per call (same values). Why:
        one [N, dim] x [dim, E * hidden] GEMM instead of a batched matmul of E small ones (tiny config's layer, routing
        included, one token: 190 -> 158 us; at 12-16 tokens the two cost the same, the math dominates)."""
        w, E, N = self.experts, self.num_experts, x.shape[0]
        gate = x.new_zeros(N, E).scatter_(1, experts, weights.to(x.dtype))  # [N, E]
        h = F.silu(F.linear(x, w.w1.reshape(-1, self.dim))) * F.linear(x, w.w3.reshape(-1, self.dim))
        h = (h.view(N, E, -1) * gate[:, :, None]).view(N, -1)  # [N, E * hidden]
        return h @ w.w2.mT.reshape(-1, self.dim)

    def _decode_one(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """``_decode_loop`` for a single token, without its sort, gathers and scatter: x [1, dim]; weights fp32 and
        experts long [1, top_k]. Its chosen experts run in ascending id order and their outputs are summed in that
        order, as the loop's ``index_add`` sums them, so the result [1, dim] is the loop's bit for bit."""
        w, ids, scale = self.experts, experts[0].tolist(), weights[0].tolist()
        out = None
        for k in sorted(range(len(ids)), key=ids.__getitem__):
            e = ids[k]
            y = F.linear((F.silu(F.linear(x, w.w1[e])) * F.linear(x, w.w3[e])).mul_(scale[k]), w.w2[e])
            out = y if out is None else out.add_(y)
        return out

    def _decode_loop(self, x: torch.Tensor, weights: torch.Tensor, flat: torch.Tensor,
                     order: torch.Tensor) -> torch.Tensor:
        """``_dispatch_gather`` with one expert at a time instead of grouped GEMMs: x [N, dim]; weights fp32
        [N, top_k]; flat long [N * top_k] expert of each assignment; order: the assignments sorted by expert.
        Returns [N, dim]: each token's routing-weighted sum of its experts' outputs."""
        token = order // self.top_k
        xs = x.index_select(0, token)
        scale = weights.reshape(-1).index_select(0, order).to(x.dtype)[:, None]
        w = self.experts
        ids, counts = torch.unique_consecutive(flat[order], return_counts=True)
        ys, start = [], 0
        for e, n in zip(ids.tolist(), counts.tolist()):
            xe = xs[start : start + n]
            h = F.silu(F.linear(xe, w.w1[e])) * F.linear(xe, w.w3[e]) * scale[start : start + n]
            ys.append(F.linear(h, w.w2[e]))
            start += n
        return x.new_zeros(x.shape[0], self.dim).index_add(0, token, torch.cat(ys))
