"""Speech activity as a listener's voice-activity detector hears it: the one decision "is this stream speaking?".

Default: Silero VAD (the ``silero-vad`` package; its TorchScript weights ship inside the package, nothing is
downloaded), run with the package's own ``get_speech_timestamps`` and its default settings (speech probability
0.5, speech runs >= 250 ms, silences >= 100 ms split, 30 ms padding), on 16 kHz audio. That is what
Full-Duplex-Bench v1.5 runs (``get_timing.py``, ``eval_backchannel.py``), so activity here and there agree.

Fallback ``method="logmel"``: a 10 ms frame is speech when its mean log10-mel exceeds ``logmel_threshold``
(``tml.eval.duplex.speech_activity``). It is cheap and exact on clean synthetic audio but counts any loud sound as
speech: a constant noise floor at -20 dB is "speech" to it and silence to Silero (``tests/test_vad.py``).

    segs = speech_segments(wave, 16000)          # [(0.0, 0.8), (0.9, 2.1)] seconds
    act = activity(wave, 16000, frame_s=0.01)    # bool [frames], True where a frame's centre is inside a segment
    segs_each = speech_segments_many([a, b, c], 16000)   # the same for many waves, Silero run on all at once

Many waves (an evaluation's episodes): ``speech_segments_many`` runs Silero on all of them as one batch, each row
with its own recurrent state, and applies the package's own decision rule (``get_speech_timestamps_from_probs``,
what ``get_speech_timestamps`` calls) per wave. A batched model call rounds its speech probabilities differently
from a batch of one (up to ~1e-6 here), so a window within that of a threshold could be decided differently; the
segments are otherwise those of ``speech_segments`` (tested).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torchaudio.functional as AF

VAD_SAMPLE_RATE = 16000  # Silero runs at 8 or 16 kHz; FD-bench resamples everything to 16 kHz first


class VADError(ValueError):
    """Bad input to the VAD or a VAD that cannot be loaded; the message says what to change."""


@dataclass
class VADConfig:
    method: str = "silero"  # silero | logmel (documented fallback: counts loud noise as speech)
    threshold: float = 0.5  # silero: speech probability above which a 32 ms window is speech
    min_speech_ms: int = 250  # silero: shorter speech runs are dropped
    min_silence_ms: int = 100  # silero: a speech run ends after this much silence
    speech_pad_ms: int = 30  # silero: each run is padded by this much on both sides
    logmel_threshold: float = -5.0  # logmel: mean log10-mel above which a 10 ms frame is speech

    def validate(self) -> "VADConfig":
        if self.method not in ("silero", "logmel"):
            raise VADError(f"vad.method={self.method!r}: choose silero or logmel")
        if not 0.0 < self.threshold < 1.0:
            raise VADError(f"vad.threshold={self.threshold}: a speech probability in (0, 1)")
        return self


@functools.lru_cache(maxsize=1)
def silero_model():
    """The packaged Silero VAD TorchScript model, loaded once per process (no network)."""
    try:
        import silero_vad
    except ImportError as e:  # pragma: no cover - the locked environment has it
        raise VADError("silero-vad is not installed: install the locked environment (make setup), or use "
                       "vad.method=logmel") from e
    return silero_vad.load_silero_vad(onnx=False)


def _mono16k(wave: torch.Tensor, sample_rate: int) -> torch.Tensor:
    if wave.ndim == 2:
        wave = wave.mean(0)
    if wave.ndim != 1 or not wave.is_floating_point():
        raise VADError(f"VAD expects a float wave [samples] or [channels, samples], got {wave.dtype} "
                       f"{tuple(wave.shape)}")
    if sample_rate != VAD_SAMPLE_RATE:
        wave = AF.resample(wave.float(), sample_rate, VAD_SAMPLE_RATE)
    return wave.float()


def merge_segments(segments: list[tuple[float, float]], gap_s: float) -> list[tuple[float, float]]:
    """Join segments separated by at most ``gap_s`` (sorted first), as FD-bench v1.5 ``get_timing.py`` does."""
    merged: list[tuple[float, float]] = []
    for s, e in sorted(segments):
        if merged and s - merged[-1][1] <= gap_s:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def speech_segments(wave: torch.Tensor, sample_rate: int, cfg: VADConfig | None = None) -> list[tuple[float, float]]:
    """[(start_s, end_s)] of speech in ``wave`` (float [samples] or [channels, samples] at ``sample_rate``)."""
    cfg = (cfg or VADConfig()).validate()
    x = _mono16k(wave, sample_rate)
    if x.numel() == 0:
        return []
    if cfg.method == "logmel":
        from tml.audio.dmel import DMelTokenizer
        from tml.eval.duplex import _runs, speech_activity

        dmel = DMelTokenizer()  # default front end: 16 kHz, 10 ms hop
        hop = dmel.cfg.hop_length / VAD_SAMPLE_RATE
        act = speech_activity(dmel.log_mel(x), cfg.logmel_threshold)
        end = x.numel() / VAD_SAMPLE_RATE
        return [(s * hop, min(e * hop, end)) for s, e in _runs(act)]
    from silero_vad import get_speech_timestamps

    with torch.no_grad():
        ts = get_speech_timestamps(x, silero_model(), threshold=cfg.threshold, sampling_rate=VAD_SAMPLE_RATE,
                                   min_speech_duration_ms=cfg.min_speech_ms,
                                   min_silence_duration_ms=cfg.min_silence_ms, speech_pad_ms=cfg.speech_pad_ms)
    return [(t["start"] / VAD_SAMPLE_RATE, t["end"] / VAD_SAMPLE_RATE) for t in ts]


SILERO_WINDOW = 512  # samples per Silero call at 16 kHz (``get_speech_timestamps``'s window)


def speech_segments_many(waves: list[torch.Tensor], sample_rate: int, cfg: VADConfig | None = None
                         ) -> list[list[tuple[float, float]]]:
    """``speech_segments`` of each wave (float [samples] or [channels, samples] at ``sample_rate``), Silero run on
    all of them at once: one [len(waves), 512] window per model call, each row its own recurrent state (rows past
    their wave's end read zeros, discarded), then the package's decision rule per wave, with the settings
    ``speech_segments`` passes. ``logmel``: per wave, as ``speech_segments``."""
    cfg = (cfg or VADConfig()).validate()
    if cfg.method == "logmel" or len(waves) < 2:
        return [speech_segments(w, sample_rate, cfg) for w in waves]
    from silero_vad.utils_vad import get_speech_timestamps_from_probs

    xs = [_mono16k(w, sample_rate) for w in waves]
    windows = [-(-x.numel() // SILERO_WINDOW) for x in xs]  # get_speech_timestamps zero-pads the last window
    batch = torch.zeros(len(xs), max(windows) * SILERO_WINDOW)
    for i, x in enumerate(xs):
        batch[i, : x.numel()] = x
    model = silero_model()
    with torch.no_grad():
        model.reset_states()
        probs = torch.stack([model(batch[:, j : j + SILERO_WINDOW], VAD_SAMPLE_RATE)[:, 0]
                             for j in range(0, batch.shape[1], SILERO_WINDOW)], 1) if batch.shape[1] else \
            torch.zeros(len(xs), 0)
        model.reset_states()  # the next single-wave call starts from batch 1, as get_speech_timestamps does anyway
    out = []
    for x, n, p in zip(xs, windows, probs):
        ts = get_speech_timestamps_from_probs(p[:n].tolist(), sampling_rate=VAD_SAMPLE_RATE, threshold=cfg.threshold,
                                              min_speech_duration_ms=cfg.min_speech_ms,
                                              min_silence_duration_ms=cfg.min_silence_ms,
                                              speech_pad_ms=cfg.speech_pad_ms, audio_length_samples=x.numel()) \
            if x.numel() else []
        out.append([(t["start"] / VAD_SAMPLE_RATE, t["end"] / VAD_SAMPLE_RATE) for t in ts])
    return out


def segments_to_frames(segments: list[tuple[float, float]], n_frames: int, frame_s: float) -> torch.Tensor:
    """bool [n_frames]: frame i (covering [i, i+1) * frame_s) is active when its centre lies inside a segment."""
    centres = (torch.arange(n_frames, dtype=torch.float64) + 0.5) * frame_s
    act = torch.zeros(n_frames, dtype=torch.bool)
    for s, e in segments:
        act |= (centres >= s) & (centres < e)
    return act


def activity(wave: torch.Tensor, sample_rate: int, frame_s: float = 0.01, cfg: VADConfig | None = None,
             n_frames: int | None = None) -> torch.Tensor:
    """bool [n_frames] speech activity on a ``frame_s`` clock (0.01 = the mel clock of ``tml.eval.duplex``,
    0.2 = one value per micro-turn); ``n_frames`` defaults to the whole wave, ceil(duration / frame_s)."""
    segs = speech_segments(wave, sample_rate, cfg)
    if n_frames is None:
        n_frames = math.ceil(round(wave.shape[-1] / sample_rate / frame_s, 6))
    return segments_to_frames(segs, n_frames, frame_s)
