"""One spec per modality: what the data pipeline knows about text, dMel audio and video patches, in one place.

A spec owns its ``Kind``, the fields that carry its payload (in ``EpisodeTokens`` and ``Batch``), how one stream
of an episode becomes that stream's positions micro-turn by micro-turn (``encode``), and, for a modality the model
writes, the ``Batch`` field of its targets, and how a live stream's input of one micro-turn becomes positions
(``live``, for the streaming session). ``interleave``, ``pack.collate``, ``Batch.validate``,
``EpisodeTokens.slice_turns`` and ``tml.eval.session.StreamingSession`` loop over ``MODALITIES`` / ``SPEC`` instead
of branching on ``Kind``; the model's ``MultimodalEmbedding`` has one embedder per spec, named ``spec.name``.

Payload fields come in two shapes:

* dense: one value per position, ``[n]`` in ``EpisodeTokens`` and ``[B, L]`` in ``Batch``, 0 where the position is
  of another kind (text: ``text_ids``);
* rows: one row per position of the kind, in row-major order of those positions (audio: ``audio_bins`` [N, S, C];
  patches: ``patches`` [N, P, P, 3] and ``patch_rc`` [N, 2]).

Adding a modality: a new spec here (its ``Kind`` member in ``layout.py``, its fields in ``EpisodeTokens`` and
``Batch``), an entry in ``MODALITIES``, and its embedder in ``tml.model.embed.EMBEDDERS`` (README, "Adding a
modality or a head").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torchaudio

from tml.errors import ConfigError
from tml.streams.layout import Kind, LayoutConfig, MicroTurnLayout, Slot, SlotConfig, Stream
from tml.vision.patches import frame_to_patches

if TYPE_CHECKING:
    from tml.audio.dmel import DMelTokenizer
    from tml.streams.episode import Episode
    from tml.text.tokenizer import TextTokenizer

# What ``encode`` returns for one micro-turn of one slot run: the kind its positions get (the spec's kind, or PAD
# when the stream has nothing there, e.g. no video frame) and the payload of those positions per field.
TurnPositions = tuple[Kind, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Modality:
    """Base of the specs. ``name`` is the embedder's module name in ``MultimodalEmbedding`` (so also the checkpoint
    key prefix ``embed.<name>.``); ``fields`` are its payload fields; ``target`` its target field when the model
    writes it (None: input only)."""

    kind: Kind
    name: str
    fields: tuple[str, ...]
    dense: bool
    target: str | None = None

    def check_slot(self, cfg: LayoutConfig, slot: SlotConfig, where: str) -> None:
        """Raise ConfigError (naming ``where``, e.g. ``layout.slots[2]``) if the slot run ``slot`` breaks this
        modality's rule: its count per micro-turn, the streams it may belong to, or that ``slot.stream``'s only
        modality is this one. Every spec sees every slot run."""

    def encode(self, episode: "Episode", slot: Slot, layout: MicroTurnLayout, dmel: "DMelTokenizer",
               text: "TextTokenizer", num_turns: int) -> tuple[list[TurnPositions], int]:
        """One stream of ``episode`` -> per micro-turn (``num_turns`` of them) the positions of ``slot``'s run, and
        how many payload items did not fit before the episode ended (counted, never silently dropped)."""
        raise NotImplementedError

    def live(self, slot: Slot, layout: MicroTurnLayout, dmel: "DMelTokenizer", pad_id: int) -> "LiveInput":
        """A per-session encoder of ``slot``'s run in a live stream: called once per micro-turn with what arrived
        on ``slot.stream`` in it (``None``: nothing), it returns that micro-turn's positions as ``encode`` makes them
        from a recording."""
        raise NotImplementedError(f"modality {self.name!r} has no live input (tml.streams.modality); add live()")

    def empty(self, cfg: LayoutConfig | None = None) -> dict[str, torch.Tensor]:
        """Payload of zero positions (row fields only), with the trailing shape ``cfg`` (default: the tiny layout)
        gives them."""
        return {}

    def shapes(self, batch) -> dict[str, tuple[torch.dtype, tuple[int | None, ...]]]:
        """Field -> (dtype, shape; None = any size) that ``Batch.validate`` checks: this modality's payload and
        targets in ``batch``."""
        B, L = batch.kind.shape
        n, n_t = int((batch.kind == self.kind).sum()), int((batch.target_kind == self.kind).sum())
        out = {f: (torch.int64, (B, L) if self.dense else (n,)) for f in self.fields}
        if self.target is not None:
            out[self.target] = (torch.int64, (B, L) if self.dense else (n_t,))
        return out

    def payload(self, batch) -> tuple[torch.Tensor, ...]:
        """The embedder's inputs from a ``Batch``: the payload of this kind's positions, row-major order."""
        if self.dense:
            mask = batch.kind == self.kind
            return tuple(getattr(batch, f)[mask] for f in self.fields)
        return tuple(getattr(batch, f) for f in self.fields)


class TextModality(Modality):
    """Text streams: token ids, one per slot. Every word (or background result, or delegation span) is placed in the
    micro-turn in which it starts; its tokens queue up and fill the stream's slots in order, spilling into later
    micro-turns; unused slots hold ``<pad>`` (the model learns when not to write)."""

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
        return [(Kind.TEXT, {"text_ids": ids[t]}) for t in range(num_turns)], dropped

    def live(self, slot, layout, dmel, pad_id):
        return LiveText(slot.count, pad_id)


class AudioModality(Modality):
    """Audio streams: dMel bins, one audio position per ``frames_per_audio_position`` mel frames. Audio slot ``k``
    of micro-turn ``t`` holds mel frames ``[t*F + kS, t*F + kS + S)`` (F frames per micro-turn, S per position) of
    the stream's wave, resampled to the layout's rate first; past the end of the wave is digital silence."""

    def check_slot(self, cfg, slot, where):
        audio_per_turn = cfg.micro_turn_ms // (cfg.mel_hop_ms * cfg.frames_per_audio_position)
        if slot.kind == self.name and slot.count != audio_per_turn:
            raise ConfigError(f"{where}.count={slot.count}: an audio stream needs micro_turn_ms / (mel_hop_ms * "
                              f"frames_per_audio_position) = {audio_per_turn} slots per micro-turn")

    def encode(self, episode, slot, layout, dmel, text, num_turns):
        cfg = layout.cfg
        name = slot.stream.name.lower()
        if name not in episode.audio:
            raise KeyError(f"episode {episode.key} has no {name} audio but the layout has {name} audio slots")
        wave = episode.audio[name]
        if episode.sample_rate != cfg.sample_rate:  # recordings at any rate land on the layout's clock
            wave = torchaudio.functional.resample(wave, episode.sample_rate, cfg.sample_rate)
        bins = dmel.encode(wave)
        if slot.stream == Stream.MODEL:  # the model's streams lead (tml.streams.interleave)
            bins = bins[cfg.model_lead_turns * layout.frames_per_turn:]
        need = num_turns * layout.frames_per_turn
        if bins.shape[0] < need:
            bins = torch.cat([bins, dmel.silence_bins(need - bins.shape[0])])
        bins = bins[:need].reshape(num_turns, slot.count, cfg.frames_per_audio_position, cfg.n_mels)
        return [(Kind.AUDIO, {"audio_bins": bins[t]}) for t in range(num_turns)], 0

    def live(self, slot, layout, dmel, pad_id):
        return LiveAudio(slot, layout, dmel)

    def shapes(self, batch):
        S, C = batch.audio_bins.shape[1:] if batch.audio_bins.ndim == 3 else (None, None)
        n, n_t = int((batch.kind == self.kind).sum()), int((batch.target_kind == self.kind).sum())
        return {"audio_bins": (torch.int64, (n, None, None)), "target_audio": (torch.int64, (n_t, S, C))}

    def empty(self, cfg=None):
        cfg = cfg or LayoutConfig()
        return {"audio_bins": torch.zeros(0, cfg.frames_per_audio_position, cfg.n_mels, dtype=torch.int64)}


class PatchModality(Modality):
    """Video: on micro-turns ``t % video_stride == 0`` the frame showing time ``t * micro_turn`` is cut into
    ``patch_size`` patches (RGB uint8 and their (row, col) in the frame); other micro-turns, and micro-turns past the
    end of the video, leave the patch slots empty (kind PAD)."""

    def check_slot(self, cfg, slot, where):
        patches_per_frame = (cfg.frame_height // cfg.patch_size) * (cfg.frame_width // cfg.patch_size)
        if slot.kind == self.name and slot.count != patches_per_frame:
            raise ConfigError(f"{where}.count={slot.count}: a {cfg.frame_height}x{cfg.frame_width} frame cut into "
                              f"{cfg.patch_size}x{cfg.patch_size} patches needs {patches_per_frame} slots")
        if slot.kind == self.name and slot.stream != "video":
            raise ConfigError(f"{where}: patch slots belong to the video stream, not {slot.stream!r}")
        if slot.stream == "video" and slot.kind != self.name:
            raise ConfigError(f"{where}: the video stream only has patch slots")

    def encode(self, episode, slot, layout, dmel, text, num_turns):
        cfg, turn_s = layout.cfg, layout.cfg.micro_turn_ms / 1000.0
        n_frames = 0 if episode.video is None else episode.video.shape[0]
        out: list[TurnPositions] = []
        for t in range(num_turns):
            f = int(t * turn_s * episode.video_fps + 1e-6)
            if t % cfg.video_stride == 0 and f < n_frames:
                p, rc = frame_to_patches(episode.video[f], cfg.patch_size, cfg.frame_height, cfg.frame_width,
                                         cfg.frame_fit)
                out.append((Kind.PATCH, {"patches": p, "patch_rc": rc}))
            else:
                out.append((Kind.PAD, {}))
        return out, 0

    def live(self, slot, layout, dmel, pad_id):
        return LivePatches(layout.cfg)

    def shapes(self, batch):
        n = int((batch.kind == self.kind).sum())
        return {"patches": (torch.uint8, (n, None, None, 3)), "patch_rc": (torch.int64, (n, 2))}

    def empty(self, cfg=None):
        P = (cfg or LayoutConfig()).patch_size
        return {"patches": torch.zeros(0, P, P, 3, dtype=torch.uint8), "patch_rc": torch.zeros(0, 2, dtype=torch.int64)}


TEXT = TextModality(Kind.TEXT, "text", ("text_ids",), dense=True, target="target_text")
AUDIO = AudioModality(Kind.AUDIO, "audio", ("audio_bins",), dense=False, target="target_audio")
PATCH = PatchModality(Kind.PATCH, "patch", ("patches", "patch_rc"), dense=False)

# Every modality, in the order the embedding fills positions. Kind -> spec: ``SPEC[kind]``.
MODALITIES: tuple[Modality, ...] = (TEXT, AUDIO, PATCH)
SPEC: dict[Kind, Modality] = {m.kind: m for m in MODALITIES}
DENSE_FIELDS = tuple(f for m in MODALITIES if m.dense for f in m.fields)
ROW_FIELDS = tuple(f for m in MODALITIES if not m.dense for f in m.fields)


# -- live input: one micro-turn of a stream as it arrives -> its positions (per session, so they keep state) --------

class LiveInput:
    """What ``Modality.live`` returns: ``(value, turn) -> TurnPositions`` for one slot run of one session."""

    def __call__(self, value, turn: int) -> TurnPositions:
        raise NotImplementedError


class LiveText(LiveInput):
    """Token ids arriving in a micro-turn (a list, or None) queue up and fill the run's ``count`` slots, spilling
    into later micro-turns, ``<pad>`` where the queue is empty: ``place_text`` one micro-turn at a time."""

    def __init__(self, count: int, pad_id: int):
        self.count, self.pad_id = count, pad_id
        self.queue: list[int] = []

    def __call__(self, value, turn):
        self.queue.extend(value or [])
        take, self.queue = self.queue[: self.count], self.queue[self.count:]
        return Kind.TEXT, {"text_ids": torch.tensor(take + [self.pad_id] * (self.count - len(take)), dtype=torch.long)}


class LiveLogMel:
    """Log-mel of a live audio stream, one micro-turn at a time: the micro-turn's frames computed from the previous
    micro-turn's samples plus this one's. [samples_per_turn] -> [frames_per_turn, n_mels].

    The final frame's 25 ms window reaches 2.5 ms into the next micro-turn, which a live stream does not have yet: it
    is zero-padded (as the end of a recording is in training), the only difference from offline encoding."""

    def __init__(self, layout: MicroTurnLayout, dmel: "DMelTokenizer"):
        self.layout, self.dmel = layout, dmel
        self.history = torch.zeros(0)

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        segment = torch.cat([self.history, chunk.float()])
        first = self.history.numel() // self.layout.hop_samples
        self.history = chunk.float()
        return self.dmel.log_mel(segment)[first : first + self.layout.frames_per_turn]


class LiveAudio(LiveInput):
    """A micro-turn of a stream's audio: a float wave [samples_per_turn] at the layout's rate (encoded with
    ``LiveLogMel``), or long dMel bins [frames_per_turn, n_mels] already encoded -> the run's positions."""

    def __init__(self, slot: Slot, layout: MicroTurnLayout, dmel: "DMelTokenizer"):
        self.name, self.layout, self.dmel = slot.stream.name.lower(), layout, dmel
        self.live_mel = LiveLogMel(layout, dmel)

    def bins(self, audio: torch.Tensor | None) -> torch.Tensor:
        """This micro-turn's audio -> dMel bins [frames_per_turn, n_mels]."""
        lay, F = self.layout, self.layout.frames_per_turn
        if audio is None:
            raise ValueError(f"no {self.name} audio in this micro-turn's inputs, but the layout has {self.name} audio "
                             f"slots: pass {lay.samples_per_turn} samples (or [{F}, {lay.cfg.n_mels}] dMel bins)")
        if audio.dtype == torch.long:
            if audio.shape != (F, lay.cfg.n_mels):
                raise ValueError(f"{self.name} audio bins must be [{F}, {lay.cfg.n_mels}], got {tuple(audio.shape)}")
            return audio
        n = lay.samples_per_turn
        if audio.ndim != 1 or audio.numel() != n:
            raise ValueError(f"{self.name} audio must be {n} samples ({lay.cfg.micro_turn_ms} ms at "
                             f"{lay.cfg.sample_rate} Hz) per micro-turn, got shape {tuple(audio.shape)}")
        return self.dmel.quantize(self.live_mel(audio))

    def __call__(self, value, turn):
        return Kind.AUDIO, {"audio_bins": self.bins(value).view(-1, self.layout.cfg.frames_per_audio_position,
                                                                 self.layout.cfg.n_mels)}


class LivePatches(LiveInput):
    """A video frame (uint8 [H, W, 3], or None) -> its patches on micro-turns ``turn % video_stride == 0``; other
    micro-turns, and micro-turns without a frame, leave the slots empty (PAD), as ``PatchModality.encode`` does."""

    def __init__(self, cfg: LayoutConfig):
        self.cfg = cfg

    def __call__(self, value, turn):
        c = self.cfg
        if value is None or turn % c.video_stride:
            return Kind.PAD, {}
        p, rc = frame_to_patches(value, c.patch_size, c.frame_height, c.frame_width, c.frame_fit)
        return Kind.PATCH, {"patches": p, "patch_rc": rc}


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


def delegate_span(query: str, text: "TextTokenizer") -> list[int]:
    """``<delegate> query </delegate>`` as token ids: what the model writes to hand ``query`` to the background
    model (``tml.eval.background.DelegationBridge`` reads it back)."""
    return [text.delegate_id, *(i for w in query.split() for i in text.word_ids(w)), text.end_delegate_id]
