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


def test_place_on_playback_clock_by_hand():
    import torch

    from tml.eval.clock import place_on_playback_clock

    # 3 micro-turns of 2 items each (values 1..6) at 10 items/s (0.2 s per micro-turn): the real-time schedule puts
    # them at 0.2, 0.4, 0.6 s = items 2, 4, 6 of an 7-item track; the last one is cut to 1 item.
    x = torch.arange(1.0, 7.0)
    out = place_on_playback_clock(x, 2, playback_starts(3, 0.2), 10, 7, fill=-1.0)
    assert out.tolist() == [-1, -1, 1, 2, 3, 4, 5]
    # the slow schedule of the test above (starts 0.25, 0.75, 0.95 s) at 20 items/s: items 5, 15, 19
    out = place_on_playback_clock(x, 2, [0.25, 0.75, 0.95], 20, 22)
    assert out.nonzero().flatten().tolist() == [5, 6, 15, 16, 19, 20]


def test_the_incremental_clock_reports_the_lag_behind_real_time():
    from tml.eval.clock import PlaybackClock

    clock = PlaybackClock(0.2)  # the same hand-worked schedule as above, one micro-turn at a time
    lags = []
    for c in [0.05, 0.35, 0.05, 0.05]:
        clock.add(c)
        lags.append(clock.lag_s)
    assert lags == pytest.approx([0.05, 0.35, 0.35, 0.35])  # 0.25-0.2, 0.75-0.4, 0.95-0.6, 1.15-0.8

