"""Full-Duplex-Bench: `python recipes/fdbench.py checkpoint=RUN_DIR root=FDB/v1/smooth_turn_taking
task=smooth_turn_taking`.

Streams every sample's `input.wav` (and v1.5's `clean_input.wav`) through the checkpoint in real-time order (the
StreamingSession of evaluate/converse), writes `output.wav` / `output.json` (and `clean_output.*`) next to it, then
scores the task (`tml.eval.fdbench`; task=timing for v1.5 folders). `responder=silence_rule` runs the silence-rule
baseline instead (no checkpoint needed). Word times come from the model's own text stream; `asr=module:function`
uses a user-installed ASR on output.wav instead, as the official pipeline does. Summary: the Hydra run dir's
fdbench.json and ROOT/fdbench_TASK.json.
"""

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from tml.eval.evaluate import canned_reply
from tml.cli import check_overrides, recipe_run
from tml.audio.dmel import DMelTokenizer
from tml.eval.evaluate import SilenceRuleResponder
from tml.eval.fdbench import TASKS, export_sample, load_asr, sample_dirs, score
from tml.eval.loading import load_run
from tml.eval.session import SessionConfig, StreamingSession
from tml.eval.vad import VADConfig
from tml.streams import LayoutConfig, MicroTurnLayout
from tml.errors import ConfigError
from tml.text.tokenizer import train_bpe


@dataclass
class FDBenchConfig:
    root: str = "???"  # one task's folder of sample IDs (the official --root_dir)
    task: str = "???"  # smooth_turn_taking | pause_handling | user_interruption | backchannel | timing (v1.5)
    checkpoint: Optional[str] = None  # RUN_DIR, RUN_DIR/checkpoints or a step dir; needed for responder=model
    responder: str = "model"  # model | silence_rule
    silence_gap_s: float = 0.3  # silence_rule: user silence before it speaks
    threshold: float = -5.0  # silence_rule: mean log10-mel above which a 10 ms user frame counts as speech
    silence_reply: str = "okay, I hear you."  # silence_rule: what it says (espeak-ng)
    realtime: bool = False  # true: place output as if compute were instantaneous (default: measured compute)
    asr: Optional[str] = None  # module:function of a user-installed ASR for output.json (default: own text stream)
    gt: Optional[str] = None  # backchannel: icc_gt_distribution.json (default: ROOT/icc_gt_distribution.json)
    limit: int = 0  # export only the first N samples (0 = all)
    vad: VADConfig = field(default_factory=VADConfig)
    session: SessionConfig = field(default_factory=SessionConfig)


ConfigStore.instance().store(name="fdbench_schema", node=FDBenchConfig)


@hydra.main(version_base=None, config_path="../configs", config_name="fdbench")
def main(cfg) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with recipe_run(run_dir, "fdbench"):
        cfg: FDBenchConfig = OmegaConf.to_object(cfg)
        if cfg.task not in TASKS:
            raise ConfigError(f"task={cfg.task!r}: choose one of {', '.join(TASKS)}")
        if cfg.responder not in ("model", "silence_rule"):
            raise ConfigError(f"responder={cfg.responder!r}: choose model or silence_rule")
        if cfg.checkpoint is not None:
            run = load_run(cfg.checkpoint)
            layout, dmel, text = run.layout, run.dmel, run.text
        elif cfg.responder == "model":
            raise ConfigError("responder=model needs checkpoint=RUN_DIR (or use responder=silence_rule)")
        else:  # the baseline alone: default layout and front end, a byte-level BPE that spells its reply
            layout, dmel = MicroTurnLayout(LayoutConfig()), DMelTokenizer()
            text = train_bpe([cfg.silence_reply] * 20, 300, Path(tempfile.mkdtemp()) / "tokenizer.json")
        if cfg.responder == "silence_rule":
            reply = canned_reply(cfg.silence_reply, dmel, text)
            make = lambda: SilenceRuleResponder(layout, dmel, cfg.silence_gap_s, threshold=cfg.threshold,  # noqa: E731
                                                text_pad_id=text.pad_id, reply=reply)
        else:
            make = lambda: StreamingSession(run.model, layout, dmel, cfg.session, text.pad_id)  # noqa: E731
        asr = load_asr(cfg.asr) if cfg.asr else None
        dirs = sample_dirs(Path(cfg.root))
        dirs = dirs[: cfg.limit] if cfg.limit else dirs
        compute, exported = [], 0
        for d in dirs:
            for prefix in ("", "clean_"):
                if (d / f"{prefix}input.wav").exists():
                    info = export_sample(d, make, layout, dmel, text, prefix, cfg.task, realtime=cfg.realtime, asr=asr)
                    compute += info["compute_ms"]
                    exported += 1
                    print(f"{d.name}/{prefix}output.wav: {info['micro_turns']} micro-turns, {info['words']} words",
                          flush=True)
        result = score(cfg.root, cfg.task, cfg.gt, cfg.vad)
        summary = {k: v for k, v in result.items() if k != "per_sample"}
        summary.update(exported=exported, responder=cfg.responder, checkpoint=cfg.checkpoint,
                       compute_ms_per_micro_turn=sum(compute) / max(len(compute), 1), vad=asdict(cfg.vad))
        (run_dir / "fdbench.json").write_text(json.dumps(summary, indent=2))
        (Path(cfg.root) / f"fdbench_{cfg.task}.json").write_text(json.dumps(result, indent=2))  # with per-sample values
        print(json.dumps(summary, indent=2), flush=True)


if __name__ == "__main__":
    check_overrides(FDBenchConfig)
    main()
