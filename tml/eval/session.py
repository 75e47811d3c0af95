"""Streaming micro-turn runtime: a trained model run as it is deployed, 200 ms in and 200 ms out at a time.

Each ``step`` takes one micro-turn of input (user audio, optionally a video frame and background-model text),
runs the input slots through the model as one chunk against the KV cache, then writes the output slots one
position at a time in layout order, exactly as in training (``tml.streams.batch``): the hidden state of the last
input slot predicts the first model text token, each output position predicts the next, and every generated
payload is fed back as the next position's input. Nothing of the past is recomputed; with
``SessionConfig.cache_window`` the cache keeps only that many positions, so cost per micro-turn stays flat in
arbitrarily long sessions.

Audio front end: frames of micro-turn ``t`` are computed from the last 200 ms of history plus this micro-turn's
samples. The final frame's 25 ms window reaches 2.5 ms into the next micro-turn, which a live stream does not have
yet: it is zero-padded (as the end of a recording is in training), the only difference from offline encoding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from tml.audio.dmel import DMelTokenizer
from tml.eval.background import DelegationBridge
from tml.model import InteractionModel
from tml.model.attention import KVCache
from tml.model.heads import DMelHead, unit_to_bins
from tml.model.sampling import SamplingConfig
from tml.streams.batch import Batch
from tml.streams.layout import Kind, MicroTurnLayout, Stream
from tml.vision.patches import frame_to_patches


@dataclass
class SessionConfig:
    cache_window: int = 0  # positions each query may attend to (0 = the whole session)
    # how text and audio are drawn: by default a sampled speak/silent decision, then greedy content
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class MicroTurnInputs:
    """One micro-turn of input. ``user_audio``: float wave [samples_per_turn] at the layout's rate, or long dMel
    bins [frames_per_turn, n_mels] already encoded. ``background_text``: token ids arriving in this micro-turn
    (they queue into the background slots, spilling into later micro-turns as in training)."""

    user_audio: torch.Tensor
    video_frame: torch.Tensor | None = None  # uint8 [H, W, 3]
    background_text: list[int] = field(default_factory=list)


@dataclass
class MicroTurnOutputs:
    turn: int
    text_ids: list[int]  # the model's text slots (pad id where it wrote nothing)
    audio_bins: torch.Tensor  # long [frames_per_turn, n_mels]
    mel: torch.Tensor  # float [frames_per_turn, n_mels]: log-mel (bin centres, or the flow head's values)
    wave: torch.Tensor | None  # float [samples_per_turn] when the session has a vocoder
    text_logits: torch.Tensor  # [text slots, vocab]: the distributions the text was drawn from
    audio_logits: torch.Tensor | None  # [audio slots, S, C, bins] for the dMel head; None for the flow head
    background_ids: list[int]  # what the background slots read in this micro-turn (pad id where empty)
    compute_s: float


class LiveLogMel:
    """Log-mel of a live audio stream, one micro-turn at a time: the micro-turn's frames computed from the previous
    micro-turn's samples plus this one's (see the module docstring). [samples_per_turn] -> [frames_per_turn, n_mels]."""

    def __init__(self, layout: MicroTurnLayout, dmel: DMelTokenizer):
        self.layout, self.dmel = layout, dmel
        self.history = torch.zeros(0)

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        segment = torch.cat([self.history, chunk.float()])
        first = self.history.numel() // self.layout.hop_samples
        self.history = chunk.float()
        return self.dmel.log_mel(segment)[first : first + self.layout.frames_per_turn]


class StreamingSession:
    """Run ``model`` one micro-turn at a time with a KV cache (see module docstring). Batch size 1."""

    def __init__(self, model: InteractionModel, layout: MicroTurnLayout, dmel: DMelTokenizer,
                 cfg: SessionConfig | None = None, text_pad_id: int = 0,
                 vocoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 background: DelegationBridge | None = None):
        """``vocoder``: any ``log-mel [frames, n_mels] -> wave [samples]`` callable; ``background``: a bridge to a
        background model that turns the model's ``<delegate>`` spans into results on the background stream."""
        self.model, self.layout, self.dmel = model.eval(), layout, dmel
        self.background = background
        self.cfg = cfg or SessionConfig()
        self.pad_id, self.vocoder = text_pad_id, vocoder
        self.caches = [KVCache(self.cfg.cache_window) for _ in model.layers]
        self.generator = torch.Generator().manual_seed(self.cfg.sampling.validate().seed)
        self.turn = 0
        self.position = 0
        self.background_queue: list[int] = []
        self.live_mel = LiveLogMel(layout, dmel)
        self.inputs_end = next(i for i, s in enumerate(layout.streams) if s == Stream.MODEL)
        self.device = next(model.parameters()).device

    # -- model plumbing ----------------------------------------------------------------------------------------
    def _forward(self, kind: list[int], stream: list[int], text_ids: list[int], audio_bins: torch.Tensor,
                 patches: torch.Tensor, patch_rc: torch.Tensor) -> torch.Tensor:
        """Embed and run new positions through every layer against the caches. Returns hidden [T_new, dim]."""
        n = len(kind)
        long = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)[None]  # noqa: E731
        empty = torch.zeros(1, n, dtype=torch.long, device=self.device)
        chunk = Batch(kind=long(kind), stream=long(stream), micro_turn=empty, position_ids=empty, doc_ids=empty,
                      text_ids=long(text_ids), audio_bins=audio_bins.to(self.device), patches=patches.to(self.device),
                      patch_rc=patch_rc.to(self.device), target_kind=empty, target_text=empty,
                      target_audio=audio_bins[:0].to(self.device))
        hidden = self.model.forward_cached(chunk, self.caches, self.position)[0]
        self.position += n
        return hidden

    def _encode_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """This micro-turn's user audio -> dMel bins [frames_per_turn, n_mels] (see module docstring)."""
        F = self.layout.frames_per_turn
        if audio.dtype == torch.long:
            if audio.shape != (F, self.layout.cfg.n_mels):
                raise ValueError(f"user_audio bins must be [{F}, {self.layout.cfg.n_mels}], got {tuple(audio.shape)}")
            return audio
        n = self.layout.samples_per_turn
        if audio.ndim != 1 or audio.numel() != n:
            raise ValueError(f"user_audio must be {n} samples ({self.layout.cfg.micro_turn_ms} ms at "
                             f"{self.layout.cfg.sample_rate} Hz) per micro-turn, got shape {tuple(audio.shape)}")
        return self.dmel.quantize(self.live_mel(audio))

    # -- one micro-turn ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, inputs: MicroTurnInputs, force: dict | None = None) -> MicroTurnOutputs:
        """Read one micro-turn of input and write one micro-turn of output.

        ``force`` (teacher forcing, for evaluation and tests): {"text": [ids per model text slot], "audio": long
        [frames_per_turn, n_mels]} fed back instead of the sampled payloads; logits are still returned.
        """
        t0 = time.perf_counter()
        lay, cfg = self.layout, self.layout.cfg
        S, C = cfg.frames_per_audio_position, cfg.n_mels
        user_bins = self._encode_audio(inputs.user_audio).view(-1, S, C)
        now = self.turn * cfg.micro_turn_ms / 1000  # session time at the start of this micro-turn
        self.background_queue.extend(inputs.background_text)
        if self.background is not None:  # results that arrived by now; never waits for one
            self.background_queue.extend(self.background.arrivals(now))
        show_frame = inputs.video_frame is not None and self.turn % cfg.video_stride == 0

        # Input slots as one chunk, in layout order.
        kind, stream, text_ids, audio, patches, rcs, background_ids = [], [], [], [], [], [], []
        for slot in lay.slots:
            if slot.stream == Stream.MODEL:
                break
            for j in range(slot.count):
                k, tid = slot.kind, 0
                if slot.kind == Kind.AUDIO:
                    audio.append(user_bins[j])
                elif slot.kind == Kind.TEXT:
                    tid = self.background_queue.pop(0) if self.background_queue else self.pad_id
                    background_ids.append(tid)
                elif slot.kind == Kind.PATCH and not show_frame:
                    k = Kind.PAD
                kind.append(int(k))
                stream.append(int(slot.stream))
                text_ids.append(tid)
            if slot.kind == Kind.PATCH and show_frame:
                p, rc = frame_to_patches(inputs.video_frame, cfg.patch_size, cfg.frame_height, cfg.frame_width)
                patches.append(p)
                rcs.append(rc)
        P = cfg.patch_size
        h = self._forward(kind, stream, text_ids,
                          torch.stack(audio) if audio else torch.zeros(0, S, C, dtype=torch.long),
                          torch.cat(patches) if patches else torch.zeros(0, P, P, 3, dtype=torch.uint8),
                          torch.cat(rcs) if rcs else torch.zeros(0, 2, dtype=torch.long))[-1]

        # Output slots, one position at a time: predict from h, feed the payload back, get the next h. Every draw
        # is the head's own ``sample`` (floor decision, then content) on the session's seeded generator.
        out_text, out_audio, out_mel, text_logits, audio_logits = [], [], [], [], []
        sc, head = self.cfg.sampling, self.model.audio_head
        forced_text = list(force["text"]) if force else None
        forced_audio = force["audio"].view(-1, S, C) if force else None
        outputs = [(s.kind, s.stream) for s in lay.slots if s.stream == Stream.MODEL for _ in range(s.count)]
        for i, (k, st) in enumerate(outputs):
            if k == Kind.TEXT:
                logits = self.model.text_head(h[None])
                tid = int(self.model.text_head.sample(h[None], sc, self.generator, self.pad_id, logits)[0])
                tid = forced_text[len(out_text)] if forced_text is not None else tid
                text_logits.append(logits[0])
                out_text.append(tid)
                payload = dict(text_ids=[tid], audio_bins=torch.zeros(0, S, C, dtype=torch.long))
            else:
                if isinstance(head, DMelHead):
                    logits = head(h[None])  # [1, S, C, bins]
                    bins = unit_to_bins(head.sample(h[None], sc, self.generator, logits)[0], head.bins)
                    mel = self.dmel.decode(bins)  # bin centres (also with per-channel ranges)
                    audio_logits.append(logits[0])
                else:  # flow: a continuous log-mel sample; it feeds back quantised, like real audio
                    unit = head.sample(h[None], sc, self.generator)[0]
                    bins, mel = unit_to_bins(unit, head.bins), self.dmel.unit_to_log_mel(unit)
                if forced_audio is not None:
                    bins = forced_audio[len(out_audio)]
                    mel = self.dmel.decode(bins)
                out_audio.append(bins)
                out_mel.append(mel)
                payload = dict(text_ids=[0], audio_bins=bins[None])
            h = self._forward([int(k)], [int(st)], payload["text_ids"], payload["audio_bins"],
                              torch.zeros(0, P, P, 3, dtype=torch.uint8), torch.zeros(0, 2, dtype=torch.long))[-1]

        if self.background is not None:
            self.background.observe(out_text, now + cfg.micro_turn_ms / 1000)
        bins = torch.stack(out_audio).reshape(-1, C) if out_audio else torch.zeros(0, C, dtype=torch.long)
        mel = torch.stack(out_mel).reshape(-1, C) if out_mel else torch.zeros(0, C)
        result = MicroTurnOutputs(
            turn=self.turn, text_ids=out_text, audio_bins=bins, mel=mel,
            wave=self.vocoder(mel) if self.vocoder is not None else None,
            text_logits=torch.stack(text_logits) if text_logits else torch.zeros(0),
            audio_logits=torch.stack(audio_logits) if audio_logits else None,
            background_ids=background_ids,
            compute_s=time.perf_counter() - t0,
        )
        self.turn += 1
        return result


def converse(session: StreamingSession, user: torch.Tensor, sample_rate: int, text, out_dir,
             realtime: bool = False) -> dict:
    """Feed a user recording ``user`` [samples] at ``sample_rate`` through ``session`` in time order, printing each
    micro-turn's compute time and text; write ``model.wav`` and stereo ``dialogue.wav`` (user left) to ``out_dir``.

    The model's side is placed where a listener of a live session hears it (``tml.eval.clock``): micro-turn t's
    output from its playback start, (t + 1) * 0.2 s plus the measured compute backlog (``realtime=True``: as if
    compute were instantaneous). Returns {"compute_ms": [...], "text": [(playback time, text)], "real_time_factor":
    mean compute / micro-turn length, "max_lag_s": the most an output played behind a real-time model}."""
    from pathlib import Path

    import torchaudio

    from tml.audio.wav import write_wav
    from tml.eval.clock import place_on_playback_clock, playback_starts

    lay = session.layout
    sr, n, turn_s = lay.cfg.sample_rate, lay.samples_per_turn, lay.cfg.micro_turn_ms / 1000
    if sample_rate != sr:
        user = torchaudio.functional.resample(user, sample_rate, sr)
    user = torch.nn.functional.pad(user, (0, -user.numel() % n))
    mels, compute, words_by_turn = [], [], []
    for t in range(user.numel() // n):
        out = session.step(MicroTurnInputs(user_audio=user[t * n : (t + 1) * n]))
        mels.append(out.mel)
        compute.append(1000 * out.compute_s)
        words = text.decode(out.text_ids)
        words_by_turn.append(words)
        print(f"micro-turn {t:5d} ({t * turn_s:7.1f} s): {compute[-1]:6.1f} ms  {words}", flush=True)
    T = len(mels)
    starts = playback_starts(T, turn_s, None if realtime else [c / 1000 for c in compute])
    said = [(starts[t], w) for t, w in enumerate(words_by_turn) if w.strip()]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_wave = session.dmel.to_wave(torch.cat(mels), session.vocoder)
    model_wave = torch.nn.functional.pad(model_wave, (0, max(0, T * n - model_wave.numel())))[: T * n]
    model_wave = place_on_playback_clock(model_wave, n, starts, sr, user.numel())
    write_wav(out_dir / "model.wav", model_wave, sr)
    write_wav(out_dir / "dialogue.wav", torch.stack([user, model_wave]), sr)
    rtf = sum(compute) / len(compute) / lay.cfg.micro_turn_ms if compute else 0.0
    lag = max((s - (t + 1) * turn_s for t, s in enumerate(starts)), default=0.0)
    print(f"{len(compute)} micro-turns, mean {sum(compute) / max(len(compute), 1):.1f} ms each, real-time factor "
          f"{rtf:.3f}, playback lag up to {lag:.2f} s; wrote {out_dir / 'model.wav'} and {out_dir / 'dialogue.wav'} "
          f"(the model as a listener hears it, on the playback clock)", flush=True)
    return {"compute_ms": compute, "text": said, "real_time_factor": rtf, "max_lag_s": lag}
