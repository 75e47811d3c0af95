"""Streaming micro-turn runtime: a trained model run as it is deployed, 200 ms in and 200 ms out at a time.

Each ``step`` takes one micro-turn of input (user audio, optionally a video frame and background-model text),
runs the input slots through the model as one chunk against the KV cache, then writes the output slots one
position at a time in layout order, exactly as in training (``tml.streams.batch``): the hidden state of the last
input slot predicts the first model text token, each output position predicts the next, and every generated
payload is fed back as the next position's input. Nothing of the past is recomputed; with
``SessionConfig.cache_window`` the cache keeps only that many positions, so cost per micro-turn stays flat in
arbitrarily long sessions.

Inputs: each input slot run's stream, as it arrives in a micro-turn, becomes that micro-turn's positions through
its modality's live encoder (``tml.streams.modalities``: ``Modality.live``): audio frames are computed from the last
200 ms of history plus this micro-turn's samples (``LiveLogMel``; the final frame's window reaches 2.5 ms into the
next micro-turn, which a live stream does not have yet, and is zero-padded, the only difference from offline
encoding), text queues into its slots, a video frame is cut into patches. Or the positions come ready made
(``MicroTurnInputs.positions``, e.g. taken from an episode's training tokens): free generation
(``tml.eval.generate``) is this session driven by a recorded episode's inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from tml.audio.dmel import DMelTokenizer
from tml.errors import ConfigError
from tml.eval.background import DelegationBridge
from tml.model import InteractionModel
from tml.model.attention import ContextFullError, KVCache, RopeTable
from tml.model.heads import OutputHead, bins_to_unit, unit_to_bins
from tml.model.sampling import SamplingConfig
from tml.streams.batch import Batch
from tml.streams.layout import MicroTurnLayout, Stream
from tml.streams.modalities import DENSE_FIELDS, MODALITIES, ROW_FIELDS, SPEC, Kind, TurnPositions
from tml.streams.modalities.audio import LiveLogMel

__all__ = ["LiveLogMel", "MicroTurnInputs", "MicroTurnOutputs", "SessionConfig", "StreamingSession", "converse",
           "listening_mel"]


# session.cache_dtype's choices. float16 is left out: SDPA's CPU kernel reads it no faster than float32 (measured).
CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class SessionConfig:
    """How much of the past a session attends to, and how it samples.

    Default: a sliding window of ``cache_window`` = 1000 positions (10 s of the default layout: the training rows'
    length, ``data.loader.seq_len``, so the model never attends farther than it learned to; set it to your runs'),
    held in a ring of preallocated slots, so every micro-turn costs the same however long the session runs
    (README, "Long sessions"). ``attention_sinks`` keeps the session's first positions visible too.
    ``cache_window=0``: the full context, up to ``max_context`` positions, then a ``ContextFullError`` that says what
    to change. ``cache_dtype="bfloat16"`` halves the cache's bytes at a small cost in precision.
    """

    cache_window: int = 1000  # positions each query may attend to, its own included (0 = the whole session)
    attention_sinks: int = 0  # with a window: the session's first positions stay visible to every query
    max_context: int = 65536  # full context: the longest session in positions
    # precision the keys and values are kept and attended in: "float32" (the activations', equal to the training
    # forward to ~1e-6) or "bfloat16" (half the bytes each output position reads: faster where reading the cache
    # bounds the step, as at many batched sessions; held-out loss unchanged to 1e-4 nats, README "Long sessions")
    cache_dtype: str = "float32"
    # CPU, with a window: run output positions through torch.compile'd ``InteractionModel.decode_position`` (inductor,
    # one graph; the first step at each number of sessions compiles, ~20 s). Only where every MoE layer decodes the
    # sessions' tokens dense (``MoE.decodes_dense``: the tiny config up to 19 sessions; other steps run eager): a
    # per-expert decode branches on the chosen experts, which a graph cannot. Tiny, one session: ~1.3x faster; equal
    # to the eager step up to float rounding, not bitwise (README, "Long sessions")
    compile: bool = False
    # how text and audio are drawn: by default a sampled speak/silent decision, then greedy content
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class MicroTurnInputs:
    """One micro-turn of input, per input stream as it arrives; each slot run's modality turns it into positions
    (``Modality.live``). ``user_audio``: float wave [samples_per_turn] at the layout's rate, or long dMel bins
    [frames_per_turn, n_mels] already encoded. ``background_text``: token ids arriving in this micro-turn (they queue
    into the background slots, spilling into later micro-turns as in training). ``streams``: any other input slot
    run's value, by ``"<stream>.<kind>"`` (e.g. ``{"user2.audio": wave}``; nothing given: the run's encoder gets None).

    ``positions``: instead of the above, every input slot run's positions of this micro-turn already made, in layout
    order, as ``Modality.encode`` returns them (``(kind, {field: payload})``; ``tml.eval.generate.turn_positions``
    takes them from an episode's training tokens)."""

    user_audio: torch.Tensor | None = None
    video_frame: torch.Tensor | None = None  # uint8 [H, W, 3]
    background_text: list[int] = field(default_factory=list)
    streams: dict = field(default_factory=dict)
    positions: list[TurnPositions] | None = None

    def of(self, stream: Stream, kind: Kind):
        """What arrived for the ``stream``'s ``kind`` slots in this micro-turn (None: nothing)."""
        key = f"{stream.name.lower()}.{kind.name.lower()}"
        named = {"user.audio": self.user_audio, "video.patch": self.video_frame, "background.text": self.background_text}
        return named[key] if key in named else self.streams.get(key)


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
    compute_s: float  # wall time of the step that computed it (shared by the sessions stepped together)
    # the floor head's decision for this micro-turn and the model's P(speak) (before sampling.floor_temperature;
    # None: a model without a floor head)
    speaks: bool | None = None
    p_speak: float | None = None
    audio_unit: torch.Tensor | None = None  # float [frames_per_turn, n_mels]: the audio head's samples, unit coordinates
    # what the listen head reads off this micro-turn's user audio positions (the likeliest transcript token of each,
    # pad id where no word is due; a readout for traces, nothing is sampled from it). None: a model without one
    heard_ids: list[int] | None = None
    # every modality the model writes, by name ("text", "audio", ...): the micro-turn's values as its head wrote
    # them (``OutputHead.write``, forced ones included) [its output slots, ...], and the logits they were drawn from
    # (None: a head without logits). The fields above are the text and audio ones, as a listener reads them.
    written: dict = field(default_factory=dict)
    logits: dict = field(default_factory=dict)
    # every head the session reads out at input positions (``OutputHead.reads``), by name: its readout of this
    # micro-turn's positions (``heard_ids`` is the listen head's)
    readouts: dict = field(default_factory=dict)


def listening_mel(dmel: DMelTokenizer, unit: torch.Tensor) -> torch.Tensor:
    """An audio head's sample, unit coordinates [..., n_mels] -> the log-mel a listener hears [..., n_mels]: a value
    at its bin's centre is that bin (``dmel.decode``, per-channel ranges included: the dMel head's samples and
    silence), any other value the continuous log-mel it stands for (``dmel.unit_to_log_mel``: the flow head's)."""
    bins = unit_to_bins(unit, dmel.cfg.n_bins)
    return torch.where(unit == bins_to_unit(bins, dmel.cfg.n_bins), dmel.decode(bins), dmel.unit_to_log_mel(unit))


class _Row:
    """The per-session state of one row of a batched session: its generator, one live encoder per input slot run
    (audio history, text queue), its background bridge, and the held-back output position."""

    def __init__(self, input_slots: list, layout: MicroTurnLayout, dmel: DMelTokenizer, pad_id: int, seed: int,
                 background):
        self.generator = torch.Generator().manual_seed(seed)
        self.live = [SPEC[s.kind].live(s, layout, dmel, pad_id) for s in input_slots]
        self.background = background
        self.turn = 0
        self.position = 0  # positions in the caches
        self.pending: TurnPositions | None = None  # the last output position, not yet fed: (kind, its payload)
        self.speaking = False  # the floor decision of its previous micro-turn (sampling.floor_temperature_speaking)


@dataclass
class _Chunk:
    """One session's positions for one forward, assembled as ``interleave`` assembles an episode: kind and stream
    per position, dense payload fields per position (0 off their kind), row payload fields as tensors of rows; plus
    what its background slots read and the session time at the start of its micro-turn."""

    now: float
    kind: list[int] = field(default_factory=list)
    stream: list[int] = field(default_factory=list)
    dense: dict = field(default_factory=lambda: {f: [] for f in DENSE_FIELDS})
    rows: dict = field(default_factory=lambda: {f: [] for f in ROW_FIELDS})
    background_ids: list[int] = field(default_factory=list)

    def add(self, kind: Kind, stream: Stream, count: int, payload: dict) -> None:
        """``count`` positions of one kind and stream with their payload (``TurnPositions``'s dict)."""
        self.kind += [int(kind)] * count
        self.stream += [int(stream)] * count
        for f in DENSE_FIELDS:
            self.dense[f] += payload[f].tolist() if f in payload else [0] * count
        for f in ROW_FIELDS:
            if f in payload:
                self.rows[f].append(payload[f])


class StreamingSession:
    """Run ``model`` one micro-turn at a time with a KV cache (see module docstring), for ``sessions``
    independent conversations at once.

    ``step(inputs)`` advances a single session; ``step_many([inputs per session])`` advances all of them in one
    batched forward per position, each with its own cache length, inputs, background queue and sampling generator
    (seeded ``seeds[b]``; default ``sampling.seed`` for all), so every session's outputs are those it would get
    alone. ``keep(rows)`` ends sessions, ``add_sessions(seeds)`` starts new ones beside running ones.
    """

    def __init__(self, model: InteractionModel, layout: MicroTurnLayout, dmel: DMelTokenizer,
                 cfg: SessionConfig | None = None, text_pad_id: int = 0,
                 vocoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 background: DelegationBridge | list[DelegationBridge | None] | None = None,
                 sessions: int = 1, seeds: list[int] | None = None):
        """``vocoder``: any ``log-mel [frames, n_mels] -> wave [samples]`` callable; ``background``: a bridge to a
        background model that turns the model's ``<delegate>`` spans into results on the background stream (one
        per session when ``sessions > 1``)."""
        self.model, self.layout, self.dmel = model.eval().decode_layout(), layout, dmel  # see decode_layout
        self.cfg = cfg or SessionConfig()
        self.cfg.sampling.validate()
        if self.cfg.cache_dtype not in CACHE_DTYPES:
            raise ConfigError(f"session.cache_dtype={self.cfg.cache_dtype!r}: one of {', '.join(CACHE_DTYPES)}")
        self.pad_id, self.vocoder = text_pad_id, vocoder
        self.device = next(model.parameters()).device
        mcfg = model.cfg
        # Every write is at most one micro-turn plus the held-back output position: size the ring for it once.
        chunk = layout.length + 1
        self.cache = KVCache(len(model.layers), self.cfg.cache_window, self.cfg.attention_sinks,
                             self.cfg.attention_sinks + self.cfg.cache_window + chunk if self.cfg.cache_window
                             else min(self.cfg.max_context, 64 * layout.length),
                             dtype=CACHE_DTYPES[self.cfg.cache_dtype])
        self.rope = RopeTable(mcfg.head_dim, mcfg.rope_theta, next(model.parameters()).dtype)
        self.decode_position = None  # the compiled one-position step (SessionConfig.compile)
        if self.cfg.compile:
            if self.device.type != "cpu" or not self.cfg.cache_window:
                raise ConfigError(f"session.compile=true runs the CPU decode step over a windowed cache; this session "
                                  f"has device {self.device.type} and session.cache_window={self.cfg.cache_window}: "
                                  f"set session.compile=false, or a window (session.cache_window > 0) on CPU")
            if not self.model.decodes_dense(1):
                raise ConfigError("session.compile=true needs MoE layers that decode a session's token dense (every "
                                  "expert on it: tokens x experts x dim x hidden <= MoE.DECODE_DENSE_MAX); this "
                                  "model's experts decode one by one, branching on the chosen ones: set "
                                  "session.compile=false")
            self.decode_position = torch.compile(self.model.decode_position, fullgraph=True, dynamic=False)
        self.input_slots = [s for s in layout.slots if s.stream != Stream.MODEL]  # inputs come first (layout)
        self.outputs = [s.kind for s in layout.slots if s.stream == Stream.MODEL for _ in range(s.count)]
        self.writers = self._writers(model)
        self.readers = {name: head for name, head in model.output_heads().items() if head.reads is not None}
        self.rows: list[_Row] = []
        self.add_sessions(seeds if seeds is not None else [self.cfg.sampling.seed] * sessions,
                          background if isinstance(background, list) else [background] * sessions)

    def _writers(self, model: InteractionModel) -> dict[Kind, OutputHead]:
        """The content head that writes each kind of the layout's output slots (``OutputHead.kind``), in the order
        the kinds first appear in a micro-turn."""
        heads: dict[Kind, OutputHead] = {}
        for name, head in model.output_heads().items():
            if head.kind is not None and head.kind in heads:
                raise ValueError(f"two heads write {head.kind.name} positions ({name} and another, model.heads): "
                                 f"the session needs one per output modality")
            if head.kind is not None:
                heads[head.kind] = head
        missing = [k.name for k in dict.fromkeys(self.outputs) if k not in heads]
        if missing:
            raise ValueError(f"the layout has model output slots of kind {', '.join(missing)} "
                             f"({self.layout.describe()}) but the model has no head that writes them (model.heads)")
        return {k: heads[k] for k in dict.fromkeys(self.outputs)}

    # -- sessions ----------------------------------------------------------------------------------------------
    def add_sessions(self, seeds: list[int], backgrounds: list | None = None) -> None:
        """Start ``len(seeds)`` new sessions (rows appended after the running ones), at position 0."""
        backgrounds = backgrounds or [None] * len(seeds)
        self.cache.add_rows(len(seeds))
        self.rows += [_Row(self.input_slots, self.layout, self.dmel, self.pad_id, s, bg)
                      for s, bg in zip(seeds, backgrounds)]

    def keep(self, rows: list[int]) -> None:
        """End every session not in ``rows``; the kept ones become rows 0.. in this order."""
        self.rows = [self.rows[i] for i in rows]
        self.cache.keep(rows)

    @property
    def sessions(self) -> int:
        return len(self.rows)

    # Single-session views (B = 1), as before batching.
    @property
    def turn(self) -> int:
        return self.rows[0].turn

    @property
    def position(self) -> int:
        """Positions of session 0 so far (the held-back last output position included)."""
        return self.rows[0].position + (self.rows[0].pending is not None)

    @property
    def generator(self) -> torch.Generator:
        return self.rows[0].generator

    # -- model plumbing ----------------------------------------------------------------------------------------
    def _forward(self, chunks: list[_Chunk], rows: list[int] | None = None) -> torch.Tensor:
        """Embed and run the chunks (T positions each) of sessions ``rows`` (default all) against the caches, as one
        Batch without targets whose fields each modality spec names. Returns hidden [len(rows), T, dim]."""
        long = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        kind = long([c.kind for c in chunks])
        empty = torch.zeros_like(kind)
        none = {f: e.to(self.device) for m in MODALITIES for f, e in m.empty(self.layout.cfg).items()}  # zero rows
        payload = {f: long([c.dense[f] for c in chunks]) for f in DENSE_FIELDS}
        for f in ROW_FIELDS:
            xs = [x for c in chunks for x in c.rows[f]]
            payload[f] = torch.cat(xs).to(self.device) if xs else none[f]
        targets = {m.target: empty if m.dense else none[m.fields[0]] for m in MODALITIES if m.target}
        chunk = Batch(kind=kind, stream=long([c.stream for c in chunks]), micro_turn=empty, position_ids=empty,
                      doc_ids=empty, target_kind=empty, payload={**payload, **targets})
        return self._run(self.model.embed(chunk), rows)

    def _run(self, x: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """Embedded positions x [n, T, dim], the next T of sessions ``rows`` (default all) -> hidden [n, T, dim]."""
        sessions = self.rows if rows is None else [self.rows[b] for b in rows]
        start = torch.tensor([r.position for r in sessions], dtype=torch.long, device=self.device)
        T = x.shape[1]
        if not self.cfg.cache_window and int(start.max()) + T > self.cfg.max_context:
            raise ContextFullError(
                f"session reached session.max_context={self.cfg.max_context} positions "
                f"({self.cfg.max_context // self.layout.length * self.layout.cfg.micro_turn_ms / 1000:.0f} s): raise "
                f"session.max_context, or bound the context with session.cache_window (see README, long sessions)")
        positions = start[:, None] + torch.arange(T, device=self.device)
        every = rows is None or len(rows) == self.sessions
        if every and T == 1 and self.decode_position is not None and self.model.decodes_dense(x.shape[0]):
            mcfg = self.model.cfg
            self.cache.prepare(positions, mcfg.num_kv_heads, mcfg.head_dim, x.dtype, before_write=True)
            h, k, v = self.decode_position(x, *self.rope(positions), self.cache.k, self.cache.v, self.cache.bias)
            self.cache.write_layers(k, v)
        elif every:
            h = self.model.forward_embedded(x, positions, self.cache, self.rope)
        else:  # a subset of the sessions: their rows of the cache, written back after (only when sessions join)
            sub = self.cache.select(rows)
            h = self.model.forward_embedded(x, positions, sub, self.rope)
            self.cache.put(rows, sub)
        for r in sessions:
            r.position += T
        return h

    def _embed_output(self, kind: Kind, payload: dict) -> torch.Tensor:
        """One MODEL-stream output position per session -> embeddings [B, 1, dim]: what ``MultimodalEmbedding``
        computes for it (bitwise), without building a Batch. ``payload``: the kind's fields, one row per session
        (text_ids long [B]; audio_bins long [B, S, C])."""
        emb, spec = self.model.embed, SPEC[kind]
        x = getattr(emb, spec.name)(*(payload[f].to(self.device) for f in spec.fields))
        return (x + emb.stream.weight[int(Stream.MODEL)])[:, None]

    def _input_chunk(self, b: int, inputs: MicroTurnInputs) -> _Chunk:
        """Session b's positions for this step: its held-back output position, then the micro-turn's input slot
        runs in layout order, each from its modality's live encoder (or ``inputs.positions``)."""
        row, cfg = self.rows[b], self.layout.cfg
        chunk = _Chunk(now=row.turn * cfg.micro_turn_ms / 1000)  # session time at the start of this micro-turn
        if row.pending is not None:
            chunk.add(row.pending[0], Stream.MODEL, 1, row.pending[1])
            row.pending = None
        # Background results that arrived by now (never waits for one) queue behind this micro-turn's own text.
        arrived = row.background.arrivals(chunk.now) if row.background is not None else []
        ready = inputs.positions
        if ready is not None and len(ready) != len(self.input_slots):
            raise ValueError(f"MicroTurnInputs.positions has {len(ready)} slot runs; the layout has "
                             f"{len(self.input_slots)} input slot runs ({self.layout.describe()})")
        for i, (slot, live) in enumerate(zip(self.input_slots, row.live)):
            if ready is not None:
                kind, payload = ready[i]
            else:
                value = inputs.of(slot.stream, slot.kind)
                if slot.stream == Stream.BACKGROUND:
                    value = [*(value or []), *arrived]
                kind, payload = live(value, row.turn)
            chunk.add(kind, slot.stream, slot.count, payload)
            if slot.stream == Stream.BACKGROUND:
                chunk.background_ids += payload["text_ids"].tolist()
        return chunk

    def _forced(self, head: OutputHead, kind: Kind, j: int, value: torch.Tensor, force: list[dict | None]
                ) -> torch.Tensor:
        """``value`` [B, ...], the j-th output slot of ``kind`` this micro-turn, with the rows ``force`` gives
        replaced by what their forced payload stands for (``OutputHead.from_payload``): ``force[b][<modality
        name>]`` holds the micro-turn's payload of that kind's slots in slot order (text: ids [slots]; audio: bins
        [frames_per_turn, n_mels])."""
        spec, value = SPEC[kind], value.clone()
        shape = head.to_payload(value)[spec.fields[0]].shape[1:]  # one position's payload
        for b, f in enumerate(force):
            if f is not None:
                value[b] = head.from_payload(torch.as_tensor(f[spec.name]).reshape(-1, *shape)[j].to(value.device))
        return value

    # -- one micro-turn ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, inputs: MicroTurnInputs, force: dict | None = None) -> MicroTurnOutputs:
        """Read one micro-turn of input and write one micro-turn of output (a session of one).

        ``force`` (teacher forcing, for evaluation and tests): per modality the model writes, by name, the payload
        its output slots are fed back with instead of the sampled ones, in slot order ({"text": [ids per model text
        slot], "audio": long [frames_per_turn, n_mels]}); logits are still returned.
        """
        if self.sessions != 1:
            raise ValueError(f"step() advances one session; this one runs {self.sessions}: use step_many")
        return self.step_many([inputs], None if force is None else [force])[0]

    @torch.no_grad()
    def step_many(self, inputs: list[MicroTurnInputs], force: list[dict | None] | None = None
                  ) -> list[MicroTurnOutputs]:
        """Advance every session by one micro-turn: ``inputs[b]`` (and ``force[b]``, see ``step``) for session b.

        The input slots of all sessions run as one [B, T] chunk; then each output position runs for all sessions
        at once ([B, 1]), predicted from the previous position's hidden state and sampled per session. The last
        output position is held back and fed with the next micro-turn's inputs (its hidden state predicts nothing,
        so nothing waits for it): one sequential forward fewer per micro-turn.
        """
        t0 = time.perf_counter()
        B = self.sessions
        if len(inputs) != B or (force is not None and len(force) != B):
            raise ValueError(f"step_many: {B} sessions, got {len(inputs)} inputs"
                             + ("" if force is None else f" and {len(force)} forced outputs"))
        cfg = self.layout.cfg
        C = cfg.n_mels
        chunks = [self._input_chunk(b, x) for b, x in enumerate(inputs)]
        h = torch.empty(B, self.model.cfg.dim, device=self.device)
        readouts: list[dict] = [{} for _ in range(B)]
        for n in sorted({len(c.kind) for c in chunks}):  # one group unless sessions just started beside running ones
            rows = [b for b in range(B) if len(chunks[b].kind) == n]
            h_chunk = self._forward([chunks[b] for b in rows], rows)
            h[rows] = h_chunk[:, -1]
            # Heads read out at input positions (``OutputHead.reads``; the listen head: what it heard of the user's
            # audio). Chunks of one length hold the same slots in the same places, so the first one's positions are
            # every row's: one head call for the group.
            first = chunks[rows[0]]
            for name, head in self.readers.items():
                stream, kind = head.reads
                at = [j for j, (k, st) in enumerate(zip(first.kind, first.stream)) if k == kind and st == stream]
                for b, value in zip(rows, head.readout(h_chunk[:, at]).tolist()):
                    readouts[b][name] = value

        # The floor decision, once per micro-turn from its last input position (tml.model.heads.FloorHead); every
        # output slot follows it. Without a floor head (or sampling.floor="none") each slot decides for itself.
        # Every head samples all sessions in one call, each row drawing from its session's generator exactly what it
        # draws alone (``tml.model.sampling.Generators``).
        sc, gens = self.cfg.sampling, [r.generator for r in self.rows]
        speak = p_speak = starts = None
        if self.model.floor_head is not None and sc.floor != "none":
            speaking = torch.tensor([r.speaking for r in self.rows])
            speak, p_speak = self.model.floor_head.sample(h, sc, gens, speaking)
            starts = speak & ~speaking.to(speak.device)  # a turn's first micro-turn (sampling.words_given_speech)
            for r, s in zip(self.rows, speak.tolist()):
                r.speaking = s

        # Output slots, one position at a time: the head that writes the slot's kind draws it for every session from
        # h [B, dim] (``OutputHead.write``, given the micro-turn's decision), ``force`` replaces rows' draws, and
        # the payload it becomes (``OutputHead.to_payload``) is fed back; that position's hidden state is the next h.
        values = {k: [] for k in self.writers}  # per kind: one [B, ...] per output slot of it
        payloads = {k: [] for k in self.writers}
        logits = {k: [] for k in self.writers}
        for i, k in enumerate(self.outputs):
            head = self.writers[k]
            value, lg = head.write(h, sc, gens, speak, p_speak, self.pad_id, starts)
            if force is not None:
                value = self._forced(head, k, len(values[k]), value, force)
            payload = head.to_payload(value)
            values[k].append(value)
            payloads[k].append(payload)
            logits[k].append(lg)
            if i + 1 < len(self.outputs):
                h = self._run(self._embed_output(k, payload))[:, -1]
            else:  # held back: fed with the next micro-turn's inputs
                for b, r in enumerate(self.rows):
                    r.pending = (k, {f: v[b : b + 1] for f, v in payload.items()})

        # Per modality, every session's micro-turn at once: values [B, slots, ...], logits [B, slots, ...] or None.
        written = {SPEC[k].name: torch.stack(v, 1) for k, v in values.items()}
        drawn_from = {SPEC[k].name: None if v[0] is None else torch.stack(v, 1) for k, v in logits.items()}
        fed = {SPEC[k].name: torch.stack([p[SPEC[k].fields[0]] for p in v], 1) for k, v in payloads.items()}
        # What a listener hears: the audio head's samples as log-mel (one elementwise call for all sessions).
        mels = listening_mel(self.dmel, written["audio"]) if "audio" in written else None
        compute_s = time.perf_counter() - t0
        results = []
        for b, r in enumerate(self.rows):
            out_text = fed["text"][b].tolist() if "text" in fed else []
            if r.background is not None:
                r.background.observe(out_text, chunks[b].now + cfg.micro_turn_ms / 1000)
            empty = torch.zeros(0, C)  # a layout without model audio slots
            mel = mels[b].reshape(-1, C) if mels is not None else empty
            results.append(MicroTurnOutputs(
                turn=r.turn, text_ids=out_text,
                audio_bins=fed["audio"][b].reshape(-1, C) if "audio" in fed else empty.long(), mel=mel,
                wave=self.vocoder(mel) if self.vocoder is not None else None,
                text_logits=drawn_from["text"][b] if "text" in drawn_from else torch.zeros(0),
                audio_logits=drawn_from["audio"][b] if drawn_from.get("audio") is not None else None,
                background_ids=chunks[b].background_ids, compute_s=compute_s,
                speaks=None if speak is None else bool(speak[b]), p_speak=None if p_speak is None else float(p_speak[b]),
                audio_unit=written["audio"][b].reshape(-1, C).float() if "audio" in written else empty,
                heard_ids=readouts[b].get("listen"), readouts=readouts[b],
                written={n: v[b] for n, v in written.items()},
                logits={n: None if v is None else v[b] for n, v in drawn_from.items()}))
            r.turn += 1
        return results


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
