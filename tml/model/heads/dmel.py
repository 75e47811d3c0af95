"""The dMel audio head (``model.heads.audio=dmel``): an independent ``bins``-way classification per (stacked frame,
mel channel) of the next audio position; exact likelihood, cheap."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tml.model.heads.base import SILENT_BIN, AudioHead, bins_to_unit
from tml.model.sampling import Generators, SamplingConfig, decide_floor, sample_logits

if TYPE_CHECKING:
    from tml.model.config import ModelConfig
    from tml.model.embed import MultimodalEmbedding


class DMelHead(AudioHead):
    """Hidden [N, dim] -> dMel logits [N, frames, n_mels, bins]: an independent ``bins``-way classification per
    (stacked frame, mel channel) of the next audio position."""

    def __init__(self, dim: int, frames: int, n_mels: int, bins: int):
        super().__init__()
        self.frames, self.n_mels, self.bins = frames, n_mels, bins
        self.proj = nn.Linear(dim, frames * n_mels * bins, bias=False)

    @classmethod
    def from_config(cls, cfg: ModelConfig, embed: MultimodalEmbedding | None = None) -> DMelHead:
        return cls(cfg.dim, cfg.frames_per_audio_position, cfg.n_mels, cfg.dmel_bins)

    @staticmethod
    def num_params(cfg: ModelConfig) -> int:
        return cfg.dim * cfg.frames_per_audio_position * cfg.n_mels * cfg.dmel_bins  # one linear layer

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h).view(h.shape[0], self.frames, self.n_mels, self.bins)

    def loss(self, h: torch.Tensor, target: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy (nats) of each (frame, mel channel) bin of each target position: hidden [N, dim], target
        bins long [N, frames, n_mels] -> fp32 [N, frames, n_mels]."""
        logits = self(h) if logits is None else logits
        return F.cross_entropy(logits.float().reshape(-1, self.bins), target.reshape(-1),
                               reduction="none").view(target.shape)

    def log_prob(self, h: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
        """Exact log-likelihood (nats) of bin ids [N, frames, n_mels] given hidden [N, dim] -> [N]: channels are
        independent given the hidden state, so it is the sum of per-channel log-softmax entries."""
        logp = self(h).float().log_softmax(-1)
        return logp.gather(-1, bins.unsqueeze(-1)).squeeze(-1).sum((1, 2))

    @torch.no_grad()
    def sample(self, h: torch.Tensor, cfg: SamplingConfig, generator: Generators = None,
               logits: torch.Tensor | None = None, speak: torch.Tensor | None = None) -> torch.Tensor:
        """Next audio position for hidden states h [N, dim] -> unit coordinates [N, frames, n_mels] at bin centres.

        Floor: one speak/silent draw per 40 ms position (``cfg.floor``) from P(speak) = the mean over its frames and
        channels of P(bin != SILENT_BIN); silent means every bin is SILENT_BIN. Given speech, each channel's bin comes
        from its distribution with the silent positions' share taken out of the silent bin, i.e. P(b | speak) ~
        max(P(b) - (1 - P(speak)) [b = SILENT_BIN], 0) (a channel that is quieter than the position on average keeps
        some silent mass), drawn with ``audio_temperature`` / ``audio_top_p`` (0 = greedy). ``floor="none"``: every
        channel's bin drawn from its full distribution. ``logits`` [N, frames, n_mels, bins]: ``self(h)`` if known.
        ``speak`` bool [N]: the decision already taken (by ``FloorHead`` for the whole micro-turn): only the content
        is drawn, given speech where True; silence where False.
        """
        logits = self(h) if logits is None else logits
        if cfg.floor == "none" and speak is None:
            return bins_to_unit(sample_logits(logits, cfg.audio_temperature, cfg.audio_top_p, generator), self.bins)
        p = logits.float().softmax(-1)  # [N, S, C, bins]
        p_silent_bin = p[..., SILENT_BIN]
        p_speak = 1.0 - p_silent_bin.mean((1, 2))  # [N]
        if speak is None:
            speak = decide_floor(p_speak, cfg.floor, generator)
        given = p.clone()
        given[..., SILENT_BIN] = (p_silent_bin - (1.0 - p_speak)[:, None, None]).clamp_min(0.0)
        bins = sample_logits(given.log(), cfg.audio_temperature, cfg.audio_top_p, generator)
        return bins_to_unit(torch.where(speak[:, None, None], bins, SILENT_BIN), self.bins)
