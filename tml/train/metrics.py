"""Where metrics go: ``metrics.jsonl`` in the run dir (always), Weights & Biases (offline unless asked), console
lines and a progress bar with rate and ETA, and on request images of dMel predictions and expert load.

``metrics.jsonl`` is strict JSON: a NaN or inf value is written as null and named in the record's ``nonfinite``
field (key -> "nan" | "inf" | "-inf"); ``read_metrics`` gives the values back. Only rank 0 writes. On resume, lines past the resumed step are dropped first, so the file reads like one
uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from tml.train.config import LoggerConfig

log = logging.getLogger(__name__)


def _float_or_flag(v: Any) -> tuple[Any, str | None]:
    if isinstance(v, float) and not math.isfinite(v):
        return None, str(v)  # 'nan', 'inf', '-inf'
    return v, None


def to_strict_json(record: dict[str, Any]) -> str:
    """One metrics.jsonl line: non-finite floats (also inside lists) become null, named in ``nonfinite``."""
    out, flags = {}, {}
    for k, v in record.items():
        if isinstance(v, list):
            pairs = [_float_or_flag(x) for x in v]
            out[k] = [x for x, _ in pairs]
            if any(f for _, f in pairs):
                flags[k] = [f for _, f in pairs]
        else:
            out[k], flag = _float_or_flag(v)
            if flag:
                flags[k] = flag
    if flags:
        out["nonfinite"] = flags
    return json.dumps(out, allow_nan=False)


def from_strict_json(line: str) -> dict[str, Any]:
    """The record of a metrics.jsonl line with its non-finite values restored as floats."""
    record = json.loads(line)
    for k, flag in record.pop("nonfinite", {}).items():
        if isinstance(flag, list):
            record[k] = [float(f) if f else x for x, f in zip(record[k], flag)]
        else:
            record[k] = float(flag)
    return record


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of ``RUN_DIR/metrics.jsonl`` (NaN / inf restored)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: RUN_DIR must be a run dir written by recipes/pretrain.py")
    return [from_strict_json(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the records with ``step <= last_step`` (those a resumed run will not write again)."""
    if not path.exists():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    os.replace(tmp, path)


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg: LoggerConfig, config_dict: dict, enabled: bool, resume_step: int = 0,
                 max_steps: int = 0):
        self.enabled, self.cfg, self.max_steps = enabled, cfg, max_steps
        self.path = run_dir / "metrics.jsonl"
        self.wandb = self.bar = None
        self.t0 = time.time()
        self.run_dir = run_dir
        if not enabled:
            return
        truncate_metrics(self.path, resume_step)
        self.file = self.path.open("a")
        if cfg.progress_bar and sys.stderr.isatty():  # no bar residue (carriage returns) in pipes and log files
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=resume_step, unit="step", file=sys.stderr, dynamic_ncols=True,
                            mininterval=1.0)
        if cfg.wandb.enabled and cfg.wandb.mode != "disabled":
            self.wandb = self._init_wandb(run_dir, config_dict, resume_step > 0)

    def _init_wandb(self, run_dir: Path, config_dict: dict, resume: bool):
        import wandb

        mode = self.cfg.wandb.mode
        if mode == "online" and not os.environ.get("WANDB_API_KEY"):
            log.warning("logger.wandb.mode=online but WANDB_API_KEY is not set: logging offline instead")
            mode = "offline"
        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if resume and id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        return wandb.init(project=self.cfg.wandb.project, entity=self.cfg.wandb.entity, name=self.cfg.wandb.name,
                          id=run_id, resume="allow", mode=mode, dir=str(run_dir), config=config_dict)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(to_strict_json(record) + "\n")
        self.file.flush()
        if self.wandb is not None:  # lists (expert load) go in as images, see log_samples
            self.wandb.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                           step=record["step"])
        step = record["step"]
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
            self.bar.update(step - self.bar.n)
        if step == 1 or step % self.cfg.console_every == 0 or step == self.max_steps:
            done = step / max(self.max_steps, 1)
            elapsed = time.time() - self.t0
            print(f"step {step:>6}/{self.max_steps} ({100 * done:5.1f}%) loss {record['loss']:.4f} "
                  f"text {record['loss/text']:.4f} (words {record['loss/text_words']:.3f}) audio {record['loss/audio']:.4f} "
                  + (f"floor {record['loss/floor']:.3f} " if "loss/floor" in record else "") + f"lr {record['lr']:.2e} "
                  f"gnorm {record['grad_norm']:.3f} {record['tokens_per_s']:.0f} tok/s elapsed {elapsed:.0f}s",
                  flush=True)

    def log_samples(self, step: int, out, batch, record: dict, dmel=None) -> None:
        """PNG (under ``samples/``) and W&B images of the last micro-batch's teacher-forced dMel predictions
        (argmax of ``out.audio_logits``; dMel head only) against the targets, and of the expert load when logged;
        with ``dmel`` (a DMelTokenizer) also the predictions as audio (Griffin-Lim): ``samples/dmel_STEP.wav`` and
        ``wandb.Audio``."""
        if not self.enabled:
            return
        import matplotlib.pyplot as plt

        from tml.train.figures import dmel_figure, expert_load_figure, load_matrix

        figs, wav_path = {}, None
        n = 0 if out.audio_logits is None else min(50, out.audio_logits.shape[0])  # 50 positions = 2 s of audio
        if n:
            pred = out.audio_logits[:n].detach().argmax(-1)
            figs["samples/dmel"] = dmel_figure(pred, batch.target_audio[:n], f"step {step}")
            if dmel is not None:
                from tml.audio.wav import write_wav

                wave = dmel.to_wave(pred.reshape(-1, pred.shape[-1]).cpu())
                (self.run_dir / "samples").mkdir(exist_ok=True)
                wav_path = self.run_dir / "samples" / f"dmel_{step:08d}.wav"
                write_wav(wav_path, wave, dmel.cfg.sample_rate)
        loads = load_matrix(record)
        if loads is not None:
            figs["samples/expert_load"] = expert_load_figure(loads, f"expert load, step {step}")
        (self.run_dir / "samples").mkdir(exist_ok=True)
        for key, fig in figs.items():
            fig.savefig(self.run_dir / "samples" / f"{key.split('/')[1]}_{step:08d}.png", dpi=80)
        if self.wandb is not None:
            import wandb

            media = {k: wandb.Image(f) for k, f in figs.items()}
            if wav_path is not None:  # from the file: an array would need the soundfile package
                media["samples/dmel_audio"] = wandb.Audio(str(wav_path))
            self.wandb.log(media, step=step)
        for fig in figs.values():
            plt.close(fig)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
