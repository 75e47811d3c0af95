"""The pretraining loop: validated config -> data, model, DeepSpeed engine -> steps, metrics, checkpoints.

One optimizer step = ``grad_accum_steps`` micro-batches per rank. Logged values are means over the step's
micro-batches and over ranks. With ``trainer.resume=true`` the run continues from its run dir's newest checkpoint
with the same step count, data cursor and RNG state, so its metrics equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tml.audio.dmel import DMelTokenizer
from tml.data.loader import PackedBatchLoader, read_manifest
from tml.model import InteractionModel, compute_losses, param_counts
from tml.model.moe_stats import expert_load_metrics
from tml.parallel.engine import build_engine, deepspeed_config, setup_distributed
from tml.parallel.expert import moe_param_groups, prepare_expert_parallel, restore_expert_shards
from tml.streams.layout import ConfigError
from tml.text.tokenizer import TextTokenizer
from tml.train.checkpoint import latest_tag, load_checkpoint, save_checkpoint, set_rng_state
from tml.train.config import PretrainConfig, validate_config
from tml.train.metrics import MetricsLogger
from tml.train.optim import param_groups, warmup_cosine

log = logging.getLogger(__name__)

LOGGED = ("loss", "loss/text", "loss/audio", "loss/aux", "loss/text_words")


def _broadcast_run_dir(run_dir: Path, rank: int) -> Path:
    """All ranks write to rank 0's run dir (each process's Hydra may have stamped its own time)."""
    box = [str(run_dir)]
    torch.distributed.broadcast_object_list(box, src=0)
    return Path(box[0])


def _grad_norm(model: torch.nn.Module) -> float:
    """L2 norm of all (already data-parallel averaged) gradients, before clipping."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def pretrain(cfg: PretrainConfig, run_dir: str | Path) -> dict:
    """Run (or resume) pretraining into ``run_dir``. Returns the last logged metrics record."""
    run_dir = Path(run_dir)
    t = cfg.trainer
    layout = validate_config(cfg)
    manifest = read_manifest(cfg.data.path)
    text = TextTokenizer.load(Path(cfg.data.path) / manifest.get("tokenizer", "tokenizer.json"))
    cfg.model.vocab_size = text.vocab_size  # the head and embedding follow the data's tokenizer
    ckpt_dir = run_dir / "checkpoints"
    if not t.resume and latest_tag(ckpt_dir) is not None:
        raise ConfigError(f"{ckpt_dir} already holds checkpoints: pass trainer.resume=true to continue that run, "
                          f"or choose a fresh hydra.run.dir")
    if t.threads > 0:
        torch.set_num_threads(t.threads)

    dist = setup_distributed(cfg.parallel)
    run_dir = _broadcast_run_dir(run_dir, dist.rank)
    is_main = dist.rank == 0
    if is_main and t.max_steps > t.decay_steps:
        log.warning("trainer.max_steps=%d > trainer.decay_steps=%d: the lr stays at its minimum after step %d",
                    t.max_steps, t.decay_steps, t.decay_steps)
    torch.manual_seed(t.seed)

    model = InteractionModel(cfg.model)
    counts = param_counts(model)
    autoep = prepare_expert_parallel(model, cfg.parallel, cfg.model, dist.world_size)  # shards experts (native)
    ds_config = deepspeed_config(micro_batch_size=cfg.data.loader.micro_batch_size, grad_accum_steps=t.grad_accum_steps,
                                 world_size=dist.world_size, grad_clip=t.grad_clip, precision=t.precision,
                                 zero_stage=cfg.parallel.zero_stage, expert_parallel=autoep)
    schedule = warmup_cosine(t.warmup_steps, t.decay_steps, t.min_lr_ratio)
    engine, optimizer, _ = build_engine(
        model, ds_config, param_groups(model, t.weight_decay),
        optimizer_fn=lambda groups: torch.optim.AdamW(moe_param_groups(groups), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps),
        scheduler_fn=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    loader = PackedBatchLoader(cfg.data.path, cfg.data.loader, layout, DMelTokenizer(cfg.data.dmel), text,
                               rank=dist.rank, world_size=dist.world_size)

    step = 0
    if t.resume:
        state = load_checkpoint(engine, ckpt_dir, dist.rank)
        restore_expert_shards(engine)
        step = state["step"]
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        if is_main:
            print(f"resumed from {ckpt_dir / latest_tag(ckpt_dir)} at step {step}", flush=True)

    config_dict = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    if is_main:
        (run_dir / "config.resolved.json").write_text(json.dumps(config_dict, indent=2))
        print(f"tml pretrain: {counts['total'] / 1e6:.2f}M params ({counts['active'] / 1e6:.2f}M active), world {dist.world_size}, "
              f"layout {layout.describe()}, run dir {run_dir}", flush=True)
    logger = MetricsLogger(run_dir, cfg.logger, config_dict, enabled=is_main, resume_step=step, max_steps=t.max_steps)

    record: dict = {}
    while step < t.max_steps:
        t0 = time.perf_counter()
        sums = torch.zeros(len(LOGGED) + 1, dtype=torch.float64)  # losses..., tokens
        lr = optimizer.param_groups[0]["lr"]
        expert_counts = grad_norm = None
        for _ in range(t.grad_accum_steps):
            batch = next(loader).to(dist.device)
            out = engine(batch)
            losses = compute_losses(out, batch, text_weight=t.text_loss_weight, audio_weight=t.audio_loss_weight,
                                    text_pad_id=text.pad_id)
            engine.backward(losses["loss"])
            if engine.is_gradient_accumulation_boundary() and cfg.parallel.zero_stage == 0:
                grad_norm = _grad_norm(engine.module)  # DeepSpeed reports it only for ZeRO >= 1 and bf16
            engine.step()
            sums[:-1] += torch.stack([losses[k].detach().double().cpu() for k in LOGGED])
            sums[-1] += batch.num_tokens()
            counts = out.expert_counts.detach()
            expert_counts = counts if expert_counts is None else expert_counts + counts
        step += 1
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(expert_counts)  # global load: the same bias update and metrics on every rank
        engine.module.update_expert_bias(expert_counts)
        elapsed = time.perf_counter() - t0
        n_micro = t.grad_accum_steps * dist.world_size
        if cfg.parallel.zero_stage > 0 or t.precision == "bf16":
            grad_norm = engine.get_global_grad_norm()
        record = {"step": step, **{k: float(v) / n_micro for k, v in zip(LOGGED, sums[:-1])},
                  "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                  "tokens_per_s": float(sums[-1]) / elapsed, "tokens": int(sums[-1]), "step_time_s": elapsed}
        record.update(expert_load_metrics(expert_counts))
        record.update(loader.stats())
        if step % t.log_every == 0 or step == t.max_steps:
            logger.log(record)
        if step % t.save_every == 0 or step == t.max_steps:
            save_checkpoint(engine, ckpt_dir, step, loader.state_dict(), dist.rank)
    logger.close()
    return record


def config_from_dict(d: dict) -> PretrainConfig:
    """A PretrainConfig from a plain dict (what tests and tools use outside Hydra), with type checking."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PretrainConfig), d))

