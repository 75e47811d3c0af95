"""The interaction model: multimodal embeddings, attention, MoE, blocks, heads and losses."""

from tml.model.attention import Attention, RMSNorm, apply_rope, rope_cos_sin
from tml.model.config import FlowHeadConfig, HeadsConfig, ModelConfig, MoEConfig
from tml.model.embed import DMelBagEmbedding, HMLPPatchEmbedding, MultimodalEmbedding, TextEmbedding
from tml.model.heads import DMelHead, FloorHead, FlowHead, OutputHead, TextHead, bins_to_unit, unit_to_bins
from tml.model.losses import compute_losses
from tml.model.mlp import SwiGLU
from tml.model.moe import GroupedExperts, MoE
from tml.model.params import param_counts
from tml.model.transformer import Block, InteractionModel, ModelOutput

__all__ = [
    "Attention", "Block", "DMelBagEmbedding", "DMelHead", "FloorHead", "FlowHead", "FlowHeadConfig", "GroupedExperts",
    "HMLPPatchEmbedding", "HeadsConfig", "InteractionModel", "ModelConfig", "ModelOutput", "MoE", "MoEConfig",
    "MultimodalEmbedding", "OutputHead", "RMSNorm", "SwiGLU", "TextEmbedding", "TextHead", "apply_rope", "bins_to_unit",
    "compute_losses", "param_counts", "rope_cos_sin", "unit_to_bins",
]
