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

import math
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
        wave = griffin_lim(spec, self.griffin_lim, torch.Generator().manual_seed(self.seed))
        peak = wave.abs().max()
        return wave / peak if peak > 1.0 else wave  # least squares can overshoot; never clip when writing PCM


def griffin_lim(power: torch.Tensor, gl: torchaudio.transforms.GriffinLim, generator: torch.Generator) -> torch.Tensor:
    """Power spectrogram [n_stft, frames] -> wave [(frames - 1) * hop], the steps of torchaudio's Griffin-Lim
    (``torchaudio.functional.griffinlim`` with ``gl``'s settings) with the random initial phase drawn from
    ``generator``: torchaudio draws it from the global RNG, which threads share, so two live sessions vocoding at
    once would take each other's draws. Its inverse transforms are ``InverseSTFT``'s (``torch.istft``'s values,
    bitwise) unless ``gl.length`` trims them."""
    mag = power.pow(1 / gl.power)
    # mag * angles promotes mag to complex in every call: once here instead (the same values, the same product)
    mag_c = mag.to(torch.complex64)
    kw = dict(n_fft=gl.n_fft, hop_length=gl.hop_length, win_length=gl.win_length, window=gl.window)
    istft = (InverseSTFT(mag.shape[-1], gl.n_fft, gl.hop_length, gl.win_length, gl.window) if gl.length is None
             else lambda spec: torch.istft(spec, length=gl.length, **kw))
    angles = torch.rand(mag.shape, dtype=torch.complex64, generator=generator) if gl.rand_init else torch.ones_like(
        mag, dtype=torch.complex64)
    momentum = gl.momentum / (1 + gl.momentum)
    previous = torch.tensor(0.0)
    for _ in range(gl.n_iter):
        rebuilt = torch.stft(istft(mag_c * angles), center=True, pad_mode="reflect", normalized=False, onesided=True,
                             return_complex=True, **kw)
        angles = rebuilt - previous * momentum if momentum else rebuilt
        angles = angles / (angles.abs() + 1e-16)
        previous = rebuilt
    return istft(mag_c * angles)


class InverseSTFT:
    """``torch.istft`` (centred, onesided, not normalized, no ``length``) of spectrograms with ``frames`` frames,
    bitwise: the same inverse FFT and window product, the same overlap-add sums in the same order, the same division
    by the window envelope. Griffin-Lim inverts one shape ``n_iter + 1`` times, and ``torch.istft`` spends most of
    each call on what does not change or need a scatter: it rebuilds the window envelope (an overlap-add as costly
    as the signal's) and overlap-adds by a scatter over every (frame, sample) pair. Here the envelope is built once,
    and the overlap-add is K = ceil(n_fft / hop) strided adds of whole hops: hop block j of the output sums part k of
    frame j - k over k, earliest frame first, as ``torch.istft``'s overlap-add does (tests/test_vocoder.py). 3.3 ->
    1.2 ms per call for a 12 s wave (one thread)."""

    def __init__(self, frames: int, n_fft: int, hop: int, win_length: int, window: torch.Tensor):
        left = (n_fft - win_length) // 2  # a shorter window sits centred in the frame, as torch.istft pads it
        self.window = torch.nn.functional.pad(window, (left, n_fft - win_length - left))
        self.frames, self.n_fft, self.hop = frames, n_fft, hop
        self.parts = -(-n_fft // hop)  # hop blocks a frame spans (the last one zero-padded)
        total = n_fft + hop * (frames - 1)
        envelope = torch.ops.aten.unfold_backward(self.window.pow(2).expand(1, frames, n_fft), [1, total], 1, n_fft,
                                                  hop)[0, n_fft // 2 : total - n_fft // 2]
        if bool(envelope.abs().min() < 1e-11):
            raise ValueError(f"InverseSTFT: the window's overlap-add has zeros (n_fft={n_fft}, hop={hop}, "
                             f"win_length={win_length}): the transform cannot be inverted")
        self.envelope = envelope
        # frame f at row f + K - 1 between K - 1 zero rows on either side, each row cut into K hop blocks; only the
        # frames' part is rewritten per call, the zeros stay
        self.rows = torch.zeros(frames + 2 * (self.parts - 1), self.parts * hop)

    def __call__(self, spec: torch.Tensor) -> torch.Tensor:
        """Complex spectrogram [n_fft // 2 + 1, frames] -> wave [hop * (frames - 1)], as ``torch.istft``."""
        F, K, hop = self.frames, self.parts, self.hop
        if spec.shape != (self.n_fft // 2 + 1, F):
            raise ValueError(f"InverseSTFT built for [{self.n_fft // 2 + 1}, {F}] spectrograms, got "
                             f"{tuple(spec.shape)}")
        frames = torch.fft.irfft(spec.unsqueeze(0).transpose(1, 2), n=self.n_fft)[0]  # [F, n_fft], as torch.istft
        torch.mul(frames, self.window, out=self.rows[K - 1 : K - 1 + F, : self.n_fft])
        rows = self.rows.view(-1, K, hop)
        blocks = rows[: F + K - 1, K - 1]  # block j: part K - 1 of frame j - K + 1, the earliest frame over it
        for k in range(K - 2, -1, -1):
            blocks = blocks + rows[K - 1 - k : K - 1 - k + F + K - 1, k]
        total = self.n_fft + hop * (F - 1)
        return blocks.reshape(-1)[self.n_fft // 2 : total - self.n_fft // 2] / self.envelope


class StreamingVocoder:
    """A vocoder run one micro-turn at a time, for live playback: each call turns the micro-turn's log-mel
    [frames, n_mels] into exactly ``frames * hop_length`` samples that join the previous call's without a gap.

    Each call vocodes ``context`` frames of history plus the new frames (a frame-level vocoder like Griffin-Lim
    needs the neighbours of a frame to place it) and keeps the samples from the centre of the last history frame
    to the centre of the last new frame, so consecutive chunks tile the timeline; ``overlap`` samples are held back
    and cross-faded with the next chunk's, which hides the phase jump between independently vocoded chunks. The
    output therefore lags the frames by one hop plus ``overlap`` samples (20 ms with the defaults); the first call
    starts from silent history (the log-mel floor).
    """

    def __init__(self, vocoder: Vocoder, cfg: DMelConfig | None = None, context: int = 4, overlap: int = 160):
        cfg = cfg or DMelConfig()
        if context < 1 or not 0 <= overlap <= cfg.hop_length * (context - 1):
            raise ValueError(f"StreamingVocoder needs context >= 1 frame and 0 <= overlap <= (context - 1) * hop "
                             f"({cfg.hop_length * (context - 1)} samples); got context={context}, overlap={overlap}")
        self.vocoder, self.hop, self.context, self.overlap = vocoder, cfg.hop_length, context, overlap
        self.history = torch.full((context, cfg.n_mels), math.log10(cfg.eps))
        self.held = torch.zeros(overlap)  # the previous chunk's last samples, not yet emitted
        self.fade_in = torch.linspace(0.0, 1.0, overlap + 2)[1:-1]

    def __call__(self, log_mel: torch.Tensor) -> torch.Tensor:
        """log-mel [frames, n_mels] -> wave [frames * hop_length]."""
        frames = log_mel.shape[0]
        wave = self.vocoder(torch.cat([self.history, log_mel.float()]))  # [(context + frames - 1) * hop]
        self.history = torch.cat([self.history, log_mel.float()])[-self.context:]
        o = self.overlap
        new = wave[(self.context - 1) * self.hop - o:]  # the overlap region, then this chunk's frames * hop samples
        mixed = self.held * (1 - self.fade_in) + new[:o] * self.fade_in
        out = torch.cat([mixed, new[o:]])
        self.held = out[out.numel() - o:].clone()
        return out[: frames * self.hop]
