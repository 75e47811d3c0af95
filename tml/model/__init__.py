"""The interaction model: multimodal embeddings, attention, MoE, blocks, heads and losses."""

from tml.model.attention import Attention, RMSNorm, apply_rope, rope_cos_sin
from tml.model.config import ModelConfig, MoEConfig
from tml.model.embed import DMelBagEmbedding, HMLPPatchEmbedding, MultimodalEmbedding, TextEmbedding
from tml.model.heads import DMelHead, TextHead
from tml.model.losses import compute_losses
from tml.model.mlp import SwiGLU
from tml.model.moe import GroupedExperts, MoE
from tml.model.params import param_counts
from tml.model.transformer import Block, InteractionModel, ModelOutput

__all__ = [
    "Attention", "Block", "DMelBagEmbedding", "DMelHead", "GroupedExperts", "HMLPPatchEmbedding",
    "InteractionModel", "ModelConfig", "ModelOutput", "MoE", "MoEConfig", "MultimodalEmbedding", "RMSNorm",
    "SwiGLU", "TextEmbedding", "TextHead", "apply_rope", "compute_losses", "param_counts", "rope_cos_sin",
]
