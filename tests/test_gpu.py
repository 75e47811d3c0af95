"""The CUDA paths, on a machine with a GPU (skipped elsewhere, so CI's CPU machines skip them):

- the MoE's GPU dispatch (``_dispatch_permute``) with grouped_mm experts in bf16 against an fp32 per-expert loop on
  the same routing, and its claim of run-to-run reproducible gradients (no atomics);
- MegaBlocks' grouped GEMM backend against grouped_mm (where ``make setup-gpu`` installed it);
- the pretraining recipe on the GPU through DeepSpeed with NCCL (ZeRO 2's reduce-scatter and all-gather even on one
  rank): its first steps' losses equal the CPU run's of the same seeds, and the bf16 run learns.

    DS_ACCELERATOR=cuda python -m pytest tests/test_gpu.py
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, metrics, recipe_cmd
from tml.model import MoE, MoEConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DIM, HIDDEN, E, TOP_K = 256, 512, 8, 2


def routed_reference(moe: MoE, x32: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """The MoE's forward written from its definition in fp32 on the CPU, for the expert choices ``experts`` [N, top_k]
    the module made (so a bf16 near-tie cannot pick different experts on the two sides): routing weights from the fp32
    gate's softmax at those experts, a loop over experts with plain matmuls. Differentiable in x32.
    x32: fp32 [N, dim] on the CPU -> fp32 [N, dim]."""
    weights = (x32 @ moe.gate.weight.detach().float().cpu().T).softmax(-1).gather(1, experts)
    ex = moe.experts
    out = torch.zeros_like(x32)
    for e in range(moe.num_experts):
        w1, w2, w3 = (w[e].detach().float().cpu() for w in (ex.w1, ex.w2, ex.w3))
        y = (F.silu(x32 @ w1.T) * (x32 @ w3.T)) @ w2.T  # every token through expert e
        out = out + (weights * (experts == e)).sum(-1, keepdim=True) * y  # zero where e was not chosen
    return out


def _moe(backend: str = "grouped_mm") -> MoE:
    torch.manual_seed(0)
    return MoE(DIM, MoEConfig(hidden_dim=HIDDEN, num_experts=E, top_k=TOP_K, expert_backend=backend)).cuda().bfloat16()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


def test_gpu_moe_bf16_matches_fp32_loop_and_is_reproducible():
    moe = _moe()  # softmax routing, no renormalisation: weights are the softmax at the chosen experts
    x = torch.randn(4, 256, DIM, device="cuda").bfloat16().requires_grad_()
    mask = torch.ones(4, 256, dtype=torch.bool, device="cuda")
    mask[1, 200:] = False  # packing padding: computed, not counted
    dy = torch.randn(4, 256, DIM, device="cuda").bfloat16()
    grads = []
    for _ in range(2):
        moe.zero_grad(set_to_none=True)
        x.grad = None
        y = moe(x, mask)
        (y.float() * dy.float()).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in (moe.experts.w1, moe.experts.w2, moe.gate.weight)])
    for a, b in zip(*grads):  # the permute dispatch scatters with index_copy (no atomics): bitwise the same
        assert torch.equal(a, b)
    assert moe.last_expert_counts.sum().item() == (4 * 256 - 56) * TOP_K

    with torch.no_grad():
        _, experts, _, _ = moe.route(x.view(-1, DIM))
    x32 = x.detach().float().cpu().view(-1, DIM).requires_grad_()
    ref = routed_reference(moe, x32, experts.cpu())
    (ref * dy.float().cpu().view(-1, DIM)).sum().backward()
    # bf16 inputs, weights and intermediate activations with fp32 accumulation: ~2^-8 relative rounding per operand
    assert _rel(y.view(-1, DIM), ref.detach()) < 1e-2
    assert _rel(grads[0][0].view(-1, DIM), x32.grad) < 3e-2


def test_gpu_megablocks_backend_matches_grouped_mm():
    pytest.importorskip("grouped_gemm", reason="MegaBlocks' grouped GEMM not installed (make setup-gpu)")
    a, b = _moe("grouped_mm"), _moe("megablocks")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 300, DIM, device="cuda").bfloat16()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    assert _rel(yb, ya) < 1e-2
    dy = torch.randn_like(ya)
    (ya * dy).sum().backward()
    (yb * dy).sum().backward()
    assert _rel(xb.grad, xa.grad) < 2e-2
    assert _rel(b.experts.w2.grad, a.experts.w2.grad) < 2e-2


def _recipe(run_dir, accelerator: str, *overrides) -> list[dict]:
    env = {**os.environ, "DS_ACCELERATOR": accelerator, "OMP_NUM_THREADS": "1"}
    if accelerator == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(recipe_cmd(run_dir, ["logger=none", *overrides]), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{accelerator} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return metrics(run_dir)


def test_gpu_pretrain_matches_cpu_and_learns_in_bf16(tmp_path):
    from handmade import write_dataset

    data = f"data.path={write_dataset(tmp_path / 'data', 8, 4)}"
    common = (data, "parallel=zero2", "trainer.save_every=1000")
    cpu = _recipe(tmp_path / "cpu", "cpu", *common, "trainer.max_steps=3")
    gpu = _recipe(tmp_path / "gpu", "cuda", *common, "trainer.max_steps=3", "parallel.backend=nccl")
    for c, g in zip(cpu, gpu):  # fp32 both; different kernels (TF32 off): agreement to rounding, not bits
        for k in ("loss", "loss/text", "loss/audio", "loss/aux", "grad_norm"):
            assert g[k] == pytest.approx(c[k], rel=2e-3), (c["step"], k)
    bf16 = _recipe(tmp_path / "bf16", "cuda", *common, "trainer.max_steps=16", "trainer.precision=bf16",
                   "parallel.backend=nccl")
    assert [r["step"] for r in bf16] == list(range(1, 17))
    assert bf16[-1]["loss/text"] < 0.8 * bf16[0]["loss/text"]
    assert all(0 < r["mfu"] < 1 for r in bf16)
