"""Pack episode pieces into fixed-length rows and rows into a ``Batch``.

Rows are filled greedily in stream order. An episode that does not fit in what is left of a row is cut at a
micro-turn boundary: the first part ends this row, the rest starts the next one. Each piece is its own document
(positions and micro-turns restart at 0), so attention and targets never cross a piece boundary. Space too
short for one micro-turn is padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from tml.streams.batch import IGNORE_INDEX, Batch
from tml.streams.interleave import EpisodeTokens
from tml.streams.layout import Kind, Stream


@dataclass
class PackCursor:
    """Where a row starts in the rank's episode stream: episode at ``position`` (a data-source cursor), from
    micro-turn ``turn_offset``. Saving the cursor of the next row is enough to resume packing exactly."""

    position: tuple
    turn_offset: int = 0


def pack_rows(episodes: Iterator[tuple[tuple, EpisodeTokens]], seq_len: int, turn_length: int,
              start_offset: int = 0) -> Iterator[tuple[list[EpisodeTokens], PackCursor]]:
    """Greedy packer.

    Args:
        episodes: (source position, tokens) in stream order; the position is opaque here.
        seq_len: positions per row; must hold at least one micro-turn.
        turn_length: positions per micro-turn.
        start_offset: micro-turn to start the first episode at (resume inside an episode).
    Yields:
        (pieces of one row, cursor of the row that follows it).
    """
    if seq_len < turn_length:
        raise ValueError(f"seq_len={seq_len} is shorter than one micro-turn ({turn_length} positions)")
    max_turns = seq_len // turn_length
    row: list[EpisodeTokens] = []
    free = max_turns
    carry: tuple[tuple, EpisodeTokens, int] | None = None
    it = iter(episodes)
    first = True
    while True:
        if carry is None:
            pos, tok = next(it)
            off = start_offset if first else 0
            first = False
        else:
            pos, tok, off = carry
        take = min(free, tok.num_turns - off)
        if take > 0:
            row.append(tok.slice_turns(off, off + take))
            free -= take
        carry = (pos, tok, off + take) if off + take < tok.num_turns else None
        if free == 0:
            # The next row starts where the carry is, or at the next episode (peeked so its position is known).
            if carry is None:
                pos, tok = next(it)
                carry = (pos, tok, 0)
            yield row, PackCursor(carry[0], carry[2])
            row, free = [], max_turns


def collate(rows: list[list[EpisodeTokens]], seq_len: int) -> Batch:
    """Rows of pieces -> a validated Batch of shape [len(rows), seq_len] (targets per the prediction convention)."""
    B = len(rows)
    kind = torch.zeros(B, seq_len, dtype=torch.int64)
    stream = torch.zeros_like(kind)
    micro_turn = torch.zeros_like(kind)
    position_ids = torch.zeros_like(kind)
    doc_ids = torch.full_like(kind, -1)
    text_ids = torch.zeros_like(kind)
    target_kind = torch.zeros_like(kind)
    target_text = torch.full_like(kind, IGNORE_INDEX)
    audio, patches, rcs, t_audio = [], [], [], []
    for b, pieces in enumerate(rows):
        p = 0
        for d, piece in enumerate(pieces):
            n = piece.kind.numel()
            if p + n > seq_len:
                raise ValueError(f"row {b} holds {p + n} positions, more than seq_len={seq_len}")
            sl = slice(p, p + n)
            kind[b, sl] = piece.kind
            stream[b, sl] = piece.stream
            micro_turn[b, sl] = piece.micro_turn
            position_ids[b, sl] = torch.arange(n)
            doc_ids[b, sl] = d
            text_ids[b, sl] = piece.text_ids
            # Position i predicts position i+1 when i+1 is model-stream text or audio of the same piece.
            nxt_kind, nxt_stream = piece.kind[1:], piece.stream[1:]
            is_t = (nxt_stream == Stream.MODEL) & ((nxt_kind == Kind.TEXT) | (nxt_kind == Kind.AUDIO))
            tk = torch.where(is_t, nxt_kind, torch.zeros_like(nxt_kind))
            target_kind[b, p : p + n - 1] = tk
            target_text[b, p : p + n - 1] = torch.where(tk == Kind.TEXT, piece.text_ids[1:], IGNORE_INDEX)
            audio_index = torch.cumsum(piece.kind == Kind.AUDIO, 0) - 1  # payload row of each audio position
            t_audio.append(piece.audio_bins[audio_index[1:][tk == Kind.AUDIO]])
            audio.append(piece.audio_bins)
            patches.append(piece.patches)
            rcs.append(piece.patch_rc)
            p += n
    S, C = rows[0][0].audio_bins.shape[1:] if rows and rows[0] else (4, 80)
    return Batch(
        kind=kind, stream=stream, micro_turn=micro_turn, position_ids=position_ids, doc_ids=doc_ids,
        text_ids=text_ids,
        audio_bins=torch.cat(audio) if audio else torch.zeros(0, S, C, dtype=torch.int64),
        patches=torch.cat(patches) if patches else torch.zeros(0, 40, 40, 3, dtype=torch.uint8),
        patch_rc=torch.cat(rcs) if rcs else torch.zeros(0, 2, dtype=torch.int64),
        target_kind=target_kind, target_text=target_text,
        target_audio=torch.cat(t_audio) if t_audio else torch.zeros(0, S, C, dtype=torch.int64),
    ).validate()
