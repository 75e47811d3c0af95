"""Expert-load metrics by hand, and the heatmap written from metrics records."""

import math

import pytest
import torch

from tml.model.moe_plots import plot_expert_load
from tml.model import MoE, MoEConfig
from tml.model.moe_stats import expert_load_metrics, router_metrics


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


def test_router_metrics_report_enabled_terms_and_biases():
    """Two layers; switch and z enabled, seq off: means over layers of the enabled terms only; with bias balancing,
    each layer's bias and the mean over layers of max |bias| (0.3 and 0.1 -> 0.2)."""
    terms = torch.tensor([[1.2, 9.0, 3.0], [0.8, 9.0, 1.0]])
    cfg = MoEConfig(hidden_dim=8, num_experts=2, top_k=1, aux_loss_coeff=0.01, z_loss_coeff=1e-3)
    assert router_metrics(terms, cfg, []) == pytest.approx({"moe/switch_loss": 1.0, "moe/z_loss": 2.0})
    cfg.load_balance_coeff = 1e-3
    moes = [MoE(8, cfg), MoE(8, cfg)]
    moes[0].expert_bias.copy_(torch.tensor([0.3, -0.3]))
    moes[1].expert_bias.copy_(torch.tensor([-0.1, 0.05]))
    m = router_metrics(terms, cfg, moes)
    assert m["moe/layer0/bias"] == pytest.approx([0.3, -0.3]) and m["moe/layer1/bias"] == pytest.approx([-0.1, 0.05])
    assert m["moe/bias_absmax"] == pytest.approx(0.2)
    assert router_metrics(torch.zeros(0, 3), cfg, []) == {}
