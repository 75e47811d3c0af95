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
from tml.streams.layout import Stream
from tml.streams.modalities import DENSE_FIELDS, LABEL_FIELDS, MODALITIES, OUTPUTS, ROW_FIELDS

OUTPUT_KINDS = torch.tensor([int(m.kind) for m in OUTPUTS])  # the kinds the model writes (they have targets)


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
    """Rows of pieces -> a validated Batch of shape [len(rows), seq_len] (targets per the prediction convention).
    Payload fields come from the modality specs (``tml.streams.modalities``): dense ones are copied position by
    position, row ones concatenated; a modality the model writes gets its targets in ``spec.target``."""
    B = len(rows)
    kind = torch.zeros(B, seq_len, dtype=torch.int64)
    stream = torch.zeros_like(kind)
    micro_turn = torch.zeros_like(kind)
    position_ids = torch.zeros_like(kind)
    doc_ids = torch.full_like(kind, -1)
    target_kind = torch.zeros_like(kind)
    dense = {f: torch.zeros_like(kind) for f in DENSE_FIELDS}
    # Labels (e.g. audio's heard_text) where every piece has them: recordings do, hand-built pieces may not.
    has = [f for f in LABEL_FIELDS if all(f in piece.payload for pieces in rows for piece in pieces)]
    labels = {f: torch.full_like(kind, IGNORE_INDEX) for f in has}
    rows_of = {f: [] for f in ROW_FIELDS}
    targets = {m.target: (torch.full_like(kind, IGNORE_INDEX) if m.dense else []) for m in OUTPUTS}
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
            for f in DENSE_FIELDS:
                dense[f][b, sl] = piece.payload[f]
            for f in has:
                labels[f][b, sl] = piece.payload[f]
            # Position i predicts position i+1 when i+1 is a model-stream position of an output modality, same piece.
            nxt_kind, nxt_stream = piece.kind[1:], piece.stream[1:]
            is_t = (nxt_stream == Stream.MODEL) & torch.isin(nxt_kind, OUTPUT_KINDS)
            tk = torch.where(is_t, nxt_kind, torch.zeros_like(nxt_kind))
            target_kind[b, p : p + n - 1] = tk
            for m in OUTPUTS:
                (field,) = m.fields  # an output modality has one payload field: what its head predicts
                if m.dense:
                    targets[m.target][b, p : p + n - 1] = torch.where(tk == m.kind, piece.payload[field][1:],
                                                                      IGNORE_INDEX)
                else:
                    row_index = torch.cumsum(piece.kind == m.kind, 0) - 1  # payload row of each position
                    targets[m.target].append(piece.payload[field][row_index[1:][tk == m.kind]])
            for f in ROW_FIELDS:
                rows_of[f].append(piece.payload[f])
            p += n
    empty = {f: e for m in MODALITIES for f, e in m.empty().items()}
    first = rows[0][0] if rows and rows[0] else None  # trailing payload shapes come from the data when it has any
    if first is not None:
        empty = {f: first.payload[f][:0] for f in ROW_FIELDS}
    cat = lambda xs, f: torch.cat(xs) if xs else empty[f]  # noqa: E731
    target_rows = {m.target: cat(targets[m.target], m.fields[0]) for m in OUTPUTS if not m.dense}
    payload = {**dense, **labels, **{f: cat(v, f) for f, v in rows_of.items()},
               **{m.target: targets[m.target] for m in OUTPUTS if m.dense}, **target_rows}
    return Batch(kind=kind, stream=stream, micro_turn=micro_turn, position_ids=position_ids, doc_ids=doc_ids,
                 target_kind=target_kind, payload=payload).validate()
