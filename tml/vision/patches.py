"""Cut a video frame into non-overlapping square patches, one model position each."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def frame_to_patches(frame: torch.Tensor, patch_size: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize a frame to ``height x width`` (multiples of ``patch_size``) and cut it into patches.

    Args:
        frame: uint8 [H, W, 3] RGB frame of any size.
    Returns:
        patches: uint8 [N, patch_size, patch_size, 3], row-major over the patch grid, N = (height/P) * (width/P)
        rc: int64 [N, 2] (row, col) of each patch in the grid
    """
    if frame.dtype != torch.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"frame must be uint8 [H, W, 3], got {frame.dtype} {tuple(frame.shape)}")
    if height % patch_size or width % patch_size:
        raise ValueError(f"patch_size={patch_size} must divide the target frame size {height}x{width}")
    if tuple(frame.shape[:2]) != (height, width):
        x = frame.permute(2, 0, 1)[None].float()
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        frame = x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8)
    gh, gw = height // patch_size, width // patch_size
    patches = frame.reshape(gh, patch_size, gw, patch_size, 3).permute(0, 2, 1, 3, 4).reshape(-1, patch_size, patch_size, 3)
    rows = torch.arange(gh).repeat_interleave(gw)
    cols = torch.arange(gw).repeat(gh)
    return patches.contiguous(), torch.stack([rows, cols], dim=1)
