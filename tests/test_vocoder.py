"""Listening: dMel of real espeak speech back to a 16 kHz wave through Griffin-Lim, scored against the original."""

import pytest
import torch

from tml.data.espeak import speak
from tml.audio import DMelTokenizer
from tml.audio.compare import log_mel_correlation, mel_l1, spectral_convergence
from tml.audio.vocoder import GriffinLimVocoder


@pytest.fixture(scope="module")
def tok():
    return DMelTokenizer()


@pytest.fixture(scope="module")
def speech():
    wave, _ = speak("the quick brown fox jumps over the lazy dog, then it sat down", voice="en+f3")
    return wave


def test_dmel_to_wave_of_espeak_speech_keeps_its_spectrogram(tok, speech):
    back = tok.to_wave(tok.encode(speech))
    assert back.dtype == torch.float32 and back.ndim == 1 and back.abs().max() <= 1.0
    assert abs(back.numel() - speech.numel()) <= tok.cfg.hop_length  # 16 kHz, same duration
    ref, got = tok.log_mel(speech), tok.log_mel(back)
    corr, sc, l1 = log_mel_correlation(ref, got), spectral_convergence(ref, got), mel_l1(ref, got)
    # Measured 0.972 / 0.22 / 0.26 (half a dMel bin); a different sentence by the same voice scores far worse:
    other, _ = speak("seven green parrots were singing in the garden all morning", voice="en+f3")
    other_mel = tok.log_mel(other)
    assert corr > 0.95 and sc < 0.3 and l1 < 0.35, (corr, sc, l1)
    assert log_mel_correlation(ref, other_mel) < 0.85 and spectral_convergence(ref, other_mel) > 0.8
    # The continuous log-mel (no quantisation) resynthesises better still: dMel costs a little, Griffin-Lim most.
    assert spectral_convergence(ref, tok.log_mel(tok.to_wave(tok.log_mel(speech)))) < sc


def test_to_wave_takes_any_vocoder_and_bins_or_mel(tok, speech):
    bins = tok.encode(speech)
    seen = []

    def vocoder(log_mel):  # a plug-in: here Griffin-Lim with 8 iterations, recording what it was given
        seen.append(log_mel)
        return GriffinLimVocoder(tok.cfg, n_iter=8)(log_mel)

    wave = tok.to_wave(bins, vocoder=vocoder)
    torch.testing.assert_close(seen[0], tok.decode(bins))
    torch.testing.assert_close(wave, GriffinLimVocoder(tok.cfg, n_iter=8)(tok.decode(bins)))  # same seed, same wave
    torch.testing.assert_close(tok.to_wave(tok.decode(bins)), tok.to_wave(bins))  # float input = log-mel
    with pytest.raises(ValueError, match="log-mel"):
        GriffinLimVocoder(tok.cfg)(torch.zeros(10, 40))


def test_compare_by_hand():
    ref = torch.tensor([[0.0, -2.0], [-4.0, -7.0]])
    other = torch.tensor([[0.0, -2.0], [-3.0, -9.0]])  # -9 clips to -7
    assert mel_l1(ref, other) == pytest.approx(0.25)
    amp = lambda x: 10 ** (x / 2)  # noqa: E731
    want = abs(amp(-4.0) - amp(-3.0)) / (amp(0.0) ** 2 + amp(-2.0) ** 2 + amp(-4.0) ** 2 + amp(-7.0) ** 2) ** 0.5
    assert spectral_convergence(ref, other) == pytest.approx(want, rel=1e-5)
    assert log_mel_correlation(ref, ref) == pytest.approx(1.0)


def test_spectral_convergence_of_a_silent_reference_is_undefined():
    silent = torch.full((50, 80), -11.0)  # digital silence: below the range, every cell clips to the floor
    speech = torch.full((50, 80), -1.0)
    assert spectral_convergence(silent, speech) is None  # was 10 ** 3 (the loudness ratio to the floor)
    assert spectral_convergence(speech, silent) == pytest.approx(1 - 10 ** -3, rel=1e-5)


def test_griffin_lim_equals_torchaudios_and_leaves_the_global_rng_alone(tok, speech):
    import torchaudio

    from tml.audio.vocoder import griffin_lim

    voc = GriffinLimVocoder(tok.cfg, n_iter=8)
    spec = voc.inverse_mel(torch.pow(10.0, tok.log_mel(speech)).T).clamp_min(0.0)
    torch.manual_seed(voc.seed)  # the reference: torchaudio's own transform, initial phase from the seeded global RNG
    reference = voc.griffin_lim(spec)
    state = torch.random.get_rng_state()
    mine = griffin_lim(spec, voc.griffin_lim, torch.Generator().manual_seed(voc.seed))
    torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert isinstance(voc.griffin_lim, torchaudio.transforms.GriffinLim)


@pytest.mark.parametrize("n_fft,hop,win_length", [(400, 160, 400), (512, 128, 400), (400, 100, 400), (64, 64, 64)])
def test_inverse_stft_is_torch_istft_bitwise(n_fft, hop, win_length):
    # Griffin-Lim's inverse transform (the dMel front end's shape first), for spectrograms of 2, a few and many
    # frames: the same values as torch.istft to the last bit, so what the evaluation hears does not move.
    from tml.audio.vocoder import InverseSTFT

    torch.manual_seed(0)
    window = torch.hann_window(win_length) if hop < win_length else torch.ones(win_length)  # no overlap: a box
    for frames in (2, 7, 300):
        istft = InverseSTFT(frames, n_fft, hop, win_length, window)
        for _ in range(3):
            spec = torch.randn(n_fft // 2 + 1, frames, dtype=torch.complex64)
            ref = torch.istft(spec, n_fft=n_fft, hop_length=hop, win_length=win_length, window=window)
            assert torch.equal(istft(spec), ref)
    with pytest.raises(ValueError, match="built for"):
        istft(torch.randn(n_fft // 2 + 1, 8, dtype=torch.complex64))
    if hop == win_length:  # a Hann window without overlap is zero between frames: no inverse (torch.istft refuses too)
        with pytest.raises(ValueError, match="overlap-add has zeros"):
            InverseSTFT(7, n_fft, hop, win_length, torch.hann_window(win_length))
