"""Pretrain an interaction model: `python recipes/pretrain.py model=tiny data=synthetic trainer.max_steps=100`.

Same command under `torchrun --nproc_per_node 2 recipes/pretrain.py ...` for data parallel. Outputs go to the
Hydra run dir (outputs/pretrain/DATE/TIME unless `hydra.run.dir=...`).
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from tml.cli import check_overrides, recipe_run
from tml.train.config import PretrainConfig, register_hydra_schema
from tml.train.loop import pretrain

register_hydra_schema()


@hydra.main(version_base=None, config_path="../configs", config_name="pretrain")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    with recipe_run(run_dir, "pretrain"):
        pretrain(OmegaConf.to_object(cfg), run_dir)


if __name__ == "__main__":
    check_overrides(PretrainConfig)
    main()
