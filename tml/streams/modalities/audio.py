"""dMel audio: log-mel channels cut into a few intensity bins, on the user and model streams (the modality's whole
spec).

One audio position stacks ``frames_per_audio_position`` mel frames. Audio slot ``k`` of micro-turn ``t`` holds mel
frames ``[t*F + kS, t*F + kS + S)`` (F frames per micro-turn, S per position) of the stream's wave, resampled to the
layout's rate first; past the end of the wave is digital silence. Embedded by a bag of embeddings (one table per
stacked frame and mel channel, looked up and summed). The model writes audio: its target field is ``target_audio``.

Its label ``heard_text`` is what the listener has heard so far: on an input stream whose episode has words (the
user's), each word's tokens queue up at the audio position in which the word ends (the first position from which
all of it has been heard) and fill one position each, in order, spilling into later positions; positions with
nothing due hold ``<pad>``. IGNORE_INDEX on the model's own audio and on streams without words. The listen head
(``model.heads.listen``) is trained on it: an aligned transcript of what the model hears, so the backbone learns
to recognise the user's words, which the floor decision needs ("hold on" vs "tell me more").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from tml.errors import ConfigError
from tml.streams.layout import LayoutConfig, MicroTurnLayout, Slot, Stream
from tml.streams.modalities.base import IGNORE_INDEX, LiveInput, Modality
from tml.streams.modalities.text import place_text

if TYPE_CHECKING:
    from tml.audio.dmel import DMelTokenizer


class AudioModality(Modality):
    def check_slot(self, cfg, slot, where):
        audio_per_turn = cfg.micro_turn_ms // (cfg.mel_hop_ms * cfg.frames_per_audio_position)
        if slot.kind == self.name and slot.count != audio_per_turn:
            raise ConfigError(f"{where}.count={slot.count}: an audio stream needs micro_turn_ms / (mel_hop_ms * "
                              f"frames_per_audio_position) = {audio_per_turn} slots per micro-turn")

    def encode(self, episode, slot, layout, dmel, text, num_turns):
        cfg = layout.cfg
        name = slot.stream.name.lower()
        if name not in episode.audio:
            raise KeyError(f"episode {episode.key} has no {name} audio but the layout has {name} audio slots")
        wave = episode.audio[name]
        if episode.sample_rate != cfg.sample_rate:  # recordings at any rate land on the layout's clock
            wave = torchaudio.functional.resample(wave, episode.sample_rate, cfg.sample_rate)
        bins = dmel.encode(wave)
        if slot.stream == Stream.MODEL:  # the model's streams lead (tml.streams.interleave)
            bins = bins[cfg.model_lead_turns * layout.frames_per_turn:]
        need = num_turns * layout.frames_per_turn
        if bins.shape[0] < need:
            bins = torch.cat([bins, dmel.silence_bins(need - bins.shape[0])])
        bins = bins[:need].reshape(num_turns, slot.count, cfg.frames_per_audio_position, cfg.n_mels)
        heard, dropped = heard_text(episode, slot, layout, text, num_turns)
        return [(self.kind, {"audio_bins": bins[t], "heard_text": heard[t]}) for t in range(num_turns)], dropped

    def live(self, slot, layout, dmel, pad_id):
        return LiveAudio(slot, layout, dmel)

    def embedder(self, cfg):
        return DMelBagEmbedding(cfg.frames_per_audio_position, cfg.n_mels, cfg.dmel_bins, cfg.dim)

    def num_params(self, cfg):
        return cfg.frames_per_audio_position * cfg.n_mels * cfg.dmel_bins * cfg.dim

    def check_embedder(self, embedder, batch):
        if tuple(batch.audio_bins.shape[1:]) != (embedder.frames, embedder.n_mels):
            raise ConfigError(f"Batch.audio_bins has [S, C] = {list(batch.audio_bins.shape[1:])} but the model "
                              f"expects model.frames_per_audio_position={embedder.frames}, model.n_mels="
                              f"{embedder.n_mels}; make them equal to layout.frames_per_audio_position and layout.n_mels")

    def shapes(self, batch):
        S, C = batch.audio_bins.shape[1:] if batch.audio_bins.ndim == 3 else (None, None)
        n, n_t = int((batch.kind == self.kind).sum()), int((batch.target_kind == self.kind).sum())
        return {"audio_bins": (torch.int64, (n, None, None)), "target_audio": (torch.int64, (n_t, S, C))}

    def empty(self, cfg=None):
        cfg = cfg or LayoutConfig()
        return {"audio_bins": torch.zeros(0, cfg.frames_per_audio_position, cfg.n_mels, dtype=torch.int64)}


AUDIO = AudioModality(kind=2, name="audio", fields=("audio_bins",), dense=False, target="target_audio",
                      labels=("heard_text",))


def heard_text(episode, slot: Slot, layout: MicroTurnLayout, text, num_turns: int) -> tuple[torch.Tensor, int]:
    """The ``heard_text`` label of one audio slot run (module docstring): long [num_turns, slot.count], and the
    tokens still queued when the episode ended (counted with the episode's dropped text)."""
    words = episode.words.get(slot.stream.name.lower())
    if slot.stream == Stream.MODEL or words is None:
        return torch.full((num_turns, slot.count), IGNORE_INDEX, dtype=torch.int64), 0
    position_s = layout.cfg.micro_turn_ms / 1000.0 / slot.count
    ids, dropped = place_text([(w.end, text.word_ids(w.text)) for w in words], num_turns * slot.count, 1,
                              position_s, text.pad_id)
    return ids.view(num_turns, slot.count), dropped


class DMelBagEmbedding(nn.Module):
    """Bag of embeddings for dMel: one ``bins``-row table per (stacked frame, mel channel), looked up and summed.

    The ``frames * n_mels`` tables live in one ``nn.Embedding(frames * n_mels * bins, dim)``; table (s, c) starts
    at row ``(s * n_mels + c) * bins``.
    """

    def __init__(self, frames: int, n_mels: int, bins: int, dim: int):
        super().__init__()
        self.frames, self.n_mels, self.bins = frames, n_mels, bins
        self.table = nn.Embedding(frames * n_mels * bins, dim)

    def init_weights(self, std: float) -> None:
        # The output is a sum of frames*n_mels rows: scale each row so the sum has std ``std`` like a text token.
        nn.init.normal_(self.table.weight, std=std / (self.frames * self.n_mels) ** 0.5)

    def forward(self, bins: torch.Tensor) -> torch.Tensor:
        """bins: long [N, frames, n_mels] in [0, bins) -> [N, dim]."""
        # Offsets built per call (tiny) instead of a buffer, so models built on the meta device need no fix-up.
        offsets = torch.arange(self.frames * self.n_mels, device=bins.device) * self.bins
        idx = bins.reshape(bins.shape[0], self.frames * self.n_mels) + offsets
        # embedding_bag sums without materialising the [N, frames*n_mels, dim] intermediate.
        return F.embedding_bag(idx, self.table.weight, mode="sum")


class LiveLogMel:
    """Log-mel of a live audio stream, one micro-turn at a time: the micro-turn's frames computed from the previous
    micro-turn's samples plus this one's. [samples_per_turn] -> [frames_per_turn, n_mels].

    The final frame's 25 ms window reaches 2.5 ms into the next micro-turn, which a live stream does not have yet: it
    is zero-padded (as the end of a recording is in training), the only difference from offline encoding."""

    def __init__(self, layout: MicroTurnLayout, dmel: "DMelTokenizer"):
        self.layout, self.dmel = layout, dmel
        self.history = torch.zeros(0)

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        segment = torch.cat([self.history, chunk.float()])
        first = self.history.numel() // self.layout.hop_samples
        self.history = chunk.float()
        return self.dmel.log_mel(segment)[first : first + self.layout.frames_per_turn]


class LiveAudio(LiveInput):
    """A micro-turn of a stream's audio: a float wave [samples_per_turn] at the layout's rate (encoded with
    ``LiveLogMel``), or long dMel bins [frames_per_turn, n_mels] already encoded -> the run's positions."""

    def __init__(self, slot: Slot, layout: MicroTurnLayout, dmel: "DMelTokenizer"):
        self.name, self.layout, self.dmel = slot.stream.name.lower(), layout, dmel
        self.live_mel = LiveLogMel(layout, dmel)

    def bins(self, audio: torch.Tensor | None) -> torch.Tensor:
        """This micro-turn's audio -> dMel bins [frames_per_turn, n_mels]."""
        lay, F = self.layout, self.layout.frames_per_turn
        if audio is None:
            raise ValueError(f"no {self.name} audio in this micro-turn's inputs, but the layout has {self.name} audio "
                             f"slots: pass {lay.samples_per_turn} samples (or [{F}, {lay.cfg.n_mels}] dMel bins)")
        if audio.dtype == torch.long:
            if audio.shape != (F, lay.cfg.n_mels):
                raise ValueError(f"{self.name} audio bins must be [{F}, {lay.cfg.n_mels}], got {tuple(audio.shape)}")
            return audio
        n = lay.samples_per_turn
        if audio.ndim != 1 or audio.numel() != n:
            raise ValueError(f"{self.name} audio must be {n} samples ({lay.cfg.micro_turn_ms} ms at "
                             f"{lay.cfg.sample_rate} Hz) per micro-turn, got shape {tuple(audio.shape)}")
        return self.dmel.quantize(self.live_mel(audio))

    def __call__(self, value, turn):
        return AUDIO.kind, {"audio_bins": self.bins(value).view(-1, self.layout.cfg.frames_per_audio_position,
                                                                 self.layout.cfg.n_mels)}
