"""Video patches: frames cut into ``patch_size`` RGB patches on the video stream (the modality's whole spec).

On micro-turns ``t % video_stride == 0`` the frame showing time ``t * micro_turn`` is cut into patches (RGB uint8
and their (row, col) in the frame); other micro-turns, and micro-turns past the end of the video, leave the patch
slots empty (kind PAD). Each patch is embedded by an hMLP stem (Touvron et al. 2022) plus learned row/col
embeddings. Input only: the model does not write video.
"""

from __future__ import annotations

import torch
from torch import nn

from tml.errors import ConfigError
from tml.streams.layout import LayoutConfig
from tml.streams.modalities.base import PAD, LiveInput, Modality, TurnPositions
from tml.vision.patches import frame_to_patches


class PatchModality(Modality):
    def check_slot(self, cfg, slot, where):
        patches_per_frame = (cfg.frame_height // cfg.patch_size) * (cfg.frame_width // cfg.patch_size)
        if slot.kind == self.name and slot.count != patches_per_frame:
            raise ConfigError(f"{where}.count={slot.count}: a {cfg.frame_height}x{cfg.frame_width} frame cut into "
                              f"{cfg.patch_size}x{cfg.patch_size} patches needs {patches_per_frame} slots")
        if slot.kind == self.name and slot.stream != "video":
            raise ConfigError(f"{where}: patch slots belong to the video stream, not {slot.stream!r}")
        if slot.stream == "video" and slot.kind != self.name:
            raise ConfigError(f"{where}: the video stream only has patch slots")

    def encode(self, episode, slot, layout, dmel, text, num_turns):
        cfg, turn_s = layout.cfg, layout.cfg.micro_turn_ms / 1000.0
        n_frames = 0 if episode.video is None else episode.video.shape[0]
        out: list[TurnPositions] = []
        for t in range(num_turns):
            f = int(t * turn_s * episode.video_fps + 1e-6)
            if t % cfg.video_stride == 0 and f < n_frames:
                p, rc = frame_to_patches(episode.video[f], cfg.patch_size, cfg.frame_height, cfg.frame_width,
                                         cfg.frame_fit)
                out.append((self.kind, {"patches": p, "patch_rc": rc}))
            else:
                out.append((PAD, {}))
        return out, 0

    def live(self, slot, layout, dmel, pad_id):
        return LivePatches(layout.cfg)

    def embedder(self, cfg):
        return HMLPPatchEmbedding(cfg.patch_size, cfg.dim, cfg.max_patch_grid)

    def num_params(self, cfg):
        d, w, k = cfg.dim, max(cfg.dim // 4, 1), cfg.patch_size // 4  # the stem's width and first kernel
        stem = (3 * w * k * k + w) + 2 * w + (w * w * 4 + w) + 2 * w + (w * d * 4 + d) + 2 * d  # convs and norms
        return stem + 2 * cfg.max_patch_grid * d  # plus the row and col tables

    def check_embedder(self, embedder, batch):
        p = batch.patches.shape[1:3]
        if p[0] != p[1] or p[0] != embedder.patch_size:
            raise ConfigError(f"Batch.patches are {p[0]}x{p[1]} but model.patch_size={embedder.patch_size}; set it "
                              f"to layout.patch_size")

    def shapes(self, batch):
        n = int((batch.kind == self.kind).sum())
        return {"patches": (torch.uint8, (n, None, None, 3)), "patch_rc": (torch.int64, (n, 2))}

    def empty(self, cfg=None):
        P = (cfg or LayoutConfig()).patch_size
        return {"patches": torch.zeros(0, P, P, 3, dtype=torch.uint8), "patch_rc": torch.zeros(0, 2, dtype=torch.int64)}


PATCH = PatchModality(kind=3, name="patch", fields=("patches", "patch_rc"), dense=False)


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


class LivePatches(LiveInput):
    """A video frame (uint8 [H, W, 3], or None) -> its patches on micro-turns ``turn % video_stride == 0``; other
    micro-turns, and micro-turns without a frame, leave the slots empty (PAD), as ``PatchModality.encode`` does."""

    def __init__(self, cfg: LayoutConfig):
        self.cfg = cfg

    def __call__(self, value, turn):
        c = self.cfg
        if value is None or turn % c.video_stride:
            return PAD, {}
        p, rc = frame_to_patches(value, c.patch_size, c.frame_height, c.frame_width, c.frame_fit)
        return PATCH.kind, {"patches": p, "patch_rc": rc}
