"""What every modality spec provides (``Modality``), and the types its methods exchange.

A spec owns its ``Kind`` value, the fields that carry its payload (in ``EpisodeTokens.payload`` and
``Batch.payload``), how one stream of an episode becomes that stream's positions micro-turn by micro-turn
(``encode``), how a live stream's input of one micro-turn becomes positions (``live``, for the streaming session),
its input embedder (``embedder``: a plain ``nn.Module`` built from the model config, and its parameter count
``num_params``), and, for a modality the
model writes, the payload field of its targets. ``interleave``, ``pack.collate``, ``Batch.validate``,
``EpisodeTokens.slice_turns``, ``MultimodalEmbedding`` and ``tml.eval.session.StreamingSession`` loop over
``tml.streams.modalities.MODALITIES`` instead of branching on ``Kind``.

Payload fields come in two shapes:

* dense: one value per position, ``[n]`` in ``EpisodeTokens`` and ``[B, L]`` in ``Batch``, 0 where the position is
  of another kind (text: ``text_ids``);
* rows: one row per position of the kind, in row-major order of those positions (audio: ``audio_bins`` [N, S, C];
  patches: ``patches`` [N, P, P, 3] and ``patch_rc`` [N, 2]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from tml.streams.layout import LayoutConfig, MicroTurnLayout, Slot, SlotConfig

if TYPE_CHECKING:
    from tml.audio.dmel import DMelTokenizer
    from tml.streams.episode import Episode
    from tml.text.tokenizer import TextTokenizer

PAD = 0  # the Kind value of an empty slot (no payload) or packing padding; every spec's kind is another value
IGNORE_INDEX = -100  # a target or label that is not there: losses skip it

# What ``encode`` returns for one micro-turn of one slot run: the kind its positions get (the spec's kind, or PAD
# when the stream has nothing there, e.g. no video frame) and the payload of those positions per field.
TurnPositions = tuple[int, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Modality:
    """Base of the specs. ``kind`` is its ``Kind`` value (``Kind.<NAME>``, NAME = ``name`` upper-cased); ``name`` is
    also the slot runs' ``kind`` in the layout config and the embedder's module name in ``MultimodalEmbedding`` (so
    the checkpoint key prefix ``embed.<name>.``); ``fields`` are its payload fields; ``target`` its target field when
    the model writes it (None: input only)."""

    kind: int
    name: str
    fields: tuple[str, ...]
    dense: bool
    target: str | None = None
    # Training labels of its positions that no embedder reads and a live stream does not have (audio:
    # ``heard_text``). Always dense ([n] / [B, L]), IGNORE_INDEX where a position has none; optional in a Batch.
    labels: tuple[str, ...] = ()

    @property
    def batch_fields(self) -> tuple[str, ...]:
        """Its fields every ``Batch.payload`` has: the payload fields, then the target field of a modality the model
        writes (its ``labels`` come on top where the batch was built from recordings)."""
        return (*self.fields, *filter(None, [self.target]))

    def check_slot(self, cfg: LayoutConfig, slot: SlotConfig, where: str) -> None:
        """Raise ConfigError (naming ``where``, e.g. ``layout.slots[2]``) if the slot run ``slot`` breaks this
        modality's rule: its count per micro-turn, the streams it may belong to, or that ``slot.stream``'s only
        modality is this one. Every spec sees every slot run."""

    def encode(self, episode: "Episode", slot: Slot, layout: MicroTurnLayout, dmel: "DMelTokenizer",
               text: "TextTokenizer", num_turns: int) -> tuple[list[TurnPositions], int]:
        """One stream of ``episode`` -> per micro-turn (``num_turns`` of them) the positions of ``slot``'s run, and
        how many payload items did not fit before the episode ended (counted, never silently dropped)."""
        raise NotImplementedError

    def live(self, slot: Slot, layout: MicroTurnLayout, dmel: "DMelTokenizer", pad_id: int) -> "LiveInput":
        """A per-session encoder of ``slot``'s run in a live stream: called once per micro-turn with what arrived
        on ``slot.stream`` in it (``None``: nothing), it returns that micro-turn's positions as ``encode`` makes them
        from a recording."""
        raise NotImplementedError(f"modality {self.name!r} has no live input (tml.streams.modalities); add live()")

    def embedder(self, cfg) -> nn.Module:
        """The input embedder, built from the model config ``cfg`` (``tml.model.ModelConfig``): called with this
        spec's payload fields (``payload``) it returns one vector [N, cfg.dim] per position of the kind. It may
        define ``init_weights(std)``, which the model calls after its generic init."""
        raise NotImplementedError(f"modality {self.name!r} has no embedder (tml.streams.modalities); add embedder()")

    def num_params(self, cfg) -> int:
        """The embedder's parameter count from the model config alone (``tml.model.counts``, the planner; tests
        check it against built models)."""
        raise NotImplementedError(f"modality {self.name!r} has no num_params (tml.streams.modalities); add it")

    def check_embedder(self, embedder: nn.Module, batch) -> None:
        """Raise ConfigError, naming the config keys, when ``batch``'s payload does not have the shapes
        ``embedder`` was built for (the data layout and the model config disagree)."""

    def empty(self, cfg: LayoutConfig | None = None) -> dict[str, torch.Tensor]:
        """Payload of zero positions (row fields only), with the trailing shape ``cfg`` (default: the tiny layout)
        gives them."""
        return {}

    def shapes(self, batch) -> dict[str, tuple[torch.dtype, tuple[int | None, ...]]]:
        """Field -> (dtype, shape; None = any size) that ``Batch.validate`` checks: this modality's payload and
        targets in ``batch``."""
        B, L = batch.kind.shape
        n, n_t = int((batch.kind == self.kind).sum()), int((batch.target_kind == self.kind).sum())
        out = {f: (torch.int64, (B, L) if self.dense else (n,)) for f in self.fields}
        if self.target is not None:
            out[self.target] = (torch.int64, (B, L) if self.dense else (n_t,))
        return out

    def payload(self, batch) -> tuple[torch.Tensor, ...]:
        """The embedder's inputs from a ``Batch``: the payload of this kind's positions, row-major order."""
        if self.dense:
            mask = batch.kind == self.kind
            return tuple(batch.payload[f][mask] for f in self.fields)
        return tuple(batch.payload[f] for f in self.fields)


class LiveInput:
    """What ``Modality.live`` returns: ``(value, turn) -> TurnPositions`` for one slot run of one session."""

    def __call__(self, value, turn: int) -> TurnPositions:
        raise NotImplementedError


class PayloadFields:
    """``x.<field>`` reads (and assigns) ``x.payload[<field>]``: the modalities' payload and target fields of an
    ``EpisodeTokens`` or ``Batch`` read like attributes (``batch.audio_bins``), whatever the specs name them."""

    def __getattr__(self, name: str):  # only called when normal lookup fails
        payload = self.__dict__.get("payload")
        if payload is not None and name in payload:
            return payload[name]
        raise AttributeError(f"{type(self).__name__} has no field {name!r} (payload fields: "
                             f"{', '.join(payload or ())}; tml.streams.modalities)")

    def __setattr__(self, name: str, value) -> None:
        payload = self.__dict__.get("payload")
        if payload is not None and name in payload:
            payload[name] = value
        else:
            object.__setattr__(self, name, value)
