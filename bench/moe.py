"""MoE layer forward+backward time against baselines measured in the same run.

    python bench/moe.py            # table
    python bench/moe.py --json     # one JSON object per shape: shape, ms, ms_naive, ms_dense, ms_experts (+ ratios)
    python bench/moe.py --device cuda   # bf16 on the GPU, at the ladder's layer shapes (GPU_SHAPES)

For each (tokens, dim, experts, hidden, top_k) shape:
  ms          tml.model.MoE: router, dropless dispatch in expert order, grouped_mm experts, weighted combine
  ms_naive    the same weights and routing through a per-expert Python loop, as in Hugging Face's Mixtral block
              (torch.where per expert, index_add_ back)
  ms_dense    a dense SwiGLU of hidden width top_k * hidden: the same active FLOPs as the MoE's experts
  ms_experts  the MoE's experts alone on rows already sorted by expert and perfectly balanced (no router, no
              dispatch): the floor for any dropless MoE built on these matmul kernels
On CUDA the layer runs its GPU dispatch (a permutation instead of index_add, no atomics) and the times come from
CUDA events around each forward+backward.
Goals on a 2-core CPU: ms / ms_dense <= 1.3 at every shape; ms_naive / ms >= 3 with many small experts (64, top-8).
Times are medians over --reps rounds after warm-up (the variants interleaved in each round), on the same inputs and a
random output gradient; ratios are medians of the per-round ratios.

What limits it on CPU: ms_experts / ms_dense. The experts run the dense layer's FLOPs as E small matmuls (rows ~
tokens * top_k / E, width hidden), which PyTorch's CPU kernels (MKL through grouped_mm, or bmm) run at a lower rate
than one large matmul: measured here, 64 experts of [256 x 256] @ [256 x 128] take ~1.4x one [2048 x 256] @
[256 x 1024] on 2 threads (1.2x on 1 thread), so at 64 experts of 128 the experts alone are ~1.5x dense before any
routing. The layer adds ~5-10% over ms_experts (router, sort, one gather and one index_add of the [tokens * top_k,
dim] rows). Larger experts (8 of 512, or model=small's 16 of 384 at dim 512) are within 1.3x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from tml.model import MoE, MoEConfig, SwiGLU

SHAPES = [  # tokens, dim, experts, hidden, top_k
    (2048, 256, 8, 512, 2),  # few large experts
    (2048, 256, 32, 256, 4),
    (2048, 256, 64, 128, 8),  # many small experts
    (2048, 512, 16, 384, 2),  # model=small's MoE layer
]
GPU_SHAPES = [  # a micro-batch of 16k tokens through the ladder's MoE layers
    (16384, 512, 16, 384, 2),  # model=small
    (16384, 1024, 48, 512, 4),  # model=medium
    (16384, 2048, 96, 1024, 6),  # model=large
    (16384, 2048, 8, 3072, 2),  # few large experts, same active FLOPs as large
]


def naive_mixtral(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Hugging Face MixtralSparseMoeBlock's loop over experts, on ``moe``'s weights. x [N, dim] -> [N, dim]."""
    logits = moe.gate(x)
    weights, selected = logits.float().softmax(-1).topk(moe.top_k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
    out = torch.zeros_like(x)
    expert_mask = F.one_hot(selected, moe.num_experts).permute(2, 1, 0)  # [E, top_k, N]
    ex = moe.experts
    for e in range(moe.num_experts):
        idx, top_x = torch.where(expert_mask[e])
        if top_x.numel() == 0:
            continue
        h = x[top_x]
        y = F.linear(F.silu(F.linear(h, ex.w1[e])) * F.linear(h, ex.w3[e]), ex.w2[e])
        out.index_add_(0, top_x, y * weights[top_x, idx, None])
    return out


def fwd_bwd_seconds(fn, x: torch.Tensor, grad: torch.Tensor, params) -> float:
    for p in params:
        p.grad = None
    xi = x.detach().requires_grad_(True)
    if x.is_cuda:  # CUDA events: kernel time on the device's own clock, launch queue included
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(xi).backward(grad)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    fn(xi).backward(grad)
    return time.perf_counter() - t0


def bench_shape(tokens: int, dim: int, experts: int, hidden: int, top_k: int, reps: int,
                device: str = "cpu") -> dict:
    """The three variants timed in turn within each repetition, so that load from other processes on a shared
    machine hits all three alike; ratios are medians of the per-repetition ratios. fp32 on CPU, bf16 on CUDA."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    moe = MoE(dim, MoEConfig(hidden_dim=hidden, num_experts=experts, top_k=top_k, route_norm=True,
                             aux_loss_coeff=0.0))
    dense = SwiGLU(dim, top_k * hidden)
    for m in (moe, dense):
        for p in m.parameters():
            torch.nn.init.normal_(p, std=dim ** -0.5)
        m.to(device, dtype)
    x = torch.randn(tokens, dim, device=device, dtype=dtype)
    grad = torch.randn(tokens, dim, device=device, dtype=dtype)
    # The experts alone on perfectly balanced rows already sorted by expert: no router, no gather, no padding.
    rows = tokens * top_k
    offs = (torch.arange(1, experts + 1) * rows // experts).to(device, torch.int32)
    x_sorted = torch.randn(rows, dim, device=device, dtype=dtype)
    grad_sorted = torch.randn(rows, dim, device=device, dtype=dtype)
    variants = {
        "ms": (lambda xi: moe(xi[None])[0], list(moe.parameters()), x, grad),
        "ms_naive": (lambda xi: naive_mixtral(moe, xi), list(moe.parameters()), x, grad),
        "ms_dense": (dense, list(dense.parameters()), x, grad),
        "ms_experts": (lambda xi: moe.experts(xi, offs), list(moe.experts.parameters()), x_sorted, grad_sorted),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(reps + 2):  # 2 warm-up rounds
        for k, (fn, params, xk, gk) in variants.items():
            t = fwd_bwd_seconds(fn, xk, gk, params)
            if i >= 2:
                times[k].append(1000 * t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"shape": {"tokens": tokens, "dim": dim, "experts": experts, "hidden": hidden, "top_k": top_k}, **med,
            "vs_dense": statistics.median(a / b for a, b in zip(times["ms"], times["ms_dense"])),
            "experts_vs_dense": statistics.median(a / b for a, b in zip(times["ms_experts"], times["ms_dense"])),
            "naive_speedup": statistics.median(a / b for a, b in zip(times["ms_naive"], times["ms"]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="one JSON object per shape instead of the table")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: bf16 at GPU_SHAPES")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = GPU_SHAPES if args.device == "cuda" else SHAPES
    if not args.json:
        where = torch.cuda.get_device_name() + ", bf16" if args.device == "cuda" else \
            f"fp32, {torch.get_num_threads()} threads"
        print(f"MoE fwd+bwd, {where}, median of {args.reps}")
        print(f"{'tokens':>6} {'dim':>4} {'E':>3} {'hidden':>6} {'k':>2} | {'MoE ms':>8} {'naive ms':>9} "
              f"{'dense ms':>9} {'experts ms':>10} | {'MoE/dense':>9} {'naive/MoE':>9} {'experts/dense':>13}")
    for shape in shapes:
        r = bench_shape(*shape, reps=args.reps, device=args.device)
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            s = r["shape"]
            print(f"{s['tokens']:>6} {s['dim']:>4} {s['experts']:>3} {s['hidden']:>6} {s['top_k']:>2} | "
                  f"{r['ms']:8.2f} {r['ms_naive']:9.2f} {r['ms_dense']:9.2f} {r['ms_experts']:10.2f} | "
                  f"{r['vs_dense']:8.2f}x {r['naive_speedup']:8.2f}x {r['experts_vs_dense']:12.2f}x", flush=True)


if __name__ == "__main__":
    main()
