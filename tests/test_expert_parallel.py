"""Expert parallelism under torchrun (gloo, CPU): the sharded MoE against the unsharded one, and the pretraining
recipe at EP = 2 and 4 with both backends against EP = 1 on the same data, plus resume at EP = 2."""

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, metrics
from handmade import write_dataset
from tml.parallel.expert import validate_expert_parallel
from tml.errors import ConfigError

TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.moe.hidden_dim=64",
        "model.moe.num_experts=4", "data.loader.seq_len=200", "data.loader.micro_batch_size=1",
        "trainer.warmup_steps=2", "trainer.decay_steps=16", "logger=none", "model.moe.z_loss_coeff=1e-3"]


def _free_port() -> str:
    with socket.socket() as s:  # other test sessions may hold torchrun's default port 29500
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--master_port", _free_port(), "--nproc_per_node",
           str(nproc), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.mark.parametrize("ep, nproc, opts", [
    (2, 2, dict(top_k=2, score_func="softmax", num_shared_experts=1, aux_loss_coeff=0.01, seq_aux_loss_coeff=0.01)),
    (4, 4, dict(top_k=3, score_func="sigmoid", route_norm=True, n_groups=2, topk_groups=2, z_loss_coeff=1e-3)),
    (2, 4, dict(top_k=2, capacity_factor=1.0)),  # EP 2 x expert-data-parallel 2
])
def test_sharded_moe_matches_unsharded_over_sgd_steps(ep, nproc, opts):
    proc = torchrun(nproc, "tests/ep_worker.py", str(ep), json.dumps(opts))
    assert f"EP{ep} OK" in proc.stdout


def assert_same_run(a, b, what):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for k in ("loss", "loss/text", "loss/audio", "loss/aux", "grad_norm", "moe/layer1/max_over_mean"):
            # fp32 on CPU; all-to-all and differently partitioned reductions change summation order only
            assert y[k] == pytest.approx(x[k], rel=2e-5, abs=1e-6), (what, k, x["step"])


@pytest.fixture(scope="module")
def ep_data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ep") / "data", 16, 4)


def test_recipe_ep2_both_backends_and_resume_match_ep1(ep_data, tmp_path):
    common = [*TINY, f"data.path={ep_data}", "trainer.save_every=2"]
    run = lambda name, *o: torchrun(2, "recipes/pretrain.py", *common, f"hydra.run.dir={tmp_path / name}", *o)
    run("ep1", "parallel=zero2", "trainer.max_steps=4")
    run("native", "parallel=ep2", "trainer.max_steps=2")
    proc = run("native", "parallel=ep2", "trainer.max_steps=4", "trainer.resume=true")  # resumed at EP=2
    assert "resumed from" in proc.stdout
    run("autoep", "parallel=autoep2", "trainer.max_steps=4")
    ep1, native, autoep = (metrics(tmp_path / n) for n in ("ep1", "native", "autoep"))
    assert ep1[-1]["loss"] < ep1[0]["loss"]
    assert_same_run(ep1, native, "native EP2 (resumed at step 2)")
    assert_same_run(ep1, autoep, "AutoEP EP2")
    assert_same_run(native, autoep, "native vs AutoEP")


def test_recipe_ep4_both_backends_match_ep1(ep_data, tmp_path):
    """Also cross-checks AutoEP's own router against ours on sigmoid scores with group-limited routing (2 groups of
    2 experts, each token confined to its best group), which EP=1 and the native backend compute with MoE.route."""
    routing = ["model.moe.score_func=sigmoid", "model.moe.route_norm=true", "model.moe.n_groups=2",
               "model.moe.topk_groups=1"]
    common = [*TINY, *routing, f"data.path={ep_data}", "trainer.max_steps=3"]
    run = lambda name, *o: torchrun(4, "recipes/pretrain.py", *common, f"hydra.run.dir={tmp_path / name}", *o)
    run("ep1", "parallel=zero1")
    run("native", "parallel=zero1", "parallel.expert_parallel_size=4", "parallel.moe_backend=native")
    run("autoep", "parallel=zero3", "parallel.expert_parallel_size=4", "parallel.moe_backend=deepspeed")
    ep1, native, autoep = (metrics(tmp_path / n) for n in ("ep1", "native", "autoep"))
    assert_same_run(ep1, native, "native EP4")
    assert_same_run(ep1, autoep, "AutoEP EP4 ZeRO 3")


@pytest.mark.parametrize("ep, backend, world, experts, zero, key", [
    (3, "native", 2, 6, 2, "must divide the world size"),
    (2, "native", 2, 3, 2, "must divide model.moe.num_experts=3"),
    (2, "native", 2, 4, 3, "needs parallel.zero_stage 1 or 2"),
    (2, "megatron", 2, 4, 2, "parallel.moe_backend='megatron'"),
])
def test_expert_parallel_config_errors(ep, backend, world, experts, zero, key):
    with pytest.raises(ConfigError, match=key):
        validate_expert_parallel(ep, backend, world, experts, zero)
