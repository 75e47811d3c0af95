"""Duplex evaluation of a checkpoint: `python recipes/evaluate.py checkpoint=RUN_DIR data_path=DIR episodes=20`.

`responder=model` (default) streams each held-out episode through the checkpoint's StreamingSession;
`responder=untrained` uses the same architecture with random weights; `responder=silence_rule` is the
silence-threshold baseline. Writes eval.json, latency histograms, timelines and stereo .wav files to the run dir.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from tml.eval.evaluate import SilenceRuleResponder, evaluate
from tml.eval.loading import load_run, read_episodes
from tml.eval.session import SessionConfig, StreamingSession


@dataclass
class EvaluateConfig:
    checkpoint: str = "???"  # RUN_DIR, RUN_DIR/checkpoints or a step dir (also gives layout and tokenizers)
    data_path: Optional[str] = None  # held-out episodes; None = the run's data.path
    episodes: int = 20  # the first N episodes of data_path
    responder: str = "model"  # model | untrained | silence_rule
    threshold: float = -5.0  # mean log10-mel above which a 10 ms frame counts as speech
    silence_gap_s: float = 0.3  # silence_rule: user silence before it speaks
    session: SessionConfig = field(default_factory=SessionConfig)


ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


@hydra.main(version_base=None, config_path="../configs", config_name="evaluate")
def main(cfg) -> None:
    cfg: EvaluateConfig = OmegaConf.to_object(cfg)
    if cfg.responder not in ("model", "untrained", "silence_rule"):
        raise ValueError(f"responder={cfg.responder!r}: choose model, untrained or silence_rule")
    run = load_run(cfg.checkpoint, untrained=cfg.responder == "untrained")
    episodes = read_episodes(cfg.data_path or run.config.data.path, limit=cfg.episodes)
    if cfg.responder == "silence_rule":
        make = lambda: SilenceRuleResponder(run.layout, run.dmel, cfg.silence_gap_s, threshold=cfg.threshold)  # noqa: E731
    else:
        make = lambda: StreamingSession(run.model, run.layout, run.dmel, cfg.session, run.text.pad_id)  # noqa: E731
    result = evaluate(make, episodes, run.layout, run.dmel, run.text, Path(HydraConfig.get().runtime.output_dir),
                      cfg.threshold)
    print(OmegaConf.to_yaml(OmegaConf.create(result)), flush=True)


if __name__ == "__main__":
    main()
