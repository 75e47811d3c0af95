"""dMel: log-mel channels discretised into a few uniform intensity bins (Bai et al. 2024).

    wave [samples] --MelSpectrogram--> mel power [frames, n_mels] --log10--> log-mel
         --clip [log_min, log_max]--> n_bins uniform bins --> bin ids [frames, n_mels] in [0, n_bins)

Decoding maps each bin id to its bin centre, so ``decode(encode(x))`` is within half a bin width of the clipped
log-mel everywhere. (The dMel authors' code puts the 16 levels at ``linspace(log_min, log_max, 16)`` and rounds to
the nearest; uniform bins decoded at centres have the same resolution and a simpler exact error bound.)

Range, measured with this front end (HTK mel, no filterbank norm, power 2) on the espeak-ng speech of the 96-episode
synthetic set (peaks ~0.75): cells inside words have log10 mel power median -1.6, 5% / 10% / 90% / 99% quantiles
-5.2 / -4.2 / +0.8 / +1.95, max 3.3; digital silence sits at the ``eps`` floor (-10). So the authors' global
range [-7, 2] fits: silence and the quietest speech cells land in bin 0, the loudest ~0.8% clip to the top bin.

Per-channel ranges fitted to a data set (``fit_channel_ranges``; ``data_prep`` writes them as ``dmel_ranges.json``
beside the shards) spend the 16 bins where each channel's speech actually lies: low channels are louder than high
ones, so one global range wastes bins at both ends. Select them with ``dmel.ranges_file``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchaudio


class DMelError(ValueError):
    """A dMel config or input is invalid; the message names the value and the fix."""


@dataclass
class DMelConfig:
    sample_rate: int = 16000
    n_fft: int = 400
    win_length: int = 400  # 25 ms at 16 kHz
    hop_length: int = 160  # 10 ms at 16 kHz: 100 frames/s
    n_mels: int = 80
    n_bins: int = 16
    log_min: float = -7.0  # log10 mel power range that is kept; outside it is clipped (see module docstring)
    log_max: float = 2.0
    f_min: float = 0.0
    f_max: float | None = None  # None = sample_rate / 2
    eps: float = 1e-10  # power floor before log10, so digital silence is finite (log10 = -10 < log_min)
    ranges_file: str | None = None  # JSON {"log_min": [n_mels], "log_max": [n_mels]} from fit_channel_ranges;
    # None = the global [log_min, log_max] for every channel


def fit_channel_ranges(log_mels: list[torch.Tensor], low_q: float = 0.01, high_q: float = 0.995,
                       floor: float = -9.0) -> dict:
    """Per-channel log-mel ranges from a data set.

    Args:
        log_mels: FloatTensor[frames, n_mels] per recording (``DMelTokenizer.log_mel``).
        low_q, high_q: quantiles of each channel's non-silent cells (above ``floor``) that become its range.
    Returns:
        {"log_min": [n_mels], "log_max": [n_mels], "low_q", "high_q", "frames"} (JSON-ready).
    """
    x = torch.cat([m.reshape(-1, m.shape[-1]) for m in log_mels]).numpy()
    lo, hi = [], []
    for c in range(x.shape[1]):
        v = x[:, c][x[:, c] > floor]
        if v.size < 10:
            raise DMelError(f"channel {c} has only {v.size} non-silent cells; fit on more audio")
        a, b = np.quantile(v, [low_q, high_q])
        lo.append(round(float(a), 4))
        hi.append(round(float(max(b, a + 0.5)), 4))  # keep a usable width even for a near-constant channel
    return {"log_min": lo, "log_max": hi, "low_q": low_q, "high_q": high_q, "frames": int(x.shape[0])}


class DMelTokenizer:
    """Wave <-> dMel bin ids. The mel transform is built once; encode is fully vectorised."""

    def __init__(self, cfg: DMelConfig | None = None):
        cfg = cfg or DMelConfig()
        if cfg.n_bins < 2:
            raise DMelError(f"dmel.n_bins={cfg.n_bins}: need at least 2 bins (default 16)")
        if not cfg.log_max > cfg.log_min:
            raise DMelError(f"dmel.log_min={cfg.log_min} must be below dmel.log_max={cfg.log_max}")
        if cfg.win_length > cfg.n_fft:
            raise DMelError(f"dmel.win_length={cfg.win_length} exceeds dmel.n_fft={cfg.n_fft}")
        f_max = cfg.f_max if cfg.f_max is not None else cfg.sample_rate / 2
        if not 0 <= cfg.f_min < f_max <= cfg.sample_rate / 2:
            raise DMelError(f"dmel.f_min={cfg.f_min}, f_max={f_max}: need 0 <= f_min < f_max <= sample_rate/2")
        self.cfg = cfg
        # center=True gives frames = samples // hop + 1; constant (zero) padding instead of reflect so that
        # any non-empty wave works (reflect needs > n_fft/2 samples) and edges look like silence, as in streaming.
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop_length,
            f_min=cfg.f_min, f_max=f_max, n_mels=cfg.n_mels, power=2.0, center=True, pad_mode="constant",
            norm=None, mel_scale="htk",
        )
        # Per-channel range [C]: the global one, or fitted ranges from cfg.ranges_file.
        lo = torch.full((cfg.n_mels,), float(cfg.log_min))
        hi = torch.full((cfg.n_mels,), float(cfg.log_max))
        if cfg.ranges_file:
            path = Path(cfg.ranges_file)
            try:
                r = json.loads(path.read_text())
                lo, hi = torch.tensor(r["log_min"], dtype=torch.float32), torch.tensor(r["log_max"], dtype=torch.float32)
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise DMelError(f"dmel.ranges_file={cfg.ranges_file}: cannot read per-channel ranges ({e}); make it "
                                f"with `python -m data_prep.fit_dmel --data DIR` or set dmel.ranges_file=null") from e
            if lo.shape != (cfg.n_mels,) or hi.shape != (cfg.n_mels,) or not bool((hi > lo).all()):
                raise DMelError(f"dmel.ranges_file={cfg.ranges_file}: need log_min < log_max, {cfg.n_mels} values each "
                                f"(dmel.n_mels)")
        self.log_lo, self.log_hi = lo, hi
        self.bin_width_c = (hi - lo) / cfg.n_bins  # [C]
        self.bin_width = (cfg.log_max - cfg.log_min) / cfg.n_bins

    @property
    def bin_centers(self) -> torch.Tensor:
        """FloatTensor[n_bins] (global range) or [n_bins, n_mels] (per-channel ranges): what each bin id decodes to."""
        k = torch.arange(self.cfg.n_bins, dtype=torch.float32) + 0.5
        if not self.cfg.ranges_file:
            return self.cfg.log_min + k * self.bin_width
        return self.log_lo + k[:, None] * self.bin_width_c

    def num_frames(self, samples: int) -> int:
        return samples // self.cfg.hop_length + 1

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """FloatTensor[samples] at ``sample_rate`` -> log10 mel power FloatTensor[frames, n_mels], floored at
        log10(eps); frames = samples // hop_length + 1."""
        if not isinstance(wave, torch.Tensor) or wave.ndim != 1 or not wave.is_floating_point():
            got = f"{wave.dtype} {tuple(wave.shape)}" if isinstance(wave, torch.Tensor) else type(wave).__name__
            raise DMelError(f"dMel expects a 1-D float wave [samples] (mono, {self.cfg.sample_rate} Hz); got {got}. "
                            f"Mix channels down (w.mean(0)) and convert int PCM with w.float() / 32768.")
        if wave.numel() == 0:
            raise DMelError("dMel got an empty wave; need at least one sample")
        if self.mel.mel_scale.fb.device != wave.device:
            self.mel = self.mel.to(wave.device)
        power = self.mel(wave.to(torch.float32))  # [n_mels, frames]
        return power.clamp_min(self.cfg.eps).log10().T.contiguous()

    def quantize(self, log_mel: torch.Tensor) -> torch.Tensor:
        """Log-mel FloatTensor[..., n_mels] -> bin ids LongTensor[..., n_mels] in [0, n_bins)."""
        if not self.cfg.ranges_file:
            x = log_mel.clamp(self.cfg.log_min, self.cfg.log_max)
            idx = torch.floor((x - self.cfg.log_min) / self.bin_width).long()
        else:
            lo, w = self.log_lo.to(log_mel.device), self.bin_width_c.to(log_mel.device)
            idx = torch.floor((log_mel - lo) / w).long()
        return idx.clamp_(0, self.cfg.n_bins - 1)  # log_max itself falls in the top bin

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """FloatTensor[samples] -> dMel bin ids LongTensor[frames, n_mels] in [0, n_bins)."""
        return self.quantize(self.log_mel(wave))

    def decode(self, bins: torch.Tensor) -> torch.Tensor:
        """Bin ids LongTensor[..., n_mels] -> log-mel FloatTensor[..., n_mels] at the bin centres."""
        if bins.is_floating_point() or bins.is_complex():
            raise DMelError(f"dMel decode expects integer bin ids, got {bins.dtype}")
        if bins.numel() and (int(bins.min()) < 0 or int(bins.max()) >= self.cfg.n_bins):
            raise DMelError(f"dMel bin ids must lie in [0, {self.cfg.n_bins}); got [{int(bins.min())}, "
                            f"{int(bins.max())}]")
        if not self.cfg.ranges_file:
            return self.bin_centers.to(bins.device)[bins]
        lo, w = self.log_lo.to(bins.device), self.bin_width_c.to(bins.device)
        return lo + (bins.to(torch.float32) + 0.5) * w

    def silence_bins(self, frames: int) -> torch.Tensor:
        """LongTensor[frames, n_mels]: the bins of digital silence (log-mel at the eps floor), used for padding."""
        floor = torch.full((frames, self.cfg.n_mels), torch.tensor(self.cfg.eps).log10().item())
        return self.quantize(floor)

    def unit_to_log_mel(self, unit: torch.Tensor) -> torch.Tensor:
        """Unit coordinates FloatTensor[..., n_mels] in [-1, 1] (the audio heads' output space, ``tml.model.heads``)
        -> log10 mel FloatTensor[..., n_mels]: per channel the affine map that takes bin ids to bin centres
        (``decode``, per-channel ranges included: -1 and 1 are the channel's range ends), clipped to that range."""
        u = (unit.float().clamp(-1, 1) + 1) / 2
        if not self.cfg.ranges_file:
            return self.cfg.log_min + u * (self.cfg.log_max - self.cfg.log_min)
        lo, hi = self.log_lo.to(unit.device), self.log_hi.to(unit.device)
        return lo + u * (hi - lo)

    def to_wave(self, bins_or_mel: torch.Tensor, vocoder=None) -> torch.Tensor:
        """dMel bin ids LongTensor[frames, n_mels] or log10 mel FloatTensor[frames, n_mels] -> wave
        FloatTensor[samples] at ``sample_rate``, through ``vocoder`` (any ``log_mel -> wave`` callable; default
        Griffin-Lim, ``tml.audio.vocoder``)."""
        from tml.audio.vocoder import GriffinLimVocoder  # here, not at the top: vocoder.py imports this module

        log_mel = bins_or_mel.float() if bins_or_mel.is_floating_point() else self.decode(bins_or_mel)
        if vocoder is None:
            if getattr(self, "_vocoder", None) is None:
                self._vocoder = GriffinLimVocoder(self.cfg)
            vocoder = self._vocoder
        return vocoder(log_mel)
