"""Frames of any size -> 40x40 patches with (row, col): resize, letterbox padding, video stride."""

import pytest
import torch

from tml.streams import Episode, Kind, LayoutConfig, MicroTurnLayout, SlotConfig
from tml.vision.patches import fit_frame, frame_to_patches


def test_patches_are_the_frame_cut_row_major():
    frame = torch.arange(80 * 120 * 3, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(80, 120, 3)
    p, rc = frame_to_patches(frame, 40, 80, 120)
    assert p.shape == (6, 40, 40, 3) and rc.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    for (r, c), patch in zip(rc.tolist(), p):
        assert torch.equal(patch, frame[40 * r: 40 * r + 40, 40 * c: 40 * c + 40])


def test_pad_keeps_aspect_ratio_and_letterboxes():
    frame = torch.full((50, 200, 3), 200, dtype=torch.uint8)  # 1:4, into 80x160 (1:2): scaled by 0.8 to 40x160
    out = fit_frame(frame, 80, 160, "pad")
    assert out.shape == (80, 160, 3)
    assert (out[20:60] == 200).all() and (out[:20] == 0).all() and (out[60:] == 0).all()
    stretched = fit_frame(frame, 80, 160, "resize")
    assert (stretched == 200).all()
    with pytest.raises(ValueError, match="frame_fit"):
        fit_frame(frame, 80, 160, "crop")


def test_video_stride_and_odd_frame_size_through_interleave():
    from tml.audio.dmel import DMelTokenizer
    from tml.streams.interleave import interleave
    from tml.text.tokenizer import train_bpe

    import tempfile
    from pathlib import Path

    tok = train_bpe(["a b c"] * 5, 300, Path(tempfile.mkdtemp()) / "t.json")
    video = torch.randint(0, 256, (10, 37, 53, 3), dtype=torch.uint8)  # 5 fps, 2 s, an odd size
    ep = Episode("v", 2.0, 16000, {"user": torch.zeros(32000), "model": torch.zeros(32000)}, video=video,
                 video_fps=5.0)
    slots = [SlotConfig("user", "audio", 5), SlotConfig("video", "patch", 4), SlotConfig("model", "text", 2),
             SlotConfig("model", "audio", 5)]
    layout = MicroTurnLayout(LayoutConfig(video_stride=3, frame_fit="pad", slots=slots))
    toks = interleave(ep, layout, DMelTokenizer(), tok)
    patch_turns = sorted(set(toks.micro_turn[toks.kind == Kind.PATCH].tolist()))
    assert patch_turns == [0, 3, 6, 9]  # a frame every 3rd micro-turn
    p0, _ = frame_to_patches(video[0], 40, 80, 80, "pad")
    assert torch.equal(toks.patches[:4], p0)
