"""Hear and see what a checkpoint learned: `python recipes/sample.py checkpoint=RUN_DIR episode=0`.

Teacher-forced on the user side of one (held-out) episode, the model writes its own side (text and audio).
Writes into the Hydra run dir (outputs/sample/DATE/TIME unless `hydra.run.dir=...`):

    model.wav       the model's generated speech (16 kHz, Griffin-Lim)
    dialogue.wav    stereo: the recorded user on the left, the generated model on the right
    text.tsv        per micro-turn: start time, what the model wrote, what the recording's model said
    mels.png        log-mel of the user, the reference model speech, the one-step (teacher-forced) prediction and
                    the generated model speech
    metrics.json    teacher-forced losses on the episode; mel L1 / spectral convergence / log-mel correlation
                    against the recording of the generated and the one-step predicted speech, and of two anchors:
                    the dMel-quantised recording (the best a dMel path can do) and silence

Free generation re-runs the prefix for every position (no KV cache): ~25 s for 5 s of tiny-model dialogue on CPU;
`generate=false` gives only the teacher-forced numbers (one forward).

`episode` is a sample key or an index in shard order; `data_path` (default: the run's training set) is where the
episode is read from; the text tokenizer is always the training set's. Sampling settings: `sampling.*`
(tml.model.sampling.SamplingConfig), e.g. `sampling.audio_temperature=0.7 sampling.flow_steps=32`.
"""

from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from tml.eval.listen import ListenConfig, listen

ConfigStore.instance().store(name="sample_schema", node=ListenConfig)


@hydra.main(version_base=None, config_path="../configs", config_name="sample")
def main(cfg) -> None:
    listen(OmegaConf.to_object(cfg), Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
