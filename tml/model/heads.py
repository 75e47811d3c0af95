"""Output heads on the final hidden state. Each is its own module so other heads (e.g. flow matching) can join."""

from __future__ import annotations

import torch
from torch import nn


class TextHead(nn.Module):
    """Hidden [N, dim] -> next-token logits [N, vocab]. Optionally shares its weight with the text embedding."""

    def __init__(self, dim: int, vocab_size: int, tied_weight: nn.Parameter | None = None):
        super().__init__()
        self.proj = nn.Linear(dim, vocab_size, bias=False)
        if tied_weight is not None:
            self.proj.weight = tied_weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)


class DMelHead(nn.Module):
    """Hidden [N, dim] -> dMel logits [N, frames, n_mels, bins]: an independent ``bins``-way classification per
    (stacked frame, mel channel) of the next audio position."""

    def __init__(self, dim: int, frames: int, n_mels: int, bins: int):
        super().__init__()
        self.frames, self.n_mels, self.bins = frames, n_mels, bins
        self.proj = nn.Linear(dim, frames * n_mels * bins, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h).view(h.shape[0], self.frames, self.n_mels, self.bins)
