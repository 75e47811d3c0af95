"""Full-Duplex-Bench scoring against values computed by hand on folders built here (the official definitions are
quoted in tml/eval/fdbench.py), and the export of a responder's words on the playback clock."""

import json
import math

import pytest
import torch

from tml.data.espeak import speak
from tml.audio.wav import write_wav
from tml.eval.fdbench import (backchannels, js_distance, main, response_intervals, score, stop_intervals,
                              window_distribution, words_on_playback_clock, write_output, WordTime)
from tml.text.tokenizer import train_bpe

SR = 16000


def chunks(*spans):
    return {"text": " ".join(f"w{i}" for i in range(len(spans))),
            "chunks": [{"text": f"w{i}", "timestamp": list(s)} for i, s in enumerate(spans)]}


# Four responses (hand-worked):
#   0: 3 words over 2.5-3.6 (1.1 s >= 1 s)         -> TOR 1, latency 2.5 - ref
#   1: 4 words over 1.8-2.6 (0.8 s, but > 3 words)  -> TOR 1, latency 1.8 - ref (negative for ref 2.0 -> 0)
#   2: 2 words over 3.2-3.9 (0.7 s, <= 3 words)     -> TOR 0
#   3: no words                                     -> TOR 0
RESPONSES = [chunks((2.5, 2.8), (2.8, 3.0), (3.1, 3.6)),
             chunks((1.8, 2.0), (2.0, 2.2), (2.2, 2.4), (2.4, 2.6)),
             chunks((3.2, 3.4), (3.4, 3.9)),
             chunks()]


def build(root, annotation_name, annotations):
    for i, (resp, ann) in enumerate(zip(RESPONSES, annotations)):
        d = root / str(i)
        d.mkdir(parents=True)
        (d / "output.json").write_text(json.dumps(resp))
        if ann is not None:
            (d / annotation_name).write_text(json.dumps(ann))
    return root


def test_smooth_turn_taking_by_hand(tmp_path):
    ends = [2.0, 2.0, 3.0, 1.0]
    root = build(tmp_path / "stt", "turn_taking.json",
                 [[{"text": "[TURN-TAKING]", "timestamp": [e, e + 0.4]}] for e in ends])
    (tmp_path / "stt" / "4").mkdir()  # a folder without output.json: listed, not scored
    r = score(root, "smooth_turn_taking")
    assert [x["tor"] for x in r["per_sample"]] == [1, 1, 0, 0]
    assert r["tor"] == 0.5 and r["missing"] == ["4"]
    # latencies 0.5 and max(0, -0.2) = 0 -> mean 0.25
    assert r["latency"] == pytest.approx(0.25)
    assert r["per_sample"][1]["latency_raw"] == pytest.approx(-0.2)


def test_pause_handling_by_hand(tmp_path):
    root = build(tmp_path / "pause", "pause.json", [[{"text": "[PAUSE]", "timestamp": [1.0, 1.8]}]] * 4)
    # a None end counts as its start: 0.5-0.9 then a word starting at 1.6 with no end -> span 1.1 s -> TOR 1
    (root / "4").mkdir()
    (root / "4" / "output.json").write_text(json.dumps(chunks((0.5, 0.9), (1.6, None))))
    r = score(root, "pause_handling")
    assert [x["tor"] for x in r["per_sample"]] == [1, 1, 0, 0, 1]
    assert r["tor"] == pytest.approx(3 / 5) and "latency" not in r


def test_user_interruption_by_hand_and_cli(tmp_path, capsys):
    ints = [[{"context": "tell me a story", "interrupt": "wait, stop", "timestamp": [1.0, e]}]
            for e in (2.0, 1.5, 3.0, 1.0)]
    root = build(tmp_path / "ui", "interrupt.json", ints)
    result = main(["score", f"root={root}", "task=user_interruption"])
    # latencies: 2.5 - 2.0 = 0.5 and 1.8 - 1.5 = 0.3 -> 0.4
    assert result["tor"] == 0.5 and result["latency"] == pytest.approx(0.4)
    assert "GPT" in result["relevance"]
    printed = json.loads(capsys.readouterr().out)
    assert printed["latency"] == pytest.approx(0.4) and "per_sample" not in printed
    assert json.loads((root / "fdbench_user_interruption.json").read_text())["samples"] == 4


def test_backchannel_rules_and_jsd_by_hand():
    words = chunks((1.0, 1.2), (5.0, 5.2), (5.2, 5.4), (5.4, 5.6))["chunks"]
    # 1.0-1.4: 0.4 s, 1 word -> TOR 0, a backchannel; 5.0-5.8: 0.8 s with 3 words -> TOR 1, still a backchannel
    assert backchannels([(1.0, 1.4)], words) == (0, [(1.0, 1.4)])
    assert backchannels([(1.0, 1.4), (5.0, 5.8)], words) == (1, [(1.0, 1.4), (5.0, 5.8)])
    # a segment over 3 s stops the scan: TOR 1, the later one is not looked at
    assert backchannels([(1.0, 1.4), (2.0, 5.5), (6.0, 6.2)], words) == (1, [(1.0, 1.4)])
    # the last segment decides: 1.2 s with 0 words -> TOR 1 (duration >= 1)
    assert backchannels([(5.0, 5.8), (7.0, 8.2)], words)[0] == 1
    # 0.5 s -> 3 windows; (0.1, 0.3) touches windows 0 and 1: [1, 1, 0] + eps, normalised
    p = window_distribution([(0.1, 0.3)], 0.5)
    assert p == pytest.approx([0.5, 0.5, 0.0], abs=1e-9)
    # against [0, 0, 1]: m = [.25, .25, .5]; KL(p||m) = ln 2, KL(q||m) = ln 2 -> sqrt((ln2 + ln2) / 2)
    assert js_distance(p, [0.0, 0.0, 1.0]) == pytest.approx(math.sqrt(math.log(2)), abs=1e-6)
    assert js_distance([0.2, 0.8], [0.2, 0.8]) == pytest.approx(0.0, abs=1e-7)


def test_backchannel_on_real_audio(tmp_path):
    """Two short espeak 'yeah.'s in 8 s of output: 2 backchannels, TOR 0, 0.25 per second; JSD against a reference
    that puts all its mass where the first one is is below that against one at the far end."""
    yeah, _ = speak("yeah.")
    out = torch.zeros(8 * SR)
    for t in (1.0, 5.0):
        out[int(t * SR): int(t * SR) + yeah.numel()] = yeah
    d = tmp_path / "bc" / "0"
    d.mkdir(parents=True)
    write_wav(d / "output.wav", out, SR)
    (d / "output.json").write_text(json.dumps(chunks((1.05, 1.3), (5.05, 5.3))))
    near = [0.0] * 40
    near[5] = near[25] = 1.0  # 0.2 s windows at 1.0 and 5.0 s
    (tmp_path / "bc" / "icc_gt_distribution.json").write_text(json.dumps({"0": near}))
    r = score(tmp_path / "bc", "backchannel")
    assert r["per_sample"][0]["backchannels"] == 2 and r["tor"] == 0 and r["frequency"] == pytest.approx(0.25)
    far = [0.0] * 40
    far[39] = 1.0
    (tmp_path / "far.json").write_text(json.dumps({"0": far}))
    assert r["jsd"] < score(tmp_path / "bc", "backchannel", gt=tmp_path / "far.json")["jsd"]


def test_timing_intervals_by_hand(tmp_path):
    user, model = [(0.0, 2.0), (3.0, 5.0)], [(1.5, 3.2), (6.0, 7.0)]
    # overlaps: (1.5, 2.0) then (3.0, 3.2); responses: after 2.0 the next model start is 6.0, after 5.0 too ->
    # one entry per model start, the later user end wins
    assert stop_intervals(user, model) == [[1.5, 2.0], [3.0, 3.2]]
    assert response_intervals(user, model) == [[5.0, 6.0]]
    # on audio: the user asks (0.5 s on), the 'model' answers 1 s after the question ends
    q, qw = speak("what is the capital of france?")
    a, _ = speak("it is paris.")
    d = tmp_path / "t" / "0"
    d.mkdir(parents=True)
    user_w = torch.zeros(6 * SR)
    user_w[SR // 2: SR // 2 + q.numel()] = q
    q_end = 0.5 + qw[-1].end
    model_w = torch.zeros(6 * SR)
    s = int((q_end + 1.0) * SR)
    model_w[s: s + a.numel()] = a
    write_wav(d / "input.wav", user_w, SR)
    write_wav(d / "output.wav", model_w, SR)
    r = score(tmp_path / "t", "timing")
    data = json.loads((d / "latency_intervals.json").read_text())
    assert data["latency_stop_list"] == []
    (ue, ms), = data["latency_resp_list"]
    assert ue == pytest.approx(q_end, abs=0.1) and ms == pytest.approx(q_end + 1.0, abs=0.1)
    assert r["response_latency"] == pytest.approx(1.0, abs=0.15)


def test_words_on_playback_clock_and_output_json(tmp_path):
    tok = train_bpe(["hello there my friend"] * 20, 300, tmp_path / "tok.json")
    hello, there = tok.word_ids("hello"), tok.word_ids("there")
    # 4 text slots per micro-turn; "hello" in turn 0 slot 0, "there" split over turn 1 slot 3 and turn 2 slot 0
    # when it has 2+ tokens (else it sits in turn 1 slot 3 alone).
    pad = tok.pad_id
    turns = [hello + [pad] * (4 - len(hello)), [pad, pad, pad, there[0]], there[1:] + [pad] * (4 - len(there[1:]))]
    starts = [0.2, 0.4, 0.7]  # a backlog delayed turn 2
    words = words_on_playback_clock(turns, starts, 0.2, tok)
    assert [w.text for w in words] == ["hello", "there"]
    assert words[0].start == pytest.approx(0.2)
    assert words[1].start == pytest.approx(0.4 + 3 / 4 * 0.2)
    assert words[1].end == pytest.approx(0.7 + 0.05 if len(there) > 1 else 0.6)
    # <delegate> spans are written, not spoken
    d_ids = [tok.delegate_id] + tok.word_ids("friend") + [tok.end_delegate_id]
    assert [w.text for w in words_on_playback_clock([d_ids + hello], [0.2], 0.2, tok)] == ["hello"]
    write_output(tmp_path, torch.zeros(SR), SR, [WordTime("a", 0.1, 0.2), WordTime("b", 0.6, 0.8)], not_before=0.5)
    assert json.loads((tmp_path / "output.json").read_text()) == {"text": "b", "chunks": [{"text": "b", "timestamp": [0.6, 0.8]}]}


def test_snap_to_speech_by_hand():
    from tml.eval.fdbench import snap_to_speech

    words = [WordTime("a", 1.0, 1.05), WordTime("b", 1.4, 1.45), WordTime("c", 3.0, 3.05)]
    # speech 1.13-1.6: "a" (slot 1.0, silent) moves to 1.13; "b" is inside speech, stays; "c" has no speech
    # within 0.2 s, stays
    snapped = snap_to_speech(words, [(1.13, 1.6), (3.25, 3.5)], 0.2)
    assert [(w.start, w.end) for w in snapped] == [(1.13, 1.13), (1.4, 1.45), (3.0, 3.05)]
