"""Own-voice flips: training inputs in which the model's own past audio is sometimes not what the reference said.

Teacher forcing feeds the model the reference's audio as its own past. Whether it spoke in the previous micro-turn
then predicts whether it speaks in this one almost perfectly, so the floor head learns to continue whatever it
hears itself doing. At inference it hears its own samples instead: one wrongly sampled start keeps it talking
through a wait request or a barge-in. ``flip_own_audio`` flips the model's own audio inputs of a random share of
micro-turns (speech becomes silence, silence becomes speech taken from elsewhere in the batch) while every target
stays the reference's, so the decision to continue or stop must also come from what the user is doing.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from tml.model.heads import SILENT_BIN
from tml.streams.batch import Batch
from tml.streams.layout import Kind, Stream


def flip_own_audio(batch: Batch, prob: float, generator: torch.Generator) -> tuple[Batch, int]:
    """``batch`` with the MODEL-stream audio inputs of each (row, document, micro-turn) flipped with probability
    ``prob``: a speaking position (any bin not ``SILENT_BIN``) becomes silent, a silent one takes the bins of a
    random speaking MODEL position of the batch (stays silent if there is none). Targets are untouched.

    Returns (the new batch, the number of micro-turns flipped). ``audio_bins`` [N_audio, S, C] is copied, never
    changed in place; the draws come from ``generator`` (CPU), so a seeded step flips the same micro-turns again.
    """
    if prob <= 0:
        return batch, 0
    B, L = batch.shape
    own = (batch.kind == Kind.AUDIO) & (batch.stream == Stream.MODEL) & (batch.doc_ids >= 0)
    if not own.any():
        return batch, 0
    docs, turns = int(batch.doc_ids.max()) + 1, int(batch.micro_turn.max()) + 1
    chosen = (torch.rand(B, docs, turns, generator=generator) < prob).to(own.device)
    rows = torch.arange(B, device=own.device)[:, None].expand(B, L)
    flip = own & chosen[rows, batch.doc_ids.clamp_min(0), batch.micro_turn]
    audio_row = ((batch.kind == Kind.AUDIO).flatten().cumsum(0) - 1).view(B, L)
    own_rows, flip_rows = audio_row[own], audio_row[flip]
    speaking = (batch.audio_bins != SILENT_BIN).flatten(1).any(1)  # [N_audio]
    donors = own_rows[speaking[own_rows]]
    bins = batch.audio_bins.clone()
    was_speaking = speaking[flip_rows]
    bins[flip_rows[was_speaking]] = SILENT_BIN
    quiet = flip_rows[~was_speaking]
    if len(donors) and len(quiet):
        pick = torch.randint(len(donors), (len(quiet),), generator=generator).to(donors.device)
        bins[quiet] = batch.audio_bins[donors[pick]]
    n_flipped = int(((rows[flip] * docs + batch.doc_ids[flip]) * turns + batch.micro_turn[flip]).unique().numel())
    return replace(batch, audio_bins=bins), n_flipped
