"""Expert-load metrics by hand, and the heatmap written from metrics records."""

import math

import pytest
import torch

from tml.model.moe_plots import plot_expert_load
from tml.model.moe_stats import expert_load_metrics


def test_load_metrics_by_hand():
    # layer 0: 2, 2, 0, 0 -> load (1/2, 1/2, 0, 0), max/mean = 0.5 * 4 = 2, entropy ln 2
    # layer 1: all on expert 3 -> max/mean 4, entropy 0
    m = expert_load_metrics(torch.tensor([[2, 2, 0, 0], [0, 0, 0, 7]]))
    assert m["moe/layer0/load"] == [0.5, 0.5, 0.0, 0.0]
    assert m["moe/layer0/max_over_mean"] == 2.0 and m["moe/layer0/entropy"] == pytest.approx(math.log(2))
    assert m["moe/layer1/load"] == [0.0, 0.0, 0.0, 1.0]
    assert m["moe/layer1/max_over_mean"] == 4.0 and m["moe/layer1/entropy"] == 0.0
    assert m["moe/max_load"] == 3.0
    assert expert_load_metrics(torch.zeros(0, 4)) == {}


def test_heatmap_png(tmp_path):
    records = [{"step": s, **expert_load_metrics(torch.tensor([[s, 1, 1, 1], [1, 1, 1, 1]]))} for s in range(1, 6)]
    path = plot_expert_load(records + [{"step": 6, "loss": 1.0}], tmp_path / "plots" / "expert_load.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    with pytest.raises(ValueError, match="moe/layer"):
        plot_expert_load([{"step": 1, "loss": 1.0}], tmp_path / "x.png")
