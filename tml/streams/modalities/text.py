"""Text: token ids, one per slot, on the user, model and background streams (the modality's whole spec).

Every word (or background result, or delegation span) is placed in the micro-turn in which it starts; its tokens
queue up and fill the stream's slots in order, spilling into later micro-turns; unused slots hold ``<pad>`` (the
model learns when not to write). The model writes text: its target field is ``target_text``.
"""

from __future__ import annotations

import torch
from torch import nn

from tml.streams.layout import Stream
from tml.streams.modalities.base import LiveInput, Modality


class TextModality(Modality):
    def encode(self, episode, slot, layout, dmel, text, num_turns):
        cfg, turn_s = layout.cfg, layout.cfg.micro_turn_ms / 1000.0
        if slot.stream == Stream.BACKGROUND:
            groups = [(e.time, [i for w in e.text.split() for i in text.word_ids(w)]) for e in episode.background]
        else:
            name = slot.stream.name.lower()
            groups = [(w.start, text.word_ids(w.text)) for w in episode.words.get(name, [])]
            groups += [(e["time"], delegate_span(e["query"], text)) for e in episode.meta.get("events", [])
                       if e.get("type") == "delegate" and e.get("speaker") == name]
            if slot.stream == Stream.MODEL:  # the model's streams lead (tml.streams.interleave)
                groups = [(start - cfg.model_lead_turns * turn_s, ids) for start, ids in groups]
        ids, dropped = place_text(groups, num_turns, slot.count, turn_s, text.pad_id)
        return [(self.kind, {"text_ids": ids[t]}) for t in range(num_turns)], dropped

    def live(self, slot, layout, dmel, pad_id):
        return LiveText(slot.count, pad_id)

    def embedder(self, cfg):
        return TextEmbedding(cfg.vocab_size, cfg.dim)

    def num_params(self, cfg):
        return cfg.vocab_size * cfg.dim


TEXT = TextModality(kind=1, name="text", fields=("text_ids",), dense=True, target="target_text")


class TextEmbedding(nn.Module):
    """Token ids [...] -> [..., dim]."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)

    @property
    def weight(self) -> nn.Parameter:
        return self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)


class LiveText(LiveInput):
    """Token ids arriving in a micro-turn (a list, or None) queue up and fill the run's ``count`` slots, spilling
    into later micro-turns, ``<pad>`` where the queue is empty (``place_text`` feeds it a recording's words)."""

    def __init__(self, count: int, pad_id: int):
        self.count, self.pad_id = count, pad_id
        self.queue: list[int] = []

    def __call__(self, value, turn):
        self.queue.extend(value or [])
        take, self.queue = self.queue[: self.count], self.queue[self.count:]
        return TEXT.kind, {"text_ids": torch.tensor(take + [self.pad_id] * (self.count - len(take)), dtype=torch.long)}


def place_text(words: list[tuple[float, list[int]]], num_turns: int, slots: int, turn_s: float,
               pad_id: int) -> tuple[torch.Tensor, int]:
    """Fill ``slots`` text slots per micro-turn from timed token groups.

    Args:
        words: (start time in seconds, token ids) per word or event, any order.
    Returns:
        ids: int64 [num_turns, slots]; dropped: tokens still queued when the episode ended.
    """
    by_turn: dict[int, list[int]] = {}
    for start, toks in sorted(words, key=lambda w: w[0]):
        t = max(0, int(round(start * 1000, 6) // round(turn_s * 1000, 6)))
        by_turn.setdefault(t, []).extend(toks)
    live = LiveText(slots, pad_id)  # the spill queue, fed each micro-turn's tokens as a live stream is
    ids = torch.stack([live(by_turn.pop(t, []), t)[1]["text_ids"] for t in range(num_turns)]) if num_turns \
        else torch.full((0, slots), pad_id, dtype=torch.int64)
    dropped = len(live.queue) + sum(len(v) for v in by_turn.values())
    return ids, dropped


def delegate_span(query: str, text) -> list[int]:
    """``<delegate> query </delegate>`` as token ids (``text``: a ``TextTokenizer``): what the model writes to hand
    ``query`` to the background model (``tml.eval.background.DelegationBridge`` reads it back)."""
    return [text.delegate_id, *(i for w in query.split() for i in text.word_ids(w)), text.end_delegate_id]
