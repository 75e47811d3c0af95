"""Content checks of a decoded ``Episode`` before it is tokenised: what a reader cannot see from the file format.

Each failed check raises ``EpisodeError`` with a short ``reason`` code (the loader counts bad samples by it) and a
message naming the sample and the field:

    wrong_sample_rate   the episode is not at the layout's rate and ``data.loader.resample=false``
    nonfinite_audio     NaN or inf in a wave
    length_mismatch     a wave's length differs from ``duration`` (or from the other wave) by more than
                        ``data.loader.length_tolerance_s``; also a video shorter than the episode by more than that
    empty_text          a word (or background event) with no text
    mistimed_text       a word time that is not finite, negative, ends before it starts, or lies past the end
    bad_duration        duration not finite or not positive
"""

from __future__ import annotations

import math

import torch

from tml.streams.episode import Episode, EpisodeError


def check_episode(ep: Episode, sample_rate: int, resample: bool = True, tolerance_s: float = 0.2) -> None:
    """Raise EpisodeError (with ``reason``) if ``ep`` cannot be trusted; return None if it can."""
    def bad(reason: str, what: str) -> EpisodeError:
        return EpisodeError(f"sample {ep.key}: {what}", reason)

    if not (math.isfinite(ep.duration) and ep.duration > 0):
        raise bad("bad_duration", f"duration={ep.duration} must be a positive number of seconds")
    if ep.sample_rate != sample_rate and not resample:
        raise bad("wrong_sample_rate", f"audio at {ep.sample_rate} Hz, the layout wants {sample_rate} Hz "
                                       f"(set data.loader.resample=true to resample instead of rejecting)")
    want = ep.duration * ep.sample_rate
    lengths = {}
    for name, w in ep.audio.items():
        if not bool(torch.isfinite(w).all()):
            n = int((~torch.isfinite(w)).sum())
            raise bad("nonfinite_audio", f"{name} audio holds {n} NaN/inf samples")
        lengths[name] = w.numel()
        if abs(w.numel() - want) > tolerance_s * ep.sample_rate:
            raise bad("length_mismatch", f"{name} audio is {w.numel() / ep.sample_rate:.3f} s long but duration is "
                                         f"{ep.duration:.3f} s (tolerance data.loader.length_tolerance_s={tolerance_s})")
    if len(lengths) > 1 and max(lengths.values()) - min(lengths.values()) > tolerance_s * ep.sample_rate:
        raise bad("length_mismatch", f"audio streams differ in length: "
                                     f"{ {k: round(v / ep.sample_rate, 3) for k, v in lengths.items()} } s")
    if ep.video is not None and ep.video.shape[0] < (ep.duration - tolerance_s) * ep.video_fps - 1:
        raise bad("length_mismatch", f"video has {ep.video.shape[0]} frames at {ep.video_fps} fps, too few for "
                                     f"{ep.duration:.3f} s")
    end = ep.duration + tolerance_s
    for stream, words in ep.words.items():
        for i, w in enumerate(words):
            where = f"words.{stream}[{i}] {w.text!r}"
            if not isinstance(w.text, str) or not w.text.strip():
                raise bad("empty_text", f"{where} has no text")
            if not (math.isfinite(w.start) and math.isfinite(w.end)) or w.start < 0 or w.end < w.start \
                    or w.start > end:
                raise bad("mistimed_text", f"{where} has start={w.start}, end={w.end}; need 0 <= start <= end and "
                                           f"start <= duration={ep.duration}")
    for i, e in enumerate(ep.background):
        if not isinstance(e.text, str) or not e.text.strip():
            raise bad("empty_text", f"background[{i}] has no text")
        if not math.isfinite(e.time) or not 0 <= e.time <= end:
            raise bad("mistimed_text", f"background[{i}] time={e.time} lies outside [0, duration={ep.duration}]")
