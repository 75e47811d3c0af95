"""Hear and see what a checkpoint learned on one (held-out) episode: ``recipes/sample.py`` is its command line.

Teacher-forced on the user side, the model writes its own side (text and audio). Writes into ``out``:

    model.wav       the model's generated speech (16 kHz, Griffin-Lim) as a listener hears it: on the playback clock
                    (``tml.eval.clock``), micro-turn t's output from (t + 1) * 0.2 s, as from a model keeping real time
    dialogue.wav    stereo: the recorded user on the left, the generated model (as in model.wav) on the right
    text.tsv        per micro-turn: when a listener gets its text (playback clock), what the model wrote, what the
                    recording's model said in that micro-turn's output slots
    mels.png        log-mel of the user, the reference model speech, the one-step (teacher-forced) prediction and
                    the generated model speech
    metrics.json    teacher-forced losses on the episode; mel L1 / spectral convergence / log-mel correlation
                    against the recording of the generated and the one-step predicted speech, and of two anchors:
                    the dMel-quantised recording (the best a dMel path can do) and silence

Free generation (``tml.eval.generate``: the streaming session driven by the episode's inputs) feeds every position
once through a KV cache: the whole recipe takes ~18 s for 5 s of tiny-model dialogue on CPU (40 s when it re-ran the
prefix per position); ``generate=false`` gives only the teacher-forced numbers (one forward).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf

from tml.audio import write_wav
from tml.audio.compare import log_mel_correlation, mel_l1, spectral_convergence
from tml.audio.plot import plot_mels
from tml.eval.clock import place_on_playback_clock, playback_starts
from tml.eval.generate import generate_model_side
from tml.eval.loading import load_run, read_episodes
from tml.model import compute_losses
from tml.model.sampling import SamplingConfig
from tml.streams import Kind, Stream
from tml.streams.interleave import interleave
from tml.streams.pack import collate


@dataclass
class ListenConfig:
    checkpoint: str = "???"  # RUN_DIR, RUN_DIR/checkpoints or RUN_DIR/checkpoints/step_XXXXXXXX
    episode: str = "0"  # sample key, or index in shard order
    data_path: Optional[str] = None  # None = the run's data.path
    max_turns: int = 0  # use at most this many micro-turns (0 = the whole episode)
    generate: bool = True  # false: teacher-forced metrics and one-step picture only (fast; no wavs, no text)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


def listen(cfg: "ListenConfig", out: Path) -> dict:
    """Teacher-forced metrics, one-step and free-running generation for one episode of a checkpoint; writes the
    files listed in the module docstring into ``out`` and returns the metrics."""
    cfg.sampling.validate()
    run = load_run(cfg.checkpoint)
    model, train_cfg, layout, text, dmel, step_dir = run.model, run.config, run.layout, run.text, run.dmel, run.step_dir
    episode = read_episodes(cfg.data_path or train_cfg.data.path, keys=[str(cfg.episode)])[0]
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
        one_step = dmel.unit_to_log_mel(model.audio_head.sample(h_audio, cfg.sampling, gen)).flatten(0, 1)

    model_pos = (tok.stream == Stream.MODEL) & (tok.kind == Kind.AUDIO)
    ref_bins = tok.audio_bins[model_pos[tok.kind == Kind.AUDIO]]  # [T * audio slots, S, C] in time order
    # The recording, not quantised, aligned like the training tokens (model streams lead by model_lead_turns).
    lead = layout.cfg.model_lead_turns * layout.frames_per_turn
    ref_mel = dmel.log_mel(episode.audio["model"])[lead:lead + frames]
    ref_mel = torch.cat([ref_mel, ref_mel.new_full((frames - ref_mel.shape[0], ref_mel.shape[1]), dmel.cfg.log_min)])
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
        g = generate_model_side(model, tok, layout, dmel, cfg.sampling, text.pad_id)
        gen_mel = g.model_mel  # what a listener of the session hears
        metrics["generated_vs_reference"] = gm = compare(gen_mel)
        panels.append(("generated model", gen_mel))
        sc = gm["spectral_convergence"]
        title += f": generated vs reference mel L1 {gm['mel_l1']:.2f}, " + \
            (f"SC {sc:.2f}" if sc is not None else "SC n/a (silent reference)")
        sr, n = dmel.cfg.sample_rate, T * layout.samples_per_turn
        fit = lambda w: torch.nn.functional.pad(w[:n], (0, max(0, n - w.numel())))  # noqa: E731
        starts = playback_starts(T, layout.cfg.micro_turn_ms / 1000)  # free generation: as if keeping real time
        model_wave = place_on_playback_clock(fit(dmel.to_wave(gen_mel)), layout.samples_per_turn, starts, sr, n)
        write_wav(out / "model.wav", model_wave, sr)
        write_wav(out / "dialogue.wav", torch.stack([fit(episode.audio["user"]), model_wave]), sr)
        lines = ["heard_at_s\tmicro_turn\tgenerated\treference"]
        ref_text = tok.text_ids[(tok.stream == Stream.MODEL) & (tok.kind == Kind.TEXT)].view(T, -1)
        said_turns, ref_turns = text.decode_turns(g.model_text.tolist()), text.decode_turns(ref_text.tolist())
        for t in range(T):
            said, ref = said_turns[t].strip(), ref_turns[t].strip()  # whole characters (byte-level BPE)
            if said or ref:
                lines.append(f"{starts[t]:.1f}\t{t}\t{said}\t{ref}")
        (out / "text.tsv").write_text("\n".join(lines) + "\n")
    plot_mels(out / "mels.png", panels, dmel.cfg.hop_length / dmel.cfg.sample_rate, lo, hi, title=title)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2), flush=True)
    return metrics
