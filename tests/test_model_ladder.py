"""The model ladder: every config builds on the meta device with counts equal to the planner's analytic ones; the
planner's memory and FLOP arithmetic checked by hand on small cases; activation checkpointing changes nothing."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TURN, make_batch
from tml.model import InteractionModel, ModelConfig, MoEConfig, param_counts
from tml.model.counts import count_params
from tml.parallel.engine import ParallelConfig
from tml.errors import ConfigError
from tml.tools.plan import GIB, ClusterConfig, PlanConfig, TrainShape, plan

ROOT = Path(__file__).resolve().parents[1]
LADDER = {  # name: (total, active) targets from the issue, with the tolerance the issue states or +-25% for "~"
    "tiny": None,
    "small": ((100e6, 0.25), None),
    "medium": ((1e9, 0.25), (200e6, 0.25)),
    "large": ((20e9, 0.25), (2e9, 0.25)),
    "interaction_small": ((276e9, 0.02), (12e9, 0.05)),
}


def model_config(name: str) -> ModelConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                               OmegaConf.load(ROOT / "configs" / "model" / f"{name}.yaml")))


@pytest.mark.parametrize("name", list(LADDER))
def test_config_builds_on_meta_with_analytic_counts(name):
    cfg = model_config(name)
    with torch.device("meta"):
        model = InteractionModel(cfg)
    assert all(p.is_meta for p in model.parameters())  # nothing allocated
    built = param_counts(model)
    analytic = count_params(cfg)
    assert (built["total"], built["active"]) == (analytic.total, analytic.active)
    targets = LADDER[name]
    if targets:
        for target, got in zip(targets, (analytic.total, analytic.active)):
            if target is not None:
                want, tol = target
                assert abs(got / want - 1) <= tol, (name, got, want)


def test_every_model_config_is_in_the_ladder():
    assert {p.stem for p in (ROOT / "configs" / "model").glob("*.yaml")} == set(LADDER)


@pytest.mark.parametrize("heads", [{"audio": "flow", "text": "tied", "listen": False},
                                   {"audio": "flow", "text": "untied", "listen": False},
                                   {"audio": "dmel", "text": "untied", "listen": True}])
def test_flow_and_tied_heads_count_like_the_built_model(heads):
    cfg = model_config("small")
    cfg.heads.audio, cfg.heads.text, cfg.heads.listen = heads["audio"], heads["text"], heads["listen"]
    with torch.device("meta"):
        model = InteractionModel(cfg)
    assert param_counts(model)["total"] == count_params(cfg).total


def test_counts_by_hand_on_a_small_case():
    # dim 8, 1 dense + 1 MoE layer, 2 heads (1 kv head), vocab 10, 4 experts of 4 (top-1), one shared expert.
    cfg = ModelConfig(dim=8, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=10, dense_layers=1, dense_hidden_dim=12,
                      n_mels=2, frames_per_audio_position=1, dmel_bins=3, patch_size=4, max_patch_grid=2,
                      moe=MoEConfig(hidden_dim=4, num_experts=4, top_k=1, num_shared_experts=1))
    c = count_params(cfg)
    # hMLP width 2, kernel 1: conv 3*2+2, LN 4, conv 2*2*4+2, LN 4, conv 2*8*4+8, LN 16 = 8+4+18+4+72+16 = 122
    assert c.embed == 10 * 8 + 1 * 2 * 3 * 8 + 122 + 2 * 2 * 8 + 8 + 4 * 8
    assert c.attention == 2 * (8 * 8 + 2 * 8 * 4 + 8 * 8)  # wq, wk, wv (one kv head of 4), wo
    assert c.dense_ffn == 3 * 8 * 12 and c.router == 8 * 4 and c.shared_experts == 3 * 8 * 4
    assert c.routed_experts == 4 * 3 * 8 * 4 and c.heads == 10 * 8 + 8 * 6 + (8 + 1)  # text, dMel, floor
    assert c.active == c.total - 3 * (3 * 8 * 4)  # 3 of 4 experts idle per token


def test_memory_plan_by_hand():
    # tiny MoE on 4 GPUs, EP 2, fp32: each expert lives on 2 GPUs; everything else on all 4.
    m = ModelConfig(vocab_size=512)
    c = count_params(m)
    dense, expert = c.total - c.routed_experts, c.routed_experts
    base = dict(model=m, cluster=ClusterConfig(gpus=4, gpus_per_node=4), train=TrainShape(precision="fp32"))
    for stage in (0, 1, 2, 3):
        r = plan(PlanConfig(parallel=ParallelConfig(zero_stage=stage, expert_parallel_size=2), **base))
        mem = r["memory_per_gpu_gib"]
        local = dense + expert / 2
        sharded = dense / 4 + expert / 2 / 2
        assert mem["optimizer_states"] * GIB == pytest.approx(8 * (sharded if stage >= 1 else local))
        assert mem["gradients"] * GIB == pytest.approx(4 * (sharded if stage >= 2 else local))
        assert mem["parameters"] * GIB == pytest.approx(4 * (sharded if stage >= 3 else local))
        assert r["params_per_gpu"] == dense + expert // 2
    r = plan(PlanConfig(parallel=ParallelConfig(expert_parallel_size=2), **base))
    assert r["all_to_all_bytes_per_step"] == 4000 * 4 * 2 * 128 * 2 * 2 * 2 * (1 / 2)  # tokens*layers*k*d*2B*2*2*1/2


def test_activation_checkpointing_only_trades_memory(tmp_path):
    r0 = plan(PlanConfig(model=model_config("medium")))
    ckpt = model_config("medium")
    ckpt.activation_checkpointing = True
    r1 = plan(PlanConfig(model=ckpt))
    assert r1["memory_per_gpu_gib"]["activations"] < r0["memory_per_gpu_gib"]["activations"] / 4
    assert r1["step_time_s"]["compute"] > r0["step_time_s"]["compute"]


def test_checkpointed_model_has_the_same_gradients():
    """Activation checkpointing recomputes each block in backward; the recompute must see the same packing padding
    as the forward, so the balancing losses' gradients (switch, sequence-level, z) still skip padding. The batch has
    padding at the end of both rows; the aux loss alone and the full loss are compared."""
    batch = make_batch([[2], [1]], L=3 * TURN, vocab=128, seed=1)
    assert (batch.doc_ids < 0).sum() == 3 * TURN  # one micro-turn of padding in row 0, two in row 1

    def grads(ckpt: bool, loss) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = InteractionModel(ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=128, activation_checkpointing=ckpt,
                                             moe=MoEConfig(hidden_dim=64, num_experts=4, aux_loss_coeff=0.5,
                                                           seq_aux_loss_coeff=0.5, z_loss_coeff=0.1)))
        loss(model(batch)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for loss in (lambda out: out.aux_loss,
                 lambda out: out.text_logits.square().mean() + out.audio_logits.square().mean() + out.aux_loss):
        plain, ckpt = grads(False, loss), grads(True, loss)
        assert plain.keys() == ckpt.keys() and any(".gate." in n for n in plain)
        for n in plain:
            torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)


def test_plan_rejects_impossible_sharding_and_says_what_to_turn():
    with pytest.raises(ConfigError, match="parallel.expert_parallel_size=3"):
        plan(PlanConfig(parallel=ParallelConfig(expert_parallel_size=3), cluster=ClusterConfig(gpus=6)))
    r = plan(PlanConfig(model=model_config("interaction_small"), cluster=ClusterConfig(gpus=8)))
    assert not r["fits"]
    text = " ".join(r["advice"])
    assert "parallel.expert_parallel_size" in text and "parallel.zero_stage" in text
    assert "model.activation_checkpointing=true" in text


def test_planner_cli_json_for_interaction_small():
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "tml.tools.plan", "model=interaction_small", "parallel=ep32_zero2",
                           "model.activation_checkpointing=true", "cluster.gpus=256", "cluster.gpu=h100", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert time.time() - t0 < 60
    r = json.loads(proc.stdout)
    for key in ("params_total", "params_active", "flops_per_token", "memory_per_gpu_gib", "all_to_all_bytes_per_step",
                "step_time_s", "mfu"):
        assert key in r
    assert abs(r["params_total"] / 276e9 - 1) < 0.02 and abs(r["params_active"] / 12e9 - 1) < 0.05
    assert r["fits"] and 0 < r["mfu"] < 1
    mem = r["memory_per_gpu_gib"]
    assert {"parameters", "gradients", "optimizer_states", "activations_with_checkpointing",
            "activations_without_checkpointing"} <= mem.keys()
