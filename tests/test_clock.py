"""The playback clock, against schedules worked out by hand."""

import pytest

from tml.eval.clock import playback_starts


def test_real_time_model_plays_one_micro_turn_after_its_input():
    assert playback_starts(3, 0.2) == pytest.approx([0.2, 0.4, 0.6])


def test_slow_micro_turns_delay_everything_after_them():
    # compute 0.05, 0.35, 0.05, 0.05 s per 0.2 s micro-turn (hand-worked):
    # t0: input at 0.2, ready 0.25, plays 0.25
    # t1: input 0.4, ready 0.75, plays 0.75 (0.25 + 0.2 = 0.45 is free earlier)
    # t2: input 0.6, model busy until 0.75 -> ready 0.80; previous plays until 0.95 -> plays 0.95
    # t3: input 0.8, ready 0.85; plays after t2 ends: 1.15
    assert playback_starts(4, 0.2, [0.05, 0.35, 0.05, 0.05]) == pytest.approx([0.25, 0.75, 0.95, 1.15])
