"""The ``Episode`` record: one time-aligned conversation with every stream on one clock (seconds from 0).

On disk an episode is one webdataset sample (``to_sample`` / ``from_sample``)::

    KEY.user.wav    16-bit PCM mono at ``sample_rate`` (what the user says)
    KEY.model.wav   16-bit PCM mono at ``sample_rate`` (what the model should say)
                    (either may instead be KEY.user.npy / KEY.model.npy: float32 [samples], lossless)
    KEY.video.npy   uint8 [frames, H, W, 3] at ``video_fps`` (optional)
    KEY.NAME.wav    any further audio stream NAME (optional; e.g. a second user channel), like KEY.user.wav
    KEY.NAME.npy    any other array NAME a modality reads (optional, ``Episode.arrays[NAME]``; its spec in
                    ``tml.streams.modalities`` says what it holds and on which clock)
    KEY.json        {"key", "duration", "sample_rate", "video_fps", "words": {"user": [...], "model": [...]},
                     "background": [{"time", "text"}], "meta": {...}}

Words carry ``text``, ``start`` and ``end`` in seconds; ``meta`` holds anything else a generator wants to keep
(voices, provenance) and the event labels that evaluation reads.

Event labels: ``meta["events"]`` is a list of ``{"type", "time", ...}`` dicts sorted by ``time`` (seconds)::

    utterance_start / utterance_end   speaker, text, kind (turn | backchannel | delegate | answer | ...)
    interruption      the user barges in: speaker="user", target="model", stop_by (time the model must be
                      silent by, seconds)
    non_interruption  a cough / false start / backchannel during model speech after which the model goes on:
                      speaker, what ("cough" | "false_start" | "backchannel")
    pause             silence inside one utterance that is not a turn end: speaker, end
    expected_response the model should start speaking in [time, by]: speaker="model", by, reason
    wait_request      the user asks the model to stay quiet until ``until`` (the user's go-ahead); ``quiet_from``
                      (optional, default ``time``): when the quiet starts, after the model's acknowledgement
    timer             a time-aware task: target (time the model should speak), tolerance
    visual            a video event the model should react to: what ("wall_hit" | "square_appears"), answer
    background_result a background-model result arrives: text
    delegate          the model hands ``query`` to the background model: speaker, query. Not spoken: ``interleave``
                      writes ``<delegate> query </delegate>`` on that speaker's text stream at ``time``

Readers must ignore types they do not know.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from tml.audio.wav import AudioFormatError, decode_wav, encode_wav

AUDIO_STREAMS = ("user", "model")  # every episode has these; further audio streams are optional


class EpisodeError(ValueError):
    """A stored episode is malformed; the message names the sample key and the field, ``reason`` is a short code
    (``bad_json``, ``unreadable_audio``, ``wrong_sample_rate``, ``bad_video``, ...) that loaders count by."""

    def __init__(self, message: str, reason: str = "malformed"):
        super().__init__(message)
        self.reason = reason


@dataclass
class Word:
    text: str
    start: float
    end: float


@dataclass
class BackgroundEvent:
    """A background-model result that arrives at ``time`` seconds and is read as text."""

    time: float
    text: str


@dataclass
class Episode:
    key: str
    duration: float
    sample_rate: int
    audio: dict[str, torch.Tensor]  # "user" / "model" (and any further stream) -> float32 [samples] at sample_rate
    words: dict[str, list[Word]] = field(default_factory=dict)  # "user" / "model" -> words with times
    video: torch.Tensor | None = None  # uint8 [frames, H, W, 3]
    video_fps: float = 5.0
    background: list[BackgroundEvent] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)  # any other stream a modality reads, by name

    def to_sample(self) -> dict[str, Any]:
        """Episode -> webdataset sample dict (``__key__`` plus one bytes entry per file)."""
        info = {
            "key": self.key,
            "duration": self.duration,
            "sample_rate": self.sample_rate,
            "video_fps": self.video_fps,
            "words": {s: [asdict(w) for w in ws] for s, ws in self.words.items()},
            "background": [asdict(e) for e in self.background],
            "meta": self.meta,
        }
        sample: dict[str, Any] = {"__key__": self.key, "json": json.dumps(info).encode()}
        for s in (*AUDIO_STREAMS, *(s for s in self.audio if s not in AUDIO_STREAMS)):
            sample[f"{s}.wav"] = encode_wav(self.audio[s], self.sample_rate)
        arrays = {"video": self.video.to(torch.uint8)} if self.video is not None else {}
        for name, arr in {**arrays, **self.arrays}.items():
            buf = io.BytesIO()
            np.save(buf, arr.numpy())
            sample[f"{name}.npy"] = buf.getvalue()
        return sample

    @classmethod
    def from_sample(cls, sample: dict[str, Any]) -> "Episode":
        """webdataset sample dict (raw bytes per extension) -> Episode. Raises EpisodeError naming the sample."""
        key = sample.get("__key__", "<unknown>")
        where = f"{sample.get('__url__', '<stream>')}:{key}"
        if "json" not in sample:
            raise EpisodeError(f"sample {where} has no .json metadata", "bad_json")
        try:
            info = json.loads(sample["json"])
            sr = int(info.get("sample_rate", 16000))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError, AttributeError) as e:
            raise EpisodeError(f"sample {where}: .json is not valid episode JSON ({e})", "bad_json") from e
        audio = {}
        extra = [k[: -len(".wav")] for k in sample if k.endswith(".wav") and k[: -len(".wav")] not in AUDIO_STREAMS]
        for s in (*AUDIO_STREAMS, *extra):
            if s in AUDIO_STREAMS and f"{s}.npy" in sample:  # float32 [samples], lossless (e.g. after resampling)
                try:
                    arr = np.load(io.BytesIO(sample[f"{s}.npy"]), allow_pickle=False)
                except (ValueError, OSError, EOFError) as e:
                    raise EpisodeError(f"sample {where}.{s}.npy: not a readable .npy ({e})", "unreadable_audio") from e
                if arr.ndim != 1 or arr.dtype.kind != "f":
                    raise EpisodeError(f"sample {where}.{s}.npy must be float [samples], got {arr.dtype} {arr.shape}",
                                       "unreadable_audio")
                audio[s] = torch.from_numpy(arr.astype(np.float32))
                continue
            name = f"{s}.wav"
            if name not in sample:
                raise EpisodeError(f"sample {where} has no {name}", "unreadable_audio")
            try:
                w, file_sr = decode_wav(sample[name], f"{where}.{name}")
            except AudioFormatError as e:
                raise EpisodeError(str(e), "unreadable_audio") from e
            if file_sr != sr:
                raise EpisodeError(f"sample {where}.{name} is at {file_sr} Hz but its .json says {sr} Hz",
                                   "wrong_sample_rate")
            audio[s] = w.mean(0)
        video = None
        if "video.npy" in sample:
            try:
                arr = np.load(io.BytesIO(sample["video.npy"]), allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise EpisodeError(f"sample {where}.video.npy: not a readable .npy ({e})", "bad_video") from e
            if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
                raise EpisodeError(f"sample {where}.video.npy must be uint8 [frames, H, W, 3], got "
                                   f"{arr.dtype} {arr.shape}", "bad_video")
            video = torch.from_numpy(arr.copy())
        arrays = {}
        for name in sample:
            stem = name[: -len(".npy")]
            if name.endswith(".npy") and stem not in (*AUDIO_STREAMS, "video"):
                try:
                    arrays[stem] = torch.from_numpy(np.load(io.BytesIO(sample[name]), allow_pickle=False).copy())
                except (ValueError, OSError, EOFError) as e:
                    raise EpisodeError(f"sample {where}.{name}: not a readable .npy ({e})", "bad_array") from e
        try:
            return cls(
                key=key,
                duration=float(info["duration"]),
                sample_rate=sr,
                audio=audio,
                words={s: [Word(**w) for w in ws] for s, ws in info.get("words", {}).items()},
                video=video,
                video_fps=float(info.get("video_fps", 5.0)),
                background=[BackgroundEvent(**e) for e in info.get("background", [])],
                meta=info.get("meta", {}),
                arrays=arrays,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise EpisodeError(f"sample {where}: malformed .json field ({e})", "bad_json") from e
