"""Interaction phenomena of the synthetic set: the audio and video do what the event labels say."""

import math
import re

import pytest
import torch

from data_prep.synth_content import SCENARIOS
from data_prep.synth_dialogues import SynthConfig, make_episode
from data_prep.synth_timeline import add_noise
from data_prep.synth_video import VIDEO_SIZE, VideoSpec, bounce

SR = 16000
QUIET = dict(backchannel_prob=0.0, listener_sound_prob=0.0, pause_prob=0.0, noise_prob=0.0)


def episode(scenario, i=0, **kw):
    return make_episode(i, SynthConfig(seed=11, scenario=scenario, **{**QUIET, **kw}))


def rms(x, a, b):
    seg = x[max(0, round(a * SR)): round(b * SR)]
    return float(seg.pow(2).mean().sqrt()) if seg.numel() else 0.0


def events(ep, type_):
    return [e for e in ep.meta["events"] if e["type"] == type_]


@pytest.mark.parametrize("scenario", ["tool", *SCENARIOS])
def test_every_scenario_has_sorted_events_inside_the_episode(scenario):
    ep = episode(scenario, 1)
    ev = ep.meta["events"]
    assert ev == sorted(ev, key=lambda e: (e["time"], e["type"])) and ep.meta["scenario"] == scenario
    assert all(0 <= e["time"] <= ep.duration for e in ev)
    assert 6.0 <= ep.duration <= 14.0
    starts = events(ep, "utterance_start")
    assert len(starts) == len(events(ep, "utterance_end")) == len(ep.meta["turns"])
    assert events(ep, "expected_response")  # every scenario has a user turn the model answers


@pytest.mark.parametrize("i", range(3))
def test_barge_in_model_stops_within_a_few_hundred_ms(i):
    ep = episode("interrupt", i)
    (cut,) = events(ep, "interruption")
    assert cut["stop_by"] - cut["time"] <= 0.5
    model = ep.audio["model"]
    assert rms(model, cut["time"] - 0.3, cut["time"]) > 0.01  # the model was talking when the user cut in
    nxt = min(e["time"] for e in events(ep, "utterance_start") if e["speaker"] == "model" and e["time"] > cut["time"])
    assert rms(model, cut["stop_by"], nxt) < 1e-3  # ... and is silent from stop_by until its next turn
    interrupted = [t for t in ep.meta["turns"] if t.get("interrupted")]
    assert len(interrupted) == 1 and interrupted[0]["end"] <= cut["stop_by"]
    assert all(w.end <= cut["stop_by"] + 1e-3 for w in ep.words["model"] if w.start < cut["time"])


def test_listener_sounds_do_not_stop_the_model():
    found = []
    for i in range(12):
        ep = make_episode(i, SynthConfig(seed=5, scenario="long_talk" if i % 2 else "interrupt",
                                         listener_sound_prob=1.0, noise_prob=0.0))
        for e in events(ep, "non_interruption"):
            found.append(e["what"])
            turn = next(t for t in ep.meta["turns"] if t["speaker"] == "model" and t["start"] < e["time"] < t["end"])
            assert not turn.get("interrupted")
            assert turn["end"] - e["time"] >= 1.5  # far from the line's end: going on is the model's choice there
            assert rms(ep.audio["model"], e["end"], e["end"] + 0.2) > 0.005  # still talking after the sound
            assert rms(ep.audio["user"], e["time"], e["end"]) > 0.01  # the sound is there
    assert len(found) >= 6 and len(set(found)) >= 2


def test_wait_request_keeps_the_model_quiet_until_the_go_ahead():
    for i in range(3):
        ep = episode("wait", i)
        (w,) = events(ep, "wait_request")
        ack = next(t for t in ep.meta["turns"] if t["speaker"] == "model" and t["start"] >= w["time"] - 0.3)
        assert w["until"] - ack["end"] >= 1.5
        assert rms(ep.audio["model"], ack["end"] + 0.05, w["until"]) < 1e-3
        assert w["quiet_from"] == pytest.approx(ack["end"], abs=1e-3)  # the quiet starts after the acknowledgement


def test_mid_turn_pause_is_silence_inside_one_utterance():
    ep = make_episode(2, SynthConfig(seed=11, scenario="wait", **{**QUIET, "pause_prob": 1.0}))
    (p,) = events(ep, "pause")
    assert 0.5 <= p["end"] - p["time"] <= 1.3
    assert rms(ep.audio["user"], p["time"] + 0.05, p["end"] - 0.05) < 1e-3
    utt = [(s["time"], e["time"]) for s, e in zip(events(ep, "utterance_start"), events(ep, "utterance_end"))]
    assert any(a < p["time"] and p["end"] < b for a, b in utt)  # inside an utterance, not between two


def test_timer_and_paced_counting_speak_on_time():
    for i in range(3):
        ep = episode("timer", i)
        (t,) = events(ep, "timer")
        n = {"three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8}[
            re.search(r"when (\w+) seconds", ep.meta["turns"][-3]["text"]).group(1)]
        assert t["target"] - t["time"] == pytest.approx(n, abs=1e-3)
        assert ep.meta["turns"][-1]["start"] == pytest.approx(t["target"], abs=0.01)
        assert rms(ep.audio["model"], t["target"], t["target"] + 0.3) > 0.01
    ep = episode("count_pace", 0)
    ticks = [e["time"] for e in events(ep, "timer") if e["what"] == "count"]
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert len(ticks) >= 3 and max(gaps) - min(gaps) < 0.01 and min(gaps) in (pytest.approx(1.0, abs=0.01),
                                                                            pytest.approx(1.5, abs=0.01),
                                                                            pytest.approx(2.0, abs=0.01))


def test_wall_hits_match_the_rendered_trajectory():
    spec = VideoSpec("red", "grey", 9, 30.0, 50.0, 33.0, -17.0)
    hits = spec.wall_hits(VIDEO_SIZE)
    t = torch.arange(0, 14, 1e-3)
    lo, hi = spec.radius, VIDEO_SIZE - 1 - spec.radius
    x, y = (bounce(torch.tensor(p), v, t, lo, hi) for p, v in ((spec.x0, spec.vx), (spec.y0, spec.vy)))
    at_wall = (((x - lo).abs() < 0.05) | ((hi - x).abs() < 0.05) | ((y - lo).abs() < 0.05) | ((hi - y).abs() < 0.05))
    dense = t[at_wall]
    want = [float(g[0]) for g in torch.tensor_split(dense, (torch.diff(dense) > 0.1).nonzero().flatten() + 1)]
    assert [round(h, 2) for h in hits if h < 13.9] == pytest.approx([round(w, 2) for w in want], abs=0.01)
    ep = episode("wall", 0)
    for e in events(ep, "visual"):
        assert e["what"] == "wall_hit" and e["time"] <= ep.meta["events"][ep.meta["events"].index(e)]["by"]
        said = next(s["time"] for s in events(ep, "utterance_start") if s["text"] == "now!" and s["time"] >= e["time"])
        assert 0.15 <= said - e["time"] <= 0.4


def test_squares_appear_in_the_video_and_the_answer_counts_them():
    ep = episode("squares", 3)
    sq = events(ep, "visual")
    words = {"one": 1, "two": 2, "three": 3, "four": 4}
    said = next(words[w] for w in ep.meta["turns"][-1]["text"].replace(".", "").split() if w in words)
    assert said == len(sq) == len(ep.meta["video"]["squares"])
    for t0, t1, x, y, side, _ in ep.meta["video"]["squares"]:
        f = math.ceil(t0 * 5)
        if f / 5 < t1:
            patch = ep.video[f, y:y + side, x:x + side].reshape(-1, 3).float()
            assert (patch.std(0) < 1).all()  # a uniform square drawn over the ball
            off = math.ceil(t1 * 5)  # first frame after it: the square is gone (background or ball there)
            if off < ep.video.shape[0]:
                assert not torch.equal(ep.video[off, y:y + side, x:x + side], ep.video[f, y:y + side, x:x + side])


def test_noise_is_added_at_the_requested_snr():
    import random

    x = torch.zeros(SR * 2)
    x[SR // 2: SR] = 0.3 * torch.sin(torch.arange(SR // 2) * 0.1)
    for snr in (5.0, 20.0):
        y = add_noise(random.Random(0), x, [(0.5, 1.0)], snr, "pink")
        noise = y - x
        measured = 10 * math.log10(x[SR // 2: SR].pow(2).mean() / noise.pow(2).mean())
        assert measured == pytest.approx(snr, abs=0.01)


def test_mix_flags_count_events_in_the_manifest_and_require_fails_a_short_set(tmp_path):
    """A held-out set made for one phenomenon: every interrupt episode has exactly one barge-in while the model
    speaks and no wait request; the manifest's counts equal a recount of the episodes' labels, and --require with
    one event more than the set has refuses to write a manifest."""
    import json

    import webdataset as wds

    from data_prep.synth_dialogues import main
    from tml.streams import Episode

    args = ["--episodes", "4", "--seed", "2", "--shard-size", "2", "--scenario-weights", "interrupt=1",
            "--background-prob", "0", "--listener-sound-prob", "0", "--noise-prob", "0", "--workers", "1"]
    m = main(["--out", str(tmp_path / "ok"), *args, "--require", "barge_in=4,reply_gap=4"])
    eps = [Episode.from_sample(s) for name in sorted((tmp_path / "ok").glob("shard-*.tar"))
           for s in wds.WebDataset(str(name), shardshuffle=False)]
    assert [e.meta["scenario"] for e in eps] == ["interrupt"] * 4
    recount = {"barge_in": "interruption", "listener_sound": "non_interruption", "wait_window": "wait_request",
               "reply_gap": "expected_response"}
    assert m["events"] == {k: sum(ev["type"] == t for e in eps for ev in e.meta["events"]) for k, t in recount.items()}
    assert m["events"]["barge_in"] == 4 and m["events"]["wait_window"] == 0 and m["events"]["reply_gap"] >= 4
    assert json.loads((tmp_path / "ok" / "manifest.json").read_text())["events"] == m["events"]
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "short"), *args, "--require", "barge_in=5"])
    assert not (tmp_path / "short" / "manifest.json").exists()


@pytest.mark.parametrize("flag", ["--scenario-weights=nope=1", "--scenario-weights=wait=x", "--require=coughs=3",
                                  "--noise-prob=1.5"])
def test_bad_mix_flags_are_usage_errors_naming_the_flag(flag, tmp_path, capsys):
    from data_prep.synth_dialogues import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--episodes", "1", flag])
    assert flag.split("=")[0] in capsys.readouterr().err
