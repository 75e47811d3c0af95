"""16-bit PCM WAV reading and writing with the standard library (no codec dependency)."""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np
import torch


class AudioFormatError(ValueError):
    """An audio file or buffer is not what the pipeline expects; the message names it."""


def encode_wav(wave_: torch.Tensor, sample_rate: int) -> bytes:
    """Float wave ``[samples]`` (mono) or ``[channels, samples]`` in [-1, 1] -> 16-bit PCM WAV bytes."""
    w = wave_.detach().to(torch.float32)
    if w.ndim == 1:
        w = w[None]
    if w.ndim != 2:
        raise AudioFormatError(f"expected [samples] or [channels, samples], got shape {tuple(wave_.shape)}")
    pcm = (w.clamp(-1, 1) * 32767.0).round().to(torch.int16).T.contiguous().numpy()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as f:
        f.setnchannels(w.shape[0])
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())
    return buf.getvalue()


def decode_wav(data: bytes, name: str = "<bytes>") -> tuple[torch.Tensor, int]:
    """16-bit PCM WAV bytes -> (float32 ``[channels, samples]`` in [-1, 1], sample_rate)."""
    try:
        with wave.open(io.BytesIO(data), "rb") as f:
            if f.getsampwidth() != 2:
                raise AudioFormatError(f"{name}: {8 * f.getsampwidth()}-bit WAV; tml reads 16-bit PCM")
            ch, sr, n = f.getnchannels(), f.getframerate(), f.getnframes()
            raw = f.readframes(n)
        if len(raw) != n * ch * 2:  # the header promises more frames than the file holds
            raise AudioFormatError(f"{name}: truncated WAV ({len(raw)} bytes of data, header says {n * ch * 2})")
        pcm = np.frombuffer(raw, dtype="<i2")
    except (wave.Error, EOFError, ValueError) as e:
        if isinstance(e, AudioFormatError):
            raise
        raise AudioFormatError(f"{name}: not a readable WAV file ({e})") from e
    w = torch.from_numpy(pcm.astype(np.float32) / 32768.0).reshape(-1, ch).T.contiguous()
    return w, sr


def write_wav(path: str | Path, wave_: torch.Tensor, sample_rate: int) -> None:
    Path(path).write_bytes(encode_wav(wave_, sample_rate))


def read_wav(path: str | Path) -> tuple[torch.Tensor, int]:
    return decode_wav(Path(path).read_bytes(), str(path))
