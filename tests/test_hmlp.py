"""hMLP patch stem: kernel = stride and a per-patch norm, so each patch's embedding depends on that patch only."""

from __future__ import annotations

import torch

from tml.model import HMLPPatchEmbedding


def _patches(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (n, 40, 40, 3), generator=gen, dtype=torch.uint8)


def test_patch_embedding_ignores_other_patches():
    gen = torch.Generator().manual_seed(0)
    stem = HMLPPatchEmbedding(patch_size=40, dim=64, max_grid=4)
    stem.train()  # the norm must be per patch in training mode too (BatchNorm would fail here)
    patches, rc = _patches(6, gen), torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [3, 3]])
    out = stem(patches, rc)
    assert out.shape == (6, 64)

    others = patches.clone()
    others[1:] = _patches(5, gen)
    torch.testing.assert_close(stem(others, rc)[0], out[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(stem(patches[:1], rc[:1])[0], out[0], atol=1e-6, rtol=0)  # alone in its batch

    changed = patches.clone()
    changed[0, 17, 3] = 255 - changed[0, 17, 3]  # one pixel of patch 0
    new = stem(changed, rc)
    assert (new[0] - out[0]).abs().max() > 1e-4
    torch.testing.assert_close(new[1:], out[1:], atol=1e-6, rtol=0)


def test_patch_position_embedding_uses_row_and_col():
    gen = torch.Generator().manual_seed(1)
    stem = HMLPPatchEmbedding(patch_size=40, dim=32, max_grid=4)
    p = _patches(1, gen).expand(3, -1, -1, -1)
    out = stem(p, torch.tensor([[0, 1], [1, 0], [0, 1]]))
    torch.testing.assert_close(out[0], out[2])
    assert (out[0] - out[1]).abs().max() > 1e-4
    torch.testing.assert_close(out[0] - out[1], stem.row.weight[0] + stem.col.weight[1]
                               - stem.row.weight[1] - stem.col.weight[0])


def test_patch_stem_other_patch_size_and_empty_batch():
    stem = HMLPPatchEmbedding(patch_size=16, dim=32, max_grid=4)  # the paper's 16x16: 4 -> 2 -> 2
    assert stem(torch.zeros(2, 16, 16, 3, dtype=torch.uint8), torch.zeros(2, 2, dtype=torch.long)).shape == (2, 32)
    assert stem(torch.zeros(0, 16, 16, 3, dtype=torch.uint8), torch.zeros(0, 2, dtype=torch.long)).shape == (0, 32)
