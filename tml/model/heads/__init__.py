"""Output heads on the final hidden state, one module each: ``text`` (next-token logits), ``dmel`` and ``flow`` (the
two audio heads), ``floor`` (the speak / stay-silent decision per micro-turn), ``listen`` (the user's transcript where
it is heard, a training signal). ``base`` says what every head provides
(``OutputHead``: ``targets``, ``forward``, ``loss``, ``metrics``, ``sample``, ``num_params``, ``init_weights``; for
the streaming session ``write``, ``to_payload``, ``from_payload``, which the audio heads share in ``AudioHead``).

Which heads a model has is ``tml.model.config.HEADS`` (the value of each ``model.heads.<name>`` -> the class that
implements it, as an import path: the config checks the values without importing torch). ``head_classes(cfg)``
resolves it; the model builds each as ``<name>_head`` and every caller loops over them. Adding a head is a new module
here plus its entry in ``HEADS`` and its switch in ``HeadsConfig`` (README, "Adding a modality or a head").
"""

from __future__ import annotations

import importlib

from tml.model.config import HEADS, ModelConfig
from tml.model.heads.base import SILENT_BIN, AudioHead, OutputHead, bins_to_unit, unit_to_bins
from tml.model.heads.dmel import DMelHead
from tml.model.heads.floor import FloorHead, floor_targets
from tml.model.heads.flow import FlowHead
from tml.model.heads.listen import ListenHead
from tml.model.heads.text import TextHead


def head_classes(cfg: ModelConfig) -> dict[str, type[OutputHead]]:
    """The head classes ``cfg.heads`` selects, by name in ``HEADS`` order (the model's build order, so its
    parameter order and checkpoint layout stay put); a head switched off (``None`` in ``HEADS``) is left out."""
    out = {}
    for name, choices in HEADS.items():
        path = choices[getattr(cfg.heads, name)]
        if path is not None:
            module, cls = path.split(":")
            out[name] = getattr(importlib.import_module(module), cls)
    return out


__all__ = ["SILENT_BIN", "AudioHead", "DMelHead", "FloorHead", "FlowHead", "ListenHead", "OutputHead", "TextHead",
           "bins_to_unit", "floor_targets", "head_classes", "unit_to_bins"]
