"""The floor head (``model.heads.floor``): the speak / stay-silent decision, once per micro-turn.

Once per micro-turn, before its first output slot, it gives P(the model speaks in this micro-turn's audio); every
output slot of the micro-turn follows the decision sampled from it. Deciding once per micro-turn instead of once per
40 ms audio position matters: a stop hazard of 0.05 per position compounds to 1 - 0.95^5 = 0.23 per micro-turn, so a
turn sampled position by position breaks off after a second or two, and a model that hears its own silence takes the
break for the end of its turn.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tml.model.heads.base import SILENT_BIN, OutputHead
from tml.model.sampling import Generators, SamplingConfig, decide_floor
from tml.streams.batch import Batch
from tml.streams.layout import Stream
from tml.streams.modalities import Kind

if TYPE_CHECKING:
    from tml.model.config import ModelConfig
    from tml.model.embed import MultimodalEmbedding


class FloorHead(OutputHead):
    """Hidden [N, dim] -> logit [N] of P(the model speaks in this micro-turn): the speak / stay-silent decision.

    It reads the hidden state of a micro-turn's last input position (which has heard this micro-turn's input and
    predicts its first output slot) and is trained with binary cross-entropy on ``floor_targets``: whether the
    reference speaks in at least half of the micro-turn's model audio positions, or starts speaking in it. At
    inference the decision is sampled from it (``cfg.floor``: ``sample``, or ``greedy`` = P > 0.5) and every output
    slot of the micro-turn follows it: silent writes ``<pad>`` text and silent audio; speaking draws the content
    given speech.
    """

    kind = None  # it writes no modality: its decision gates the content heads' samples

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 1)

    @classmethod
    def from_config(cls, cfg: ModelConfig, embed: MultimodalEmbedding | None = None) -> FloorHead:
        return cls(cfg.dim)

    @staticmethod
    def num_params(cfg: ModelConfig) -> int:
        return cfg.dim + 1  # one linear unit

    @torch.no_grad()
    def init_weights(self) -> None:
        """After the model's normal(init_std) init: bias 0, so P(speak) starts at 1/2 up to the weights' small term."""
        nn.init.zeros_(self.proj.bias)

    def targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Each micro-turn's last input position and the reference's decision there (``floor_targets``)."""
        return floor_targets(batch)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h).squeeze(-1)

    def loss(self, h: torch.Tensor, target: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Binary cross-entropy (nats) of each micro-turn's decision: hidden [Q, dim] at the queries of
        ``floor_targets``, target float [Q] (1 = the reference speaks) -> fp32 [Q]."""
        logits = self(h) if logits is None else logits
        return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")

    @torch.no_grad()
    def sample(self, h: torch.Tensor, cfg: SamplingConfig, generator: Generators = None,
               speaking: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-turn's decision for hidden states h [N, dim] -> (speak bool [N], P(speak) float [N]).

        Drawn from sigmoid((logit - shift) / T) (``cfg.floor``: sample, or greedy = that > 0.5). For the rows whose
        previous micro-turn spoke (``speaking`` bool [N]; None = none did), the decision to go on or stop: T =
        ``cfg.floor_temperature_speaking`` (None = as the others) and shift = logit(``cfg.floor_threshold_speaking``);
        for the others T = ``cfg.floor_temperature`` and shift 0. The returned P(speak) is the model's own
        (temperature 1). ``cfg.floor="none"`` has no micro-turn decision: speak is all True (every slot decides
        for itself)."""
        logit = self(h).float()
        p = torch.sigmoid(logit)
        if cfg.floor == "none":
            return torch.ones_like(p, dtype=torch.bool), p
        temperature, shift = cfg.floor_temperature, 0.0
        if speaking is not None:
            speaking = speaking.to(logit.device)
            if cfg.floor_temperature_speaking is not None:
                temperature = torch.where(speaking, cfg.floor_temperature_speaking, temperature)
            threshold = cfg.floor_threshold_speaking
            shift = torch.where(speaking, math.log(threshold / (1 - threshold)), 0.0)
        return decide_floor(torch.sigmoid((logit - shift) / temperature), cfg.floor, generator), p


def floor_targets(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the floor decision is taken and what the reference did there.

    Returns (query bool [B, L], target float [Q]): ``query`` marks each micro-turn's last input position, the one
    followed by the micro-turn's first MODEL output slot; ``target`` (row-major over the queries) is 1 where the
    reference speaks in at least half of that micro-turn's model audio positions (``target_audio`` not all
    ``SILENT_BIN``), or starts speaking in it (some speech, none in the document's previous micro-turn). The second
    rule is for onsets: an utterance that starts late in a micro-turn has its first word in that micro-turn's text
    slots (45% of the reply onsets of the interaction held-out set), and a silent decision there would erase it. A
    trailing micro-turn with less than half speech stays silent, so a stop is not delayed by a micro-turn. A query
    whose micro-turn has no audio targets (cut by the end of its row) is dropped from ``query``. With
    ``layout.model_lead_turns`` the audio targets already carry the lead, so the target does too.
    """
    B, L = batch.shape
    query = torch.zeros(B, L, dtype=torch.bool, device=batch.kind.device)
    query[:, :-1] = ((batch.stream[:, :-1] != Stream.MODEL) & (batch.stream[:, 1:] == Stream.MODEL)
                     & (batch.doc_ids[:, :-1] == batch.doc_ids[:, 1:]) & (batch.doc_ids[:, :-1] >= 0))
    is_audio = batch.target_kind == Kind.AUDIO
    spoken = torch.zeros(B, L, device=batch.kind.device)
    spoken[is_audio] = (batch.target_audio != SILENT_BIN).flatten(1).any(1).float()
    # Each output position belongs to the query before it in its row: segment ids by a running count of queries.
    seg = query.long().cumsum(1) - 1 + torch.arange(B, device=query.device)[:, None] * L
    ok = is_audio & (seg >= torch.arange(B, device=query.device)[:, None] * L)
    n_audio = torch.zeros(B * L, device=spoken.device).index_add_(0, seg[ok], torch.ones_like(spoken[ok]))
    n_spoken = torch.zeros(B * L, device=spoken.device).index_add_(0, seg[ok], spoken[ok])
    query = query & (n_audio[seg.clamp_min(0)] > 0)  # a query's own segment starts at it, so its seg is >= 0
    q_seg = seg[query]
    some = n_spoken[q_seg] > 0  # [Q]
    # The previous query of the same row and document is the previous micro-turn (queries are row-major).
    qb, ql = query.nonzero(as_tuple=True)
    follows = torch.zeros_like(some)
    follows[1:] = (qb[1:] == qb[:-1]) & (batch.doc_ids[qb[1:], ql[1:]] == batch.doc_ids[qb[:-1], ql[:-1]])
    starts = some & ~(follows & torch.cat([some.new_zeros(1), some[:-1]]))
    return query, ((2 * n_spoken[q_seg] >= n_audio[q_seg]) | starts).float()
