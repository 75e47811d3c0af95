"""Training: configs, the pretraining loop, optimizer and schedule, checkpoints, metrics."""

from tml.train.config import PretrainConfig, TrainerConfig, config_from_dict, validate_config
from tml.train.loop import pretrain

__all__ = ["PretrainConfig", "TrainerConfig", "config_from_dict", "pretrain", "validate_config"]
