"""Let the model speak its side of a recorded episode: teacher-forced on every input stream, free on its own.

Walk the episode's positions in order. Input positions (user audio, video, background text) keep the recording's
payload; at every MODEL-stream text or audio position the hidden state of the position before it is sampled by
the head's own ``sample`` (floor decision, then content: ``tml.model.sampling``) and the sample becomes that
position's payload, so later positions read what the model wrote. With a floor head the speak / stay-silent
decision is taken once per micro-turn, at its first output slot, and every output slot of the micro-turn follows it
(as ``tml.eval.session.StreamingSession`` does). Audio feeds back through the dMel bag, i.e. quantised to bins, the same path as real audio; the continuous
unit coordinates (the flow head's samples, or bin centres) are kept for listening.

Positions go through the model once each, with a KV cache per layer (``InteractionModel.forward_cached``): the
positions since the last sample are fed as one chunk, so cost grows linearly with the episode length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tml.model.attention import KVCache
from tml.model.heads import unit_to_bins
from tml.model.sampling import SamplingConfig
from tml.model.transformer import InteractionModel
from tml.streams.batch import IGNORE_INDEX, Batch
from tml.streams.interleave import EpisodeTokens
from tml.streams.layout import Kind, Stream


@dataclass
class Generation:
    """What the model wrote, per position of the episode (n = num_turns * turn length).

    text_ids: long [n] (generated at MODEL text positions, the recording's elsewhere); audio_bins: long [n_audio,
    S, C] in row-major order of the AUDIO positions (generated at MODEL ones); model_audio_unit: float
    [num_turns * audio slots, S, C] the model's continuous audio in time order; model_text: long [num_turns, text
    slots] the model's tokens (``<pad>`` = wrote nothing).
    """

    text_ids: torch.Tensor
    audio_bins: torch.Tensor
    model_audio_unit: torch.Tensor
    model_text: torch.Tensor


def span_batch(tok: EpisodeTokens, a: int, b: int, text_ids: torch.Tensor, audio_bins: torch.Tensor) -> Batch:
    """Positions [a, b) of one episode as a one-row Batch without targets (we read hidden states, not losses);
    ``text_ids`` [n] and ``audio_bins`` [n_audio, S, C] hold the episode's payloads so far."""
    kind = tok.kind[a:b]
    before = tok.kind[:a]
    a_audio, a_patch = int((before == Kind.AUDIO).sum()), int((before == Kind.PATCH).sum())
    n_audio, n_patch = int((kind == Kind.AUDIO).sum()), int((kind == Kind.PATCH).sum())
    S, C = tok.audio_bins.shape[1:]
    row = lambda x: x[None].clone()  # noqa: E731
    return Batch(kind=row(kind), stream=row(tok.stream[a:b]), micro_turn=row(tok.micro_turn[a:b]),
                 position_ids=torch.arange(a, b)[None], doc_ids=torch.zeros(1, b - a, dtype=torch.long),
                 text_ids=row(text_ids[a:b]), audio_bins=audio_bins[a_audio:a_audio + n_audio].clone(),
                 patches=tok.patches[a_patch:a_patch + n_patch], patch_rc=tok.patch_rc[a_patch:a_patch + n_patch],
                 target_kind=torch.zeros(1, b - a, dtype=torch.long),
                 target_text=torch.full((1, b - a), IGNORE_INDEX), target_audio=torch.zeros(0, S, C, dtype=torch.long))


@torch.no_grad()
def generate_model_side(model: InteractionModel, tok: EpisodeTokens, cfg: SamplingConfig,
                        text_pad_id: int = 0) -> Generation:
    """Generate every MODEL text/audio position of ``tok`` (see module docstring) with the generator seeded by
    ``cfg.seed``. The model is put in eval mode."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.validate().seed)
    device = next(model.parameters()).device
    text_ids, audio_bins = tok.text_ids.clone(), tok.audio_bins.clone()
    audio_row = torch.cumsum(tok.kind == Kind.AUDIO, 0) - 1  # row of audio_bins of each AUDIO position
    is_model = tok.stream == Stream.MODEL
    units, speak = [], None
    floor = model.floor_head is not None and cfg.floor != "none"
    cache, fed = KVCache(len(model.layers)), 0  # positions [0, fed) are in the cache
    for q in torch.nonzero(is_model & ((tok.kind == Kind.TEXT) | (tok.kind == Kind.AUDIO))).flatten().tolist():
        if q == 0:
            raise ValueError(f"episode {tok.key}: a MODEL position is first in the micro-turn; nothing predicts it")
        h = model.forward_cached(span_batch(tok, fed, q, text_ids, audio_bins).to(device), cache, fed)[0, -1:]
        fed = q
        if floor and tok.stream[q - 1] != Stream.MODEL:  # first output slot of a micro-turn: the floor decision
            speak = model.floor_head.sample(h, cfg, gen)[0]
        # The content given the micro-turn's decision (None: each slot decides for itself).
        if tok.kind[q] == Kind.TEXT:
            text_ids[q] = model.text_head.sample(h, cfg, gen, text_pad_id, speak=speak).cpu()[0]
        else:
            unit = model.audio_head.sample(h, cfg, gen, speak=speak).float().cpu()
            audio_bins[audio_row[q]] = unit_to_bins(unit[0], model.cfg.dmel_bins)
            units.append(unit[0])
    S, C = tok.audio_bins.shape[1:]
    model_text = text_ids[is_model & (tok.kind == Kind.TEXT)].view(tok.num_turns, -1)
    unit = torch.stack(units) if units else torch.zeros(0, S, C)
    return Generation(text_ids, audio_bins, unit, model_text)
