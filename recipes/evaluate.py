"""Duplex evaluation of a checkpoint: `python recipes/evaluate.py checkpoint=RUN_DIR data_path=DIR episodes=20`.

`responder=model` (default) streams each held-out episode through the checkpoint's StreamingSession;
`responder=untrained` uses the same architecture with random weights; `responder=silence_rule` is the
silence-threshold baseline (it says `silence_reply`, spoken by espeak-ng). Every metric reads the responder's speech
activity as a listener's VAD hears it on the playback clock (`vad.method=silero`, default; `vad.method=logmel` is the
mean-log-mel fallback). Model responders stream `batch_size` episodes at once (one batched StreamingSession: the
same outputs as one at a time, many times faster). Writes eval.json, latency histograms, timelines and stereo
.wav files to the run dir.
"""

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from tml.eval.evaluate import canned_reply
from tml.cli import check_overrides, recipe_run
from tml.eval.evaluate import SilenceRuleResponder, evaluate_seeds
from tml.eval.loading import load_run, read_episodes
from tml.eval.report import EvalConfig
from tml.eval.session import SessionConfig, StreamingSession
from tml.eval.vad import VADConfig
from tml.errors import ConfigError


@dataclass
class EvaluateConfig:
    checkpoint: str = "???"  # RUN_DIR, RUN_DIR/checkpoints or a step dir (also gives layout and tokenizers)
    data_path: Optional[str] = None  # held-out episodes; None = the run's data.path
    episodes: int = 20  # the first N episodes of data_path
    responder: str = "model"  # model | untrained | silence_rule
    threshold: float = -5.0  # silence_rule: mean log10-mel above which a 10 ms user frame counts as speech
    silence_gap_s: float = 0.3  # silence_rule: user silence before it speaks
    silence_reply: str = "okay, I hear you."  # silence_rule: what it says
    realtime: bool = False  # true: place output as if compute were instantaneous (default: measured compute)
    vad: VADConfig = field(default_factory=VADConfig)  # how a listener decides that the responder speaks
    batch_size: int = 16  # model responders: episodes streamed together through one batched session
    session: SessionConfig = field(default_factory=SessionConfig)  # session.sampling.seed is replaced by eval.seeds
    eval: EvalConfig = field(default_factory=EvalConfig)  # seeds, min events, bootstrap CI, silence-rule baseline


ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


@hydra.main(version_base=None, config_path="../configs", config_name="evaluate")
def main(cfg) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with recipe_run(run_dir, "evaluate"):
        cfg: EvaluateConfig = OmegaConf.to_object(cfg)
        if cfg.responder not in ("model", "untrained", "silence_rule"):
            raise ConfigError(f"responder={cfg.responder!r}: choose model, untrained or silence_rule")
        run = load_run(cfg.checkpoint, untrained=cfg.responder == "untrained")
        episodes = read_episodes(cfg.data_path or run.config.data.path, limit=cfg.episodes)
        reply = canned_reply(cfg.silence_reply, run.dmel, run.text)

        def silence_rule():
            return SilenceRuleResponder(run.layout, run.dmel, cfg.silence_gap_s, threshold=cfg.threshold,
                                        text_pad_id=run.text.pad_id, reply=reply)

        def session(seed: int):
            sampling = replace(cfg.session.sampling, seed=seed)
            return StreamingSession(run.model, run.layout, run.dmel, replace(cfg.session, sampling=sampling),
                                    run.text.pad_id)

        def sessions(seed: int, n: int):  # n episodes at once, each session seeded as session(seed) is
            sampling = replace(cfg.session.sampling, seed=seed)
            return StreamingSession(run.model, run.layout, run.dmel, replace(cfg.session, sampling=sampling),
                                    run.text.pad_id, sessions=n)

        if cfg.responder == "silence_rule":  # deterministic: one pass, reported like the model's
            cfg.eval.seeds, cfg.eval.baseline = [0], False
            make, make_sessions = (lambda seed: silence_rule()), None  # noqa: E731
        else:
            make, make_sessions = session, sessions
        report = evaluate_seeds(make, episodes, run.layout, run.dmel, run.text, run_dir, cfg.eval, cfg.vad,
                                cfg.realtime, make_baseline=silence_rule if cfg.eval.baseline else None,
                                make_sessions=make_sessions, batch_size=cfg.batch_size)
        print(f"{len(episodes)} episodes x seeds {report['seeds']}, playback clock ({report['playback']}, max lag "
              f"{report['max_lag_s']:.2f} s), activity {report['activity']}; {report['ci']}\n{report['table']}\n"
              f"wrote {run_dir / 'report.md'}" + (f"\nWarning: {report['warning']}" if report["warning"] else ""),
              flush=True)


if __name__ == "__main__":
    check_overrides(EvaluateConfig)
    main()
