"""Process group and DeepSpeed engine setup.

The same code runs as one plain ``python`` process, under ``torchrun`` on CPU (gloo, ``DS_ACCELERATOR=cpu``), and
on GPUs (NCCL). DeepSpeed picks its accelerator when it is first imported, so ``setup_distributed`` sets the
environment before importing it.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable

import torch

from tml.errors import ConfigError


@dataclass
class ParallelConfig:
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    backend: str = "auto"  # auto (nccl with CUDA, else gloo) | gloo | nccl (CPU tensors over gloo)
    expert_parallel_size: int = 1  # ranks that share one copy of every MoE layer's experts (divides world, experts)
    moe_backend: str = "native"  # native (our all-to-all dispatch) | deepspeed (DeepSpeed AutoEP); see tml.parallel.expert
    # The process group's timeout: a collective that waits longer fails (a rank that dies is noticed at once: its
    # connections close), and so does a rank that hangs: the others fail after this long, naming it. It applies to
    # every process group, DeepSpeed's too. Keep it above the longest rank-0-only work (universal conversion).
    collective_timeout_s: float = 1800.0

    def validate(self) -> None:
        if self.expert_parallel_size < 1:
            raise ConfigError(f"parallel.expert_parallel_size={self.expert_parallel_size}: must be >= 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage={self.zero_stage}: choose 0, 1, 2 or 3")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"parallel.backend={self.backend!r}: choose auto, gloo or nccl")
        if self.backend == "nccl" and not torch.cuda.is_available():
            raise ConfigError("parallel.backend=nccl needs CUDA, which this machine lacks; use parallel.backend=gloo")
        if self.expert_parallel_size < 1:
            raise ConfigError(f"parallel.expert_parallel_size={self.expert_parallel_size}: must be >= 1")
        if self.collective_timeout_s <= 0:
            raise ConfigError(f"parallel.collective_timeout_s={self.collective_timeout_s}: must be positive")
        if self.moe_backend not in ("native", "deepspeed"):
            raise ConfigError(f"parallel.moe_backend={self.moe_backend!r}: choose native or deepspeed")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(cfg: ParallelConfig) -> DistInfo:
    """Initialise the default process group (a group of one for a plain ``python`` run) and DeepSpeed's comm."""
    cuda = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    if "RANK" not in os.environ:  # plain `python recipes/pretrain.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl":  # NCCL carries CUDA tensors only; the trainer's step flags and metric sums are small CPU
        backend = "cuda:nccl,cpu:gloo"  # tensors, which go over gloo in the same process group
    import deepspeed

    timeout = datetime.timedelta(seconds=cfg.collective_timeout_s)
    # torch's new_group() without a timeout takes the module default (30 min for gloo, 10 for NCCL), not the world
    # group's, and DeepSpeed creates its data-parallel and expert groups that way: a rank that hangs (not dies) in the
    # gradient all-reduce held the others for 30 min. Every group of this process gets the configured timeout.
    c10d = torch.distributed.distributed_c10d
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return DistInfo(rank, world, local_rank, device)


def exit_without_teardown(code: int = 0) -> None:
    """End a finished or stopped multi-rank process: flush stdout and stderr, then ``os._exit(code)``, skipping the
    interpreter's finalization. Call it only when everything is saved and closed (a signalled stop's checkpoint is
    written before ``StopRequested`` leaves the recipe, so its exit code 75 goes through here too).

    Why: gloo's worker threads (``ProcessGroupGloo::runLoop``) drop their reference to a finished collective's work
    just after the caller has been told it is done. When that is the last reference to a tensor made in Python (the
    tensors of ``all_gather_object``, kept by a following barrier's work), freeing it needs the GIL; a thread that
    asks for the GIL while the interpreter is finalizing is ended with ``pthread_exit``, whose unwinding through the
    noexcept run loop calls ``std::terminate``: "terminate called without an active exception", SIGABRT, a failed
    finished run. Seen in a core dump of a 2-rank script ending in ``all_gather_object`` + ``barrier`` (4 of 15 runs
    aborted); ``destroy_process_group`` does not help, DeepSpeed keeps its own references to the groups."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class RankFailure(RuntimeError):
    """A collective failed because another rank died or hangs; the message names the ranks that did not answer."""


def unresponsive_ranks(wait_s: float = 5.0) -> list[int] | None:
    """After a failed collective: the ranks that do not report themselves alive within ``wait_s``, through the
    process group's key-value store (torchrun's agent keeps it, so it outlives any worker). Every surviving rank
    calls this when its collective fails; a dead or stopped rank never does. None when the store is gone too."""
    import time

    dist = torch.distributed
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"tml/alive_after_failure/{dist.get_rank()}", "1")
        deadline, missing = time.monotonic() + wait_s, []
        while time.monotonic() < deadline:
            missing = [r for r in range(dist.get_world_size()) if not store.check([f"tml/alive_after_failure/{r}"])]
            if not missing:
                break
            time.sleep(0.1)
        return missing
    except Exception:  # the store lived in a process that is gone (e.g. rank 0 without torchrun)
        return None


def deepspeed_config(*, micro_batch_size: int, grad_accum_steps: int, world_size: int, grad_clip: float,
                     precision: str, zero_stage: int, expert_parallel: dict | None = None,
                     load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON config for one run (optimizer and schedule are passed as objects, not here).
    ``expert_parallel``: DeepSpeed's AutoEP section (``tml.parallel.expert.autoep_config``), if any.
    ``load_universal``: the resume loads a universal-format checkpoint (``tml.train.checkpoint.convert_to_universal``)."""
    return {
        **({"expert_parallel": expert_parallel} if expert_parallel else {}),
        **({"checkpoint": {"load_universal": True}} if load_universal else {}),
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 10**9,  # tml logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, ds_config: dict, params: list, optimizer_fn: Callable,
                 scheduler_fn: Callable):
    """Wrap ``model`` in a DeepSpeed engine.

    ``params`` are the parameters or param groups to optimise; ``optimizer_fn(params) -> Optimizer`` and ``scheduler_fn(optimizer) -> LRScheduler`` are called by DeepSpeed
    after it has placed the parameters (so ZeRO partitions are what the optimizer sees).
    """
    import deepspeed

    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=params,
        optimizer=optimizer_fn,
        lr_scheduler=scheduler_fn,
        config=ds_config,
    )
    if "expert_parallel" in ds_config:  # AutoEP swapped our MoE layers: keep their router statistics flowing
        from tml.parallel.expert import observe_autoep_routers

        observe_autoep_routers(engine.module)
    return engine, optimizer, scheduler
