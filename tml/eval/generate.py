"""Let the model speak its side of a recorded episode: teacher-forced on every input stream, free on its own.

Free generation is the streaming session (``tml.eval.session.StreamingSession``, the one KV-cached micro-turn
loop) driven by the episode's training tokens: each micro-turn's input slot runs (user audio, video, background
text) are the recording's positions (``turn_positions``), and the session writes the MODEL slots as it does live:
the floor decision once per micro-turn, then every output slot drawn by its head's ``sample`` (``SamplingConfig``)
and fed back, audio quantised to dMel bins as real audio is. The session attends to the whole episode
(``cache_window=0``); each position goes through the model once, so cost grows linearly with the episode length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tml.audio.dmel import DMelTokenizer
from tml.eval.session import MicroTurnInputs, SessionConfig, StreamingSession
from tml.model.sampling import SamplingConfig
from tml.model.transformer import InteractionModel
from tml.streams.interleave import EpisodeTokens
from tml.streams.layout import MicroTurnLayout, Stream
from tml.streams.modalities import MODALITIES, SPEC, Kind, TurnPositions


@dataclass
class Generation:
    """What the model wrote, per position of the episode (n = num_turns * turn length).

    payload: every payload field of the episode's tokens, with the MODEL positions of each modality the model writes
    holding what it wrote there (as fed back: text ids, audio quantised to dMel bins, any further output modality's
    field), the recording's elsewhere; read as ``text_ids`` long [n] and ``audio_bins`` long [n_audio, S, C] (row-major
    order of the AUDIO positions). model_audio_unit: float [num_turns * audio slots, S, C] the model's continuous
    audio in time order (the audio head's samples, unit coordinates); model_mel: float [num_turns * frames_per_turn,
    n_mels] the log-mel a listener hears (``MicroTurnOutputs.mel``); model_text: long [num_turns, text slots] the
    model's tokens (``<pad>`` = wrote nothing).
    """

    payload: dict[str, torch.Tensor]
    model_audio_unit: torch.Tensor
    model_mel: torch.Tensor
    model_text: torch.Tensor

    @property
    def text_ids(self) -> torch.Tensor:
        return self.payload["text_ids"]

    @property
    def audio_bins(self) -> torch.Tensor:
        return self.payload["audio_bins"]


def turn_positions(tok: EpisodeTokens, layout: MicroTurnLayout, t: int) -> list[TurnPositions]:
    """Micro-turn ``t``'s input slot runs of ``tok`` (in layout order) as ``(kind, {field: payload})``, the form
    ``Modality.encode`` makes and ``MicroTurnInputs.positions`` takes."""
    if tok.turn_length != layout.length:
        raise ValueError(f"episode {tok.key}: {tok.turn_length} positions per micro-turn, but the layout has "
                         f"{layout.length} ({layout.describe()}); interleave it with the same layout")
    p = t * layout.length
    # Row payloads: the rows of each row modality before this micro-turn (input runs come first in a micro-turn).
    row = {m.kind: int((tok.kind[:p] == m.kind).sum()) for m in MODALITIES if not m.dense}
    out = []
    for slot in layout.slots:
        if slot.stream == Stream.MODEL:
            break
        kinds, n = tok.kind[p : p + slot.count], slot.count
        kind = Kind(int(kinds[0]))
        if not bool((kinds == kind).all()) or int(tok.stream[p]) != slot.stream:
            raise ValueError(f"episode {tok.key}, micro-turn {t}: positions {p}..{p + n - 1} are not one "
                             f"{slot.stream.name.lower()} slot run of a single kind (kinds {kinds.tolist()})")
        payload = {}
        if kind in SPEC:  # PAD: an empty run, no payload
            m = SPEC[kind]
            if m.dense:
                payload = {f: tok.payload[f][p : p + n] for f in m.fields}
            else:
                payload = {f: tok.payload[f][row[kind] : row[kind] + n] for f in m.fields}
                row[kind] += n
        out.append((kind, payload))
        p += n
    return out


def turn_outputs(tok: EpisodeTokens, layout: MicroTurnLayout, t: int) -> dict:
    """Micro-turn ``t``'s model text ids (list) and audio bins [frames_per_turn, n_mels] of ``tok``: the reference's
    output, as ``StreamingSession.step(force=...)`` takes it for teacher forcing."""
    sl = slice(t * layout.length, (t + 1) * layout.length)
    kind, stream = tok.kind[sl], tok.stream[sl]
    audio_row = (torch.cumsum(tok.kind == Kind.AUDIO, 0) - 1)[sl]  # audio_bins has one row per audio position
    model_audio = audio_row[(kind == Kind.AUDIO) & (stream == Stream.MODEL)]
    return {"text": tok.text_ids[sl][(stream == Stream.MODEL) & (kind == Kind.TEXT)].tolist(),
            "audio": tok.audio_bins[model_audio].reshape(-1, layout.cfg.n_mels)}


@torch.no_grad()
def generate_model_side(model: InteractionModel, tok: EpisodeTokens, layout: MicroTurnLayout, dmel: DMelTokenizer,
                        cfg: SamplingConfig, text_pad_id: int = 0) -> Generation:
    """Generate every MODEL position of ``tok`` (text, audio, any modality the model writes; see module docstring)
    with a session seeded by ``cfg.seed``. The model is put in eval mode."""
    n = tok.kind.numel()
    session = StreamingSession(model, layout, dmel, SessionConfig(cache_window=0, max_context=max(n, 1),
                                                                  sampling=cfg), text_pad_id)
    outs = [session.step(MicroTurnInputs(positions=turn_positions(tok, layout, t))) for t in range(tok.num_turns)]
    S, C = layout.cfg.frames_per_audio_position, layout.cfg.n_mels
    is_model, payload = tok.stream == Stream.MODEL, dict(tok.payload)
    for kind, head in session.writers.items():  # each modality the model writes: its positions get what it fed back
        spec = SPEC[kind]
        f = spec.fields[0]
        at = is_model & (tok.kind == kind)
        at = at if spec.dense else at[tok.kind == kind]  # a row field has one row per position of its kind
        payload[f] = payload[f].clone()
        if outs:
            payload[f][at] = torch.cat([head.to_payload(o.written[spec.name])[f].cpu() for o in outs]) \
                .view_as(payload[f][at])
    model_text = torch.tensor([o.text_ids for o in outs], dtype=torch.long).view(tok.num_turns, -1)
    unit = torch.cat([o.audio_unit.cpu() for o in outs]).view(-1, S, C) if outs else torch.zeros(0, S, C)
    mel = torch.cat([o.mel.cpu() for o in outs]) if outs else torch.zeros(0, C)
    return Generation(payload, unit, mel, model_text)
