"""Log-mel -> wave, for listening to what a model says.

A vocoder here is any callable ``log_mel FloatTensor[frames, n_mels] (log10 mel power) -> wave FloatTensor[samples]``
at the dMel front end's rate. The default is Griffin-Lim: the mel filterbank is inverted by least squares
(torchaudio ``InverseMelScale`` with ``driver="gelsd"``: 80 HTK triangles on a 201-bin STFT are rank-deficient, the
default driver fails) and the phase is recovered by Griffin-Lim iterations. Intelligible, buzzy; a neural vocoder
plugs in as any callable with the same signature.

    vocoder = GriffinLimVocoder(DMelConfig())
    wave = vocoder(dmel.decode(bins))
    wave = dmel.to_wave(bins)                    # the same, through the tokenizer
    wave = dmel.to_wave(bins, vocoder=my_hifigan)
"""

from __future__ import annotations

from typing import Callable

import torch
import torchaudio

from tml.audio.dmel import DMelConfig

Vocoder = Callable[[torch.Tensor], torch.Tensor]


class GriffinLimVocoder:
    """log10 mel power [frames, n_mels] -> float32 wave [(frames - 1) * hop_length] in [-1, 1]."""

    def __init__(self, cfg: DMelConfig | None = None, n_iter: int = 32, seed: int = 0):
        cfg = cfg or DMelConfig()
        self.cfg = cfg
        f_max = cfg.f_max if cfg.f_max is not None else cfg.sample_rate / 2
        # Same filterbank as DMelTokenizer's MelSpectrogram (HTK, no norm), so analysis and synthesis agree.
        self.inverse_mel = torchaudio.transforms.InverseMelScale(
            n_stft=cfg.n_fft // 2 + 1, n_mels=cfg.n_mels, sample_rate=cfg.sample_rate, f_min=cfg.f_min, f_max=f_max,
            norm=None, mel_scale="htk", driver="gelsd")
        self.griffin_lim = torchaudio.transforms.GriffinLim(
            n_fft=cfg.n_fft, n_iter=n_iter, win_length=cfg.win_length, hop_length=cfg.hop_length, power=2.0)
        self.seed = seed

    def __call__(self, log_mel: torch.Tensor) -> torch.Tensor:
        if log_mel.ndim != 2 or log_mel.shape[1] != self.cfg.n_mels:
            raise ValueError(f"vocoder expects log-mel [frames, {self.cfg.n_mels}], got {tuple(log_mel.shape)}")
        power = torch.pow(10.0, log_mel.detach().float().cpu()).T  # [n_mels, frames]
        spec = self.inverse_mel(power).clamp_min(0.0)  # [n_stft, frames] power
        # Griffin-Lim starts from random phase: fix it so the same mel always gives the same wave.
        state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)
        try:
            wave = self.griffin_lim(spec)
        finally:
            torch.random.set_rng_state(state)
        peak = wave.abs().max()
        return wave / peak if peak > 1.0 else wave  # least squares can overshoot; never clip when writing PCM
