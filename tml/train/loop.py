"""The pretraining loop: validated config -> data, model, DeepSpeed engine -> steps, metrics, checkpoints.

Read top to bottom: ``setup`` builds a ``Trainer`` (engine, loader, logger; restores a checkpoint when resuming),
``forward_backward`` runs one micro-batch, ``optimizer_step`` is the guarded update at the accumulation boundary,
``train_step`` is one optimizer step and its metrics, and ``pretrain`` loops over steps with validation, logging,
checkpoints and the stop checks in between.

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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import OmegaConf

from tml.audio.dmel import DMelTokenizer
from tml.data.loader import PackedBatchLoader
from tml.model import InteractionModel, ModelOutput, compute_losses, param_counts
from tml.model.flops import flops_per_token
from tml.model.moe_stats import expert_load_metrics, router_metrics
from tml.parallel.engine import DistInfo, build_engine, deepspeed_config, setup_distributed
from tml.parallel.expert import moe_param_groups, prepare_expert_parallel, restore_expert_shards
from tml.errors import ConfigError
from tml.streams.batch import Batch
from tml.text.tokenizer import TextTokenizer
from tml.train.checkpoint import (checkpoint_steps, convert_to_universal, load_checkpoint, load_initial_weights,
                                  save_checkpoint, set_rng_state, universal_resume_tag)
from tml.train.config import PretrainConfig
from tml.train.manifest import build_manifest, record_data_quality, write_manifest
from tml.train.metrics import MetricsLogger
from tml.train.mfu import peak_flops_per_device
from tml.train.signals import SignalFlag, StopRequested
from tml.train.optim import param_groups, warmup_cosine
from tml.train.exposure import decoded_own_audio, flip_own_audio
from tml.train.run import build_run
from tml.train.validation import validation_batches, validation_losses

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

log = logging.getLogger(__name__)



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


@dataclass
class Trainer:
    """Everything the steps need, built once by ``setup``; ``step`` and ``skipped`` advance as the run goes."""
    cfg: PretrainConfig
    run_dir: Path
    ckpt_dir: Path
    dist: DistInfo
    engine: DeepSpeedEngine
    optimizer: torch.optim.Optimizer
    loader: PackedBatchLoader
    val_batches: list
    logger: MetricsLogger
    dmel: DMelTokenizer
    text: TextTokenizer
    flops_per_step: float  # model FLOPs of one optimizer step over all ranks (for MFU)
    peak: float  # peak FLOP/s of one device
    step: int = 0  # optimizer steps done
    skipped: int = 0  # steps skipped as non-finite since the run began (carried over by resumes)

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0


def setup(cfg: PretrainConfig, run_dir: str | Path) -> Trainer:
    """Config -> distributed setup, model, DeepSpeed engine, data loader, validation batches, logger; restores the
    newest checkpoint when resuming. Writes the resolved config and the run manifest (rank 0)."""
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

    # Model and engine.
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
                                                  cfg.parallel.expert_parallel_size, cfg.parallel.moe_backend)):
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

    # Data.
    dmel = run.dmel
    loader = PackedBatchLoader(cfg.data.path, cfg.data.loader, layout, dmel, text,
                               rank=dist.rank, world_size=dist.world_size)
    val_batches = validation_batches(cfg.data.val_path, cfg.data.val_batches, cfg.data.loader, layout, dmel, text,
                                     dist.rank, dist.world_size) if t.val_every else []
    if t.own_audio_decoded:  # held-out loss on the inputs the model trains on (and meets at inference)
        val_batches = [decoded_own_audio(b)[0] for b in val_batches]

    # Resume: weights, optimizer, lr schedule, step count, data cursor and RNG state.
    step = skipped = 0
    if resume:
        tag, state = load_checkpoint(engine, ckpt_dir, dist.rank, dist.world_size, cfg.parallel.zero_stage,
                                     universal_tag=universal)
        restore_expert_shards(engine)
        step, skipped = state["step"], state.get("nonfinite_skipped", 0)
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        if is_main:
            print(f"resumed from {ckpt_dir / tag} at step {step}", flush=True)

    # Records: resolved config, manifest, metrics logger, the MFU denominator.
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
    return Trainer(cfg=cfg, run_dir=run_dir, ckpt_dir=ckpt_dir, dist=dist, engine=engine, optimizer=optimizer,
                   loader=loader, val_batches=val_batches, logger=logger, dmel=dmel, text=text,
                   flops_per_step=flops_per_step, peak=peak, step=step, skipped=skipped)


def forward_backward(tr: Trainer, batch: Batch) -> tuple[ModelOutput, dict[str, torch.Tensor], float]:
    """One micro-batch: forward, losses, backward (DeepSpeed scales it for gradient accumulation). The faults
    ``trainer.fault.nan_at_step`` / ``nan_grad_at_step`` poison the loss or its gradient at the step being computed.
    Returns the model output, the scalar losses (``loss`` is the one backpropagated) and the seconds forward and
    loss took (this rank's own work; backward may wait on other ranks)."""
    t = tr.cfg.trainer
    t0 = time.perf_counter()
    out = tr.engine(batch)
    losses = compute_losses(out, batch, text_pad_id=tr.text.pad_id, **t.loss_weights())
    forward_s = time.perf_counter() - t0
    if t.fault.nan_at_step == tr.step + 1:
        losses["loss"] = losses["loss"] * float("nan")
    if t.fault.nan_grad_at_step == tr.step + 1:
        losses["loss"] = _NaNGradient.apply(losses["loss"])
    tr.engine.backward(losses["loss"])
    return out, losses, forward_s


def optimizer_step(tr: Trainer, loss_sum: float) -> tuple[float | None, bool]:
    """At the accumulation boundary: step the optimizer unless any rank saw a non-finite loss or gradient.
    Returns (grad norm or None when DeepSpeed reports it later, whether the step was skipped as non-finite)."""
    engine, zero_stage = tr.engine, tr.cfg.parallel.zero_stage
    # Non-finite guard: any rank's NaN/inf loss (or gradient, at ZeRO 0 where grads are whole) skips the
    # optimizer step on all ranks: gradients are dropped, weights, optimizer and lr schedule stay. At
    # ZeRO >= 1 the gradients live in DeepSpeed's partitions: its optimizer checks their global norm and
    # skips the step itself (counted in engine.skipped_steps, schedule not advanced); we count it the same.
    bad = torch.tensor([float(not math.isfinite(loss_sum))])
    if zero_stage == 0:
        bad[0] += float(not _grads_finite(engine.module))
    torch.distributed.all_reduce(bad)
    if bad.item() > 0:
        engine.zero_grad()
        engine.micro_steps += 1  # what engine.step() counts, so the accumulation boundaries stay aligned
        return float("nan"), True
    grad_norm = _grad_norm(engine.module) if zero_stage == 0 else None  # DeepSpeed reports it only for ZeRO >= 1, bf16
    skipped_by_deepspeed = engine.skipped_steps
    engine.step()
    if engine.skipped_steps > skipped_by_deepspeed:
        return float("nan"), True
    return grad_norm, False


def train_step(tr: Trainer) -> tuple[dict, ModelOutput, Batch]:
    """One optimizer step: ``grad_accum_steps`` micro-batches through ``forward_backward``, the guarded optimizer
    step, then the step's metrics averaged over micro-batches and ranks (and the router's bias update from the global
    expert load). Returns (metrics record, last micro-batch's output, that batch) and advances ``tr.step``."""
    cfg, t, dist, engine = tr.cfg, tr.cfg.trainer, tr.dist, tr.engine
    t0 = time.perf_counter()
    logged = ["loss", *engine.module.loss_names(), "loss/aux"]  # compute_losses' scalars (the same on every rank)
    sums = torch.zeros(len(logged) + 1, dtype=torch.float64)  # losses..., tokens
    lr = tr.optimizer.param_groups[0]["lr"]
    expert_counts = router_terms = grad_norm = None
    nonfinite = False
    busy = 0.0  # this rank's own work (data, forward, loss) before it can wait on others: finds stragglers
    flipped = 0
    for micro in range(t.grad_accum_steps):
        b0 = time.perf_counter()
        batch = next(tr.loader).to(dist.device)
        if t.own_audio_decoded:
            batch, _ = decoded_own_audio(batch)
        if t.own_audio_flip > 0:  # seeded by (seed, step, micro-batch, rank): a resumed step flips the same
            gen = torch.Generator().manual_seed(hash((t.seed, tr.step, micro, dist.rank)) % 2**63)
            batch, n = flip_own_audio(batch, t.own_audio_flip, gen)
            flipped += n
        if t.fault.slow_rank_s > 0 and t.fault.slow_rank == dist.rank:
            time.sleep(t.fault.slow_rank_s)
        data_s = time.perf_counter() - b0
        out, losses, forward_s = forward_backward(tr, batch)
        busy += data_s + forward_s
        sums[:-1] += torch.stack([losses[k].detach().double().cpu() if k in losses else torch.zeros((), dtype=torch.float64)
                                  for k in logged])
        sums[-1] += batch.num_tokens()
        counts, terms = out.expert_counts.detach(), out.router_terms.detach().double()
        expert_counts = counts if expert_counts is None else expert_counts + counts
        router_terms = terms if router_terms is None else router_terms + terms
        if engine.is_gradient_accumulation_boundary():
            grad_norm, nonfinite = optimizer_step(tr, float(sums[0]))
        else:
            engine.step()  # DeepSpeed counts micro-steps; it steps the optimizer only at the boundary
    tr.step += 1
    tr.skipped += int(nonfinite)

    # Metrics over micro-batches and ranks; the router's bias follows the global expert load (same on every rank).
    torch.distributed.all_reduce(sums)
    torch.distributed.all_reduce(expert_counts)
    engine.module.update_expert_bias(expert_counts)
    torch.distributed.all_reduce(router_terms)
    rank_busy = torch.zeros(dist.world_size, dtype=torch.float64)
    rank_busy[dist.rank] = busy
    torch.distributed.all_reduce(rank_busy)
    elapsed = time.perf_counter() - t0
    n_micro = t.grad_accum_steps * dist.world_size
    if not nonfinite and (cfg.parallel.zero_stage > 0 or t.precision == "bf16"):
        grad_norm = engine.get_global_grad_norm()
    record = {"step": tr.step, **{k: float(v) / n_micro for k, v in zip(logged, sums[:-1]) if k in losses},
              "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
              "tokens_per_s": float(sums[-1]) / elapsed, "tokens": int(sums[-1]), "step_time_s": elapsed,
              "mfu": tr.flops_per_step / elapsed / (tr.peak * dist.world_size), "nonfinite_skipped": tr.skipped,
              "rank_busy_s": rank_busy.tolist(), "slowest_rank": int(rank_busy.argmax())}
    if t.own_audio_flip > 0:
        record["own_audio_flipped"] = flipped  # micro-turns of this rank's micro-batches (tml.train.exposure)
    record.update(expert_load_metrics(expert_counts))
    record.update(router_metrics(router_terms.cpu() / n_micro, cfg.model.moe, engine.module.moe_layers()))
    record.update(tr.loader.stats())
    return record, out, batch


def save(tr: Trainer) -> None:
    """Checkpoint the current step (engine, data cursor, RNG, skip count); prunes per keep_last / keep_every."""
    t = tr.cfg.trainer
    save_checkpoint(tr.engine, tr.ckpt_dir, tr.step, tr.loader.state_dict(), tr.dist.rank, tr.dist.world_size,
                    nonfinite_skipped=tr.skipped, keep_last=t.keep_last, keep_every=t.keep_every,
                    crash_after_files=t.fault.kill_in_save_at_step == tr.step,
                    expert_parallel_size=tr.cfg.parallel.expert_parallel_size, moe_backend=tr.cfg.parallel.moe_backend)


def close(tr: Trainer) -> None:
    """Close the logger and put every rank's bad-sample counts into the run manifest."""
    tr.logger.close()
    per_rank = [None] * tr.dist.world_size
    torch.distributed.all_gather_object(per_rank, {**tr.loader.stats(), "bad_by_reason": tr.loader.bad_by_reason})
    if tr.is_main:
        record_data_quality(tr.run_dir, per_rank)


def pretrain(cfg: PretrainConfig, run_dir: str | Path) -> dict:
    """Run (or resume) pretraining into ``run_dir``: ``setup``, then ``train_step`` until ``trainer.max_steps`` with
    validation, logging, checkpoints and the stop checks between steps. Returns the last logged metrics record."""
    tr = setup(cfg, run_dir)
    t = cfg.trainer
    signals = SignalFlag()
    record: dict = {}
    nonfinite_in_a_row = 0
    saved_step = tr.step
    while tr.step < t.max_steps:
        skipped_before = tr.skipped
        record, out, batch = train_step(tr)
        step = tr.step
        nonfinite = tr.skipped > skipped_before
        nonfinite_in_a_row = nonfinite_in_a_row + 1 if nonfinite else 0
        if nonfinite and tr.is_main:
            log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row, %d in all)", step,
                        nonfinite_in_a_row, tr.skipped)
        if t.val_every and (step % t.val_every == 0 or step == t.max_steps):
            record.update(validation_losses(tr.engine, tr.val_batches, tr.dist.device, tr.text.pad_id))
            if tr.is_main:
                print(f"step {step}: held-out loss " + " ".join(f"{k.removeprefix('val/loss/')} {v:.4f}"
                      for k, v in record.items() if k.startswith("val/loss/")), flush=True)
        if step % t.log_every == 0 or step == t.max_steps or "val/loss" in record:
            tr.logger.log(record)
            if cfg.logger.sample_every and step % cfg.logger.sample_every == 0:
                tr.logger.log_samples(step, out, batch, record, tr.dmel)
        if nonfinite_in_a_row >= t.max_nonfinite_in_a_row:
            close(tr)
            raise NonFiniteError(f"{nonfinite_in_a_row} steps in a row (up to step {step}) had a NaN/inf loss or "
                                 f"gradient (trainer.max_nonfinite_in_a_row={t.max_nonfinite_in_a_row}); the last "
                                 f"good state is the checkpoint of step {saved_step} in {tr.ckpt_dir}. Lower "
                                 f"trainer.lr or check the data.")
        stop = torch.tensor([signals.signum])
        torch.distributed.all_reduce(stop, op=torch.distributed.ReduceOp.MAX)
        if step % t.save_every == 0 or step == t.max_steps or stop.item():
            save(tr)
            saved_step = step
        if stop.item():
            close(tr)
            if tr.is_main:
                print(f"stopped by signal {stop.item()} at step {step}; checkpoint saved in {tr.ckpt_dir}", flush=True)
            raise StopRequested(int(stop.item()), step)
    signals.restore()
    close(tr)
    return record
