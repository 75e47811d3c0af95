"""Cut a video frame into non-overlapping square patches, one model position each.

A frame of any size is first brought to the layout's ``height x width`` (both multiples of the patch size):
``fit="resize"`` stretches it (bilinear, antialiased); ``fit="pad"`` scales it to fit inside while keeping its
aspect ratio and centres it on black (letterbox), so shapes stay round. Each patch keeps its (row, col) in the
patch grid so the model can add a 2-D position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FITS = ("resize", "pad")


def _resize(frame: torch.Tensor, height: int, width: int) -> torch.Tensor:
    x = frame.permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8)


def fit_frame(frame: torch.Tensor, height: int, width: int, fit: str = "resize") -> torch.Tensor:
    """uint8 [H, W, 3] of any size -> uint8 [height, width, 3] (see module docstring for ``fit``)."""
    if frame.dtype != torch.uint8 or frame.ndim != 3 or frame.shape[-1] != 3 or min(frame.shape[:2]) < 1:
        raise ValueError(f"frame must be uint8 [H, W, 3], got {frame.dtype} {tuple(frame.shape)}")
    if fit not in FITS:
        raise ValueError(f"layout.frame_fit={fit!r}: choose one of {', '.join(FITS)}")
    h, w = frame.shape[:2]
    if (h, w) == (height, width):
        return frame
    if fit == "resize":
        return _resize(frame, height, width)
    scale = min(height / h, width / w)
    nh, nw = max(1, min(height, round(h * scale))), max(1, min(width, round(w * scale)))
    out = torch.zeros(height, width, 3, dtype=torch.uint8)
    top, left = (height - nh) // 2, (width - nw) // 2
    out[top:top + nh, left:left + nw] = _resize(frame, nh, nw) if (nh, nw) != (h, w) else frame
    return out


def frame_to_patches(frame: torch.Tensor, patch_size: int, height: int, width: int,
                     fit: str = "resize") -> tuple[torch.Tensor, torch.Tensor]:
    """Bring a frame to ``height x width`` (multiples of ``patch_size``) and cut it into patches.

    Args:
        frame: uint8 [H, W, 3] RGB frame of any size.
        fit: "resize" (stretch) or "pad" (keep aspect ratio, letterbox).
    Returns:
        patches: uint8 [N, patch_size, patch_size, 3], row-major over the patch grid, N = (height/P) * (width/P)
        rc: int64 [N, 2] (row, col) of each patch in the grid
    """
    if height % patch_size or width % patch_size:
        raise ValueError(f"patch_size={patch_size} must divide the target frame size {height}x{width}")
    frame = fit_frame(frame, height, width, fit)
    gh, gw = height // patch_size, width // patch_size
    patches = frame.reshape(gh, patch_size, gw, patch_size, 3).permute(0, 2, 1, 3, 4).reshape(-1, patch_size, patch_size, 3)
    rows = torch.arange(gh).repeat_interleave(gw)
    cols = torch.arange(gw).repeat(gh)
    return patches.contiguous(), torch.stack([rows, cols], dim=1)
