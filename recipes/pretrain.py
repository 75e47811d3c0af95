"""Pretrain an interaction model: `python recipes/pretrain.py model=tiny data=synthetic trainer.max_steps=100`.

Same command under `torchrun --nproc_per_node 2 recipes/pretrain.py ...` for data parallel. Outputs go to the
Hydra run dir (outputs/pretrain/DATE/TIME unless `hydra.run.dir=...`).
"""

import signal
import sys

# launch/slurm_node.sh starts torchrun with SIGUSR1 ignored (Slurm signals every process of a step, and torchrun has
# no handler for it); the trainer takes the default back, so a SIGUSR1 before its own handler is installed (during
# start-up, before any step) ends it and the job is requeued instead of the signal being lost.
signal.signal(signal.SIGUSR1, signal.SIG_DFL)

import hydra  # noqa: E402
import torch  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from tml.cli import check_overrides, recipe_run  # noqa: E402
from tml.parallel.engine import RankFailure, exit_without_teardown, unresponsive_ranks  # noqa: E402
from tml.train.config import PretrainConfig, register_hydra_schema  # noqa: E402
from tml.train.loop import pretrain  # noqa: E402
from tml.train.signals import StopRequested, requeue_submitit_job  # noqa: E402

register_hydra_schema()


@hydra.main(version_base=None, config_path="../configs", config_name="pretrain")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    with recipe_run(run_dir, "pretrain"):
        try:
            pretrain(OmegaConf.to_object(cfg), run_dir)
        except StopRequested:
            requeue_submitit_job()  # a sweep job under submitit on Slurm; the sbatch scripts requeue by themselves
            raise
        except RuntimeError as e:  # gloo reports a dead peer or a timeout as a plain RuntimeError
            if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1 and (
                    isinstance(e, torch.distributed.DistError) or any(k in str(e) for k in ("gloo", "NCCL")))):
                raise
            missing = unresponsive_ranks()  # another rank died or hangs (parallel.collective_timeout_s)
            raise RankFailure(f"rank {torch.distributed.get_rank()}: a collective failed ({type(e).__name__}); "
                              f"ranks that did not answer within 5 s: {missing if missing is not None else 'unknown'} "
                              f"(dead or hung). Resume from the last complete checkpoint with "
                              f"trainer.auto_resume=true") from e


if __name__ == "__main__":
    check_overrides(PretrainConfig)
    # A finished multi-rank run, or one stopped by a signal (StopRequested, exit 75, raised after its checkpoint),
    # has saved, logged and closed everything when main() is left; interpreter finalization can then race gloo's
    # worker threads and abort the rank with SIGABRT instead of the exit code (see exit_without_teardown).
    try:
        main()
        code = 0
    except SystemExit as e:  # hydra turns a failure into SystemExit(1); a signalled stop is SystemExit(75)
        if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            raise
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        exit_without_teardown(code)
