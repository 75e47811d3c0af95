"""Interleave one ``Episode`` into its flat position sequence on the micro-turn clock.

Micro-turn ``t`` covers ``[t * 0.2, (t + 1) * 0.2)`` seconds and becomes ``layout.length`` positions in the
layout's slot order. Per stream:

* audio: audio slot ``k`` of micro-turn ``t`` holds mel frames ``[t*20 + 4k, t*20 + 4k + 4)`` (10 ms hop) of that
  stream's wave (resampled to the layout's rate first if needed), as dMel bins; audio past the end of the wave is
  digital silence;
* text: every word is placed in the micro-turn in which it starts; its tokens queue up and fill that stream's
  slots in order, spilling into later micro-turns when a micro-turn has more tokens than slots; unused slots hold
  the ``<pad>`` token (the model learns when *not* to write); background events arrive as text at their time;
  a ``delegate`` event in ``meta["events"]`` puts ``<delegate> query </delegate>`` on its speaker's text stream
  at its time, like a word (what the model writes, not says, to hand a request to the background model);
* the model's own streams lead by ``layout.model_lead_turns`` (default 1): its slots of micro-turn ``t`` hold its
  reference audio and text of micro-turn ``t + lead`` (mel frames shifted by ``lead * 20``, word times by
  ``-lead * 0.2`` s; a word starting in the first ``lead`` micro-turns lands in micro-turn 0, audio there is
  dropped; the last ``lead`` micro-turns are silence / ``<pad>``), because what the model writes in micro-turn
  ``t`` is heard during ``t + 1`` (``tml.eval.clock``);
* video: on micro-turns ``t % video_stride == 0`` the frame showing time ``t * 0.2`` is cut into patches; other
  micro-turns (and micro-turns past the end of the video) leave the patch slots empty (kind PAD).

How each modality's stream becomes positions lives in its spec (``tml.streams.modalities``); this module walks the
micro-turns and the layout's slot runs and assembles what the specs return.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tml.audio.dmel import DMelTokenizer
from tml.streams.episode import Episode
from tml.streams.layout import MicroTurnLayout
from tml.streams.modalities import DENSE_FIELDS, IGNORE_INDEX, LABEL_FIELDS, MODALITIES, ROW_FIELDS, SPEC
from tml.streams.modalities.base import PayloadFields
from tml.text.tokenizer import TextTokenizer


@dataclass
class EpisodeTokens(PayloadFields):
    """One episode (or a run of its micro-turns) as a flat position sequence; n = num_turns * layout.length.

    kind, stream, micro_turn: int64 [n]; ``payload``: each modality's payload fields and labels by name
    (``tml.streams.modalities``), read as attributes too: text_ids int64 [n]; audio_bins int64 [n_audio, S, C];
    patches uint8 [n_patch, P, P, 3]; patch_rc int64 [n_patch, 2]; heard_text int64 [n]. ``dropped_text`` counts
    payload items (text tokens) that did not fit before the episode ended.
    """

    key: str
    num_turns: int
    kind: torch.Tensor
    stream: torch.Tensor
    micro_turn: torch.Tensor
    payload: dict[str, torch.Tensor]
    dropped_text: int = 0

    def __post_init__(self):
        self.payload = dict(self.payload)  # its own dict: setting tok.<field> never reaches another EpisodeTokens

    @property
    def turn_length(self) -> int:
        return self.kind.numel() // max(self.num_turns, 1)

    def slice_turns(self, t0: int, t1: int) -> "EpisodeTokens":
        """Micro-turns ``[t0, t1)`` as their own sequence, micro-turn indices restarting at 0."""
        n = self.turn_length
        p0, p1 = t0 * n, t1 * n
        payload = {f: self.payload[f][p0:p1] for f in (*DENSE_FIELDS, *LABEL_FIELDS) if f in self.payload}
        for m in MODALITIES:  # row payloads: the rows of this kind's positions before p0 and p1
            if not m.dense:
                r0, r1 = (int((self.kind[:p] == m.kind).sum()) for p in (p0, p1))
                payload.update({f: self.payload[f][r0:r1] for f in m.fields})
        return EpisodeTokens(key=self.key, num_turns=t1 - t0, kind=self.kind[p0:p1], stream=self.stream[p0:p1],
                             micro_turn=self.micro_turn[p0:p1] - t0, payload=payload)


def interleave(episode: Episode, layout: MicroTurnLayout, dmel: DMelTokenizer, text: TextTokenizer) -> EpisodeTokens:
    """Episode -> EpisodeTokens in the layout's fixed slot order (see module docstring)."""
    T = layout.num_turns(episode.duration)
    # Each slot run's stream as positions, per micro-turn, from its modality's spec.
    runs, dropped = [], 0
    for slot in layout.slots:
        turns, d = SPEC[slot.kind].encode(episode, slot, layout, dmel, text, T)
        runs.append(turns)
        dropped += d

    kind, stream, turn = [], [], []
    dense = {f: [] for f in DENSE_FIELDS}
    labels = {f: [] for f in LABEL_FIELDS}
    rows = {f: [] for f in ROW_FIELDS}
    for t in range(T):
        for slot, turns in zip(layout.slots, runs):
            k, payload = turns[t]
            c = slot.count
            kind.append(torch.full((c,), int(k), dtype=torch.int64))
            stream.append(torch.full((c,), int(slot.stream), dtype=torch.int64))
            turn.append(torch.full((c,), t, dtype=torch.int64))
            for f in DENSE_FIELDS:  # 0 off the positions of the field's kind
                dense[f].append(payload.get(f, torch.zeros(c, dtype=torch.int64)))
            for f in LABEL_FIELDS:  # no label off the positions that have one
                labels[f].append(payload.get(f, torch.full((c,), IGNORE_INDEX, dtype=torch.int64)))
            for f in ROW_FIELDS:
                if f in payload:
                    rows[f].append(payload[f])

    long = torch.zeros(0, dtype=torch.int64)
    empty = {f: e for m in MODALITIES for f, e in m.empty(layout.cfg).items()}
    cat = lambda xs, e: torch.cat(xs) if xs else e  # noqa: E731
    payload = {**{f: cat(v, long) for f, v in {**dense, **labels}.items()},
               **{f: cat(v, empty[f]) for f, v in rows.items()}}
    return EpisodeTokens(key=episode.key, num_turns=T, kind=cat(kind, long), stream=cat(stream, long),
                         micro_turn=cat(turn, long), payload=payload, dropped_text=dropped)
