"""Streams on one clock: micro-turn layout, the Episode record, interleaving, packing, and the Batch contract.

Read ``batch.py`` for the contract and the prediction convention, ``layout.py`` for the clock and slot layout,
``modalities/`` for what each modality (text, dMel audio, video patches) contributes to both, one module each.
"""

from tml.errors import ConfigError
from tml.streams.layout import LayoutConfig, MicroTurnLayout, SlotConfig, Stream
from tml.streams.modalities import Kind
from tml.streams.batch import IGNORE_INDEX, Batch, BatchError
from tml.streams.episode import BackgroundEvent, Episode, EpisodeError, Word

__all__ = [
    "IGNORE_INDEX", "Batch", "BatchError", "BackgroundEvent", "Episode", "EpisodeError", "Word", "ConfigError",
    "Kind", "LayoutConfig", "MicroTurnLayout", "SlotConfig", "Stream",
]
