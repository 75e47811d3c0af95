"""Replay a user recording through a checkpoint, micro-turn by micro-turn, as a live session would hear it:
`python recipes/converse.py checkpoint=RUN_DIR input=user.wav`.

Prints each micro-turn's compute time and what the model wrote; writes model.wav (its side) and dialogue.wav
(stereo: user left, model right) into the Hydra run dir, the model's side on the playback clock (tml.eval.clock):
micro-turn t's output from (t + 1) * 0.2 s plus the measured compute backlog (`realtime=true`: without it).
"""

from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from tml.audio.wav import read_wav
from tml.cli import check_overrides, recipe_run
from tml.eval.loading import load_run
from tml.eval.session import SessionConfig, StreamingSession, converse


@dataclass
class ConverseConfig:
    checkpoint: str = "???"  # RUN_DIR, RUN_DIR/checkpoints or a step dir
    input: str = "???"  # a WAV file of the user's side (any rate, mono or stereo: channels are averaged)
    session: SessionConfig = field(default_factory=SessionConfig)
    realtime: bool = False  # true: place the model's output as if compute were instantaneous (default: measured)


ConfigStore.instance().store(name="converse_schema", node=ConverseConfig)


@hydra.main(version_base=None, config_path="../configs", config_name="converse")
def main(cfg) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with recipe_run(run_dir, "converse"):
        cfg: ConverseConfig = OmegaConf.to_object(cfg)
        run = load_run(cfg.checkpoint)
        wave, sr = read_wav(cfg.input)
        session = StreamingSession(run.model, run.layout, run.dmel, cfg.session, run.text.pad_id)
        converse(session, wave.mean(0), sr, run.text, run_dir, cfg.realtime)


if __name__ == "__main__":
    check_overrides(ConverseConfig)
    main()
