"""The playback clock: when a listener hears what the model wrote. The one definition every evaluation, export,
replay and live session uses.

The model's output slots of micro-turn ``t`` are computed after that micro-turn's input has fully arrived, at
``(t + 1) * micro_turn_s`` on the input clock. So the earliest a listener can hear them is during micro-turn
``t + 1``. When computing a micro-turn takes longer than real time, output waits for compute, and playback
of consecutive micro-turns cannot overlap, so a backlog delays every later micro-turn too (a live system drifts
behind; the server reports it). Nothing here is optimistic: an output is never placed before its input arrived.
"""

from __future__ import annotations


def playback_starts(n_turns: int, micro_turn_s: float, compute_s: list[float] | None = None) -> list[float]:
    """Start times (s, input clock, t=0 = first input sample) at which the output of micro-turns ``0..n-1`` plays.

    ``compute_s``: measured compute per micro-turn; None treats compute as instantaneous (the model keeps real
    time), which gives exactly ``(t + 1) * micro_turn_s``. With compute, micro-turn t's work starts when its input
    has arrived and the previous micro-turn's work is done; its output plays when ready and when the previous
    micro-turn's output has finished playing.
    """
    starts: list[float] = []
    busy_until = 0.0  # when the model finishes its previous micro-turn
    for t in range(n_turns):
        arrived = (t + 1) * micro_turn_s
        ready = max(arrived, busy_until) + (compute_s[t] if compute_s is not None else 0.0)
        busy_until = ready
        start = ready if not starts else max(ready, starts[-1] + micro_turn_s)
        starts.append(start)
    return starts


def playback_delay_s(micro_turn_s: float) -> float:
    """The fixed delay of a real-time model: output of micro-turn t plays at (t + 1) * micro_turn_s."""
    return micro_turn_s


def place_on_playback_clock(x, per_turn: int, starts: list[float], rate: float, total: int, fill: float = 0.0):
    """What a listener hears: micro-turn t's slice ``x[t * per_turn : (t + 1) * per_turn]`` placed at ``starts[t]``
    (``playback_starts``) on a track of ``total`` items at ``rate`` per second (wave samples: rate = sample rate;
    mel frames: rate = 100). Items before the first output, or past ``total``, are ``fill`` / cut.

    x: [T * per_turn, ...] -> [total, ...]
    """
    out = x.new_full((total, *x.shape[1:]), fill)
    for t, start in enumerate(starts):
        a = round(start * rate)
        if a >= total:
            break
        piece = x[t * per_turn : (t + 1) * per_turn][: total - a]
        out[a : a + piece.shape[0]] = piece
    return out
