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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchaudio

from tml.audio.dmel import DMelTokenizer
from tml.streams.episode import Episode
from tml.streams.layout import Kind, MicroTurnLayout, Stream
from tml.text.tokenizer import TextTokenizer
from tml.vision.patches import frame_to_patches


@dataclass
class EpisodeTokens:
    """One episode (or a run of its micro-turns) as a flat position sequence; n = num_turns * layout.length.

    kind, stream, micro_turn, text_ids: int64 [n]; audio_bins: int64 [n_audio, S, C];
    patches: uint8 [n_patch, P, P, 3]; patch_rc: int64 [n_patch, 2]. ``dropped_text`` counts text tokens that
    did not fit before the episode ended.
    """

    key: str
    num_turns: int
    kind: torch.Tensor
    stream: torch.Tensor
    micro_turn: torch.Tensor
    text_ids: torch.Tensor
    audio_bins: torch.Tensor
    patches: torch.Tensor
    patch_rc: torch.Tensor
    dropped_text: int = 0

    @property
    def turn_length(self) -> int:
        return self.kind.numel() // max(self.num_turns, 1)

    def slice_turns(self, t0: int, t1: int) -> "EpisodeTokens":
        """Micro-turns ``[t0, t1)`` as their own sequence, micro-turn indices restarting at 0."""
        n = self.turn_length
        p0, p1 = t0 * n, t1 * n
        a0, a1 = (int((self.kind[:p] == Kind.AUDIO).sum()) for p in (p0, p1))
        v0, v1 = (int((self.kind[:p] == Kind.PATCH).sum()) for p in (p0, p1))
        return EpisodeTokens(
            key=self.key,
            num_turns=t1 - t0,
            kind=self.kind[p0:p1],
            stream=self.stream[p0:p1],
            micro_turn=self.micro_turn[p0:p1] - t0,
            text_ids=self.text_ids[p0:p1],
            audio_bins=self.audio_bins[a0:a1],
            patches=self.patches[v0:v1],
            patch_rc=self.patch_rc[v0:v1],
        )


def place_text(words: list[tuple[float, list[int]]], num_turns: int, slots: int, turn_s: float,
               pad_id: int) -> tuple[torch.Tensor, int]:
    """Fill ``slots`` text slots per micro-turn from timed token groups.

    Args:
        words: (start time in seconds, token ids) per word or event, any order.
    Returns:
        ids: int64 [num_turns, slots]; dropped: tokens still queued when the episode ended.
    """
    ids = torch.full((num_turns, slots), pad_id, dtype=torch.int64)
    by_turn: dict[int, list[int]] = {}
    for start, toks in sorted(words, key=lambda w: w[0]):
        t = max(0, int(round(start * 1000, 6) // round(turn_s * 1000, 6)))
        by_turn.setdefault(t, []).extend(toks)
    queue: list[int] = []
    for t in range(num_turns):
        queue.extend(by_turn.pop(t, []))
        take, queue = queue[:slots], queue[slots:]
        ids[t, : len(take)] = torch.tensor(take, dtype=torch.int64)
    dropped = len(queue) + sum(len(v) for v in by_turn.values())
    return ids, dropped


def delegate_span(query: str, text: TextTokenizer) -> list[int]:
    """``<delegate> query </delegate>`` as token ids: what the model writes to hand ``query`` to the background
    model (``tml.eval.background.DelegationBridge`` reads it back)."""
    return [text.delegate_id, *(i for w in query.split() for i in text.word_ids(w)), text.end_delegate_id]


def interleave(episode: Episode, layout: MicroTurnLayout, dmel: DMelTokenizer, text: TextTokenizer) -> EpisodeTokens:
    """Episode -> EpisodeTokens in the layout's fixed slot order (see module docstring)."""
    cfg = layout.cfg
    T = layout.num_turns(episode.duration)
    S, C = cfg.frames_per_audio_position, cfg.n_mels
    turn_s = cfg.micro_turn_ms / 1000.0
    lead = cfg.model_lead_turns  # the model's streams are read this many micro-turns ahead (module docstring)

    # Per (stream, kind) payload blocks, each [T, count, ...].
    audio: dict[Stream, torch.Tensor] = {}
    texts: dict[Stream, torch.Tensor] = {}
    dropped = 0
    for slot in layout.slots:
        if slot.kind == Kind.AUDIO:
            name = slot.stream.name.lower()
            if name not in episode.audio:
                raise KeyError(f"episode {episode.key} has no {name} audio but the layout has {name} audio slots")
            wave = episode.audio[name]
            if episode.sample_rate != cfg.sample_rate:  # recordings at any rate land on the layout's clock
                wave = torchaudio.functional.resample(wave, episode.sample_rate, cfg.sample_rate)
            bins = dmel.encode(wave)
            if slot.stream == Stream.MODEL:
                bins = bins[lead * layout.frames_per_turn:]
            need = T * layout.frames_per_turn
            if bins.shape[0] < need:
                bins = torch.cat([bins, dmel.silence_bins(need - bins.shape[0])])
            audio[slot.stream] = bins[:need].reshape(T, slot.count, S, C)
        elif slot.kind == Kind.TEXT:
            if slot.stream == Stream.BACKGROUND:
                groups = [(e.time, [i for w in e.text.split() for i in text.word_ids(w)]) for e in episode.background]
            else:
                name = slot.stream.name.lower()
                groups = [(w.start, text.word_ids(w.text)) for w in episode.words.get(name, [])]
                groups += [(e["time"], delegate_span(e["query"], text)) for e in episode.meta.get("events", [])
                           if e.get("type") == "delegate" and e.get("speaker") == name]
                if slot.stream == Stream.MODEL:
                    groups = [(start - lead * turn_s, ids) for start, ids in groups]
            texts[slot.stream], d = place_text(groups, T, slot.count, turn_s, text.pad_id)
            dropped += d

    kind, stream, turn, text_ids = [], [], [], []
    audio_out, patches_out, rc_out = [], [], []
    n_frames = 0 if episode.video is None else episode.video.shape[0]
    for t in range(T):
        for slot in layout.slots:
            c = slot.count
            k = slot.kind
            ids = torch.zeros(c, dtype=torch.int64)
            if k == Kind.AUDIO:
                audio_out.append(audio[slot.stream][t])
            elif k == Kind.TEXT:
                ids = texts[slot.stream][t]
            elif k == Kind.PATCH:
                f = int(t * turn_s * episode.video_fps + 1e-6)
                if t % cfg.video_stride == 0 and f < n_frames:
                    p, rc = frame_to_patches(episode.video[f], cfg.patch_size, cfg.frame_height, cfg.frame_width,
                                             cfg.frame_fit)
                    patches_out.append(p)
                    rc_out.append(rc)
                else:
                    k = Kind.PAD
            kind.append(torch.full((c,), int(k), dtype=torch.int64))
            stream.append(torch.full((c,), int(slot.stream), dtype=torch.int64))
            turn.append(torch.full((c,), t, dtype=torch.int64))
            text_ids.append(ids)

    P = cfg.patch_size
    cat = lambda xs, empty: torch.cat(xs) if xs else empty  # noqa: E731
    return EpisodeTokens(
        key=episode.key,
        num_turns=T,
        kind=cat(kind, torch.zeros(0, dtype=torch.int64)),
        stream=cat(stream, torch.zeros(0, dtype=torch.int64)),
        micro_turn=cat(turn, torch.zeros(0, dtype=torch.int64)),
        text_ids=cat(text_ids, torch.zeros(0, dtype=torch.int64)),
        audio_bins=cat(audio_out, torch.zeros(0, S, C, dtype=torch.int64)),
        patches=cat(patches_out, torch.zeros(0, P, P, 3, dtype=torch.uint8)),
        patch_rc=cat(rc_out, torch.zeros(0, 2, dtype=torch.int64)),
        dropped_text=dropped,
    )
