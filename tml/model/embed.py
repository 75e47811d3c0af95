"""Input embeddings assembled into [B, L, dim].

Every position gets its modality embedding (the embedder its spec in ``tml.streams.modalities`` builds: text
tokens, dMel bag of embeddings, hMLP patch stem; or the learned ``pad`` vector for empty slots) plus a learned
stream embedding (user / model / background / video), so the model knows whose token it reads.
"""

from __future__ import annotations

import torch
from torch import nn

from tml.model.config import ModelConfig
from tml.streams.batch import Batch
from tml.streams.layout import Stream
from tml.streams.modalities import MODALITIES, Kind
# The embedders live with their modality's spec; re-exported here for ``tml.model`` users.
from tml.streams.modalities.audio import DMelBagEmbedding
from tml.streams.modalities.patch import HMLPPatchEmbedding
from tml.streams.modalities.text import TextEmbedding

__all__ = ["DMelBagEmbedding", "HMLPPatchEmbedding", "MultimodalEmbedding", "TextEmbedding"]


class MultimodalEmbedding(nn.Module):
    """Batch -> [B, L, dim]: each modality embedded and scattered into its positions, plus the stream embedding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        for m in MODALITIES:  # module name = spec name, so checkpoint keys stay embed.text.*, embed.audio.*, ...
            self.add_module(m.name, m.embedder(cfg))
        self.pad = nn.Parameter(torch.zeros(cfg.dim))  # empty slots inside documents (and packing padding)
        self.stream = nn.Embedding(len(Stream), cfg.dim)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Each spec's payload (``spec.payload``: its positions' values in row-major order, which is the order
        ``masked_scatter`` fills the masked positions in) goes through the spec's embedder."""
        for m in MODALITIES:  # the data layout and the model config must agree on payload shapes
            m.check_embedder(getattr(self, m.name), batch)
        kind = batch.kind
        x = torch.zeros(*kind.shape, self.pad.shape[0], dtype=self.pad.dtype, device=self.pad.device)
        for m in MODALITIES:
            x = x.masked_scatter((kind == m.kind).unsqueeze(-1), getattr(self, m.name)(*m.payload(batch)))
        x = x + (kind == Kind.PAD).unsqueeze(-1).to(x.dtype) * self.pad
        return x + self.stream(batch.stream)
