"""tml: a training framework for full-duplex multimodal interaction models (see README.md and DESIGN.md)."""

__version__ = "0.1.0"
