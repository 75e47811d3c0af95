"""Cluster planner: parameters, per-GPU memory, FLOPs, all-to-all traffic and a roofline step time for any model
config on any cluster, computed from the configs alone (nothing is allocated).

    python -m tml.tools.plan model=interaction_small parallel=zero1 parallel.expert_parallel_size=64 \
        cluster.gpus=256 cluster.gpu=h100 [train.seq_len=4000 ...] [--json] [--search]

``--json`` prints one JSON object; ``--search`` also ranks every (expert-parallel size, ZeRO stage, activation
checkpointing) choice that fits by estimated step time.

Model of the run (stated so it can be argued with):
* data parallel over all GPUs; experts sharded over expert-parallel groups of size EP, so each expert's weights
  are replicated over N / EP GPUs and everything else over N; ZeRO shards optimizer states (stage >= 1),
  gradients (>= 2) and parameters (3) over those replica groups;
* bf16 mixed precision keeps bf16 parameters, fp32 gradient accumulation and fp32 master weights + Adam moments
  (2 + 4 + 12 bytes per parameter); fp32 keeps 4 + 4 + 8;
* activations are 2-byte tensors saved for backward per token and layer (listed in ``activation_bytes``); with
  activation checkpointing only each block's input is kept, plus one block's activations during recompute;
* step time = compute + all-to-all + gradient synchronisation, not overlapped (an upper bound); compute is the
  roofline max of FLOPs / peak and weight traffic / HBM bandwidth; all-to-all runs over NVLink inside a node and
  over the per-GPU network link across nodes.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tml.errors import ConfigError
from tml.model.config import ModelConfig
from tml.model.counts import count_params
from tml.model.flops import flops_per_token
from tml.parallel.engine import ParallelConfig

GIB = 1024**3


@dataclass(frozen=True)
class GPUSpec:
    name: str
    peak_bf16_flops: float  # dense, no sparsity
    memory_bytes: float
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float  # per GPU, one direction
    network_bytes_per_s: float  # per GPU across nodes (one 400 Gb/s NIC per GPU)


GPUS = {
    "h100": GPUSpec("NVIDIA H100 SXM 80GB", 989e12, 80e9, 3.35e12, 450e9, 50e9),
    "h200": GPUSpec("NVIDIA H200 SXM 141GB", 989e12, 141e9, 4.8e12, 450e9, 50e9),
}


@dataclass
class ClusterConfig:
    gpus: int = 8
    gpu: str = "h100"  # h100 | h200
    gpus_per_node: int = 8
    usable_memory_fraction: float = 0.9  # CUDA context, allocator fragmentation, communication buffers


@dataclass
class TrainShape:
    seq_len: int = 4000  # positions per row: 200 micro-turns x 20 slots = 40 s of interaction
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    precision: str = "bf16"  # bf16 | fp32
    text_target_fraction: float = 0.2  # share of positions whose target is text (4 of 20 slots in tiny)
    audio_target_fraction: float = 0.25  # share whose target is dMel audio (5 of 20)


@dataclass
class PlanConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainShape = field(default_factory=TrainShape)


def activation_bytes(cfg: ModelConfig, moe_layer: bool) -> int:
    """Bytes saved for backward per token in one block (2-byte activations; router logits and the attention
    log-sum-exp in fp32)."""
    d, hd, m = cfg.dim, cfg.head_dim, cfg.moe
    attn = 2 * (2 * d + 2 * cfg.n_heads * hd + 2 * cfg.num_kv_heads * hd) + 4 * cfg.n_heads
    if moe_layer:
        routed = m.top_k * 2 * (d + 3 * m.hidden_dim)  # dispatched input, w1 and w3 outputs, their product
        shared = 2 * 3 * m.num_shared_experts * m.hidden_dim
        ffn = 2 * 2 * d + 4 * m.num_experts + routed + shared + 2 * d
    else:
        ffn = 2 * 2 * d + 2 * 3 * cfg.dense_hidden_dim + 2 * d
    return attn + ffn


def _ring_allreduce_s(bytes_: float, n: int, bw: float) -> float:
    return 0.0 if n <= 1 else 2 * (n - 1) / n * bytes_ / bw


def plan(cfg: PlanConfig, fpt: float | None = None) -> dict:
    """The plan as one JSON-able dict (see module docstring for the model of the run). ``fpt``: FLOPs per token if
    already known (``search`` computes it once: it builds the model on the meta device)."""
    m, c, t, p = cfg.model, cfg.cluster, cfg.train, cfg.parallel
    m.validate()
    p.validate()
    if c.gpu not in GPUS:
        raise ConfigError(f"cluster.gpu={c.gpu!r}: choose one of {', '.join(GPUS)}")
    gpu = GPUS[c.gpu]
    N, EP, E = c.gpus, p.expert_parallel_size, m.moe.num_experts
    if N <= 0 or c.gpus_per_node <= 0:
        raise ConfigError("cluster.gpus and cluster.gpus_per_node must be positive")
    if N % EP:
        raise ConfigError(f"parallel.expert_parallel_size={EP} does not divide cluster.gpus={N}")
    if m.n_moe_layers and E % EP:
        raise ConfigError(f"parallel.expert_parallel_size={EP} does not divide model.moe.num_experts={E}")
    if t.precision not in ("bf16", "fp32"):
        raise ConfigError(f"train.precision={t.precision!r}: choose bf16 or fp32")

    counts = count_params(m)
    dense_params = counts.total - counts.expert
    expert_params_local = counts.expert // EP
    local_params = dense_params + expert_params_local
    p_b, g_b, o_b = (2, 4, 12) if t.precision == "bf16" else (4, 4, 8)
    dp_dense, dp_expert = N, N // EP

    def sharded(per_param: int, stage_needed: int) -> float:
        shard = p.zero_stage >= stage_needed
        return per_param * (dense_params / (dp_dense if shard else 1) + expert_params_local / (dp_expert if shard else 1))

    mem_params = sharded(p_b, 3)
    mem_grads = sharded(g_b, 2)
    mem_optim = sharded(o_b, 1)

    tokens = t.seq_len * t.micro_batch_size
    per_layer = [activation_bytes(m, moe_layer=i >= m.dense_layers) for i in range(m.n_layers)]
    logits = tokens * 4 * 2 * (t.text_target_fraction * m.vocab_size
                               + t.audio_target_fraction * m.frames_per_audio_position * m.n_mels * m.dmel_bins)
    embed_out = tokens * 2 * m.dim * 2  # embedding output and final norm output
    act_full = tokens * sum(per_layer) + logits + embed_out
    act_ckpt = tokens * (m.n_layers * 2 * m.dim + max(per_layer)) + logits + embed_out
    act = act_ckpt if m.activation_checkpointing else act_full
    total = mem_params + mem_grads + mem_optim + act
    available = gpu.memory_bytes * c.usable_memory_fraction

    # Compute.
    fpt = flops_per_token(m, t.seq_len) if fpt is None else fpt
    tokens_step = tokens * t.grad_accum_steps  # per GPU per optimizer step
    model_flops = fpt * tokens_step
    hw_flops = model_flops * (4 / 3 if m.activation_checkpointing else 1)  # recompute = one more forward
    weight_traffic = local_params * p_b * (4 if m.activation_checkpointing else 3) * t.grad_accum_steps
    t_compute = max(hw_flops / gpu.peak_bf16_flops, weight_traffic / gpu.hbm_bytes_per_s)

    # All-to-all: every routed copy of a token goes out and comes back, forward and backward (and again in the
    # recompute); only the (EP-1)/EP that leaves the GPU is traffic.
    passes = 3 if m.activation_checkpointing else 2
    a2a = tokens_step * m.n_moe_layers * m.moe.top_k * m.dim * 2 * 2 * passes * (EP - 1) / max(EP, 1)
    off_node = max(0, EP - c.gpus_per_node) / max(EP - 1, 1)
    t_a2a = a2a * off_node / gpu.network_bytes_per_s + a2a * (1 - off_node) / gpu.nvlink_bytes_per_s

    # Gradient synchronisation in bf16 (all-reduce; ZeRO >= 2 reduce-scatters, half the traffic) and ZeRO-3's
    # parameter all-gathers (forward and backward).
    def group_bw(n: int) -> float:
        return gpu.nvlink_bytes_per_s if n <= c.gpus_per_node else gpu.network_bytes_per_s

    rs = 0.5 if p.zero_stage >= 2 else 1.0
    t_grad = rs * (_ring_allreduce_s(dense_params * 2, dp_dense, group_bw(dp_dense))
                   + _ring_allreduce_s(expert_params_local * 2, dp_expert, group_bw(dp_expert)))
    if p.zero_stage == 3:  # all-gather (half an all-reduce's traffic) before forward and before backward
        t_grad += 2 * t.grad_accum_steps * (_ring_allreduce_s(dense_params * 2, dp_dense, group_bw(dp_dense))
                                            + _ring_allreduce_s(expert_params_local * 2, dp_expert, group_bw(dp_expert))) / 2
    step = t_compute + t_a2a + t_grad
    fits = total <= available

    result = {
        "model": {"dim": m.dim, "n_layers": m.n_layers, "num_experts": E, "top_k": m.moe.top_k,
                  "activation_checkpointing": m.activation_checkpointing},
        "cluster": {"gpus": N, "gpu": gpu.name, "gpus_per_node": c.gpus_per_node},
        "parallel": {"data_parallel_size": N, "expert_parallel_size": EP, "expert_data_parallel_size": dp_expert,
                     "zero_stage": p.zero_stage},
        "train": asdict(t),
        "params_total": counts.total,
        "params_active": counts.active,
        "params_expert": counts.expert,
        "params_per_gpu": local_params,
        "flops_per_token": fpt,
        "memory_per_gpu_gib": {
            "parameters": mem_params / GIB,
            "gradients": mem_grads / GIB,
            "optimizer_states": mem_optim / GIB,
            "activations": act / GIB,
            "activations_without_checkpointing": act_full / GIB,
            "activations_with_checkpointing": act_ckpt / GIB,
            "total": total / GIB,
            "available": available / GIB,
        },
        "fits": fits,
        "all_to_all_bytes_per_step": a2a,
        "tokens_per_step": tokens_step * N,
        "step_time_s": {"compute": t_compute, "all_to_all": t_a2a, "gradient_sync": t_grad, "total": step},
        "mfu": model_flops / (step * gpu.peak_bf16_flops),
        "assumptions": {"peak_bf16_flops": gpu.peak_bf16_flops, "hbm_bytes_per_s": gpu.hbm_bytes_per_s,
                        "nvlink_bytes_per_s": gpu.nvlink_bytes_per_s,
                        "network_bytes_per_s": gpu.network_bytes_per_s,
                        "overlap": "none (communication is not overlapped with compute: an upper bound)"},
        "advice": [] if fits else advice(cfg, mem_params, mem_grads, mem_optim, act, act_ckpt, available),
    }
    return result


def advice(cfg: PlanConfig, params: float, grads: float, optim: float, act: float, act_ckpt: float,
           available: float) -> list[str]:
    """Which knobs to turn when the plan does not fit, biggest lever first."""
    m, p, c, t = cfg.model, cfg.parallel, cfg.cluster, cfg.train
    tips = []
    over = (params + grads + optim + act - available) / GIB
    tips.append(f"needs {over:.1f} GiB more per GPU than the {available / GIB:.1f} GiB usable")
    if m.n_moe_layers:
        ep_max = math.gcd(m.moe.num_experts, c.gpus)
        if p.expert_parallel_size < ep_max:
            tips.append(f"raise parallel.expert_parallel_size (now {p.expert_parallel_size}, up to {ep_max}): "
                        f"shards the routed experts, which hold most of the parameters")
    if p.zero_stage < 3:
        tips.append(f"raise parallel.zero_stage (now {p.zero_stage}) to shard "
                    + ["optimizer states", "gradients too", "parameters too"][p.zero_stage])
    if not m.activation_checkpointing and act_ckpt < act:
        tips.append(f"set model.activation_checkpointing=true: activations {act / GIB:.1f} -> {act_ckpt / GIB:.1f} GiB")
    if t.micro_batch_size > 1:
        tips.append("lower train.micro_batch_size (raise train.grad_accum_steps to keep the batch)")
    tips.append("or add GPUs (cluster.gpus) / use cluster.gpu=h200 (141 GB)")
    return tips


def search(cfg: PlanConfig) -> list[dict]:
    """Every (EP, ZeRO stage, checkpointing) choice that fits, fastest first."""
    import copy

    found = []
    fpt = flops_per_token(cfg.model, cfg.train.seq_len)  # activation checkpointing does not change model FLOPs
    eps = [e for e in range(1, cfg.cluster.gpus + 1) if cfg.cluster.gpus % e == 0
           and (not cfg.model.n_moe_layers or cfg.model.moe.num_experts % e == 0)]
    for ep in eps:
        for stage in (0, 1, 2, 3):
            for ckpt in (False, True):
                c = copy.deepcopy(cfg)
                c.parallel.expert_parallel_size, c.parallel.zero_stage = ep, stage
                c.model.activation_checkpointing = ckpt
                r = plan(c, fpt)
                if r["fits"]:
                    found.append({"expert_parallel_size": ep, "zero_stage": stage, "activation_checkpointing": ckpt,
                                  "memory_gib": r["memory_per_gpu_gib"]["total"],
                                  "step_time_s": r["step_time_s"]["total"], "mfu": r["mfu"]})
    return sorted(found, key=lambda r: (r["step_time_s"], r["memory_gib"]))


def format_plan(r: dict) -> str:
    mem = r["memory_per_gpu_gib"]
    st = r["step_time_s"]
    lines = [
        f"model: {r['params_total'] / 1e9:.2f}B params total, {r['params_active'] / 1e9:.2f}B active, "
        f"{r['flops_per_token'] / 1e9:.1f} GFLOP per token (fwd+bwd)",
        f"cluster: {r['cluster']['gpus']} x {r['cluster']['gpu']}; DP {r['parallel']['data_parallel_size']}, "
        f"EP {r['parallel']['expert_parallel_size']} (each expert on {r['parallel']['expert_data_parallel_size']} "
        f"GPUs), ZeRO-{r['parallel']['zero_stage']}",
        f"memory per GPU (GiB): params {mem['parameters']:.1f}  grads {mem['gradients']:.1f}  "
        f"optimizer {mem['optimizer_states']:.1f}  activations {mem['activations']:.1f} "
        f"(no ckpt {mem['activations_without_checkpointing']:.1f} / ckpt {mem['activations_with_checkpointing']:.1f})"
        f"  total {mem['total']:.1f} of {mem['available']:.1f} -> {'fits' if r['fits'] else 'DOES NOT FIT'}",
        f"step: {r['tokens_per_step']:,} tokens; compute {st['compute']:.3f} s + all-to-all {st['all_to_all']:.3f} s "
        f"({r['all_to_all_bytes_per_step'] / 1e9:.1f} GB per GPU) + grad sync {st['gradient_sync']:.3f} s = "
        f"{st['total']:.3f} s; MFU {100 * r['mfu']:.1f}%",
    ]
    a = r["assumptions"]
    lines.append(f"assumed per GPU: peak {a['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16, HBM {a['hbm_bytes_per_s'] / 1e12:.2f} "
                 f"TB/s, NVLink {a['nvlink_bytes_per_s'] / 1e9:.0f} GB/s, network {a['network_bytes_per_s'] / 1e9:.0f} GB/s; "
                 f"communication not overlapped with compute (an upper bound)")
    lines += [f"  - {tip}" for tip in r["advice"]]
    return "\n".join(lines)


def format_search(rows: list[dict], top: int = 8) -> str:
    """The --search table: the ``top`` fastest choices that fit, with a header."""
    if not rows:
        return "search: no (expert-parallel size, ZeRO stage, checkpointing) choice fits"
    lines = [f"search: {len(rows)} choices fit; the {min(top, len(rows))} fastest:",
             f"  {'EP':>6}  {'ZeRO':>4}  {'act. ckpt':>9}  {'GiB/GPU':>8}  {'step s':>7}  {'MFU':>6}"]
    for row in rows[:top]:
        lines.append(f"  {row['expert_parallel_size']:>6}  {row['zero_stage']:>4}  "
                     f"{str(row['activation_checkpointing']):>9}  {row['memory_gib']:>8.1f}  "
                     f"{row['step_time_s']:>7.3f}  {100 * row['mfu']:>5.1f}%")
    return "\n".join(lines)


def load_config(overrides: list[str]) -> PlanConfig:
    """Compose configs/plan.yaml with Hydra overrides (model=..., parallel=..., cluster.gpus=...)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="plan_schema", node=PlanConfig)
    configs = Path(__file__).resolve().parents[2] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        return OmegaConf.to_object(compose("plan", overrides=overrides))


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    flags = {a for a in argv if a.startswith("--")}
    unknown = flags - {"--json", "--search"}
    if unknown:
        raise SystemExit(f"unknown flag(s) {sorted(unknown)}; use --json and/or --search plus Hydra overrides")
    cfg = load_config([a for a in argv if not a.startswith("--")])
    result = plan(cfg)
    if "--search" in flags:
        result["search"] = search(cfg)
    if "--json" in flags:
        print(json.dumps(result))
    else:
        print(format_plan(result))
        if "search" in result:
            print(format_search(result["search"]))
    return result


if __name__ == "__main__":
    main()
