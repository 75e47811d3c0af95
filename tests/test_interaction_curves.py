"""The checkpoint-curve metrics from raw per-episode measurements, by hand."""

import pytest

from tml.tools.interaction_curves import curve_metrics


def test_curve_metrics_by_hand():
    empty = {k: [] for k in ("latency", "missed_turns", "stop_latency", "stopped", "false_stop", "quiet_ok")}
    a = {**empty, "latency": [0.2, 0.4, 1.6], "missed_turns": [1], "stopped": [1, 1, 0], "stop_latency": [0.3, 0.9],
         "false_stop": [0, 1], "quiet_ok": [1, 1]}
    b = {**empty, "latency": [0.1], "false_stop": [0, 0], "quiet_ok": [0]}
    m = curve_metrics([a, b])
    assert m["response_rate"] == pytest.approx(4 / 5) and m["n_response_rate"] == 5
    assert m["latency_median_s"] == pytest.approx(0.3)  # median of 0.1, 0.2, 0.4, 1.6
    assert m["latency_p90_s"] == pytest.approx(1.6)  # nearest rank: ceil(0.9 * 4) = 4th
    # 3 barge-ins while it spoke: stopped within 0.5 s once (0.3), after 0.9 s once, never once -> 1/3
    assert m["barge_in_stop_rate"] == pytest.approx(1 / 3) and m["n_barge_in_stop_rate"] == 3
    assert m["cough_stop_rate"] == pytest.approx(1 / 4) and m["wait_speak_rate"] == pytest.approx(1 / 3)
    assert curve_metrics([empty])["response_rate"] is None


def test_summary_averages_seeds_and_flags_too_few_events():
    from tml.tools.interaction_curves import summary, table

    empty = {k: [] for k in ("latency", "missed_turns", "stop_latency", "stopped", "false_stop", "quiet_ok")}
    # 12 episodes, one reply gap each: seed 0 answers all, seed 1 misses the first 6 -> rates 1.0 and 0.5, mean 0.75
    seed0 = [{**empty, "latency": [0.2]} for _ in range(12)]
    seed1 = [{**empty, "missed_turns": [1]} for _ in range(6)] + [{**empty, "latency": [0.4]} for _ in range(6)]
    s = summary([seed0, seed1], resamples=200)
    r = s["response_rate"]
    assert r["value"] == pytest.approx(0.75) and r["events_per_seed"] == [12, 12]
    assert r["ci"][0] <= 0.75 <= r["ci"][1] and r["ci"][1] - r["ci"][0] > 0.05  # resampling episodes moves seed 1
    assert s["barge_in_stop_rate"]["value"] is None and "too few" in s["barge_in_stop_rate"]["flag"]
    assert "0.75 [" in table(s)


def test_sampling_overrides_are_typed_like_their_fields_and_unknown_ones_refused():
    from tml.tools.interaction_curves import sampling_overrides

    got = sampling_overrides(["words_given_speech=never", "text_temperature=0.7", "flow_steps=4", "floor=greedy"])
    assert got == {"words_given_speech": "never", "text_temperature": 0.7, "flow_steps": 4, "floor": "greedy"}
    assert sampling_overrides(["floor_temperature_speaking=none"]) == {"floor_temperature_speaking": None}
    with pytest.raises(SystemExit, match="no_such_field"):
        sampling_overrides(["no_such_field=1"])
