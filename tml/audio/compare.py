"""Distances between two log-mel spectrograms (log10 mel power [frames, n_mels], same frame rate).

All compare the overlapping frames (the shorter length) after clipping both to the dMel range, so the values do
not depend on how far below the range digital silence happens to sit:

* ``mel_l1``: mean absolute difference of the clipped log10 mel (0 = equal; one dMel bin of 16 over [-7, 2] is
  0.5625);
* ``spectral_convergence``: ``||A - B||_F / ||A||_F`` on mel magnitudes ``sqrt(10 ** log_mel)`` (0 = equal; 1 = as
  far as silence is from the reference); None for a silent reference (every cell at the floor of the range): the
  ratio would only measure the other side's loudness against the floor (it read 1486 for a model side that was
  silent in the recording);
* ``log_mel_correlation``: Pearson correlation of the clipped log10 mel values over all cells.
"""

from __future__ import annotations

import torch


def _aligned(ref: torch.Tensor, other: torch.Tensor, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    if ref.ndim != 2 or other.ndim != 2 or ref.shape[1] != other.shape[1]:
        raise ValueError(f"log-mels must be [frames, n_mels] with equal n_mels; got {tuple(ref.shape)} and "
                         f"{tuple(other.shape)}")
    n = min(ref.shape[0], other.shape[0])
    return ref[:n].float().clamp(lo, hi), other[:n].float().clamp(lo, hi)


def mel_l1(ref: torch.Tensor, other: torch.Tensor, lo: float = -7.0, hi: float = 2.0) -> float:
    a, b = _aligned(ref, other, lo, hi)
    return float((a - b).abs().mean())


def spectral_convergence(ref: torch.Tensor, other: torch.Tensor, lo: float = -7.0, hi: float = 2.0) -> float | None:
    a, b = _aligned(ref, other, lo, hi)
    if not bool((a > lo).any()):
        return None  # silent reference: nothing to converge to
    ma, mb = torch.pow(10.0, a / 2), torch.pow(10.0, b / 2)
    return float((ma - mb).norm() / ma.norm())


def log_mel_correlation(ref: torch.Tensor, other: torch.Tensor, lo: float = -7.0, hi: float = 2.0) -> float:
    a, b = _aligned(ref, other, lo, hi)
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])
