"""The text head: hidden state -> next-token logits, sampled with a floor decision (write a word or leave the slot
empty)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tml.model.heads.base import OutputHead
from tml.model.sampling import Generators, SamplingConfig, decide_floor, sample_logits
from tml.streams.modalities import Kind

if TYPE_CHECKING:
    from tml.model.config import ModelConfig
    from tml.model.embed import MultimodalEmbedding


class TextHead(OutputHead):
    """Hidden [N, dim] -> next-token logits [N, vocab]. Optionally shares its weight with the text embedding
    (``model.heads.text=tied``)."""

    kind = Kind.TEXT
    # loss/text_words: the CE of the targets that are not the empty-slot token. Most model text slots are ``<pad>``,
    # which is easy to predict, so loss/text alone overstates how well the model writes words.
    metric_names = ("text_words",)

    def __init__(self, dim: int, vocab_size: int, tied_weight: nn.Parameter | None = None):
        super().__init__()
        self.proj = nn.Linear(dim, vocab_size, bias=False)
        if tied_weight is not None:
            self.proj.weight = tied_weight

    @classmethod
    def from_config(cls, cfg: ModelConfig, embed: MultimodalEmbedding) -> TextHead:
        return cls(cfg.dim, cfg.vocab_size, embed.text.weight if cfg.heads.text == "tied" else None)

    @staticmethod
    def num_params(cfg: ModelConfig) -> int:
        return 0 if cfg.heads.text == "tied" else cfg.vocab_size * cfg.dim  # tied: the embedding's weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)

    def loss(self, h: torch.Tensor, target: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy (nats) of each target token: hidden [N, dim], target long [N] -> fp32 [N]."""
        logits = self(h) if logits is None else logits
        return F.cross_entropy(logits.float(), target, reduction="none")

    def metrics(self, per_target: torch.Tensor, target: torch.Tensor, pad_id: int | None = None
                ) -> dict[str, torch.Tensor]:
        """``text_words``: the per-target CE [N] at the targets that are not ``pad_id`` (none without one)."""
        return {} if pad_id is None else {"text_words": per_target[target != pad_id]}

    @torch.no_grad()
    def write(self, h: torch.Tensor, cfg: SamplingConfig, generator: Generators = None,
              speak: torch.Tensor | None = None, p_speak: torch.Tensor | None = None, pad_id: int = 0,
              starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``OutputHead.write``: the token ids long [B] ``sample`` draws, and the logits [B, vocab] they came from."""
        logits = self(h)
        return self.sample(h, cfg, generator, pad_id, logits, speak, p_speak, starts), logits

    @torch.no_grad()
    def sample(self, h: torch.Tensor, cfg: SamplingConfig, generator: Generators = None,
               pad_id: int = 0, logits: torch.Tensor | None = None, speak: torch.Tensor | None = None,
               p_speak: torch.Tensor | None = None, starts: torch.Tensor | None = None) -> torch.Tensor:
        """Next token for hidden states h [N, dim] -> long [N] (``pad_id`` = this slot stays empty).

        Floor: write with probability P(not pad) = 1 - softmax(logits)[pad] (``cfg.floor``; the model's probability
        as trained, no temperature), then the word among the non-pad tokens with ``text_temperature`` /
        ``text_top_p`` (0 = greedy). ``floor="none"``: one draw over all tokens, pad included. ``logits`` [N, vocab]:
        ``self(h)`` if the caller has it already. ``speak`` bool [N]: the micro-turn's decision (``FloorHead``):
        ``pad_id`` where False; where True the slot still decides for itself whether it holds a word (a speaking
        micro-turn has empty text slots too). Every row draws either way, so the generator advances the same.
        ``p_speak`` float [N]: the floor head's P(speak) behind ``speak``; a speaking slot writes with P(word |
        speak) = min(1, P(word) / P(speak)) instead of P(word) where ``cfg.words_given_speech`` says: ``always``, or
        ``start``: in the rows whose micro-turn starts a turn (``starts`` bool [N]: speaks after a silent one; None =
        every speaking row, as free text without a history).
        """
        logits = self(h) if logits is None else logits
        if cfg.floor == "none":
            token = sample_logits(logits, cfg.text_temperature, cfg.text_top_p, generator)
        else:
            p_word = 1.0 - logits.float().softmax(-1)[:, pad_id]
            given = None if speak is None or p_speak is None or cfg.words_given_speech == "never" else speak
            if given is not None and cfg.words_given_speech == "start" and starts is not None:
                given = given & starts
            if given is not None:
                p_word = torch.where(given, (p_word / p_speak.float().clamp_min(1e-6)).clamp_max(1.0), p_word)
            writes = decide_floor(p_word, cfg.floor, generator)
            words = logits.float().index_fill(-1, torch.tensor([pad_id], device=logits.device), float("-inf"))
            word = sample_logits(words, cfg.text_temperature, cfg.text_top_p, generator)
            token = torch.where(writes, word, torch.full_like(word, pad_id))
        return token if speak is None else torch.where(speak, token, torch.full_like(token, pad_id))
