"""Evaluation with power: seed-averaged values, event counts, flags and bootstrap intervals over episodes, checked
against values worked out by hand and the binomial distribution."""

import pytest

from tml.eval.report import EvalConfig, summarise, table

KEYS = ("latency", "missed_turns", "stop_latency", "stopped", "false_stop", "backchannel", "quiet_ok", "on_time",
        "answer_ok", "delegated")


def episode(**raw) -> dict:
    """Raw per-episode measurements as ``tml.eval.duplex.episode_metrics`` returns them (unset keys empty)."""
    return {k: list(raw.get(k, [])) for k in KEYS}


def test_values_are_pooled_per_seed_then_averaged_over_seeds():
    # seed 0: 12 reply gaps, 9 answered; seed 1: 12 gaps, 6 answered -> response rates 0.75 and 0.5, mean 0.625.
    # Latencies: seed 0 answers all at 0.4 s, seed 1 all at 0.8 s -> medians 0.4 / 0.8, mean 0.6.
    seed0 = [episode(latency=[0.4] * 3, missed_turns=[1]) for _ in range(3)]
    seed1 = [episode(latency=[0.8] * 2, missed_turns=[1, 1]) for _ in range(3)]
    r = summarise([seed0, seed1], EvalConfig(seeds=[0, 1], min_events=5))
    assert r["response_rate"]["value"] == pytest.approx(0.625)
    assert r["response_rate"]["events_per_seed"] == [12, 12] and r["response_rate"]["seeds"] == [0.75, 0.5]
    assert r["latency_median_s"]["value"] == pytest.approx(0.6) and r["latency_median_s"]["events_per_seed"] == [9, 6]
    # every episode of a seed is alike, so resampling episodes changes nothing: the interval is the point
    assert r["response_rate"]["ci"] == pytest.approx([0.625, 0.625])


def test_too_few_events_are_flagged_not_reported():
    eps = [episode(stopped=[1], quiet_ok=[1, 0], latency=[0.3] * 4) for _ in range(4)]  # 4 barge-ins, 8 waits
    r = summarise([eps], EvalConfig(seeds=[0], min_events=10))
    assert r["barge_in_stop_rate"]["value"] is None and r["barge_in_stop_rate"]["ci"] is None
    assert r["barge_in_stop_rate"]["flag"] == "too few events: 4 per seed < 10"
    assert r["wait_speak_rate"]["value"] is None and r["latency_p90_s"]["value"] == pytest.approx(0.3)
    assert r["cough_stop_rate"]["flag"] == "too few events: 0 per seed < 10"
    md = table(r, r)
    assert "| barge_in_stop_rate" in md and "flagged (too few events: 4 per seed < 10; n=4)" in md
    assert "0.300 [0.300, 0.300] n=16" in md


def test_bootstrap_interval_matches_the_binomial():
    # 20 episodes with one reply gap each, 10 answered. Resampling 20 episodes draws k ~ Binomial(20, 1/2) answered
    # ones, rate k / 20; the 2.5% / 97.5% quantiles of that are 6/20 and 14/20 (P(k <= 5) = 0.021, P(k <= 6) =
    # 0.058). 2000 resamples estimate them to within one step of 1/20.
    eps = [episode(latency=[0.3]) for _ in range(10)] + [episode(missed_turns=[1]) for _ in range(10)]
    r = summarise([eps], EvalConfig(seeds=[0]))
    lo, hi = r["response_rate"]["ci"]
    assert r["response_rate"]["value"] == 0.5
    assert 0.25 <= lo <= 0.35 and 0.65 <= hi <= 0.75, (lo, hi)
    # better column: lower is better for latency, higher for response rate
    worse = summarise([[episode(latency=[0.9]) for _ in range(10)] + [episode(missed_turns=[1]) for _ in range(10)]],
                      EvalConfig(seeds=[0]))
    assert "| response_rate (reply gaps; higher is better) | 0.500" in table(r, worse)
    rows = {line.split(" (")[0]: line for line in table(r, worse).splitlines()}
    assert rows["| latency_median_s"].endswith("| yes |") and rows["| response_rate"].endswith("| no |")


def test_bad_eval_config_names_the_key():
    with pytest.raises(ValueError, match="eval.seeds"):
        EvalConfig(seeds=[1, 1]).validate()
    with pytest.raises(ValueError, match="same, non-zero number of episodes"):
        summarise([[episode()], []], EvalConfig(seeds=[0, 1]))


def test_barge_in_stop_rate_counts_stops_within_half_a_second():
    # per episode 3 barge-ins while the model spoke: stopped after 0.3 s, after 0.9 s (within the 1.5 s the raw
    # measurement allows, not within 0.5 s), never -> 1 of 3; four such episodes: 4 of 12
    eps = [episode(stopped=[1, 1, 0], stop_latency=[0.3, 0.9]) for _ in range(4)]
    r = summarise([eps], EvalConfig(seeds=[0]))["barge_in_stop_rate"]
    assert r["value"] == pytest.approx(1 / 3) and r["events_per_seed"] == [12]
