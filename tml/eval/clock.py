"""The playback clock: when a listener hears what the model wrote. The one definition every evaluation, export,
replay and live session uses.

The model's output slots of micro-turn ``t`` are computed after that micro-turn's input has fully arrived, at
``(t + 1) * micro_turn_s`` on the input clock. So the earliest a listener can hear them is during micro-turn
``t + 1``. When computing a micro-turn takes longer than real time, output waits for compute, and playback
of consecutive micro-turns cannot overlap, so a backlog delays every later micro-turn too (a live system drifts
behind; the server reports it). Nothing here is optimistic: an output is never placed before its input arrived.
"""

from __future__ import annotations


class PlaybackClock:
    """The playback schedule advanced one micro-turn at a time (a live session cannot know later compute times).

        clock = PlaybackClock(0.2)
        start = clock.add(compute_s)   # when this micro-turn's output plays (s, input clock)
        clock.lag_s                    # how far the last one plays behind a real-time model: start - (t + 1) * 0.2
    """

    def __init__(self, micro_turn_s: float):
        self.micro_turn_s = micro_turn_s
        self.turns = 0
        self.busy_until = 0.0  # when the model finishes its previous micro-turn
        self.last_start: float | None = None
        self.lag_s = 0.0

    def add(self, compute_s: float = 0.0) -> float:
        """Schedule the next micro-turn, whose work took ``compute_s``: its work starts when its input has arrived
        and the previous micro-turn's work is done; its output plays when ready and when the previous micro-turn's
        output has finished playing. Returns its playback start."""
        arrived = (self.turns + 1) * self.micro_turn_s
        ready = max(arrived, self.busy_until) + compute_s
        self.busy_until = ready
        start = ready if self.last_start is None else max(ready, self.last_start + self.micro_turn_s)
        self.last_start, self.lag_s = start, start - arrived
        self.turns += 1
        return start


def playback_starts(n_turns: int, micro_turn_s: float, compute_s: list[float] | None = None) -> list[float]:
    """Start times (s, input clock, t=0 = first input sample) at which the output of micro-turns ``0..n-1`` plays.

    ``compute_s``: measured compute per micro-turn; None treats compute as instantaneous (the model keeps real
    time), which gives exactly ``(t + 1) * micro_turn_s``. See ``PlaybackClock.add`` for the rule.
    """
    clock = PlaybackClock(micro_turn_s)
    return [clock.add(compute_s[t] if compute_s is not None else 0.0) for t in range(n_turns)]


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
