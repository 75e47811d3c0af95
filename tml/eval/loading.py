"""Load a trained run for inference: its config, model weights, layout, tokenizers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from tml.audio.dmel import DMelTokenizer
from tml.data.loader import read_manifest
from tml.eval.word_events import events_from_words
from tml.model import InteractionModel
from tml.streams.episode import Episode
from tml.streams.layout import MicroTurnLayout
from tml.text.tokenizer import TextTokenizer
from tml.train.checkpoint import find_checkpoint, load_model_weights
from tml.train.config import PretrainConfig, config_from_saved, validate_config
from tml.train.run import build_run


@dataclass
class Loaded:
    model: InteractionModel
    config: PretrainConfig
    layout: MicroTurnLayout
    text: TextTokenizer
    dmel: DMelTokenizer
    step_dir: Path | None  # None for an untrained model


def load_export(export_dir: Path, untrained: bool = False, seed: int = 0) -> Loaded:
    """An export directory (``tml.tools.export``) -> its model in eval mode and its data tools, from its own files."""
    import torch
    from safetensors.torch import load_file

    config = json.loads((export_dir / "run_config.json").read_text())
    if config["data"]["dmel"].get("ranges_file"):
        config["data"]["dmel"]["ranges_file"] = str(export_dir / config["data"]["dmel"]["ranges_file"])
    cfg = config_from_saved(config)
    layout = validate_config(cfg)
    torch.manual_seed(seed)
    model = InteractionModel(cfg.model)
    if not untrained:
        model.load_state_dict(load_file(str(export_dir / "model.safetensors")))
    text = TextTokenizer.load(export_dir / "tokenizer.json")
    return Loaded(model.eval(), cfg, layout, text, DMelTokenizer(cfg.data.dmel), None if untrained else export_dir)


def load_run(checkpoint: str | Path, untrained: bool = False, seed: int = 0) -> Loaded:
    """A pretrain run (RUN_DIR, RUN_DIR/checkpoints or a step dir) or an export dir -> its model in eval mode and its
    data tools. ``untrained=True`` builds the same model with fresh random weights (a baseline)."""
    import torch

    if (Path(checkpoint) / "run_config.json").exists():
        return load_export(Path(checkpoint), untrained, seed)
    run_dir, step_dir = find_checkpoint(checkpoint)
    run = build_run(config_from_saved(json.loads((run_dir / "config.resolved.json").read_text())))
    torch.manual_seed(seed)
    model = InteractionModel(run.config.model)
    if not untrained:
        load_model_weights(model, step_dir)
    return Loaded(model.eval(), run.config, run.layout, run.text, run.dmel, None if untrained else step_dir)


def read_episodes(data_path: str | Path, keys: list[str] | None = None, limit: int = 0,
                  derive_events: bool = True) -> list[Episode]:
    """Episodes of a data set in shard order: those named in ``keys`` (sample keys or shard-order indices), or the
    first ``limit`` (0 = all). An episode without event labels (recorded corpora) gets labels derived from its word
    alignments (``tml.eval.word_events``; ``meta["events_source"] = "words"``) unless ``derive_events=False``."""
    out, i = [], 0
    wanted = set(keys or [])
    for s in read_manifest(data_path)["shards"]:
        for sample in wds.tarfile_samples([{"url": str(Path(data_path) / s["name"])}]):
            if not wanted or sample["__key__"] in wanted or str(i) in wanted:
                ep = Episode.from_sample(sample)
                if derive_events and "events" not in ep.meta:
                    ep.meta["events"], ep.meta["events_source"] = events_from_words(ep.words), "words"
                out.append(ep)
                if limit and len(out) >= limit:
                    return out
            i += 1
    if wanted and len(out) < len(wanted):
        raise KeyError(f"episodes {sorted(wanted)}: found only {[e.key for e in out]} in {data_path} ({i} samples)")
    return out
