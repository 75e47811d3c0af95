"""Every modality the pipeline knows, one module each (``text``, ``audio``, ``patch``); ``base`` says what a spec
provides.

Adding a modality is a new module here holding its spec (``Kind`` value, payload fields, ``encode``, ``live``,
``embedder``, shapes) and its line in ``MODALITIES`` below; ``Kind`` grows from the specs, and every loop over
modalities (interleave, collate, validate, slicing, embedding, the streaming session) picks it up (README, "Adding
a modality or a head").
"""

from enum import IntEnum

from tml.streams.modalities.audio import AUDIO
from tml.streams.modalities.base import IGNORE_INDEX, PAD, Modality, TurnPositions
from tml.streams.modalities.patch import PATCH
from tml.streams.modalities.text import TEXT

# Every modality, in the order the embedding fills positions.
MODALITIES: tuple[Modality, ...] = (TEXT, AUDIO, PATCH)


def _kind_enum(specs: tuple[Modality, ...]) -> type[IntEnum]:
    """The ``Kind`` enum from the specs: PAD plus one member per spec, named ``spec.name`` upper-cased, valued
    ``spec.kind``. Values and names must be distinct (an IntEnum would silently alias a repeated value)."""
    members = [("PAD", PAD), *((m.name.upper(), m.kind) for m in specs)]
    for i, (name, value) in enumerate(members):
        for other, v in members[:i]:
            if value == v or name == other:
                raise ValueError(f"modalities {other} and {name} share a Kind value or name ({v}); give each "
                                 f"spec in tml.streams.modalities its own kind and name")
    kind = IntEnum("Kind", members, module=__name__)
    kind.__doc__ = "Modality of one position (one member per spec in MODALITIES). PAD is an empty slot or padding."
    return kind


Kind = _kind_enum(MODALITIES)
SPEC: dict[Kind, Modality] = {Kind(m.kind): m for m in MODALITIES}  # Kind -> spec
DENSE_FIELDS = tuple(f for m in MODALITIES if m.dense for f in m.fields)
ROW_FIELDS = tuple(f for m in MODALITIES if not m.dense for f in m.fields)
LABEL_FIELDS = tuple(f for m in MODALITIES for f in m.labels)  # dense, IGNORE_INDEX off their positions; optional
OUTPUTS = tuple(m for m in MODALITIES if m.target is not None)  # the modalities the model writes (with targets)

__all__ = ["DENSE_FIELDS", "IGNORE_INDEX", "Kind", "LABEL_FIELDS", "MODALITIES", "Modality", "OUTPUTS", "PAD",
           "ROW_FIELDS", "SPEC", "TurnPositions"]
