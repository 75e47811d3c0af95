"""The batch contract: the one seam where data, model and tests meet.

A packed ``Batch`` is ``B`` rows of ``L`` positions. Each position has a modality ``kind`` (PAD, TEXT, AUDIO,
PATCH), a ``stream`` (USER, MODEL, BACKGROUND, VIDEO), a ``micro_turn`` index and a ``position_ids`` entry
(both counted from the start of its episode piece), a ``doc_ids`` entry (which piece of the row it belongs to;
-1 for packing padding) and the payload for its kind. Payloads of AUDIO and PATCH positions are stored
compactly, in row-major order of the positions that carry them (``kind.flatten() == AUDIO`` selects the rows of
``audio_bins`` one to one).

Prediction convention (next-position prediction on one clock)
-------------------------------------------------------------
The hidden state at position ``i`` predicts the payload of position ``i + 1`` whenever position ``i + 1`` is a
MODEL-stream TEXT or AUDIO position of the same document. So:

* ``target_kind[b, i]`` is ``kind[b, i + 1]`` for such positions and PAD everywhere else (the last position of a
  document, positions followed by input slots, padding);
* ``target_text[b, i]`` is ``text_ids[b, i + 1]`` where ``target_kind == TEXT``, else -100 (ignored);
* ``target_audio`` holds ``audio_bins`` of position ``i + 1`` for every ``target_kind == AUDIO`` position, in
  row-major order of ``i``.

Within a micro-turn ``[inputs t][model text t][model audio t]`` this means: the last input slot of micro-turn
``t`` predicts the first model text token of ``t``; each model text slot predicts the next; the last model text
slot predicts the first model audio position of ``t``; each model audio position predicts the next. The last
model audio position of ``t`` predicts nothing (the next position is an input, which the model does not
choose). Loss is therefore only ever taken on model-output content, and attention plus targets never cross a
document boundary (document masking).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tml.streams.layout import Stream
from tml.streams.modalities import IGNORE_INDEX, LABEL_FIELDS, MODALITIES, Kind
from tml.streams.modalities.base import PayloadFields

# The fields every position has whatever its modality; the rest is ``Batch.payload``.
CORE_FIELDS = ("kind", "stream", "micro_turn", "position_ids", "doc_ids", "target_kind")


class BatchError(ValueError):
    """A Batch breaks the contract; the message names the field."""


@dataclass
class Batch(PayloadFields):
    """A packed batch of ``B`` rows x ``L`` positions. ``S`` = mel frames per audio position (4), ``C`` = mel
    channels (80), ``P`` = patch size (40).

    Fields (all int64 unless noted):
      kind          [B, L]        Kind of each position
      stream        [B, L]        Stream of each position
      micro_turn    [B, L]        micro-turn index within the position's episode piece (0 for padding)
      position_ids  [B, L]        index within the position's episode piece (RoPE position; 0 for padding)
      doc_ids       [B, L]        document (episode piece) index within the row, -1 for padding
      target_kind   [B, L]        kind of the target of position i (see module docstring), PAD if none
      payload       each modality's payload and target fields by name (``tml.streams.modalities``), read as
                    attributes too (``batch.audio_bins``):
        text_ids      [B, L]        token id where kind == TEXT, else 0
        audio_bins    [N_audio, S, C]   dMel bin ids of the AUDIO positions, row-major order
        patches       uint8 [N_patch, P, P, 3]  RGB pixels of the PATCH positions, row-major order
        patch_rc      [N_patch, 2]  (row, col) of each patch in its frame
        target_text   [B, L]        target token id where target_kind == TEXT, else -100
        target_audio  [M, S, C]     target dMel bins of the target_kind == AUDIO positions, row-major order
        heard_text    [B, L]        (optional: batches built from recordings) the user's transcript token due at
                                    each USER audio position, -100 elsewhere (``tml.streams.modalities.audio``)
    """

    kind: torch.Tensor
    stream: torch.Tensor
    micro_turn: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor
    target_kind: torch.Tensor
    payload: dict[str, torch.Tensor]

    def __post_init__(self):
        self.payload = dict(self.payload)  # its own dict: setting batch.<field> never reaches another Batch

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.kind.shape)  # type: ignore[return-value]

    @property
    def loss_mask(self) -> torch.Tensor:
        """bool [B, L]: positions that carry a target."""
        return self.target_kind != Kind.PAD

    def attention_mask(self) -> torch.Tensor:
        """bool [B, 1, L, L]: True where query i may attend key j (causal, same document). Padding positions
        attend only to themselves so no row of the mask is empty."""
        L = self.kind.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=self.kind.device).tril()
        same = self.doc_ids[:, :, None] == self.doc_ids[:, None, :]
        mask = causal & same & (self.doc_ids[:, None, :] >= 0)
        eye = torch.eye(L, dtype=torch.bool, device=self.kind.device)
        mask = mask | (eye & (self.doc_ids[:, :, None] < 0))
        return mask[:, None]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every field by name, the payload's included (to compare or concatenate batches)."""
        return {**{f: getattr(self, f) for f in CORE_FIELDS}, **self.payload}

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(**{f: getattr(self, f).to(device) for f in CORE_FIELDS},
                     payload={f: t.to(device) for f, t in self.payload.items()})

    def num_tokens(self) -> int:
        """Non-padding positions (what tokens/s counts)."""
        return int((self.doc_ids >= 0).sum())

    def validate(self) -> "Batch":
        """Check shapes, dtypes and the internal consistency of the contract; raise BatchError naming the field."""
        B, L = self.kind.shape
        want = {f for m in MODALITIES for f in m.batch_fields}
        if not want <= set(self.payload) <= want | set(LABEL_FIELDS):
            missing, extra = sorted(want - set(self.payload)), sorted(set(self.payload) - want - set(LABEL_FIELDS))
            raise BatchError(f"Batch.payload has fields {sorted(self.payload)}: missing {missing}, unknown {extra} "
                             f"(the modalities in tml.streams.modalities.MODALITIES name its fields)")
        labels = [f for f in LABEL_FIELDS if f in self.payload]
        dense = [f for m in MODALITIES if m.dense for f in m.batch_fields] + labels
        for name in ("stream", "micro_turn", "position_ids", "doc_ids", "target_kind", *dense):
            t = getattr(self, name)
            if t.shape != (B, L):
                raise BatchError(f"Batch.{name} has shape {tuple(t.shape)}, expected {(B, L)}")
        for name in ("kind", "stream", "micro_turn", "position_ids", "doc_ids", "target_kind", *labels):
            if getattr(self, name).dtype != torch.int64:
                raise BatchError(f"Batch.{name} has dtype {getattr(self, name).dtype}, expected torch.int64")
        if not ((self.kind >= 0) & (self.kind <= max(Kind))).all():
            raise BatchError("Batch.kind holds a value outside Kind")
        if not ((self.stream >= 0) & (self.stream <= max(Stream))).all():
            raise BatchError("Batch.stream holds a value outside Stream")
        for m in MODALITIES:  # each modality checks its payload and targets (tml.streams.modalities)
            for name, (dtype, shape) in m.shapes(self).items():
                t = getattr(self, name)
                if t.dtype != dtype:
                    raise BatchError(f"Batch.{name} has dtype {t.dtype}, expected {dtype}")
                if t.ndim != len(shape) or any(want is not None and have != want for have, want in zip(t.shape, shape)):
                    want = ", ".join("*" if w is None else str(w) for w in shape)
                    rows = "" if m.dense else f" (one row per {Kind(m.kind).name} position)"
                    raise BatchError(f"Batch.{name} has shape {tuple(t.shape)}, expected [{want}]{rows}")
            if m.target is not None and m.dense:
                is_t = self.target_kind == m.kind
                if ((getattr(self, m.target) != IGNORE_INDEX) != is_t).any():
                    raise BatchError(f"Batch.{m.target} must be set exactly where target_kind == {Kind(m.kind).name}")
        pad = self.doc_ids < 0
        if (self.kind[pad] != Kind.PAD).any():
            raise BatchError("Batch.kind: padding positions (doc_ids == -1) must have kind PAD")
        for f in labels:
            if (self.payload[f][pad] != IGNORE_INDEX).any():
                raise BatchError(f"Batch.{f}: padding positions (doc_ids == -1) must hold {IGNORE_INDEX} (no label)")
        if (self.target_kind[:, -1] != Kind.PAD).any():
            raise BatchError("Batch.target_kind: the last position of a row has nothing to predict")
        has_t = self.target_kind[:, :-1] != Kind.PAD
        nxt_model = (self.stream[:, 1:] == Stream.MODEL) & (self.kind[:, 1:] == self.target_kind[:, :-1])
        same_doc = (self.doc_ids[:, 1:] == self.doc_ids[:, :-1]) & (self.doc_ids[:, :-1] >= 0)
        if (has_t & ~(nxt_model & same_doc)).any():
            raise BatchError("Batch.target_kind marks a target that is not the next MODEL position of the "
                             "same document")
        for m in MODALITIES:
            for f in m.fields if m.dense else ():
                if ((getattr(self, f) != 0) & (self.kind != m.kind)).any():
                    raise BatchError(f"Batch.{f} must be 0 where kind != {Kind(m.kind).name}")
        return self
