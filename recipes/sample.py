"""Hear and see what a checkpoint learned: `python recipes/sample.py checkpoint=RUN_DIR episode=0`.

Teacher-forced on the user side of one (held-out) episode, the model writes its own side (text and audio); writes
model.wav, stereo dialogue.wav, text.tsv, mels.png and metrics.json into the Hydra run dir (outputs/sample/DATE/TIME
unless `hydra.run.dir=...`); see ``tml.eval.listen`` for what each holds. `generate=false` gives only the
teacher-forced numbers (one forward).

`episode` is a sample key or an index in shard order; `data_path` (default: the run's training set) is where the
episode is read from; the text tokenizer is always the training set's. Sampling settings: `sampling.*`
(tml.model.sampling.SamplingConfig), e.g. `sampling.audio_temperature=0.7 sampling.flow_steps=32`.
"""

from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from tml.cli import check_overrides, recipe_run
from tml.eval.listen import ListenConfig, listen

ConfigStore.instance().store(name="sample_schema", node=ListenConfig)


@hydra.main(version_base=None, config_path="../configs", config_name="sample")
def main(cfg) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with recipe_run(run_dir, "sample"):
        listen(OmegaConf.to_object(cfg), run_dir)


if __name__ == "__main__":
    check_overrides(ListenConfig)
    main()
