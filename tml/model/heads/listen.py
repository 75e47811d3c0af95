"""The listen head (``model.heads.listen``): the user's transcript where it is heard, a training signal only."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tml.model.heads.base import OutputHead
from tml.streams.batch import Batch
from tml.streams.layout import Stream
from tml.streams.modalities import IGNORE_INDEX, Kind

if TYPE_CHECKING:
    from tml.model.config import ModelConfig
    from tml.model.embed import MultimodalEmbedding


class ListenHead(OutputHead):
    """Hidden [N, dim] at the user's audio positions -> logits [N, vocab] of the transcript token due there (the
    ``heard_text`` label, ``tml.streams.modalities.audio``: each word's tokens from the position where it ends).

    A training signal only (``model.heads.listen``): nothing the model writes is sampled from it (the streaming
    session reads its argmax out as ``MicroTurnOutputs.heard_ids``, for traces). It makes the backbone recognise the
    user's words where it hears them; without it the only gradient toward recognition comes through the model's own
    replies, and the tiny model took "just a moment, please" for "tell me something" and talked through wait windows
    (README, "Interaction: a model that takes turns").
    """

    kind = None  # it writes no modality into the model's output slots
    reads = (Stream.USER, Kind.AUDIO)  # the streaming session's readout: its argmax at the user's audio
    # loss/listen_words: the CE at the positions where a word is due (not the empty-slot token): how well the model
    # recognises what the user said
    metric_names = ("listen_words",)

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.proj = nn.Linear(dim, vocab_size, bias=False)

    @classmethod
    def from_config(cls, cfg: ModelConfig, embed: MultimodalEmbedding | None = None) -> ListenHead:
        return cls(cfg.dim, cfg.vocab_size)

    @staticmethod
    def num_params(cfg: ModelConfig) -> int:
        return cfg.dim * cfg.vocab_size

    def targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The labelled positions of ``heard_text`` and their tokens; None for a batch without the label (live
        batches carry none)."""
        if "heard_text" not in batch.payload:
            return None
        where = batch.heard_text != IGNORE_INDEX
        return where, batch.heard_text[where]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)

    def loss(self, h: torch.Tensor, target: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy (nats) of each heard token: hidden [N, dim], target long [N] -> fp32 [N]."""
        logits = self(h) if logits is None else logits
        return F.cross_entropy(logits.float(), target, reduction="none")

    def metrics(self, per_target: torch.Tensor, target: torch.Tensor, pad_id: int | None = None
                ) -> dict[str, torch.Tensor]:
        """``listen_words``: the per-target CE [N] where a word is due (target not ``pad_id``; none without one)."""
        return {} if pad_id is None else {"listen_words": per_target[target != pad_id]}
