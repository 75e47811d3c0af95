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

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import hydra
import torch
import webdataset as wds
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from tml.audio import DMelTokenizer, write_wav
from tml.audio.compare import log_mel_correlation, mel_l1, spectral_convergence
from tml.audio.plot import plot_mels
from tml.data.loader import read_manifest
from tml.model import InteractionModel, compute_losses
from tml.model.generate import generate_model_side
from tml.model.sampling import SamplingConfig, sample_audio
from tml.streams import Episode, Kind, Stream
from tml.streams.interleave import interleave
from tml.streams.pack import collate
from tml.text.tokenizer import TextTokenizer
from tml.train.checkpoint import find_checkpoint, load_model_weights
from tml.train.config import validate_config
from tml.train.loop import config_from_dict


@dataclass
class SampleConfig:
    checkpoint: str = "???"  # RUN_DIR, RUN_DIR/checkpoints or RUN_DIR/checkpoints/step_XXXXXXXX
    episode: str = "0"  # sample key, or index in shard order
    data_path: Optional[str] = None  # None = the run's data.path
    max_turns: int = 0  # use at most this many micro-turns (0 = the whole episode)
    generate: bool = True  # false: teacher-forced metrics and one-step picture only (fast; no wavs, no text)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


def read_episode(data_path: str, episode: str) -> Episode:
    shards = [Path(data_path) / s["name"] for s in read_manifest(data_path)["shards"]]
    i = 0
    for shard in shards:
        for sample in wds.tarfile_samples([{"url": str(shard)}]):
            if sample["__key__"] == episode or str(i) == episode:
                return Episode.from_sample(sample)
            i += 1
    raise KeyError(f"episode={episode!r}: no sample with that key, and only {i} samples in {data_path}")


def run(cfg: SampleConfig, out: Path) -> dict:
    cfg.sampling.validate()
    run_dir, step_dir = find_checkpoint(cfg.checkpoint)
    train_cfg = config_from_dict(json.loads((run_dir / "config.resolved.json").read_text()))
    layout = validate_config(train_cfg)
    model = InteractionModel(train_cfg.model)
    load_model_weights(model, step_dir)
    model.eval()
    text = TextTokenizer.load(Path(train_cfg.data.path) / read_manifest(train_cfg.data.path).get("tokenizer",
                                                                                                  "tokenizer.json"))
    dmel = DMelTokenizer(train_cfg.data.dmel)
    episode = read_episode(cfg.data_path or train_cfg.data.path, str(cfg.episode))
    tok = interleave(episode, layout, dmel, text)
    if cfg.max_turns > 0 and tok.num_turns > cfg.max_turns:
        tok = tok.slice_turns(0, cfg.max_turns)
    T, frames = tok.num_turns, tok.num_turns * layout.frames_per_turn
    torch.manual_seed(cfg.sampling.seed)

    # 1. Teacher-forced on both sides: held-out losses, and one-step audio predictions from the true history.
    with torch.no_grad():
        batch = collate([[tok]], tok.kind.numel())
        out_tf = model(batch)
        losses = {k: float(v) for k, v in compute_losses(out_tf, batch, text_pad_id=text.pad_id).items()}
        h_audio = out_tf.hidden[batch.target_kind == Kind.AUDIO]
        gen = torch.Generator().manual_seed(cfg.sampling.seed)
        # Every model audio position is a target (of the slot before it), so these are in time order.
        one_step = dmel.unit_to_log_mel(sample_audio(model.audio_head, h_audio, cfg.sampling, gen)).flatten(0, 1)

    model_pos = (tok.stream == Stream.MODEL) & (tok.kind == Kind.AUDIO)
    ref_bins = tok.audio_bins[model_pos[tok.kind == Kind.AUDIO]]  # [T * audio slots, S, C] in time order
    ref_mel = dmel.log_mel(episode.audio["model"])[:frames]  # the recording, not quantised
    lo, hi = dmel.cfg.log_min, dmel.cfg.log_max

    def compare(mel: torch.Tensor) -> dict:
        corr = log_mel_correlation(ref_mel, mel, lo, hi)
        return {"mel_l1": mel_l1(ref_mel, mel, lo, hi),
                "spectral_convergence": spectral_convergence(ref_mel, mel, lo, hi),
                "log_mel_corr": None if math.isnan(corr) else corr}  # NaN: one side is constant (e.g. all silent)

    metrics = {
        "episode": episode.key, "turns": T, "head": train_cfg.model.heads.audio, "step_dir": str(step_dir),
        "teacher_forced_losses": losses,
        "one_step_vs_reference": compare(one_step),
        "dmel_quantised_reference_vs_reference": compare(dmel.decode(ref_bins).flatten(0, 1)),
        "silence_vs_reference": compare(torch.full_like(ref_mel, lo)),
        "sampling": OmegaConf.to_container(OmegaConf.structured(cfg.sampling)),
    }
    panels = [("user", dmel.log_mel(episode.audio["user"])[:frames]), ("reference model", ref_mel),
              ("one-step predicted", one_step)]
    title = f"{episode.key}, {train_cfg.model.heads.audio} head"

    # 2. Free-running on the model side.
    if cfg.generate:
        g = generate_model_side(model, tok, cfg.sampling)
        gen_mel = dmel.unit_to_log_mel(g.model_audio_unit).flatten(0, 1)
        metrics["generated_vs_reference"] = gm = compare(gen_mel)
        panels.append(("generated model", gen_mel))
        title += f": generated vs reference mel L1 {gm['mel_l1']:.2f}, SC {gm['spectral_convergence']:.2f}"
        sr, n = dmel.cfg.sample_rate, T * layout.samples_per_turn
        model_wave = dmel.to_wave(gen_mel)
        fit = lambda w: torch.nn.functional.pad(w[:n], (0, max(0, n - w.numel())))  # noqa: E731
        write_wav(out / "model.wav", model_wave, sr)
        write_wav(out / "dialogue.wav", torch.stack([fit(episode.audio["user"]), fit(model_wave)]), sr)
        lines = ["time_s\tmicro_turn\tgenerated\treference"]
        ref_text = tok.text_ids[(tok.stream == Stream.MODEL) & (tok.kind == Kind.TEXT)].view(T, -1)
        for t in range(T):
            said, ref = text.decode(g.model_text[t].tolist()), text.decode(ref_text[t].tolist())
            if said or ref:
                lines.append(f"{t * layout.cfg.micro_turn_ms / 1000:.1f}\t{t}\t{said}\t{ref}")
        (out / "text.tsv").write_text("\n".join(lines) + "\n")
    plot_mels(out / "mels.png", panels, dmel.cfg.hop_length / dmel.cfg.sample_rate, lo, hi, title=title)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2), flush=True)
    return metrics


ConfigStore.instance().store(name="sample_schema", node=SampleConfig)


@hydra.main(version_base=None, config_path="../configs", config_name="sample")
def main(cfg) -> None:
    run(OmegaConf.to_object(cfg), Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
