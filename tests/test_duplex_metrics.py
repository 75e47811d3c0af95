"""Duplex metrics against values computed by hand from a hand-drawn activity track."""

import pytest
import torch

from tml.eval.duplex import DuplexLabels, MetricConfig, aggregate, delegate_spans, episode_metrics, onsets


def track(duration, spans):
    """bool activity at 10 ms with True inside each (start, end) span in seconds."""
    a = torch.zeros(round(duration / 0.01), dtype=torch.bool)
    for s, e in spans:
        a[round(s / 0.01) : round(e / 0.01)] = True
    return a


def test_wait_window_grace_by_hand():
    """Window 2.0-6.0 (opens when the reference's acknowledgement ended). An acknowledgement 2.2-2.5 is inside the
    0.5 s grace (counted span 2.5-6.0: no speech); a late one 2.2-2.5 plus a new utterance 4.0-4.2 (0.2 s of 3.5 s
    = 5.7% > 5%) speaks in the window. A longer-worded acknowledgement still going at 2.5 is excused if it ends by
    2.5 + 1.0 (ack_overrun_s): 2.3-3.4 is; 2.3-3.6 is not and counts whole (1.1 s of 3.5 s); 2.3-3.4 followed by
    3.7-3.9 (0.2 s) speaks in the window again. Without the overrun, 2.3-2.7 puts 0.2 s (5.7%) into it."""
    labels = DuplexLabels(duration=8.0, quiet_windows=[(2.0, 6.0)])
    ok = lambda spans, **kw: episode_metrics(labels, track(8.0, spans), [], MetricConfig(**kw))["quiet_ok"]  # noqa: E731
    assert ok([(2.2, 2.5)]) == [1] and ok([(2.2, 2.5), (4.0, 4.2)]) == [0]
    assert ok([(2.2, 2.5), (4.0, 4.15)]) == [1]  # 0.15 s of 3.5 s = 4.3%: within the tolerance
    assert ok([(2.3, 3.4)]) == [1] and ok([(2.3, 3.6)]) == [0] and ok([(2.3, 3.4), (3.7, 3.9)]) == [0]
    assert ok([(2.3, 2.7)]) == [1] and ok([(2.3, 2.7)], ack_overrun_s=0.0) == [0]


def test_latencies_stops_and_rates_by_hand():
    # Model speaks: 1.30-2.50 (answer 1), 3.00-3.05 (a 50 ms blip: no onset), 4.40-6.00 (answer 2, interrupted at
    # 5.00, stops at 6.00), 7.00-7.40 (backchannel inside the long user turn 6.5-9.0), 10.0-12.0 (cough at 10.5:
    # keeps talking), speaks at 12.2-12.5 though asked to wait in 12.0-13.0.
    active = track(14.0, [(1.3, 2.5), (3.0, 3.05), (4.4, 6.0), (7.0, 7.4), (10.0, 12.0), (12.2, 12.5)])
    labels = DuplexLabels(
        duration=14.0,
        response_turns=[(0.0, 1.0), (3.5, 4.0), (13.0, 13.5)],  # latencies 0.3, 0.4; the last gets no answer
        interruptions=[5.0, 8.0],  # 5.0: stops at 6.0 (1.0 s); 8.0: the model is silent, nothing to interrupt
        false_barge_ins=[10.5, 11.6],  # keeps talking 1.5 s after 10.5; stops 0.4 s after 11.6 (within 0.5 s)
        long_user_turns=[(6.5, 9.0), (0.0, 1.0)],
        quiet_windows=[(12.0, 13.0), (8.0, 9.0)],  # 30% speech in the first, none in the second
        timed_cues=[1.5, 7.0, 11.0],  # onsets at 1.3 (within 0.5), 7.0 (exact); 11.0 has none within 0.5
        answers=[(4.0, "forty two"), (0.0, "paris")],
    )
    text = [(4.2, "it is forty"), (4.4, "two"), (1.0, "hello")]
    cfg = MetricConfig(quiet_grace_s=0.0)  # the grace after an acknowledgement: test_wait_window_grace_by_hand
    assert onsets(active, cfg) == pytest.approx([1.3, 4.4, 7.0, 10.0, 12.2])
    m = episode_metrics(labels, active, text, cfg)
    assert m["latency"] == pytest.approx([0.3, 0.4]) and m["missed_turns"] == [1]
    assert m["stopped"] == [1] and m["stop_latency"] == pytest.approx([1.0])
    assert m["false_stop"] == [0, 1]
    assert m["backchannel"] == [1, 0]
    assert m["quiet_ok"] == [0, 1]
    assert m["on_time"] == [1, 1, 0]
    assert m["answer_ok"] == [1, 0]
    agg = aggregate([m, {k: [] for k in m}])
    assert agg["turn_taking_latency_mean_s"] == pytest.approx(0.35)
    assert agg["turn_taking_latency_median_s"] == pytest.approx(0.35)
    assert agg["turn_taking_latency_p90_s"] == pytest.approx(0.4)
    assert agg["turn_taking_response_rate"] == pytest.approx(2 / 3)
    assert agg["silence_compliance"] == 0.5 and agg["on_time_rate"] == pytest.approx(2 / 3)
    assert agg["answer_accuracy"] == 0.5


def test_delegation_rate_by_hand():
    """Expected: "23 * 19" at 2.0 and "weather paris" at 6.0. The model opens a span at 2.2 that closes a micro-turn
    later with the right words (counted); at 6.2 it asks the wrong thing; an unclosed span at 9.0 counts for
    nothing. Rate 1/2."""
    labels = DuplexLabels(duration=10.0, delegations=[(2.0, "23 * 19"), (6.0, "weather paris")])
    text = [(2.2, "let me check <delegate> 23 *"), (2.4, "19 </delegate>"), (6.2, "<delegate>weather rome</delegate>"),
            (9.0, "<delegate> weather paris")]
    assert delegate_spans(text) == [(2.2, "23 * 19"), (6.2, "weather rome")]
    m = episode_metrics(labels, track(10.0, []), text)
    assert m["delegated"] == [1, 0] and aggregate([m])["delegation_rate"] == 0.5
    late = episode_metrics(DuplexLabels(duration=10.0, delegations=[(0.1, "23 * 19")]), track(10.0, []), text)
    assert late["delegated"] == [0]  # 2.1 s after the expected time: outside delegate_tol_s = 2.0


def test_nothing_measured_gives_none():
    agg = aggregate([episode_metrics(DuplexLabels(duration=1.0), track(1.0, []), [])])
    assert agg["turn_taking_latency_mean_s"] is None and agg["interruption_stop_rate"] is None


def test_a_reply_that_overlaps_the_end_of_the_turn_takes_it_with_latency_0():
    # Onsets at 0.8 (0.2 s before the first turn ends: taken, latency 0), 2.5 (0.5 s before the second ends: too
    # early, an overlap_s of 0.3 does not reach it, and nothing follows: missed).
    active = track(5.0, [(0.8, 1.5), (2.5, 2.9)])
    labels = DuplexLabels(duration=5.0, response_turns=[(0.0, 1.0), (2.0, 3.0)])
    m = episode_metrics(labels, active, [], MetricConfig())
    assert m["latency"] == [0.0] and m["missed_turns"] == [1]
