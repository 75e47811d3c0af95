"""What every output head provides (``OutputHead``), and the audio value space both audio heads share.

Audio values: a *unit coordinate* ``y`` in [-1, 1] that spans the dMel range linearly,
``y = 2 * (bin + u) / bins - 1`` with ``u`` in [0, 1) the position inside the bin. So ``y`` is a normalised clipped
log-mel (``log_min + (y + 1) / 2 * (log_max - log_min)``), bin ``k``'s centre is ``u = 0.5``, and quantising ``y``
gives back the bin the dMel bag reads. The model needs no knowledge of the log-mel range.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from tml.model.sampling import Generators, SamplingConfig
from tml.streams.batch import Batch
from tml.streams.layout import Stream
from tml.streams.modalities import SPEC, Kind

if TYPE_CHECKING:  # the config imports nothing of the heads; the heads need it only for annotations
    from tml.model.config import ModelConfig
    from tml.model.embed import MultimodalEmbedding

# The dMel bin of silence: digital silence (log10 eps = -10) and everything below the kept range's floor clip to the
# lowest bin (``tml.audio.dmel``), so a silent audio position is all bins 0.
SILENT_BIN = 0


def bins_to_unit(bins: torch.Tensor, n_bins: int, u: torch.Tensor | float = 0.5) -> torch.Tensor:
    """Bin ids (any shape) -> unit coordinates in [-1, 1]; ``u`` in [0, 1) is the offset inside the bin."""
    return 2.0 * (bins.float() + u) / n_bins - 1.0


def unit_to_bins(y: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Unit coordinates (any shape) -> bin ids in [0, n_bins); values outside [-1, 1] clip to the end bins."""
    return torch.floor((y + 1.0) / 2.0 * n_bins).long().clamp_(0, n_bins - 1)


class OutputHead(nn.Module):
    """One output head on the final hidden state. The model builds the heads ``tml.model.config.HEADS`` selects,
    each as the module ``<name>_head`` (checkpoint keys ``<name>_head.*``), and loops over them: the training forward
    (``targets``, ``forward``, ``loss``), ``compute_losses`` (``loss/<name>``, ``metrics``), validation, the parameter
    counts (``num_params``) and the init (``init_weights``) never ask which head they hold.

    - ``kind``: the modality a *content* head writes into the model's output slots (its targets are that modality's
      target field, ``Modality.target``); ``None`` for a head that predicts something else (the floor decision).
      Content heads' losses make ``val/loss``.
    - ``from_config(cfg, embed)``: build it from a ``ModelConfig`` (``embed``: the model's embedding, for a head that
      shares its weight, like the tied text head).
    - ``num_params(cfg)``: its parameter count from a ``ModelConfig`` alone (``tml.model.counts``).
    - ``init_weights()``: its own start, after the model's normal(init_std) init of every linear layer.
    - ``targets(batch)``: where it reads the hidden state and what it predicts there: (query bool [B, L], target
      [N, ...]) with N = query.sum(), row-major; or None when the batch carries no labels for it (e.g. a label field
      that live batches lack): that forward then has no logits or loss of this head.
    - ``forward(h)``: what the training forward keeps for inspection, ``ModelOutput.<name>_logits`` (``None`` for a
      head without logits, the flow head).
    - ``loss(h, target, logits=None)``: the loss of each target, fp32 [N, ...] (``compute_losses`` averages it over
      all its entries); ``logits``: ``forward(h)`` if the caller has it already.
    - ``metrics(per_target, target, pad_id)``: further logged means, ``{name: the per-target entries to average}``
      (logged as ``loss/<name>``, not trained on); ``metric_names`` lists their names.
    - ``sample(h, cfg, generator, ...)`` (``tml.model.sampling.SamplingConfig``): a draw for inference. Content heads
      take the micro-turn's floor decision ``speak`` (from the floor head) when there is one; audio heads return unit
      coordinates. ``generator``: one for all rows, or one per row (``tml.model.sampling.Generators``).
    - A content head in the streaming session (``tml.eval.session``), which loops over the model's output slots and
      asks the head of each slot's ``kind``: ``write(h, cfg, generator, speak, p_speak, pad_id, starts)`` (one position's
      draw and the logits it came from), ``to_payload(value)`` (the payload that position is fed back with, the
      modality's payload field) and ``from_payload(given)`` (the value a forced payload stands for). The defaults
      serve a head whose sample is its modality's payload (the text head); the audio heads share ``AudioHead``'s.
    - ``reads``: (stream, kind) of the input positions the streaming session reads this head out at, every
      micro-turn (the listen head: the user's audio), with ``readout(h)``; None (default): it reads out nothing.
    """

    kind: ClassVar[Kind | None] = None
    metric_names: ClassVar[tuple[str, ...]] = ()
    reads: ClassVar[tuple[Stream, Kind] | None] = None

    @classmethod
    def from_config(cls, cfg: ModelConfig, embed: MultimodalEmbedding) -> OutputHead:
        raise NotImplementedError(f"{cls.__name__} must define from_config (tml.model.heads.base.OutputHead)")

    def init_weights(self) -> None:
        """The model's normal(init_std) init of every linear layer is this head's unless it overrides this."""

    def targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A content head's: the positions whose target is its ``kind``, and that modality's target field there
        (a dense field [B, L] indexed by them; a row field already holds one row per such position)."""
        query = batch.target_kind == self.kind
        spec = SPEC[self.kind]
        target = batch.payload[spec.target]
        return query, target[query] if spec.dense else target

    def metrics(self, per_target: torch.Tensor, target: torch.Tensor, pad_id: int | None = None
                ) -> dict[str, torch.Tensor]:
        """None unless the head overrides it."""
        return {}

    @torch.no_grad()
    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden [B, N, dim] at the ``reads`` positions -> what the session reports there: by default the likeliest
        class of ``forward(h)``, long [B, N]."""
        return self(h).argmax(-1)

    @torch.no_grad()
    def write(self, h: torch.Tensor, cfg: SamplingConfig, generator: Generators = None,
              speak: torch.Tensor | None = None, p_speak: torch.Tensor | None = None, pad_id: int = 0,
              starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A content head's draw at one output position of its kind, for hidden states h [B, dim] -> (value [B, ...]
        as ``sample`` returns it, the logits ``forward(h)`` it was drawn from or None). ``speak`` bool [B] and
        ``p_speak`` float [B]: the micro-turn's floor decision and the floor head's P(speak) behind it (None without
        one); ``starts`` bool [B]: the rows whose micro-turn starts a turn (speaks after a silent one); ``pad_id``:
        the text tokenizer's empty-slot token. A head whose ``sample`` takes more of these (the text head:
        ``pad_id``, ``p_speak``, ``starts``) passes them on in its own ``write``."""
        logits = self(h)
        return self.sample(h, cfg, generator, logits=logits, speak=speak), logits

    def to_payload(self, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """Written values [B, ...] -> the payload the positions are fed back with, ``{field: [B, ...]}`` (its
        modality's payload field, as ``MultimodalEmbedding`` reads it): by default the value itself."""
        return {SPEC[self.kind].fields[0]: value}

    def from_payload(self, given: torch.Tensor) -> torch.Tensor:
        """A payload one position is forced to (teacher forcing, ``StreamingSession.step``'s ``force``) -> the
        value [...] whose ``to_payload`` it is: by default the payload itself."""
        return given


class AudioHead(OutputHead):
    """What the two audio heads (dMel, flow) share: they write ``Kind.AUDIO`` positions as unit coordinates over
    ``bins`` dMel bins [B, frames, n_mels]. A written position is fed back quantised, as its dMel bins (like real
    audio); a forced position's bins stand for their centres."""

    kind = Kind.AUDIO
    bins: int

    def to_payload(self, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unit coordinates [B, frames, n_mels] -> ``{"audio_bins": long [B, frames, n_mels]}``."""
        return {SPEC[self.kind].fields[0]: unit_to_bins(value, self.bins)}

    def from_payload(self, given: torch.Tensor) -> torch.Tensor:
        """Bins long [frames, n_mels] -> their centres' unit coordinates."""
        return bins_to_unit(given, self.bins)
