"""Structured configs of a pretraining run. Hydra composes ``configs/`` into ``PretrainConfig`` (types checked on
every override); ``validate_config`` rejects impossible combinations before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from tml.audio.dmel import DMelConfig
from tml.data.loader import LoaderConfig
from tml.errors import ConfigError
from tml.model.config import HEADS, ModelConfig
from tml.parallel.engine import ParallelConfig
from tml.streams.layout import LayoutConfig, MicroTurnLayout


@dataclass
class DataConfig:
    path: str = "data/synthetic_tiny"  # a directory with manifest.json, tokenizer.json and shard-*.tar
    val_path: Optional[str] = None  # held-out shards scored every trainer.val_every steps (tml.train.validation)
    val_batches: int = 8  # how many packed batches of val_path are scored (fewer if the set is smaller)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    dmel: DMelConfig = field(default_factory=DMelConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)


@dataclass
class FaultConfig:
    """Fault injection for tests of the operations machinery (0 = off)."""

    nan_at_step: int = 0  # make the loss of this step NaN on every rank
    nan_grad_at_step: int = 0  # make the gradients of this step NaN on every rank (its loss stays finite)
    kill_in_save_at_step: int = 0  # SIGKILL-like exit while the checkpoint of this step is being written
    slow_rank: int = 0  # with slow_rank_s > 0: this rank sleeps slow_rank_s in every micro-batch (a straggler)
    slow_rank_s: float = 0.0


@dataclass
class TrainerConfig:
    max_steps: int = 100  # optimizer steps
    grad_accum_steps: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    # Cosine horizon, deliberately not tied to max_steps: a run stopped at step 20 and extended to 40 follows the
    # same schedule as a straight 40-step run. Set it to the planned length of the run.
    decay_steps: int = 150
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    precision: str = "fp32"  # fp32 | bf16
    # <head>_loss_weight: that head's loss in the backpropagated sum (a head without a field here weighs 1)
    text_loss_weight: float = 1.0
    audio_loss_weight: float = 1.0
    floor_loss_weight: float = 1.0  # the floor head's speak / stay-silent cross-entropy (model.heads.floor)
    listen_loss_weight: float = 1.0  # the listen head's transcript cross-entropy (model.heads.listen)
    # share of micro-turns whose own-voice audio inputs are flipped, speech <-> silence, targets kept
    # (tml.train.exposure: teaches the floor decision not to just continue what it hears itself doing)
    own_audio_flip: float = 0.0
    # feed the model its own audio as the floor decoder writes it: whole speaking or silent micro-turns (the floor
    # target), hiding the reference's trail-off inside a micro-turn; off: it made the model stop on fewer
    # barge-ins (tml.train.exposure, README ablations)
    own_audio_decoded: bool = False
    log_every: int = 1
    save_every: int = 50  # a checkpoint every N steps, and always at the last step
    val_every: int = 0  # held-out loss on data.val_path every N steps and at the last step (0 = never)
    resume: bool = False  # continue from the run dir's latest checkpoint
    # Start a new run from these weights only (fresh optimizer, step 0): an export dir (tml.tools.export) or a
    # checkpoint (RUN_DIR, RUN_DIR/checkpoints or a step dir). Shapes must match the model config.
    init_from: Optional[str] = None
    auto_resume: bool = False  # resume when the run dir holds a checkpoint, else start (Slurm requeue uses it)
    keep_last: int = 3  # checkpoints kept besides the keep_every ones (0 = keep all)
    keep_every: int = 0  # also keep every step that is a multiple of this (0 = none)
    max_nonfinite_in_a_row: int = 5  # NaN/inf loss or gradient: skip the step; stop after this many in a row
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = H100/H200 bf16 when detected, else measured on CPU
    fault: FaultConfig = field(default_factory=FaultConfig)
    seed: int = 0
    threads: int = 0  # torch intra-op threads per process on CPU; 0 = leave torch's default

    def loss_weights(self) -> dict[str, float]:
        """``{"<head>_weight": trainer.<head>_loss_weight}`` for every head of ``HEADS`` with such a field, as
        ``compute_losses`` takes them."""
        return {f"{name}_weight": getattr(self, f"{name}_loss_weight") for name in HEADS
                if hasattr(self, f"{name}_loss_weight")}


@dataclass
class WandbConfig:
    enabled: bool = True
    mode: str = "offline"  # offline | online | disabled; online needs WANDB_API_KEY
    project: str = "tml"
    entity: Optional[str] = None
    name: Optional[str] = None


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    console_every: int = 10
    progress_bar: bool = True  # tqdm bar with rate and ETA on stderr (rank 0), only when stderr is a terminal
    sample_every: int = 0  # W&B images of teacher-forced dMel predictions vs targets every N steps (0 = never)


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


# Frame geometry has one source, ``data.layout``: the model's front ends and heads (``model.*``) and the dMel tokenizer
# (``data.dmel.*``) keep their own fields, so each can be built alone, but a composed run config interpolates them from
# the layout. Overriding ``data.layout.n_mels=64`` moves all three; overriding only ``model.n_mels`` is a ConfigError.
# A run's config.resolved.json holds resolved values, so runs saved before this load unchanged.
OmegaConf.register_new_resolver("tml.samples_per_ms", lambda rate, ms: int(rate) * int(ms) // 1000, replace=True)
GEOMETRY_FROM_LAYOUT = {
    "model": {"n_mels": "${data.layout.n_mels}", "dmel_bins": "${data.layout.dmel_bins}",
              "frames_per_audio_position": "${data.layout.frames_per_audio_position}",
              "patch_size": "${data.layout.patch_size}"},
    "data": {"dmel": {"n_mels": "${data.layout.n_mels}", "n_bins": "${data.layout.dmel_bins}",
                      "sample_rate": "${data.layout.sample_rate}",
                      "hop_length": "${tml.samples_per_ms:${data.layout.sample_rate},${data.layout.mel_hop_ms}}"}},
}


def config_schema() -> DictConfig:
    """``PretrainConfig``'s defaults with the frame geometry interpolated from ``data.layout``: what Hydra composes
    the recipe configs onto and what ``config_from_dict`` merges a dict onto."""
    return OmegaConf.merge(OmegaConf.structured(PretrainConfig), GEOMETRY_FROM_LAYOUT)


def validate_config(cfg: PretrainConfig) -> MicroTurnLayout:
    """Check every section and their agreement; raise ConfigError naming the key and the fix. Returns the layout."""
    layout = MicroTurnLayout(cfg.data.layout)
    cfg.model.validate()
    cfg.parallel.validate()
    t, lay, m, d = cfg.trainer, cfg.data.layout, cfg.model, cfg.data.dmel
    if t.max_steps <= 0:
        raise ConfigError(f"trainer.max_steps={t.max_steps}: must be positive")
    if t.grad_accum_steps <= 0:
        raise ConfigError(f"trainer.grad_accum_steps={t.grad_accum_steps}: must be positive")
    if t.precision not in ("fp32", "bf16"):
        raise ConfigError(f"trainer.precision={t.precision!r}: choose fp32 or bf16")
    if t.warmup_steps < 0:
        raise ConfigError(f"trainer.warmup_steps={t.warmup_steps}: must be >= 0")
    if t.decay_steps <= t.warmup_steps:
        raise ConfigError(f"trainer.decay_steps={t.decay_steps} must exceed trainer.warmup_steps={t.warmup_steps}")
    if t.lr <= 0 or not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError("trainer.lr must be positive and trainer.min_lr_ratio in [0, 1]")
    if t.save_every <= 0 or t.log_every <= 0:
        raise ConfigError("trainer.save_every and trainer.log_every must be positive")
    if t.max_nonfinite_in_a_row <= 0 or t.keep_last < 0 or t.keep_every < 0:
        raise ConfigError("trainer.max_nonfinite_in_a_row must be positive, trainer.keep_last and "
                          "trainer.keep_every >= 0")
    if t.val_every < 0 or cfg.data.val_batches < 1:
        raise ConfigError("trainer.val_every must be >= 0 and data.val_batches >= 1")
    if t.val_every and not cfg.data.val_path:
        raise ConfigError(f"trainer.val_every={t.val_every} needs data.val_path (a held-out set, e.g. "
                          f"`python -m data_prep.synth_dialogues --seed 1 --out DIR`)")
    if cfg.logger.wandb.mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"logger.wandb.mode={cfg.logger.wandb.mode!r}: choose offline, online or disabled")
    pairs = [
        ("model.n_mels", m.n_mels, "data.layout.n_mels", lay.n_mels),
        ("model.frames_per_audio_position", m.frames_per_audio_position,
         "data.layout.frames_per_audio_position", lay.frames_per_audio_position),
        ("model.dmel_bins", m.dmel_bins, "data.layout.dmel_bins", lay.dmel_bins),
        ("model.patch_size", m.patch_size, "data.layout.patch_size", lay.patch_size),
        ("data.dmel.n_mels", d.n_mels, "data.layout.n_mels", lay.n_mels),
        ("data.dmel.n_bins", d.n_bins, "data.layout.dmel_bins", lay.dmel_bins),
        ("data.dmel.sample_rate", d.sample_rate, "data.layout.sample_rate", lay.sample_rate),
        ("data.dmel.hop_length", d.hop_length, "data.layout.mel_hop_ms * sample_rate / 1000",
         lay.sample_rate * lay.mel_hop_ms // 1000),
    ]
    for ka, a, kb, b in pairs:  # only an explicit override of the derived side can disagree
        if a != b:
            raise ConfigError(f"{ka}={a} disagrees with {kb}={b}: frame geometry comes from data.layout and "
                              f"{ka} follows it; override data.layout instead of {ka}, or set them equal")
    grid = max(lay.frame_height, lay.frame_width) // lay.patch_size
    if grid > m.max_patch_grid:
        raise ConfigError(f"data.layout frames give a {grid}-patch grid side but model.max_patch_grid="
                          f"{m.max_patch_grid}; raise model.max_patch_grid")
    seq_len, turn = cfg.data.loader.seq_len, layout.length
    if seq_len < turn:
        raise ConfigError(f"data.loader.seq_len={seq_len} is shorter than one micro-turn "
                          f"({turn} positions); raise it")
    if seq_len % turn:  # rows hold whole micro-turns: the rest of a row would be padding, computed for nothing
        raise ConfigError(f"data.loader.seq_len={seq_len} is not a multiple of the micro-turn length ({turn} "
                          f"positions: {layout.describe()}); use {seq_len // turn * turn} or "
                          f"{(seq_len // turn + 1) * turn}")
    return layout


def config_from_dict(d: dict) -> PretrainConfig:
    """A PretrainConfig from a plain dict (a run's config.resolved.json, tests, tools outside Hydra), with type
    checking."""
    return OmegaConf.to_object(OmegaConf.merge(config_schema(), d))


def config_from_saved(d: dict) -> PretrainConfig:
    """A saved run's config (``config.resolved.json``, an export's ``run_config.json``) -> PretrainConfig. Runs saved
    before ``model.heads.floor`` existed have no floor head, so they load with ``floor: false``."""
    heads = d.get("model", {}).get("heads", {})
    if "floor" not in heads:
        d = {**d, "model": {**d.get("model", {}), "heads": {**heads, "floor": False}}}
    return config_from_dict(d)


def register_hydra_schema() -> None:
    """Register ``config_schema()`` (``PretrainConfig``, geometry from the layout) as ``pretrain_schema``, so
    ``configs/pretrain.yaml`` is type-checked by Hydra."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="pretrain_schema", node=config_schema())
