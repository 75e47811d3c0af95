"""The synthetic set's video: a ball bouncing on a plain background, squares that appear (what the vision questions
and the visual-timing scenarios of ``data_prep.synth_content`` ask about)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

VIDEO_FPS = 5
VIDEO_SIZE = 80

# Ball / background colours for the video, with their names (the vision questions ask about them).
BALL_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 70), "blue": (40, 80, 220), "yellow": (235, 215, 40),
                "orange": (245, 140, 30), "purple": (140, 60, 190), "white": (245, 245, 245)}
BACKGROUNDS = {"grey": (128, 128, 128), "black": (15, 15, 15), "dark blue": (20, 30, 70),
               "dark green": (20, 60, 35), "brown": (90, 60, 40)}


@dataclass
class VideoSpec:
    ball: str
    background: str
    radius: int
    x0: float
    y0: float
    vx: float  # px/s
    vy: float
    squares: list = field(default_factory=list)  # (t0, t1, x, y, side, colour name): squares that appear

    def wall_hits(self, size: int = 80) -> list[float]:
        """Times (s, > 0) at which the ball touches a wall: x or y reaches radius or size-1-radius."""
        hits = []
        for p0, v in ((self.x0, self.vx), (self.y0, self.vy)):
            span, u0 = size - 1 - 2 * self.radius, p0 - self.radius
            m = math.floor(u0 / span) + (1 if v > 0 else 0)
            for _ in range(40):
                t = (m * span - u0) / v
                if t > 0:
                    hits.append(t)
                m += 1 if v > 0 else -1
        return sorted(hits)


def bounce(p0: torch.Tensor, v: float, t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Position of a point moving at ``v`` from ``p0`` and reflecting off walls at lo/hi (triangle wave)."""
    span = hi - lo
    u = torch.remainder(p0 - lo + v * t, 2 * span)
    return lo + torch.where(u <= span, u, 2 * span - u)


def render_video(spec: VideoSpec, n_frames: int, fps: float = VIDEO_FPS, size: int = VIDEO_SIZE) -> torch.Tensor:
    """uint8 [n_frames, size, size, 3]: a ``spec.ball`` disc on a ``spec.background`` field, plus ``spec.squares``
    while they are visible."""
    t = torch.arange(n_frames, dtype=torch.float32) / fps
    x = bounce(torch.tensor(spec.x0), spec.vx, t, spec.radius, size - 1 - spec.radius)
    y = bounce(torch.tensor(spec.y0), spec.vy, t, spec.radius, size - 1 - spec.radius)
    grid = torch.arange(size, dtype=torch.float32)
    inside = ((grid[None, None, :] - x[:, None, None]) ** 2
              + (grid[None, :, None] - y[:, None, None]) ** 2) <= spec.radius ** 2  # [frames, H, W]
    bg = torch.tensor(BACKGROUNDS[spec.background], dtype=torch.uint8)
    fg = torch.tensor(BALL_COLOURS[spec.ball], dtype=torch.uint8)
    video = torch.where(inside[..., None], fg, bg).contiguous()
    for t0, t1, sx, sy, side, colour in spec.squares:
        on = (t >= t0) & (t < t1)
        video[on, sy:sy + side, sx:sx + side] = torch.tensor(BALL_COLOURS[colour], dtype=torch.uint8)
    return video
