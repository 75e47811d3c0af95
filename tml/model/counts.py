"""Analytic parameter counts from a ``ModelConfig`` alone (no model built), for planning big configs. (FLOPs per
token: ``tml.model.flops``.)

``tests/test_model_ladder.py`` checks these against models built on the meta device, so the formulas below are
the model's own structure written out: if a module changes, that test fails until this file follows. The heads
count their own parameters (``num_params`` in ``tml.model.heads``), next to the layers they build, and so do the
modalities' embedders (``num_params`` of each spec in ``tml.streams.modalities``).
"""

from __future__ import annotations

from dataclasses import dataclass

from tml.model.config import ModelConfig
from tml.model.heads import head_classes
from tml.streams.layout import Stream
from tml.streams.modalities import MODALITIES


@dataclass
class ParamCounts:
    embed: int  # each modality's embedder (text, dMel bag, hMLP stem and patch tables), pad and stream vectors
    attention: int  # all layers' attention projections
    norms: int  # RMSNorm gains
    dense_ffn: int  # SwiGLU of the first ``dense_layers`` layers
    router: int
    shared_experts: int
    routed_experts: int  # all routed experts of all MoE layers
    heads: int  # every head cfg.heads selects (the text head adds 0 when tied)
    total: int
    active: int  # parameters one token uses: routed experts count top_k of num_experts

    @property
    def expert(self) -> int:
        """Parameters that expert parallelism shards (routed experts only)."""
        return self.routed_experts


def count_params(cfg: ModelConfig) -> ParamCounts:
    d, L, m = cfg.dim, cfg.n_layers, cfg.moe
    hd = cfg.head_dim
    # Embeddings (tml.model.embed): each modality's embedder (its spec counts it), the pad vector, the stream table.
    embed = sum(m.num_params(cfg) for m in MODALITIES) + d + len(Stream) * d
    attention = L * (d * cfg.n_heads * hd + 2 * d * cfg.num_kv_heads * hd + cfg.n_heads * hd * d)
    norms = L * 2 * d + d
    n_moe = cfg.n_moe_layers
    dense_ffn = cfg.dense_layers * 3 * d * cfg.dense_hidden_dim
    router = n_moe * d * m.num_experts
    shared = n_moe * 3 * d * m.num_shared_experts * m.hidden_dim
    per_expert = 3 * d * m.hidden_dim
    routed = n_moe * m.num_experts * per_expert
    heads = sum(head.num_params(cfg) for head in head_classes(cfg).values())
    total = embed + attention + norms + dense_ffn + router + shared + routed + heads
    active = total - n_moe * (m.num_experts - m.top_k) * per_expert
    return ParamCounts(embed, attention, norms, dense_ffn, router, shared, routed, heads, total, active)

