"""Evaluation: the streaming micro-turn runtime, the background model, duplex metrics."""

from tml.eval.session import MicroTurnInputs, MicroTurnOutputs, SessionConfig, StreamingSession

__all__ = ["MicroTurnInputs", "MicroTurnOutputs", "SessionConfig", "StreamingSession"]
