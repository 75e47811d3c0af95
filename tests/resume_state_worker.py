"""Resume a run's newest checkpoint with the pretraining setup (``tml.train.loop.setup``, what ``recipes/pretrain.py``
runs) on the ranks this process group has, and write the whole training state gathered on rank 0: fp32 weights and
Adam moments per parameter (by name), the Adam step, each optimizer param group's hyperparameters, the lr scheduler's
state and the trainer state (step, loader cursor).

    torchrun --nproc_per_node N tests/resume_state_worker.py RUN_DIR OUT_PREFIX [KEY=VALUE ...]

Every rank writes ``OUT_PREFIX.rank{r}.pt`` (its sharded experts are its own); KEY=VALUE override the run's config
(e.g. another ``parallel.expert_parallel_size``).

Run by tests/test_operations.py at ZeRO 1 and at ZeRO 3 with AutoEP: the state loaded on another number of ranks (through DeepSpeed's
universal format) must equal the state loaded on the ranks that wrote it, bit for bit (``safe_get_full_*`` gathers
whole parameters from the partitions)."""

import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tml.parallel.engine import exit_without_teardown
from tml.train.config import config_from_dict
from tml.train.loop import close, setup


def main(run_dir: Path, out: str, overrides: list[str]) -> None:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    saved = OmegaConf.create(json.loads((run_dir / "config.resolved.json").read_text()))
    cfg = config_from_dict(OmegaConf.to_container(OmegaConf.merge(saved, OmegaConf.from_dotlist(overrides))))
    cfg.trainer.resume = True
    tr = setup(cfg, run_dir)
    optimizer = tr.optimizer
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO 1/2: DeepSpeed links each parameter to
        optimizer._lazy_init_hp_params_optimizer_state()  # its Adam moments only at the first step (private method)
    params = {n: {"fp32": safe_get_full_fp32_param(p), "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
                  "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}
              for n, p in tr.engine.module.named_parameters()}
    steps = sorted({float(s["step"]) for s in optimizer.optimizer.state.values() if "step" in s})
    torch.save({"world_size": tr.dist.world_size, "params": params, "adam_steps": steps,
                "groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
                "scheduler": tr.engine.lr_scheduler.state_dict(), "step": tr.step,
                "loader": tr.loader.state_dict()}, f"{out}.rank{tr.dist.rank}.pt")
    close(tr)
    exit_without_teardown()  # as recipes/pretrain.py ends a multi-rank run


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
