"""Training: configs, the pretraining loop, optimizer and schedule, checkpoints, metrics."""

from tml.train.config import PretrainConfig, TrainerConfig, validate_config
from tml.train.loop import config_from_dict, pretrain

__all__ = ["PretrainConfig", "TrainerConfig", "config_from_dict", "pretrain", "validate_config"]
