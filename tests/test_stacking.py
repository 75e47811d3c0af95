"""The bag-of-embeddings stacking factor is a config value: frames per audio position follow the layout."""

import tempfile
from pathlib import Path

import torch

from tml.audio.dmel import DMelTokenizer
from tml.streams import Episode, Kind, LayoutConfig, MicroTurnLayout, SlotConfig, Stream
from tml.streams.interleave import interleave
from tml.text.tokenizer import train_bpe


def test_two_frames_per_audio_position_gives_ten_slots_per_micro_turn():
    tok = train_bpe(["a b c"] * 5, 300, Path(tempfile.mkdtemp()) / "t.json")
    g = torch.Generator().manual_seed(0)
    wave = 0.1 * torch.randn(16000, generator=g)
    ep = Episode("s", 1.0, 16000, {"user": wave, "model": torch.zeros(16000)})
    slots = [SlotConfig("user", "audio", 10), SlotConfig("model", "text", 2), SlotConfig("model", "audio", 10)]
    layout = MicroTurnLayout(LayoutConfig(frames_per_audio_position=2, slots=slots))
    dmel = DMelTokenizer()
    t = interleave(ep, layout, dmel, tok)
    user = t.audio_bins[(t.stream[t.kind == Kind.AUDIO] == Stream.USER)]
    assert user.shape == (50, 2, 80)  # 5 micro-turns x 10 positions of 2 frames (20 ms)
    assert torch.equal(user.reshape(100, 80), dmel.encode(wave)[:100])  # frame order kept
