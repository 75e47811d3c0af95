"""Small pieces of the trainer checked against hand-computed values."""

import json

import pytest
import torch

from tml.train.metrics import truncate_metrics
from tml.train.optim import param_groups, warmup_cosine


def test_warmup_cosine_by_hand():
    f = warmup_cosine(warmup_steps=2, decay_steps=6, min_lr_ratio=0.1)
    # warmup (step+1)/2; then 0.1 + 0.9 * 0.5 * (1 + cos(pi * (step - 2) / 4)); flat at 0.1 after step 6.
    want = [0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + 2 ** -0.5), 0.55, 0.1 + 0.45 * (1 - 2 ** -0.5), 0.1, 0.1, 0.1]
    assert [f(s) for s in range(9)] == pytest.approx(want, abs=1e-12)


def test_weight_decay_only_on_matrices():
    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(5, 4), "proj": torch.nn.Linear(4, 4),
                                 "norm": torch.nn.LayerNorm(4)})
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4  # embedding, linear bias, norm weight and bias


def test_truncate_metrics_keeps_what_resume_will_not_rewrite(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 8)))
    truncate_metrics(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
