"""Input embeddings: text tokens, dMel bag of embeddings, hMLP patch stem, and their assembly into [B, L, dim].

Every position gets its modality embedding (text / audio / patch, or the learned ``pad`` vector for empty slots)
plus a learned stream embedding (user / model / background / video), so the model knows whose token it reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tml.errors import ConfigError
from tml.model.config import ModelConfig
from tml.streams.batch import Batch
from tml.streams.layout import Kind, Stream
from tml.streams.modality import MODALITIES


class TextEmbedding(nn.Module):
    """Token ids [...] -> [..., dim]."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)

    @property
    def weight(self) -> nn.Parameter:
        return self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)


class DMelBagEmbedding(nn.Module):
    """Bag of embeddings for dMel: one ``bins``-row table per (stacked frame, mel channel), looked up and summed.

    The ``frames * n_mels`` tables live in one ``nn.Embedding(frames * n_mels * bins, dim)``; table (s, c) starts
    at row ``(s * n_mels + c) * bins``.
    """

    def __init__(self, frames: int, n_mels: int, bins: int, dim: int):
        super().__init__()
        self.frames, self.n_mels, self.bins = frames, n_mels, bins
        self.table = nn.Embedding(frames * n_mels * bins, dim)

    def reset_parameters(self, std: float) -> None:
        # The output is a sum of frames*n_mels rows: scale each row so the sum has std ``std`` like a text token.
        nn.init.normal_(self.table.weight, std=std / (self.frames * self.n_mels) ** 0.5)

    def forward(self, bins: torch.Tensor) -> torch.Tensor:
        """bins: long [N, frames, n_mels] in [0, bins) -> [N, dim]."""
        # Offsets built per call (tiny) instead of a buffer, so models built on the meta device need no fix-up.
        offsets = torch.arange(self.frames * self.n_mels, device=bins.device) * self.bins
        idx = bins.reshape(bins.shape[0], self.frames * self.n_mels) + offsets
        # embedding_bag sums without materialising the [N, frames*n_mels, dim] intermediate.
        return F.embedding_bag(idx, self.table.weight, mode="sum")


class _ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of [N, C, H, W] at each location: per patch, so patches never mix (BatchNorm,
    the hMLP paper's default, would mix the patches of a batch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class HMLPPatchEmbedding(nn.Module):
    """Hierarchical MLP stem (Touvron et al. 2022) for square RGB patches, plus learned row/col embeddings.

    conv k(P/4) s(P/4) -> norm -> GELU -> conv k2 s2 -> norm -> GELU -> conv k2 s2 -> norm. Kernel = stride, so
    each output depends only on its own patch: for P = 40 that is 10 -> 2 -> 2, i.e. 4x4 -> 2x2 -> 1x1.
    """

    def __init__(self, patch_size: int, dim: int, max_grid: int, eps: float = 1e-6):
        super().__init__()
        self.patch_size = patch_size
        k, width = patch_size // 4, max(dim // 4, 1)
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, kernel_size=k, stride=k), _ChannelLayerNorm(width, eps=eps), nn.GELU(),
            nn.Conv2d(width, width, kernel_size=2, stride=2), _ChannelLayerNorm(width, eps=eps), nn.GELU(),
            nn.Conv2d(width, dim, kernel_size=2, stride=2), _ChannelLayerNorm(dim, eps=eps),
        )
        self.row = nn.Embedding(max_grid, dim)
        self.col = nn.Embedding(max_grid, dim)

    def forward(self, patches: torch.Tensor, patch_rc: torch.Tensor) -> torch.Tensor:
        """
        Args:
            patches: uint8 [N, P, P, 3] RGB; patch_rc: long [N, 2] (row, col) in the frame's patch grid.
        Returns:
            [N, dim]
        """
        x = patches.permute(0, 3, 1, 2).to(self.row.weight.dtype) / 127.5 - 1.0  # [N, 3, P, P] in [-1, 1]
        x = self.stem(x).flatten(1)  # [N, dim, 1, 1] -> [N, dim]
        return x + self.row(patch_rc[:, 0]) + self.col(patch_rc[:, 1])


# One input embedder per modality spec (tml.streams.modality), built from the model config; its module name is the
# spec's name (so checkpoints keep the keys embed.text.*, embed.audio.*, embed.patch.*).
EMBEDDERS = {
    "text": lambda cfg: TextEmbedding(cfg.vocab_size, cfg.dim),
    "audio": lambda cfg: DMelBagEmbedding(cfg.frames_per_audio_position, cfg.n_mels, cfg.dmel_bins, cfg.dim),
    "patch": lambda cfg: HMLPPatchEmbedding(cfg.patch_size, cfg.dim, cfg.max_patch_grid),
}


class MultimodalEmbedding(nn.Module):
    """Batch -> [B, L, dim]: each modality embedded and scattered into its positions, plus the stream embedding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        for m in MODALITIES:
            if m.name not in EMBEDDERS:
                raise ConfigError(f"modality {m.name!r} (tml.streams.modality) has no embedder in "
                                  f"tml.model.embed.EMBEDDERS; add one")
            self.add_module(m.name, EMBEDDERS[m.name](cfg))
        self.pad = nn.Parameter(torch.zeros(cfg.dim))  # empty slots inside documents (and packing padding)
        self.stream = nn.Embedding(len(Stream), cfg.dim)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Each spec's payload (``spec.payload``: its positions' values in row-major order, which is the order
        ``masked_scatter`` fills the masked positions in) goes through the spec's embedder."""
        self._check_payload_shapes(batch)
        kind = batch.kind
        x = torch.zeros(*kind.shape, self.pad.shape[0], dtype=self.pad.dtype, device=self.pad.device)
        for m in MODALITIES:
            x = x.masked_scatter((kind == m.kind).unsqueeze(-1), getattr(self, m.name)(*m.payload(batch)))
        x = x + (kind == Kind.PAD).unsqueeze(-1).to(x.dtype) * self.pad
        return x + self.stream(batch.stream)

    def _check_payload_shapes(self, batch: Batch) -> None:
        """The data layout and the model config must agree on payload shapes; say which keys when they do not."""
        a, p = self.audio, batch.patches.shape[1:3]
        if tuple(batch.audio_bins.shape[1:]) != (a.frames, a.n_mels):
            raise ConfigError(f"Batch.audio_bins has [S, C] = {list(batch.audio_bins.shape[1:])} but the model "
                              f"expects model.frames_per_audio_position={a.frames}, model.n_mels={a.n_mels}; make "
                              f"them equal to layout.frames_per_audio_position and layout.n_mels")
        if p[0] != p[1] or p[0] != self.patch.patch_size:
            raise ConfigError(f"Batch.patches are {p[0]}x{p[1]} but model.patch_size={self.patch.patch_size}; set it "
                              f"to layout.patch_size")
