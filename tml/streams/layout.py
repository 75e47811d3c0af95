"""The micro-turn clock and the fixed per-micro-turn slot layout.

Time is cut into micro-turns of ``micro_turn_ms`` (200 ms). Every micro-turn becomes the same fixed run of
positions: first the input slots (what the model reads in that micro-turn), then the output slots (what it
writes). The default (tiny) layout is::

    [user audio x5][video patch x4][background text x2] -> [model text x4][model audio x5]

One audio position stacks ``frames_per_audio_position`` mel frames (4 x 10 ms = 40 ms), so a 200 ms micro-turn
holds exactly 5 audio positions per audio stream. A fixed layout gives constant cost per micro-turn, which is
what streaming inference needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

from tml.errors import ConfigError  # re-exported: tml.streams.ConfigError is the same class

if TYPE_CHECKING:
    from tml.streams.modalities import Kind


class Stream(IntEnum):
    """Who a position belongs to. Only MODEL positions are ever prediction targets."""

    USER = 0
    MODEL = 1
    BACKGROUND = 2
    VIDEO = 3


@dataclass
class SlotConfig:
    """A run of ``count`` consecutive slots of one stream and modality inside a micro-turn."""

    stream: str = "user"  # user | model | background | video
    kind: str = "audio"  # a modality's name (tml.streams.modalities): text | audio | patch
    count: int = 5


def _default_slots() -> list[SlotConfig]:
    return [
        SlotConfig("user", "audio", 5),
        SlotConfig("video", "patch", 4),
        SlotConfig("background", "text", 2),
        SlotConfig("model", "text", 4),
        SlotConfig("model", "audio", 5),
    ]


@dataclass
class LayoutConfig:
    """Clock, audio framing, video framing and the slot order of one micro-turn.

    Input slots must come before output (model) slots: within a micro-turn the model first reads, then writes.
    """

    micro_turn_ms: int = 200
    sample_rate: int = 16000
    mel_hop_ms: int = 10
    frames_per_audio_position: int = 4
    n_mels: int = 80
    dmel_bins: int = 16
    patch_size: int = 40
    frame_height: int = 80
    frame_width: int = 80
    video_stride: int = 1  # a video frame every `video_stride` micro-turns
    frame_fit: str = "resize"  # frames of another size: "resize" (stretch) or "pad" (keep aspect, letterbox)
    # Training alignment of the model's own streams. The output of micro-turn t is heard during t + 1
    # (tml.eval.clock), so with 1 its output slots of micro-turn t carry the reference text/audio of micro-turn
    # t + 1: the model learns to say now what is due when it will be heard, from input that ended before it (as
    # causal duplex models such as Moshi align data), and on the playback clock it speaks when the reference
    # speaker did. 0 is the old alignment (same micro-turn): every reply is heard a micro-turn late.
    model_lead_turns: int = 1
    slots: list[SlotConfig] = field(default_factory=_default_slots)


@dataclass(frozen=True)
class Slot:
    stream: Stream
    kind: Kind
    count: int


class MicroTurnLayout:
    """Resolved, validated layout: slot runs, offsets, and per-position stream/kind of one micro-turn."""

    def __init__(self, cfg: LayoutConfig):
        from tml.streams.modalities import Kind  # here, not at the top: the modality specs import this module

        self.cfg = cfg
        self._validate(cfg)
        self.slots = [Slot(Stream[s.stream.upper()], Kind[s.kind.upper()], s.count) for s in cfg.slots]
        self.length = sum(s.count for s in self.slots)
        self.kinds: list[Kind] = [s.kind for s in self.slots for _ in range(s.count)]
        self.streams: list[Stream] = [s.stream for s in self.slots for _ in range(s.count)]

    @staticmethod
    def _validate(cfg: LayoutConfig) -> None:
        if cfg.micro_turn_ms <= 0:
            raise ConfigError(f"layout.micro_turn_ms={cfg.micro_turn_ms}: must be positive (default 200)")
        if cfg.mel_hop_ms <= 0 or cfg.frames_per_audio_position <= 0:
            raise ConfigError("layout.mel_hop_ms and layout.frames_per_audio_position must be positive")
        pos_ms = cfg.mel_hop_ms * cfg.frames_per_audio_position
        if cfg.micro_turn_ms % pos_ms:
            raise ConfigError(
                f"layout.micro_turn_ms={cfg.micro_turn_ms} is not a multiple of the audio position length "
                f"layout.mel_hop_ms*layout.frames_per_audio_position={pos_ms} ms; pick e.g. micro_turn_ms="
                f"{max(1, round(cfg.micro_turn_ms / pos_ms)) * pos_ms}"
            )
        if (cfg.sample_rate * cfg.mel_hop_ms) % 1000:
            raise ConfigError(f"layout.mel_hop_ms={cfg.mel_hop_ms} is not a whole number of samples at "
                              f"layout.sample_rate={cfg.sample_rate}")
        for key in ("frame_height", "frame_width"):
            size = getattr(cfg, key)
            if size <= 0 or size % cfg.patch_size:
                raise ConfigError(
                    f"layout.patch_size={cfg.patch_size} does not divide layout.{key}={size}; use a {key} that "
                    f"is a multiple of {cfg.patch_size} (frames are resized to it)"
                )
        if cfg.frame_fit not in ("resize", "pad"):
            raise ConfigError(f"layout.frame_fit={cfg.frame_fit!r}: choose resize or pad")
        if cfg.model_lead_turns < 0:
            raise ConfigError(f"layout.model_lead_turns={cfg.model_lead_turns}: must be >= 0 (1 matches the "
                              f"playback clock, 0 is the old same-micro-turn alignment)")
        if cfg.video_stride < 1:
            raise ConfigError(f"layout.video_stride={cfg.video_stride}: must be >= 1")
        from tml.streams.modalities import MODALITIES  # here, not at the top: the specs import this module

        by_name = {m.name: m for m in MODALITIES}
        seen_output = False
        seen = set()
        for i, s in enumerate(cfg.slots):
            where = f"layout.slots[{i}]"
            if s.stream.upper() not in Stream.__members__:
                raise ConfigError(f"{where}.stream={s.stream!r}: choose one of user, model, background, video")
            if s.kind.lower() not in by_name:
                raise ConfigError(f"{where}.kind={s.kind!r}: choose one of {', '.join(by_name)}")
            if s.count <= 0:
                raise ConfigError(f"{where}.count={s.count}: must be positive")
            key = (s.stream, s.kind)
            if key in seen:
                raise ConfigError(f"{where}: stream {s.stream!r} has two runs of kind {s.kind!r}; merge them")
            seen.add(key)
            for m in by_name.values():  # each modality's own rule for a slot run (count, which streams)
                m.check_slot(cfg, s, where)
            if s.stream == "model":
                seen_output = True
            elif seen_output:
                raise ConfigError(f"{where}: input slot ({s.stream}) after an output slot; input slots come "
                                  f"first in a micro-turn")
        if not seen_output:
            raise ConfigError("layout.slots has no model (output) slots: nothing to train")

    # -- clock -------------------------------------------------------------------------------------------
    @property
    def hop_samples(self) -> int:
        return self.cfg.sample_rate * self.cfg.mel_hop_ms // 1000

    @property
    def frames_per_turn(self) -> int:
        """Mel frames per micro-turn (20 at 200 ms / 10 ms)."""
        return self.cfg.micro_turn_ms // self.cfg.mel_hop_ms

    @property
    def samples_per_turn(self) -> int:
        return self.cfg.sample_rate * self.cfg.micro_turn_ms // 1000

    def turn_of(self, t_seconds: float) -> int:
        """Micro-turn index that contains time ``t_seconds`` (turn t covers [t*0.2, (t+1)*0.2) s)."""
        return int(t_seconds * 1000 // self.cfg.micro_turn_ms)

    def num_turns(self, duration_s: float) -> int:
        """Whole micro-turns in an episode of ``duration_s`` seconds (a trailing partial turn is dropped)."""
        return int(round(duration_s * 1000, 6) // self.cfg.micro_turn_ms)

    def count(self, stream: Stream, kind: Kind) -> int:
        """Slots per micro-turn of (stream, kind); 0 if the layout has none."""
        return sum(s.count for s in self.slots if s.stream == stream and s.kind == kind)

    def offset(self, stream: Stream, kind: Kind) -> int:
        """Index of the first slot of (stream, kind) inside a micro-turn."""
        off = 0
        for s in self.slots:
            if s.stream == stream and s.kind == kind:
                return off
            off += s.count
        raise KeyError(f"layout has no {stream.name.lower()} {kind.name.lower()} slots")

    def describe(self) -> str:
        parts = [f"[{s.stream.name.lower()} {s.kind.name.lower()} x{s.count}]" for s in self.slots]
        return "".join(parts)
