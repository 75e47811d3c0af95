"""Resume a run's newest checkpoint as ``recipes/pretrain.py`` does, on the ranks this process group has, and write the
whole training state gathered on rank 0: fp32 weights, Adam moments and step per parameter (by name), each optimizer
param group's hyperparameters, the lr scheduler's state and the trainer state (step, loader, non-finite count).

    torchrun --nproc_per_node N tests/resume_state_worker.py RUN_DIR OUT.pt

Run by tests/test_operations.py at ZeRO 1 and 3: the state loaded on another number of ranks (through DeepSpeed's
universal format) must equal the state loaded on the ranks that wrote it, bit for bit (``safe_get_full_*`` gathers
whole parameters from the partitions)."""

import json
import sys
from pathlib import Path

import torch

from tml.model import InteractionModel
from tml.parallel.engine import build_engine, deepspeed_config, setup_distributed
from tml.parallel.expert import moe_param_groups, prepare_expert_parallel
from tml.train.checkpoint import convert_to_universal, load_checkpoint, universal_resume_tag
from tml.train.config import config_from_dict
from tml.train.optim import param_groups, warmup_cosine


def main(run_dir: Path, out: Path) -> None:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    cfg = config_from_dict(json.loads((run_dir / "config.resolved.json").read_text()))
    t, ckpts = cfg.trainer, run_dir / "checkpoints"
    dist = setup_distributed(cfg.parallel)
    torch.manual_seed(t.seed)
    model = InteractionModel(cfg.model)
    autoep = prepare_expert_parallel(model, cfg.parallel, cfg.model, dist.world_size)
    universal = None
    if source := universal_resume_tag(ckpts, dist.world_size, cfg.parallel.zero_stage,
                                      cfg.parallel.expert_parallel_size):
        universal = convert_to_universal(ckpts, source, dist.rank)
    ds_config = deepspeed_config(micro_batch_size=cfg.data.loader.micro_batch_size, grad_accum_steps=t.grad_accum_steps,
                                 world_size=dist.world_size, grad_clip=t.grad_clip, precision=t.precision,
                                 zero_stage=cfg.parallel.zero_stage, expert_parallel=autoep,
                                 load_universal=universal is not None)
    engine, optimizer, scheduler = build_engine(
        model, ds_config, param_groups(model, t.weight_decay),
        optimizer_fn=lambda groups: torch.optim.AdamW(moe_param_groups(groups), lr=t.lr, betas=(t.beta1, t.beta2),
                                                      eps=t.eps),
        scheduler_fn=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, warmup_cosine(t.warmup_steps, t.decay_steps, t.min_lr_ratio)))
    tag, trainer_state = load_checkpoint(engine, ckpts, dist.rank, dist.world_size, cfg.parallel.zero_stage,
                                         universal_tag=universal)
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO 1/2: DeepSpeed links each parameter to
        optimizer._lazy_init_hp_params_optimizer_state()  # its Adam moments only at the first step (private method)
    params = {n: {"fp32": safe_get_full_fp32_param(p), "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
                  "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}
              for n, p in engine.module.named_parameters()}
    steps = {float(s["step"]) for s in optimizer.optimizer.state.values() if "step" in s}
    if dist.rank == 0:
        torch.save({"tag": tag, "params": params, "adam_steps": sorted(steps), "world_size": dist.world_size,
                    "groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
                    "scheduler": scheduler.state_dict(),
                    "trainer": trainer_state}, out)
    torch.distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
