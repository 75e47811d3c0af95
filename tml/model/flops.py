"""Training FLOPs per token from a model config (for MFU): matmul work of the active parameters plus attention.

Convention (PaLM, Chowdhery et al. 2022, appendix B): forward + backward = 3x forward; a matmul with ``N`` weights
costs ``2N`` FLOPs per token forward, attention scores and the weighted sum cost ``2 * 2 * seq_len * dim`` per token
per layer forward (the full square, no credit for the causal or document mask). So
``flops_per_token = 6 * N_active_matmul + 12 * n_layers * dim * seq_len``.

``N_active_matmul`` is the active parameter count without lookup tables (embeddings, position tables); both heads
are counted for every position, a slight over-count since each position uses one of them.
"""

from __future__ import annotations

import torch
from torch import nn

from tml.model.config import ModelConfig


def active_matmul_params(cfg: ModelConfig) -> int:
    """Active parameters one token multiplies with, counted on the meta device (no memory for big configs)."""
    from tml.model.params import param_counts
    from tml.model.transformer import InteractionModel

    with torch.device("meta"):
        model = InteractionModel(cfg)
    lookups = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    lookups |= {id(p) for n, p in model.named_parameters() if n.startswith("embed.") and p.ndim < 2}
    # an embedding weight a head shares (the tied text head) is a matmul there
    tied_heads = {id(p) for head in model.output_heads().values() for p in head.parameters()}
    lookup_params = sum(p.numel() for p in model.parameters() if id(p) in lookups and id(p) not in tied_heads)
    return param_counts(model)["active"] - lookup_params


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per position of a row of ``seq_len`` positions."""
    return 6.0 * active_matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.dim * seq_len
