"""dMel tokenizer: shapes, ranges, the half-bin round-trip bound, hand-computed bins, and a 1 kHz sine."""

import math

import pytest
import torch

from tml.audio import DMelConfig, DMelError, DMelTokenizer

SR = 16000


@pytest.fixture(scope="module")
def tok():
    return DMelTokenizer(DMelConfig())


def speechlike(seconds: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Harmonics with a moving pitch plus noise and a silent gap: covers loud, quiet and silent cells."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SR)) / SR
    f0 = 120 + 40 * torch.sin(2 * math.pi * 1.5 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / SR
    x = sum(torch.sin(k * phase) / k for k in range(1, 20)) * 0.2 + 0.01 * torch.randn(t.shape, generator=g)
    x[len(x) // 3: len(x) // 2] = 0.0
    return x.float()


@pytest.mark.parametrize("samples", [1, 159, 160, 161, 400, 16000, 16001])
def test_frame_count_dtype_and_range(tok, samples):
    x = 0.1 * torch.randn(samples, generator=torch.Generator().manual_seed(samples))
    bins = tok.encode(x)
    assert bins.dtype == torch.int64
    assert bins.shape == (samples // 160 + 1, 80)
    assert int(bins.min()) >= 0 and int(bins.max()) < 16


def test_round_trip_within_half_a_bin(tok):
    x = speechlike()
    clipped = tok.log_mel(x).clamp(-7.0, 2.0)
    err = (tok.decode(tok.encode(x)) - clipped).abs().max().item()
    assert err <= (2.0 - -7.0) / 16 / 2 + 1e-5  # 0.28125: half of one of 16 bins over [-7, 2]
    assert clipped.min() == -7.0  # the silent gap is clipped to the bottom


def test_hand_computed_bins(tok):
    # width = 9/16 = 0.5625; bin k covers [-7 + k*w, -7 + (k+1)*w)
    values = torch.tensor([-12.0, -7.0, -6.4375, -1.0, 1.9, 2.0, 5.0])
    expected = [0, 0, 1, 10, 15, 15, 15]  # -1.0: (6 / 0.5625) = 10.67 -> 10
    got = tok.quantize(values[:, None].expand(-1, 80))
    assert got.tolist() == [[e] * 80 for e in expected]
    assert tok.decode(torch.tensor([[10] * 80]))[0, 0].item() == pytest.approx(-7 + 10.5 * 0.5625)
    assert tok.bin_centers[0].item() == pytest.approx(-7 + 0.28125)


def test_silence_is_bottom_bin(tok):
    assert torch.equal(tok.silence_bins(7), torch.zeros(7, 80, dtype=torch.long))
    assert torch.equal(tok.encode(torch.zeros(1000)), tok.silence_bins(1000 // 160 + 1))


def test_sine_lights_up_nearest_mel_channel(tok):
    t = torch.arange(SR) / SR
    x = 0.5 * torch.sin(2 * math.pi * 1000.0 * t)
    # HTK mel scale, 80 triangles between 0 Hz and 8 kHz: channel i peaks at point i+1 of 82 equally spaced mels.
    mel = lambda f: 2595 * math.log10(1 + f / 700)
    hz = lambda m: 700 * (10 ** (m / 2595) - 1)
    centres = [hz(mel(8000.0) * (i + 1) / 81) for i in range(80)]
    nearest = min(range(80), key=lambda i: abs(centres[i] - 1000.0))
    lm = tok.log_mel(x)[5:-5]  # away from the zero-padded edges
    assert torch.all(lm.argmax(1) == nearest)
    assert tok.encode(x)[5:-5, nearest].min().item() == 15  # loud: top bin


def test_rejects_bad_waves(tok):
    with pytest.raises(DMelError, match="1-D float"):
        tok.encode(torch.zeros(2, 1600))
    with pytest.raises(DMelError, match="1-D float"):
        tok.encode(torch.zeros(1600, dtype=torch.int16))
    with pytest.raises(DMelError, match="bin ids"):
        tok.decode(torch.tensor([[16] * 80]))
    with pytest.raises(DMelError, match="log_min"):
        DMelTokenizer(DMelConfig(log_min=2.0, log_max=-7.0))


def test_fitted_per_channel_ranges_beat_the_global_range_on_speech(synth_data):
    """data_prep wrote dmel_ranges.json beside the shards; with it, decode(encode(x)) is closer to the log-mel of
    speech than with the global [-7, 2] range (hand rule: 16 bins spent where each channel's speech lies)."""
    import json

    import webdataset as wds

    from tml.audio.dmel import DMelConfig
    from tml.streams.episode import Episode

    path = synth_data / "dmel_ranges.json"
    ranges = json.loads(path.read_text())
    assert json.loads((synth_data / "manifest.json").read_text())["dmel_ranges"] == "dmel_ranges.json"
    lo, hi = torch.tensor(ranges["log_min"]), torch.tensor(ranges["log_max"])
    assert lo.shape == (80,) and (hi > lo).all() and len(set(ranges["log_max"])) > 10  # channels differ
    fitted, fixed = DMelTokenizer(DMelConfig(ranges_file=str(path))), DMelTokenizer()
    bins = torch.tensor([[0, 15] + [3] * 78])
    want = lo + (bins[0].float() + 0.5) * (hi - lo) / 16  # hand-computed bin centres per channel
    assert torch.allclose(fitted.decode(bins)[0], want)
    shard = sorted(synth_data.glob("shard-*.tar"))[0]
    ep = Episode.from_sample(next(iter(wds.WebDataset(str(shard), shardshuffle=False))))
    x = fixed.log_mel(ep.audio["user"])
    speech = x > -6  # cells with sound
    err = {name: (t.decode(t.encode(ep.audio["user"])) - x)[speech].abs().mean().item()
           for name, t in (("fitted", fitted), ("fixed", fixed))}
    assert err["fitted"] < err["fixed"], err


def test_bad_ranges_file_names_the_key(tmp_path):
    from tml.audio.dmel import DMelConfig

    with pytest.raises(DMelError, match="dmel.ranges_file"):
        DMelTokenizer(DMelConfig(ranges_file=str(tmp_path / "missing.json")))


def test_unit_coordinates_decode_through_per_channel_ranges(tmp_path):
    """log-mel -> dMel bins -> unit coordinates (what the audio heads emit) -> log-mel with a ranges file, by hand:
    16 bins per channel; channel 0 keeps [-4, 0] (bin width 0.25), channel 1 [-2, 2], the rest [-5, 3] (0.5)."""
    import json

    from tml.model.heads import bins_to_unit

    path = tmp_path / "dmel_ranges.json"
    path.write_text(json.dumps({"log_min": [-4.0, -2.0] + [-5.0] * 78, "log_max": [0.0, 2.0] + [3.0] * 78}))
    d = DMelTokenizer(DMelConfig(ranges_file=str(path)))
    x = torch.tensor([[-1.1, 1.9] + [0.1] * 78])
    bins = d.quantize(x)
    # floor((-1.1 + 4) / 0.25) = 11, floor((1.9 + 2) / 0.25) = 15, floor((0.1 + 5) / 0.5) = 10
    assert bins[0, :3].tolist() == [11, 15, 10]
    back = d.unit_to_log_mel(bins_to_unit(bins, 16))
    # the bins' centres: -4 + 11.5 * 0.25, -2 + 15.5 * 0.25, -5 + 10.5 * 0.5
    torch.testing.assert_close(back[0, :3], torch.tensor([-1.125, 1.875, 0.25]))
    torch.testing.assert_close(back, d.decode(bins))
    # continuous values: -1, 0 and 1 are each channel's lower end, middle and upper end
    ends = d.unit_to_log_mel(torch.tensor([[-1.0] * 80, [0.0] * 80, [1.0] * 80]))
    assert ends[:, 0].tolist() == [-4.0, -2.0, 0.0] and ends[:, 1].tolist() == [-2.0, 0.0, 2.0]
    assert ends[:, 2].tolist() == [-5.0, -1.0, 3.0]
