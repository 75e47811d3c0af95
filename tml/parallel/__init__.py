"""Distributed setup: process groups and the DeepSpeed engine."""

from tml.parallel.engine import DistInfo, ParallelConfig, build_engine, deepspeed_config, setup_distributed

__all__ = ["DistInfo", "ParallelConfig", "build_engine", "deepspeed_config", "setup_distributed"]
