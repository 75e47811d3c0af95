"""The interaction model: multimodal embedding -> pre-norm transformer blocks (attention + dense/MoE FFN) -> heads."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.utils.checkpoint
from torch import nn

from tml.errors import ConfigError
from tml.model.attention import Attention, KVCache, RMSNorm, RopeTable, rope_cos_sin
from tml.model.config import HEADS, ModelConfig
from tml.model.embed import MultimodalEmbedding
from tml.model.heads import OutputHead, head_classes
from tml.model.mlp import SwiGLU
from tml.model.moe import MoE, GroupedExperts
from tml.streams.batch import Batch


@dataclass
class ModelOutput:
    """What one forward returns: the hidden states, the router's statistics, and for each of the model's heads (by
    name, ``tml.model.config.HEADS``) its logits, its targets and its loss per target (``OutputHead.targets`` /
    ``forward`` / ``loss``; ``compute_losses`` averages the losses). A head's N counts its query positions in
    row-major order: for the text head the positions whose target_kind is TEXT (the order of
    ``target_text[target_kind == TEXT]``), for an audio head those whose target_kind is AUDIO (the order of
    ``Batch.target_audio``), for the floor head each micro-turn's last input position.

    ``out.<head>_logits`` / ``out.<head>_loss`` / ``out.<head>_targets`` read those dicts (``out.text_logits`` is
    ``out.logits["text"]``); a head the model does not have, or one without labels in the batch, reads None."""

    hidden: torch.Tensor  # [B, L, dim] final-norm hidden states
    aux_loss: torch.Tensor  # scalar: router losses summed over MoE layers (already times their coefficients)
    expert_counts: torch.Tensor  # long [n_moe_layers, E]: tokens routed to each expert in this forward
    router_terms: torch.Tensor  # fp32 [n_moe_layers, 3]: balancing terms before coefficients (MoE.ROUTER_TERMS)
    heads: dict[str, OutputHead]  # the model's heads by name, in build order (the dicts below: those with targets)
    # by head name: logits [N, ...] or None (a head without logits: the flow head); e.g. text [N_text, vocab], dmel
    # [N_audio, frames, n_mels, bins], floor [Q]
    logits: dict[str, Optional[torch.Tensor]]
    targets: dict[str, torch.Tensor]  # by head name: what it predicts at its N queries, e.g. floor: 1 = speak [Q]
    # by head name: fp32 loss per target [N, ...]: text CE [N_text]; dmel CE per bin [N_audio, frames, n_mels];
    # flow velocity error [N_audio]; floor BCE per decision [Q]
    losses: dict[str, torch.Tensor]

    def __getattr__(self, name: str):
        """``<head>_logits``, ``<head>_loss``, ``<head>_targets``: that head's entry (None without the head)."""
        head, _, field_ = name.rpartition("_")
        table = {"logits": "logits", "loss": "losses", "targets": "targets"}.get(field_)
        if table is None or head not in HEADS or table not in self.__dict__:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return self.__dict__[table].get(head)


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``; ``mlp`` is a dense SwiGLU for
    the first ``dense_layers`` blocks and an MoE after (the name ``layers.<i>.mlp`` is what AutoEP matches)."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.n_heads, cfg.num_kv_heads)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp: nn.Module = (SwiGLU(cfg.dim, cfg.dense_hidden_dim) if layer_id < cfg.dense_layers
                               else MoE(cfg.dim, cfg.moe))
        # Our MoE, kept outside the module tree (a list is not registered): if parallelism swaps ``mlp`` for another
        # layer (DeepSpeed AutoEP, see tml.parallel.expert), this one still owns the routing statistics and biases.
        self.moe: list[MoE] = [self.mlp] if isinstance(self.mlp, MoE) else []

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, L, dim]; cos, sin: [B, 1, L, head_dim]; mask: bool [B, 1, L, L]; token_mask: optional bool [B, L]
        (False = packing padding, kept out of the MoE's balancing losses and load counts) -> [B, L, dim]."""
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        h = self.mlp_norm(x)
        return x + (self.mlp(h, token_mask) if self.moe else self.mlp(h))

    def forward_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                       layer: int) -> torch.Tensor:
        """Streaming step over new positions only (see ``Attention.forward_cached``). [B, T_new, dim]; an MoE runs
        its inference path (``MoE.decode``: a few tokens by gathered matvecs, no router statistics)."""
        x = x + self.attn.forward_cached(self.attn_norm(x), cos, sin, cache, layer)
        return x + self._mlp_decode(self.mlp_norm(x))

    def decode_position(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, bias: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One new position per row x [B, 1, dim] against this layer's cache, which it only reads
        (``Attention.decode_position``). Returns ([B, 1, dim], the position's key and value to store)."""
        a, k, v = self.attn.decode_position(self.attn_norm(x), cos, sin, k_cache, v_cache, bias)
        x = x + a
        return x + self._mlp_decode(self.mlp_norm(x)), k, v

    def _mlp_decode(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp.decode(h) if self.moe and self.mlp is self.moe[0] else self.mlp(h)


class InteractionModel(nn.Module):
    """Consumes a ``Batch`` (any stream layout) and returns a ``ModelOutput``.

    Logits are computed only where the batch has targets: the hidden state at position i predicts the payload
    of position i + 1 (see ``tml.streams.batch``).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not isinstance(cfg, ModelConfig):  # e.g. a Hydra DictConfig: properties and validate() need the object
            raise TypeError(f"InteractionModel needs a ModelConfig, got {type(cfg).__name__}; pass "
                            f"OmegaConf.to_object(cfg.model)")
        self.cfg = cfg.validate()
        self.embed = MultimodalEmbedding(cfg)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # The heads cfg.heads selects, each the module <name>_head (checkpoint keys text_head.*, audio_head.*, ...);
        # a head switched off reads None (model.floor_head).
        classes = head_classes(cfg)
        for name in HEADS:
            setattr(self, f"{name}_head", classes[name].from_config(cfg, self.embed) if name in classes else None)
        self.head_names = tuple(classes)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(init_std) everywhere; residual output projections (attn.wo, the FFNs' w2) scaled by
        1/sqrt(2 * n_layers) as in GPT-2, so the residual stream's variance does not grow with depth. Initialises
        every parameter, so a model built on the meta device can be ``to_empty``-ed and then initialised."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=out_std if name.endswith(("attn.wo", ".w2")) else std)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, GroupedExperts):
                m.reset_parameters(std, out_std)
            elif isinstance(m, (RMSNorm, nn.LayerNorm, nn.Conv2d)):
                m.reset_parameters()  # ones / zeros; convs keep PyTorch's fan-in init (the hMLP stem has GELUs)
        # An embedder's own start (the dMel bag scales its rows), after the loop, which visits its inner modules.
        for m in self.embed.children():
            if hasattr(m, "init_weights"):
                m.init_weights(std)
        for head in self.output_heads().values():
            head.init_weights()  # a head's own start (e.g. the flow head's adaLN-zero)
        nn.init.normal_(self.embed.pad, std=std)

    def output_heads(self) -> dict[str, OutputHead]:
        """The model's heads by name, in build order (``tml.model.config.HEADS``)."""
        return {name: getattr(self, f"{name}_head") for name in self.head_names}

    def loss_names(self) -> list[str]:
        """What ``compute_losses`` reports per head, in its order: ``loss/<head>``, then the head's metrics
        (``loss/<metric>``; those that need ``text_pad_id`` only with it). ``loss`` and ``loss/aux`` come on top."""
        return [f"loss/{n}" for name, head in self.output_heads().items() for n in (name, *head.metric_names)]

    def moe_layers(self) -> list[MoE]:
        return [layer.moe[0] for layer in self.layers if layer.moe]

    def decodes_dense(self, tokens: int) -> bool:
        """Whether every MoE layer decodes ``tokens`` tokens on CPU as every expert on every token
        (``MoE.decodes_dense``): the only MoE decode without branches on the chosen experts, so the one-position step
        is a single graph (``decode_position`` under ``SessionConfig.compile``). True without MoE layers."""
        return all(moe.decodes_dense(tokens) for moe in self.moe_layers())

    def update_expert_bias(self, expert_counts: torch.Tensor) -> None:
        """Auxiliary-loss-free balancing: one bias step per MoE layer from long [n_moe_layers, E] expert counts
        (summed over the step's micro-batches and the data-parallel ranks)."""
        for moe, counts in zip(self.moe_layers(), expert_counts):
            moe.update_bias(counts)

    @torch.no_grad()
    def decode_layout(self) -> "InteractionModel":
        """Store the weights the streaming step multiplies one position at a time (every linear layer and expert of
        the blocks and heads) column-major: the same shapes and values, only their strides change, so every forward
        (training's too) computes the same function. Why: a session's output positions are matrix-vector products
        bound by reading the weights, and x @ W.T with W.T row-major streams them ~1.4x faster on CPU BLAS than with
        W row-major (bench/streaming.py); matmuls over many rows are indifferent. A weight tied to the text embedding
        keeps its layout (embedding lookups read its rows). The experts of an MoE that decodes one token dense
        (``MoE.decodes_dense``: every expert side by side in one matmul) keep w1 and w3 row-major, so all experts
        read as one [E * hidden, dim] matrix; their w2 goes column-major as the rest. Idempotent; returns the
        model."""
        tied = self.embed.text.weight
        dense = [moe.experts for moe in self.moe_layers() if moe.decodes_dense(1)]
        weights = []
        for m in [*self.layers.modules(), *(m for head in self.output_heads().values() for m in head.modules())]:
            if isinstance(m, nn.Linear) and m.weight is not tied:
                weights.append(m.weight)
            elif isinstance(m, GroupedExperts):
                weights += [m.w2] if any(m is e for e in dense) else [m.w1, m.w2, m.w3]
        for w in weights:
            if w.is_contiguous() and w.shape[-1] > 1 and w.shape[-2] > 1:
                w.data = w.data.mT.contiguous().mT
        for experts in dense:  # row-major again, if an earlier call (or a larger DECODE_DENSE_MAX) transposed them
            for w in (experts.w1, experts.w3):
                w.data = w.data.contiguous()
        return self

    def forward_embedded(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                         rope: RopeTable | None = None) -> torch.Tensor:
        """Incremental inference (the streaming step): run embeddings x [B, T, dim] of each row's next T positions,
        at absolute positions long [B, T], through every layer, appending them to ``cache`` (which holds each row's
        earlier positions). Returns final-norm hidden [B, T, dim], equal to those positions' hidden states in one full
        causal forward. ``rope``: cached rotary tables (the same values ``rope_cos_sin`` computes)."""
        positions = positions.expand(x.shape[0], -1)
        cos, sin = (rope(positions) if rope is not None else
                    rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, dtype=x.dtype))
        cache.prepare(positions, self.cfg.num_kv_heads, self.cfg.head_dim, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer.forward_cached(x, cos, sin, cache, i)
        return self.norm(x)

    def decode_position(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                        values: torch.Tensor, bias: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward_embedded`` of one position per row as a pure function, for ``torch.compile``
        (``SessionConfig.compile``): x [B, 1, dim]; cos, sin [B, 1, 1, head_dim]; keys, values: the whole cache
        [n_layers, B, n_kv_heads, S, head_dim], only read; ``bias`` [B, 1, 1, S] (``KVCache.prepare`` with
        ``before_write``). Returns (final-norm hidden [B, 1, dim], the position's keys and values [n_layers, B,
        n_kv_heads, 1, head_dim], for ``KVCache.write_layers``). Equal to ``forward_embedded`` up to float rounding (its attention merges the new
        key into the cache's log-sum-exp instead of writing it first: ``attend_cache_and_new``)."""
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer.decode_position(x, cos, sin, keys[i], values[i], bias)
            ks.append(k)
            vs.append(v)
        return self.norm(x), torch.stack(ks), torch.stack(vs)

    def forward(self, batch: Batch) -> ModelOutput:
        B, L = batch.shape
        if L > self.cfg.max_positions:
            raise ConfigError(f"batch length {L} > model.max_positions={self.cfg.max_positions}: raise "
                              f"model.max_positions or pack shorter rows")
        x = self.embed(batch)
        cos, sin = rope_cos_sin(batch.position_ids, self.cfg.head_dim, self.cfg.rope_theta, dtype=x.dtype)
        mask = batch.attention_mask()
        real = batch.doc_ids >= 0  # routing statistics and balancing losses skip packing padding
        for layer in self.layers:
            if self.cfg.activation_checkpointing and self.training:  # the recompute gets the same arguments
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, real, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, real)
        h = self.norm(x)
        # Each head's logits (kept for inspection) and its loss per target at its own queries (some heads' losses
        # need noise, so every loss is computed here, where the head is; ``compute_losses`` averages them).
        logits, targets, losses = {}, {}, {}
        for name, head in self.output_heads().items():
            where = head.targets(batch)
            if where is None:  # no labels for this head in this batch
                continue
            query, targets[name] = where
            hq = h[query]
            logits[name] = head(hq)
            losses[name] = head.loss(hq, targets[name], logits[name])
        aux_loss, expert_counts, router_terms = self._router_stats(h)
        return ModelOutput(h, aux_loss, expert_counts, router_terms, self.output_heads(), logits, targets, losses)

    def _router_stats(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(aux loss summed over MoE layers, expert counts [n_moe_layers, E], router terms [n_moe_layers, 3])."""
        moes = self.moe_layers()
        if not moes:
            return (h.new_zeros((), dtype=torch.float32),
                    torch.zeros(0, self.cfg.moe.num_experts, dtype=torch.long, device=h.device),
                    torch.zeros(0, len(MoE.ROUTER_TERMS), device=h.device))
        aux = torch.stack([m.last_aux_loss for m in moes]).sum()
        return (aux, torch.stack([m.last_expert_counts for m in moes]),
                torch.stack([m.last_router_terms for m in moes]))
