"""Expert parallelism: each MoE layer's experts sharded over an expert-parallel (EP) group of ``ep_size`` ranks.

Groups follow DeepSpeed's layout (``deepspeed.utils.groups``): with world size W and EP size P, ranks
``[0..P-1], [P..2P-1], ...`` each hold all experts between them (the EP groups, joined by all-to-all), and the ranks
``{i, i+P, i+2P, ...}`` hold the same experts (expert-data-parallel groups, over which expert gradients are
averaged); every other parameter is averaged over all W ranks.

Two backends (``parallel.moe_backend``), same parameter names and layouts:

* ``native``: our ``MoE`` keeps its ``E / P`` local experts and is given the ``AllToAllDispatcher`` (rows travel to
  their expert's rank with ``all_to_all_single`` and back) in place of its default ``local_experts``. Expert parameters are tagged ``allreduce=False`` and
  ``group_name="ep_size_P"``, as DeepSpeed tags those of its own MoE layers, so that its ZeRO 1/2 optimizer
  partitions them over the expert-data-parallel group and reduces their gradients there. DeepSpeed only looks for
  that tagging when it finds one of its MoE modules in the model, so a parameter-free ``DeepSpeedMoEMarker`` is
  attached to say so.
* ``deepspeed``: DeepSpeed's AutoEP (the ``expert_parallel`` config section from ``autoep_config``) replaces our
  MoE modules by its ``AutoEPMoELayer`` when the engine is built; ``observe_autoep_routers`` then hooks each one so
  our MoE (kept by its ``Block``) still computes the balancing losses and load counts from the new router.

The model itself knows nothing of either: both are applied from here, to a built model.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tml.errors import ConfigError
from tml.model.config import ModelConfig
from tml.model.moe import GroupedExperts, MoE
from tml.model.transformer import Block

MOE_BACKENDS = ("native", "deepspeed")


def group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert groups of EP size ``ep_size``."""
    return f"ep_size_{ep_size}"


def validate_expert_parallel(ep_size: int, backend: str, world_size: int, num_experts: int, zero_stage: int,
                             model: ModelConfig | None = None) -> None:
    """Raise ConfigError naming ``parallel.expert_parallel_size`` / ``parallel.moe_backend`` for impossible setups."""
    if backend not in MOE_BACKENDS:
        raise ConfigError(f"parallel.moe_backend={backend!r}: choose one of {', '.join(MOE_BACKENDS)}")
    if ep_size < 1 or world_size % ep_size:
        raise ConfigError(f"parallel.expert_parallel_size={ep_size} must divide the world size {world_size} "
                          f"(processes); pick one of its divisors")
    if num_experts % ep_size:
        raise ConfigError(f"parallel.expert_parallel_size={ep_size} must divide model.moe.num_experts={num_experts} "
                          f"(every rank holds the same number of experts)")
    if ep_size > 1 and backend == "native" and zero_stage not in (1, 2):
        raise ConfigError(f"parallel.moe_backend=native with parallel.expert_parallel_size={ep_size} needs "
                          f"parallel.zero_stage 1 or 2 (got {zero_stage}): DeepSpeed keeps the expert shards in its "
                          f"ZeRO 1/2 optimizer partitions; use parallel=zero1/zero2, or parallel.moe_backend=deepspeed "
                          f"(AutoEP) for ZeRO 3")
    if ep_size > 1 and backend == "deepspeed" and model is not None and model.moe.capacity_factor:
        raise ConfigError("model.moe.capacity_factor > 0 (token dropping) is not available with DeepSpeed AutoEP, "
                          "which is dropless; use parallel.moe_backend=native or set model.moe.capacity_factor=0")
    if ep_size > 1 and backend == "deepspeed" and model is not None and model.moe.load_balance_coeff:
        raise ConfigError("model.moe.load_balance_coeff > 0 (bias balancing) is not supported by DeepSpeed AutoEP "
                          "in this DeepSpeed build; use parallel.moe_backend=native or set model.moe.load_balance_coeff=0")


def _marker_class():
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    class DeepSpeedMoEMarker(DeepSpeedMoE):
        """No parameters, never called: its presence makes DeepSpeed treat parameters tagged ``allreduce=False`` as
        expert parameters (set ``has_moe_layers``). ``num_local_experts = 0``: it has no per-expert checkpoint files
        of its own; the expert shards are saved in the ZeRO optimizer partitions."""

        def __init__(self, num_experts: int, ep_size: int):
            nn.Module.__init__(self)
            self.num_experts, self.ep_size = num_experts, ep_size
            self.expert_group_name = group_name(ep_size)
            self.num_local_experts = 0

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # the groups already exist (shard_experts made them)

        def forward(self, *args, **kwargs):
            raise RuntimeError("DeepSpeedMoEMarker is a tag for DeepSpeed, not a layer")

    return DeepSpeedMoEMarker


@torch.no_grad()
def shard_experts(model: nn.Module, ep_size: int) -> None:
    """Native backend: keep this rank's experts of every ``MoE`` in ``model`` and wire the all-to-all dispatch.

    Call after ``setup_distributed`` and before building the engine, on a model initialised identically on every
    rank (same seed): rank r of its EP group keeps experts ``[r * E/P, (r + 1) * E/P)``.
    """
    from deepspeed.utils import groups

    name = group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    ep_group = groups._get_expert_parallel_group(name)
    ep_rank = groups._get_expert_parallel_rank(name)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    for moe in moes:
        local = moe.num_experts // ep_size
        lo = ep_rank * local
        for pname in ("w1", "w2", "w3"):
            p = getattr(moe.experts, pname)
            p.data = p.data[lo:lo + local].clone()
            p.allreduce, p.group_name = False, name  # DeepSpeed's expert-parameter tags
        moe.experts.num_experts = local
        moe.dispatcher = AllToAllDispatcher(ep_group, ep_size)
    if moes:
        model.ds_moe_marker = _marker_class()(moes[0].num_experts, ep_size)


def expert_parallel_apply(experts: GroupedExperts, xs: torch.Tensor, counts: torch.Tensor, group,
                          ep_size: int) -> torch.Tensor:
    """Run rows sorted by global expert on the ranks that hold them: ``all_to_all_single`` with uneven splits out,
    grouped_mm on each rank's ``E / ep_size`` local experts, and the reverse ``all_to_all_single`` back. Both
    collectives are differentiable, so expert gradients land on the owning rank.

    Args:
        experts: this rank's experts (E_local = E / ep_size of them; rank r holds experts r*E_local .. (r+1)*E_local-1)
        xs: [M, dim] rows sorted by global expert id
        counts: long [E] rows per global expert (sums to M)
    Returns:
        [M, dim] expert outputs in the order of ``xs``
    """
    from torch.distributed.nn.functional import all_to_all_single

    e_local = experts.num_experts
    # recv[r, j]: rows that rank r sends to my local expert j.
    recv = torch.empty_like(counts)
    dist.all_to_all_single(recv, counts, group=group)
    recv = recv.view(ep_size, e_local)
    send_splits = counts.view(ep_size, e_local).sum(1).tolist()
    recv_splits = recv.sum(1).tolist()
    xr = all_to_all_single(xs.new_empty(sum(recv_splits), xs.shape[1]), xs.contiguous(), recv_splits, send_splits,
                           group=group)
    # Received rows are ordered (source rank, local expert); regroup them by local expert for grouped_mm.
    local_ids = torch.arange(e_local, device=xs.device).repeat(ep_size).repeat_interleave(recv.reshape(-1))
    order = local_ids.argsort(stable=True)
    yr = experts(xr[order], recv.sum(0).cumsum(0).to(torch.int32))
    yr = yr.new_empty(yr.shape).index_copy(0, order, yr)
    return all_to_all_single(xs.new_empty(xs.shape), yr, send_splits, recv_splits, group=group)


class AllToAllDispatcher:
    """Native expert-parallel token dispatcher (``MoE.dispatcher``, same contract as ``tml.model.moe.local_experts``):
    the rows go to the ranks of ``group`` that hold their experts and come back through ``expert_parallel_apply``;
    the routing weight is applied to the returned rows."""

    def __init__(self, group, ep_size: int):
        self.group, self.ep_size = group, ep_size

    def __call__(self, experts: GroupedExperts, xs: torch.Tensor, counts: torch.Tensor,
                 scale: torch.Tensor | None = None) -> torch.Tensor:
        ys = expert_parallel_apply(experts, xs, counts, self.group, self.ep_size)
        return ys if scale is None else ys * scale.unsqueeze(-1).to(ys.dtype)


def _observe_router(moe: MoE, layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook on an AutoEP layer called as ``layer(h, token_mask)`` by ``Block``: our MoE computes the
    router statistics from AutoEP's router on the same input, then AutoEP's forward gets only ``h``."""
    h, token_mask = args
    moe.observe_router_logits(layer.router.gate(h.reshape(-1, h.shape[-1])), h.shape, token_mask)
    return (h,), kwargs


def observe_autoep_routers(model: nn.Module) -> int:
    """After ``deepspeed.initialize`` with AutoEP: hook every MoE layer AutoEP swapped in (``Block.mlp`` no longer our
    MoE) so our MoE, kept in ``Block.moe``, sets the balancing losses and load counts of each forward (also in an
    activation-checkpointing recompute). Returns the number of layers hooked."""
    hooked = 0
    for block in model.modules():
        if isinstance(block, Block) and block.moe and block.mlp is not block.moe[0]:
            block.mlp.register_forward_pre_hook(partial(_observe_router, block.moe[0]), with_kwargs=True)
            hooked += 1
    return hooked


def moe_param_groups(groups: list[dict]) -> list[dict]:
    """Optimizer param groups with expert parameters (``allreduce=False``) split into their own ``moe`` groups, as
    DeepSpeed's ZeRO optimizer requires. Call inside the ``optimizer_fn`` given to the engine: AutoEP creates its
    expert parameters while the engine is built."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    named = [{**g, "name": g.get("name", f"group{i}")} for i, g in enumerate(groups)]
    return split_params_into_different_moe_groups_for_optimizer(named)


def autoep_config(ep_size: int, model: ModelConfig) -> dict[str, Any]:
    """DeepSpeed's ``expert_parallel`` config section for our MoE layout (``layers.<i>.mlp`` = MoE)."""
    m = model.moe
    return {
        "enabled": True,
        "autoep_size": ep_size,
        "moe_layer_pattern": r"layers\.\d+\.mlp",
        "router_pattern": "gate",
        "expert_pattern": "experts",
        "expert_w1": "w1",
        "expert_w2": "w2",
        "expert_w3": "w3",
        "num_experts_attr": "num_experts",
        "top_k_attr": "top_k",
        "top_k": m.top_k,
        "score_func": m.score_func,
        "route_norm": m.route_norm,
        "route_scale": m.route_scale,
        "num_expert_groups": m.n_groups,
        "num_limited_groups": m.topk_groups,
        "has_shared_experts": m.num_shared_experts > 0,
        **({"shared_experts_pattern": "shared_experts"} if m.num_shared_experts else {}),
    }


def prepare_expert_parallel(model: nn.Module, parallel, model_cfg: ModelConfig, world_size: int) -> dict | None:
    """Validate ``parallel.expert_parallel_size`` / ``parallel.moe_backend`` and apply them to ``model`` before the
    engine is built. Returns the ``expert_parallel`` DeepSpeed config section for the ``deepspeed`` backend (AutoEP
    does its sharding inside ``deepspeed.initialize``), else None."""
    ep = parallel.expert_parallel_size
    validate_expert_parallel(ep, parallel.moe_backend, world_size, model_cfg.moe.num_experts, parallel.zero_stage,
                             model_cfg)
    if ep == 1 or model_cfg.n_moe_layers == 0:
        return None
    if parallel.moe_backend == "native":
        shard_experts(model, ep)
        return None
    return autoep_config(ep, model_cfg)


def restore_expert_shards(engine) -> None:
    """After ``engine.load_checkpoint`` with the native backend: DeepSpeed loads the module weights from the one
    model-states file rank 0 wrote, which holds rank 0's expert shard only; every rank's own shard is in its ZeRO
    optimizer partition (fp32). Copy those partitions back into the model's parameters. No-op otherwise."""
    if any(isinstance(m, MoE) and isinstance(m.dispatcher, AllToAllDispatcher) for m in engine.module.modules()):
        engine.optimizer.update_lp_params()
