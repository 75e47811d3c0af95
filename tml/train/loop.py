"""The pretraining loop: validated config -> data, model, DeepSpeed engine -> steps, metrics, checkpoints.

One optimizer step = ``grad_accum_steps`` micro-batches per rank. Logged values are means over the step's
micro-batches and over ranks. With ``trainer.resume=true`` the run continues from its run dir's newest checkpoint
with the same step count, data cursor and RNG state, so its metrics equal an uninterrupted run's.

Operations: SIGUSR1/SIGTERM stop after the current step with a checkpoint and exit code
``signals.EXIT_STOPPED_BY_SIGNAL``; a NaN/inf loss or gradient skips the step (counted as ``nonfinite_skipped``)
and ``trainer.max_nonfinite_in_a_row`` of them stop the run with ``NonFiniteError``; every step logs MFU.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tml.data.loader import PackedBatchLoader
from tml.model import InteractionModel, compute_losses, param_counts
from tml.model.flops import flops_per_token
from tml.model.moe_stats import expert_load_metrics, router_metrics
from tml.parallel.engine import build_engine, deepspeed_config, setup_distributed
from tml.parallel.expert import moe_param_groups, prepare_expert_parallel, restore_expert_shards
from tml.errors import ConfigError
from tml.train.checkpoint import (checkpoint_steps, convert_to_universal, load_checkpoint, load_initial_weights,
                                  save_checkpoint, set_rng_state, universal_resume_tag)
from tml.train.config import PretrainConfig
from tml.train.manifest import build_manifest, record_data_quality, write_manifest
from tml.train.metrics import MetricsLogger
from tml.train.mfu import peak_flops_per_device
from tml.train.signals import SignalFlag, StopRequested
from tml.train.optim import param_groups, warmup_cosine
from tml.train.run import build_run
from tml.train.validation import validation_batches, validation_losses

log = logging.getLogger(__name__)

LOGGED = ("loss", "loss/text", "loss/audio", "loss/aux", "loss/text_words")


class NonFiniteError(RuntimeError):
    """Too many NaN/inf steps in a row; the newest checkpoint holds the last good state."""


def _broadcast_run_dir(run_dir: Path, rank: int) -> Path:
    """All ranks write to rank 0's run dir (each process's Hydra may have stamped its own time)."""
    box = [str(run_dir)]
    torch.distributed.broadcast_object_list(box, src=0)
    return Path(box[0])


class _NaNGradient(torch.autograd.Function):
    """Identity whose backward returns NaN: the fault ``trainer.fault.nan_grad_at_step`` (finite loss, NaN grads)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def _grads_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


def _grad_norm(model: torch.nn.Module) -> float:
    """L2 norm of all (already data-parallel averaged) gradients, before clipping."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def pretrain(cfg: PretrainConfig, run_dir: str | Path) -> dict:
    """Run (or resume) pretraining into ``run_dir``. Returns the last logged metrics record."""
    run_dir = Path(run_dir)
    t = cfg.trainer
    run = build_run(cfg)  # validated config, layout, data tools; model.vocab_size follows the data's tokenizer
    layout, manifest, text = run.layout, run.manifest, run.text
    ckpt_dir = run_dir / "checkpoints"
    resume = t.resume or (t.auto_resume and bool(checkpoint_steps(ckpt_dir)))
    if not resume and checkpoint_steps(ckpt_dir):
        raise ConfigError(f"{ckpt_dir} already holds checkpoints: pass trainer.resume=true to continue that run, "
                          f"or trainer.auto_resume=true, or choose a fresh hydra.run.dir")
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
    if t.init_from and not resume:  # weights only; a resumed run takes everything from its own checkpoint
        source = load_initial_weights(model, t.init_from)
        if is_main:
            print(f"initial weights from {source} (trainer.init_from; new optimizer, step 0)", flush=True)
    counts = param_counts(model)
    autoep = prepare_expert_parallel(model, cfg.parallel, cfg.model, dist.world_size)  # shards experts (native)
    # A ZeRO >= 1 checkpoint written by another number of ranks is converted to DeepSpeed's universal format first.
    universal = None
    if resume and (source := universal_resume_tag(ckpt_dir, dist.world_size, cfg.parallel.zero_stage,
                                                  cfg.parallel.expert_parallel_size)):
        universal = convert_to_universal(ckpt_dir, source, dist.rank)
    ds_config = deepspeed_config(micro_batch_size=cfg.data.loader.micro_batch_size, grad_accum_steps=t.grad_accum_steps,
                                 world_size=dist.world_size, grad_clip=t.grad_clip, precision=t.precision,
                                 zero_stage=cfg.parallel.zero_stage, expert_parallel=autoep,
                                 load_universal=universal is not None)
    schedule = warmup_cosine(t.warmup_steps, t.decay_steps, t.min_lr_ratio)
    engine, optimizer, _ = build_engine(
        model, ds_config, param_groups(model, t.weight_decay),
        optimizer_fn=lambda groups: torch.optim.AdamW(moe_param_groups(groups), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps),
        scheduler_fn=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    dmel = run.dmel
    loader = PackedBatchLoader(cfg.data.path, cfg.data.loader, layout, dmel, text,
                               rank=dist.rank, world_size=dist.world_size)

    val_batches = validation_batches(cfg.data.val_path, cfg.data.val_batches, cfg.data.loader, layout, dmel, text,
                                     dist.rank, dist.world_size) if t.val_every else []

    step = skipped = 0  # skipped: steps skipped as non-finite since the run began (carried over by resumes)
    if resume:
        tag, state = load_checkpoint(engine, ckpt_dir, dist.rank, dist.world_size, cfg.parallel.zero_stage,
                                     universal_tag=universal)
        restore_expert_shards(engine)
        step, skipped = state["step"], state.get("nonfinite_skipped", 0)
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        if is_main:
            print(f"resumed from {ckpt_dir / tag} at step {step}", flush=True)

    config_dict = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    if is_main:
        (run_dir / "config.resolved.json").write_text(json.dumps(config_dict, indent=2))
        run_manifest = build_manifest(config_dict, cfg.data.path, manifest, dist.world_size)
        run_manifest["data"]["damaged_shards"] = loader.source.damaged  # sha256 check at start (data.loader.verify)
        write_manifest(run_dir, run_manifest)
        print(f"tml pretrain: {counts['total'] / 1e6:.2f}M params ({counts['active'] / 1e6:.2f}M active), world {dist.world_size}, "
              f"layout {layout.describe()}, run dir {run_dir}", flush=True)
    logger = MetricsLogger(run_dir, cfg.logger, config_dict, enabled=is_main, resume_step=step, max_steps=t.max_steps)
    # MFU: every position of a row is computed (padding too), so FLOPs count positions, not tokens.
    flops_per_step = flops_per_token(cfg.model, cfg.data.loader.seq_len) * cfg.data.loader.seq_len * \
        cfg.data.loader.micro_batch_size * t.grad_accum_steps * dist.world_size
    peak, peak_source = peak_flops_per_device(t.peak_tflops) if is_main else (float("nan"), "")
    if is_main:
        print(f"MFU peak {peak / 1e12:.3f} TFLOP/s per device ({peak_source})", flush=True)

    def save(at_step: int) -> None:
        save_checkpoint(engine, ckpt_dir, at_step, loader.state_dict(), dist.rank, dist.world_size,
                        nonfinite_skipped=skipped, keep_last=t.keep_last, keep_every=t.keep_every,
                        crash_after_files=t.fault.kill_in_save_at_step == at_step)

    def close() -> None:
        """Close the logger and put every rank's bad-sample counts into the run manifest."""
        logger.close()
        per_rank = [None] * dist.world_size
        torch.distributed.all_gather_object(per_rank, {**loader.stats(), "bad_by_reason": loader.bad_by_reason})
        if is_main:
            record_data_quality(run_dir, per_rank)

    signals = SignalFlag()
    record: dict = {}
    nonfinite_in_a_row = 0
    saved_step = step
    while step < t.max_steps:
        t0 = time.perf_counter()
        sums = torch.zeros(len(LOGGED) + 1, dtype=torch.float64)  # losses..., tokens
        lr = optimizer.param_groups[0]["lr"]
        expert_counts = router_terms = grad_norm = None
        nonfinite = False
        busy = 0.0  # this rank's own work (data, forward, loss) before it can wait on others: finds stragglers
        for _ in range(t.grad_accum_steps):
            b0 = time.perf_counter()
            batch = next(loader).to(dist.device)
            if t.fault.slow_rank_s > 0 and t.fault.slow_rank == dist.rank:
                time.sleep(t.fault.slow_rank_s)
            out = engine(batch)
            losses = compute_losses(out, batch, text_weight=t.text_loss_weight, audio_weight=t.audio_loss_weight,
                                    text_pad_id=text.pad_id)
            busy += time.perf_counter() - b0
            if t.fault.nan_at_step == step + 1:
                losses["loss"] = losses["loss"] * float("nan")
            if t.fault.nan_grad_at_step == step + 1:
                losses["loss"] = _NaNGradient.apply(losses["loss"])
            engine.backward(losses["loss"])
            sums[:-1] += torch.stack([losses[k].detach().double().cpu() for k in LOGGED])
            sums[-1] += batch.num_tokens()
            counts, terms = out.expert_counts.detach(), out.router_terms.detach().double()
            expert_counts = counts if expert_counts is None else expert_counts + counts
            router_terms = terms if router_terms is None else router_terms + terms
            if not engine.is_gradient_accumulation_boundary():
                engine.step()
                continue
            # Non-finite guard: any rank's NaN/inf loss (or gradient, at ZeRO 0 where grads are whole) skips the
            # optimizer step on all ranks: gradients are dropped, weights, optimizer and lr schedule stay. At
            # ZeRO >= 1 the gradients live in DeepSpeed's partitions: its optimizer checks their global norm and
            # skips the step itself (counted in engine.skipped_steps, schedule not advanced); we count it the same.
            bad = torch.tensor([float(not math.isfinite(float(sums[0])))])
            if cfg.parallel.zero_stage == 0:
                bad[0] += float(not _grads_finite(engine.module))
            torch.distributed.all_reduce(bad)
            if bad.item() > 0:
                engine.zero_grad()
                engine.micro_steps += 1  # what engine.step() counts, so the accumulation boundaries stay aligned
                grad_norm, nonfinite = float("nan"), True
            else:
                if cfg.parallel.zero_stage == 0:
                    grad_norm = _grad_norm(engine.module)  # DeepSpeed reports it only for ZeRO >= 1 and bf16
                skipped_by_deepspeed = engine.skipped_steps
                engine.step()
                if engine.skipped_steps > skipped_by_deepspeed:
                    grad_norm, nonfinite = float("nan"), True
        step += 1
        skipped += int(nonfinite)
        nonfinite_in_a_row = nonfinite_in_a_row + 1 if nonfinite else 0
        if nonfinite and is_main:
            log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row, %d in all)", step,
                        nonfinite_in_a_row, skipped)
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(expert_counts)  # global load: the same bias update and metrics on every rank
        engine.module.update_expert_bias(expert_counts)
        torch.distributed.all_reduce(router_terms)
        rank_busy = torch.zeros(dist.world_size, dtype=torch.float64)
        rank_busy[dist.rank] = busy
        torch.distributed.all_reduce(rank_busy)
        elapsed = time.perf_counter() - t0
        n_micro = t.grad_accum_steps * dist.world_size
        if not nonfinite and (cfg.parallel.zero_stage > 0 or t.precision == "bf16"):
            grad_norm = engine.get_global_grad_norm()
        record = {"step": step, **{k: float(v) / n_micro for k, v in zip(LOGGED, sums[:-1])},
                  "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                  "tokens_per_s": float(sums[-1]) / elapsed, "tokens": int(sums[-1]), "step_time_s": elapsed,
                  "mfu": flops_per_step / elapsed / (peak * dist.world_size), "nonfinite_skipped": skipped,
                  "rank_busy_s": rank_busy.tolist(), "slowest_rank": int(rank_busy.argmax())}
        record.update(expert_load_metrics(expert_counts))
        record.update(router_metrics(router_terms.cpu() / n_micro, cfg.model.moe, engine.module.moe_layers()))
        record.update(loader.stats())
        if t.val_every and (step % t.val_every == 0 or step == t.max_steps):
            record.update(validation_losses(engine, val_batches, dist.device, text.pad_id))
            if is_main:
                print(f"step {step}: held-out loss text {record['val/loss/text']:.4f} (words "
                      f"{record['val/loss/text_words']:.3f}) audio {record['val/loss/audio']:.4f}", flush=True)
        if step % t.log_every == 0 or step == t.max_steps or "val/loss" in record:
            logger.log(record)
            if cfg.logger.sample_every and step % cfg.logger.sample_every == 0:
                logger.log_samples(step, out, batch, record, dmel)
        if nonfinite_in_a_row >= t.max_nonfinite_in_a_row:
            close()
            raise NonFiniteError(f"{nonfinite_in_a_row} steps in a row (up to step {step}) had a NaN/inf loss or "
                                 f"gradient (trainer.max_nonfinite_in_a_row={t.max_nonfinite_in_a_row}); the last "
                                 f"good state is the checkpoint of step {saved_step} in {ckpt_dir}. Lower "
                                 f"trainer.lr or check the data.")
        stop = torch.tensor([signals.signum])
        torch.distributed.all_reduce(stop, op=torch.distributed.ReduceOp.MAX)
        if step % t.save_every == 0 or step == t.max_steps or stop.item():
            save(step)
            saved_step = step
        if stop.item():
            close()
            if is_main:
                print(f"stopped by signal {stop.item()} at step {step}; checkpoint saved in {ckpt_dir}", flush=True)
            raise StopRequested(int(stop.item()), step)
    signals.restore()
    close()
    return record

