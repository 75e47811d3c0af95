"""Analytic parameter counts from a ``ModelConfig`` alone (no model built), for planning big configs. (FLOPs per
token: ``tml.model.flops``.)

``tests/test_model_ladder.py`` checks these against models built on the meta device, so the formulas below are
the model's own structure written out: if a module changes, that test fails until this file follows.
"""

from __future__ import annotations

from dataclasses import dataclass

from tml.model.config import ModelConfig
from tml.streams.layout import Stream


@dataclass
class ParamCounts:
    embed: int  # text embedding, dMel bag, hMLP stem, patch row/col tables, pad and stream vectors
    attention: int  # all layers' attention projections
    norms: int  # RMSNorm gains
    dense_ffn: int  # SwiGLU of the first ``dense_layers`` layers
    router: int
    shared_experts: int
    routed_experts: int  # all routed experts of all MoE layers
    heads: int  # text head (0 extra when tied), audio head and floor head
    total: int
    active: int  # parameters one token uses: routed experts count top_k of num_experts

    @property
    def expert(self) -> int:
        """Parameters that expert parallelism shards (routed experts only)."""
        return self.routed_experts


def count_params(cfg: ModelConfig) -> ParamCounts:
    d, L, m = cfg.dim, cfg.n_layers, cfg.moe
    hd = cfg.head_dim
    # Embeddings (tml.model.embed).
    w, k = max(d // 4, 1), cfg.patch_size // 4
    hmlp = (3 * w * k * k + w) + 2 * w + (w * w * 4 + w) + 2 * w + (w * d * 4 + d) + 2 * d
    embed = (cfg.vocab_size * d + cfg.frames_per_audio_position * cfg.n_mels * cfg.dmel_bins * d + hmlp
             + 2 * cfg.max_patch_grid * d + d + len(Stream) * d)
    attention = L * (d * cfg.n_heads * hd + 2 * d * cfg.num_kv_heads * hd + cfg.n_heads * hd * d)
    norms = L * 2 * d + d
    n_moe = cfg.n_moe_layers
    dense_ffn = cfg.dense_layers * 3 * d * cfg.dense_hidden_dim
    router = n_moe * d * m.num_experts
    shared = n_moe * 3 * d * m.num_shared_experts * m.hidden_dim
    per_expert = 3 * d * m.hidden_dim
    routed = n_moe * m.num_experts * per_expert
    heads = ((0 if cfg.heads.text == "tied" else cfg.vocab_size * d) + audio_head_params(cfg)
             + (d + 1 if cfg.heads.floor else 0))  # floor head: one linear unit
    total = embed + attention + norms + dense_ffn + router + shared + routed + heads
    active = total - n_moe * (m.num_experts - m.top_k) * per_expert
    return ParamCounts(embed, attention, norms, dense_ffn, router, shared, routed, heads, total, active)


def audio_head_params(cfg: ModelConfig) -> int:
    """The dMel head (one linear layer to frames x n_mels x bins logits) or the flow head (AdaLN residual MLP over
    the frames x n_mels values, conditioned on the hidden state and the flow time; tml.model.heads.FlowHead)."""
    d, out = cfg.dim, cfg.frames_per_audio_position * cfg.n_mels
    if cfg.heads.audio == "dmel":
        return d * out * cfg.dmel_bins
    f = cfg.heads.flow
    w = f.hidden_dim
    block = 2 * (w * w + w) + (w * 3 * w + 3 * w)  # mlp (2 linears) + AdaLN modulation
    return ((out * w + w) + 2 * (w * w + w) + (d * w + w) + f.n_layers * block + (w * 2 * w + 2 * w)
            + (w * out + out) + (d if f.cond_dropout > 0 else 0))
