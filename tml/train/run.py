"""What a run is built from, shared by pretraining (``tml.train.loop``) and checkpoint loading
(``tml.eval.loading``): the validated config, its micro-turn layout, the data set's manifest and tokenizers, and the
model's vocabulary taken from the data's text tokenizer. Both sides build a run the same way, so a loaded checkpoint
meets the same layout and tokenizers it was trained with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tml.audio.dmel import DMelTokenizer
from tml.data.loader import read_manifest
from tml.streams.layout import MicroTurnLayout
from tml.text.tokenizer import TextTokenizer
from tml.train.config import PretrainConfig, validate_config


@dataclass
class Run:
    config: PretrainConfig
    layout: MicroTurnLayout
    manifest: dict  # the data set's manifest.json
    text: TextTokenizer
    dmel: DMelTokenizer


def build_run(cfg: PretrainConfig) -> Run:
    """Validate ``cfg`` (ConfigError naming the key) and load its data tools from ``cfg.data.path``. Sets
    ``cfg.model.vocab_size`` to the data's text tokenizer size: the embedding and text head follow the tokenizer."""
    layout = validate_config(cfg)
    manifest = read_manifest(cfg.data.path)
    text = TextTokenizer.load(Path(cfg.data.path) / manifest.get("tokenizer", "tokenizer.json"))
    cfg.model.vocab_size = text.vocab_size
    return Run(cfg, layout, manifest, text, DMelTokenizer(cfg.data.dmel))
