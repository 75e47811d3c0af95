"""Own-voice flips: training inputs in which the model's own past audio is sometimes not what the reference said.

Teacher forcing feeds the model the reference's audio as its own past. Whether it spoke in the previous micro-turn
then predicts whether it speaks in this one almost perfectly, so the floor head learns to continue whatever it
hears itself doing. At inference it hears its own samples instead: one wrongly sampled start keeps it talking
through a wait request or a barge-in. ``flip_own_audio`` flips the model's own audio inputs of a random share of
micro-turns (speech becomes silence, silence becomes speech taken from elsewhere in the batch) while every target
stays the reference's, so the decision to continue or stop must also come from what the user is doing.

``decoded_own_audio`` tests a subtler leak. The decoder speaks or stays silent for a whole micro-turn (the floor
head's one decision), so at inference the model's own audio is always whole speaking or silent micro-turns. The
reference trails off inside a micro-turn, so under teacher forcing its own audio already shows the stop one
micro-turn before the floor target does: the floor head could learn to stop on hearing itself trail off, a cue its
own decoder never produces. Shaped like the decoder's output, the own audio input holds no such cue. Measured, it
made the model stop on fewer barge-ins, not more (README, "Interaction: a model that takes turns"), so it is off by
default (``trainer.own_audio_decoded``).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from tml.model.heads import SILENT_BIN, floor_targets
from tml.streams.batch import Batch
from tml.streams.layout import Stream
from tml.streams.modalities import Kind


def _own_audio(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Where the model's own audio inputs are and which micro-turn each position belongs to.

    Returns (own bool [B, L]: MODEL-stream AUDIO positions of a document; micro_turn long [B, L]: a key of the
    position's (row, document, micro-turn), row-major; the number of keys; audio_row long [B, L]: each position's
    row of ``batch.audio_bins``)."""
    B, L = batch.shape
    own = (batch.kind == Kind.AUDIO) & (batch.stream == Stream.MODEL) & (batch.doc_ids >= 0)
    docs, turns = int(batch.doc_ids.max()) + 1, int(batch.micro_turn.max()) + 1
    rows = torch.arange(B, device=own.device)[:, None].expand(B, L)
    micro_turn = (rows * docs + batch.doc_ids.clamp_min(0)) * turns + batch.micro_turn
    audio_row = ((batch.kind == Kind.AUDIO).flatten().cumsum(0) - 1).view(B, L)
    return own, micro_turn, B * docs * turns, audio_row


def flip_own_audio(batch: Batch, prob: float, generator: torch.Generator) -> tuple[Batch, int]:
    """``batch`` with the MODEL-stream audio inputs of each (row, document, micro-turn) flipped with probability
    ``prob``: a speaking position (any bin not ``SILENT_BIN``) becomes silent, a silent one takes the bins of a
    random speaking MODEL position of the batch (stays silent if there is none). Targets are untouched.

    Returns (the new batch, the number of micro-turns flipped). ``audio_bins`` [N_audio, S, C] is copied, never
    changed in place; the draws come from ``generator`` (CPU), so a seeded step flips the same micro-turns again.
    """
    if prob <= 0:
        return batch, 0
    own, micro_turn, n_turns, audio_row = _own_audio(batch)
    if not own.any():
        return batch, 0
    chosen = (torch.rand(n_turns, generator=generator) < prob).to(own.device)  # one draw per micro-turn
    flip = own & chosen[micro_turn]
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
    return replace(batch, payload={**batch.payload, "audio_bins": bins}), int(micro_turn[flip].unique().numel())


def decoded_own_audio(batch: Batch) -> tuple[Batch, int]:
    """``batch`` with the MODEL-stream audio inputs of each (row, document, micro-turn) as the floor decoder writes
    them: all speech where the floor head's target says the reference speaks (``tml.model.heads.floor_targets``, the
    one definition), else all silent. A silent position of a speaking micro-turn takes the bins of the nearest
    speaking position before it in that micro-turn (after it, when none is before). Micro-turns without a floor
    target (cut by the end of their row) keep their audio.

    Returns (the new batch, the number of own audio positions changed). ``audio_bins`` [N_audio, S, C] is copied,
    never changed in place; targets are untouched.
    """
    own, micro_turn, n_turns, audio_row = _own_audio(batch)
    if not own.any():
        return batch, 0
    query, target = floor_targets(batch)
    decided = torch.full((n_turns,), -1, dtype=torch.long, device=own.device)  # -1: no decision
    decided[micro_turn[query]] = target.long()
    group = micro_turn[own]  # [N_own], in row order: a micro-turn's own positions are consecutive
    audio_row = audio_row[own]  # [N_own] into audio_bins
    speaking = (batch.audio_bins[audio_row] != SILENT_BIN).flatten(1).any(1)  # [N_own]
    block = decided[group]  # [N_own]: 1 speak, 0 silent, -1 keep

    # Nearest speaking position of the same micro-turn: the last one at or before i, else the first one after i.
    i = torch.arange(len(group), device=own.device)
    before = torch.where(speaking, i, -1).cummax(0).values
    after = torch.where(speaking, i, len(group)).flip(0).cummin(0).values.flip(0).clamp_max(len(group) - 1)
    source = torch.where((before >= 0) & (group[before.clamp_min(0)] == group), before, after)
    fill = (block == 1) & ~speaking & speaking[source] & (group[source] == group)
    mute = (block == 0) & speaking
    bins = batch.audio_bins.clone()
    bins[audio_row[fill]] = batch.audio_bins[audio_row[source[fill]]]
    bins[audio_row[mute]] = SILENT_BIN
    return replace(batch, payload={**batch.payload, "audio_bins": bins}), int(fill.sum() + mute.sum())
