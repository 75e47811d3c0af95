"""Vision front end: video frames -> 40x40x3 patches."""

from tml.vision.patches import frame_to_patches

__all__ = ["frame_to_patches"]
