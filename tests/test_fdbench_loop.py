"""The Full-Duplex-Bench loop offline: synthetic episodes -> FD-bench layout (data_prep.fdbench_set) ->
recipes/fdbench.py (silence-rule baseline and a trained checkpoint) -> scores equal to a hand computation."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from data_prep.fdbench_set import write_set
from tml.audio.dmel import DMelTokenizer
from tml.audio.wav import read_wav
from tml.eval.loading import read_episodes
from tml.eval.session import LiveLogMel
from tml.eval.vad import speech_segments
from tml.streams import LayoutConfig, MicroTurnLayout

SR = 16000
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def fdb(synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fdb") / "set"
    return out, write_set(synth_data, out, tail=2.0), read_episodes(synth_data)


def test_set_has_one_sample_per_labelled_event(fdb):
    out, summary, episodes = fdb
    events = [e for ep in episodes for e in ep.meta["events"]]
    n_resp = sum(e["type"] == "expected_response" for e in events)
    n_int = sum(e["type"] == "interruption" for e in events)
    n_pause = sum(e["type"] == "pause" and e["speaker"] == "user" for e in events)
    n_long = sum(t["speaker"] == "user" and t["kind"] == "turn" and t["end"] - t["start"] >= 3.0
                 for ep in episodes for t in ep.meta["turns"])
    got = summary["samples"]
    assert got.get("v1/smooth_turn_taking", 0) + summary["skipped"].get("expected_response: user turn not found",
                                                                         0) == n_resp > 0
    assert got.get("v1/user_interruption", 0) + summary["skipped"].get(
        "interruption: utterance or its context not found", 0) == n_int
    assert got.get("v1/pause_handling", 0) + summary["skipped"].get("pause: no user utterance holds it", 0) == n_pause
    assert got.get("v1/backchannel", 0) == n_long
    # a turn-taking input: the user's audio from 0.5 s before the turn to its end, then `tail` s of digital silence
    tail = round(summary["tail_s"] * SR)
    for d in sorted((out / "v1/smooth_turn_taking").iterdir())[:3]:
        src = json.loads((d / "source.json").read_text())
        ep = next(e for e in episodes if e.key == src["episode"])
        end = src["event"]["time"]
        turn = next(u for u in ep.meta["turns"] if u["speaker"] == "user" and abs(u["end"] - end) < 1e-3)
        a = max(0.0, turn["start"] - 0.5)
        assert src["offset"] == a
        assert json.loads((d / "turn_taking.json").read_text())[0]["timestamp"][0] == pytest.approx(end - a, abs=1e-4)
        (x,), sr = read_wav(d / "input.wav")  # mono: [1, samples]
        n = round(end * SR) - round(a * SR)
        assert sr == SR and x.numel() == n + tail
        assert torch.equal(x[n:], torch.zeros(tail))
        assert torch.allclose(x[:n], ep.audio["user"][round(a * SR): round(end * SR)], atol=1 / 32768)


def _first_word_heard(wav_path, reply_first_frame: int) -> float | None:
    """When a listener hears the silence-rule baseline's first word, by hand: its energy detector (LiveLogMel, the
    front end it runs on) marks loud 10 ms frames; it starts speaking on the 30th quiet frame after a loud one; its
    first word is written in the micro-turn holding that frame + the word's offset in the reply, in text slot 0, and
    heard one micro-turn later (playback clock, no compute). None: it never speaks, or only after the output ends."""
    layout, dmel = MicroTurnLayout(LayoutConfig()), DMelTokenizer()
    (x,), _ = read_wav(wav_path)
    n, n0 = layout.samples_per_turn, x.numel()
    x = torch.nn.functional.pad(x, (0, -x.numel() % n))
    live = LiveLogMel(layout, dmel)
    loud = torch.cat([live(x[i: i + n]).mean(-1) > -5.0 for i in range(0, x.numel(), n)])
    quiet_run, spoke = 0, False
    for f, is_loud in enumerate(loud.tolist()):
        if is_loud:
            spoke, quiet_run = True, 0
            continue
        quiet_run += 1
        if spoke and quiet_run == 30:
            heard = ((f + reply_first_frame) // layout.frames_per_turn + 1) * 0.2
            return heard if heard * SR < n0 else None
    return None


def test_recipe_silence_rule_scores_equal_the_hand_computation(fdb, tmp_path):
    out, _, _ = fdb
    root = out / "v1/smooth_turn_taking"
    proc = subprocess.run([sys.executable, "recipes/fdbench.py", f"root={root}", "task=smooth_turn_taking",
                           "responder=silence_rule", f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "fdbench.json").read_text())
    from tml.eval.evaluate import canned_reply
    from tml.eval.fdbench import take_turn
    from tml.text.tokenizer import train_bpe

    reply = canned_reply("okay, I hear you.", DMelTokenizer(), train_bpe(["okay, I hear you."] * 20, 300,
                                                                         tmp_path / "tok.json"))
    tors, lats = [], []
    for d in sorted((p for p in root.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        end = json.loads((d / "turn_taking.json").read_text())[0]["timestamp"][0]
        first = _first_word_heard(d / "input.wav", reply.words[0][0])
        words = json.loads((d / "output.json").read_text())["chunks"]
        x, _ = read_wav(d / "input.wav")
        y, sr = read_wav(d / "output.wav")
        assert sr == SR and y.shape == x.shape  # same t = 0 and length as the input
        if first is None:
            assert words == []
            continue
        # the word's slot time, moved to the onset of the speech a VAD hears within that micro-turn (snap_to_speech)
        onset = next((s for s, _ in speech_segments(y, sr) if first <= s < first + 0.2), first)
        assert words[0]["timestamp"][0] == pytest.approx(onset, abs=1e-4)
        tors.append(take_turn(words))
        if tors[-1]:
            lats.append(max(0.0, onset - end))
    assert summary["samples"] == summary["exported"] >= len(tors) and sum(tors) > 0
    assert summary["tor"] == pytest.approx(sum(tors) / summary["samples"])  # samples with no words: TOR 0
    assert summary["latency"] == pytest.approx(sum(lats) / len(lats))


def test_recipe_on_a_trained_checkpoint_writes_every_output(fdb, tiny_run, tmp_path):
    out, _, _ = fdb
    tasks = [("smooth_turn_taking", out / "v1/smooth_turn_taking")]  # every set has these (asserted above)
    tasks += [(t, r) for t, r in (("user_interruption", out / "v1/user_interruption"),
                                  ("timing", out / "v1.5/user_interruption")) if r.exists()]
    for task, root in tasks:
        proc = subprocess.run([sys.executable, "recipes/fdbench.py", f"checkpoint={tiny_run}", f"root={root}",
                               f"task={task}", "limit=1", f"hydra.run.dir={tmp_path / task}"], cwd=ROOT, env=ENV,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        d = root / "0"
        assert (d / "output.wav").exists() and (d / "output.json").exists()
        summary = json.loads((tmp_path / task / "fdbench.json").read_text())
        assert summary["exported"] == (2 if task == "timing" else 1)  # v1.5: input and clean_input
        if task == "timing":
            assert (d / "clean_output.wav").exists() and (d / "latency_intervals.json").exists()
        elif task == "user_interruption":  # only words after the interruption's end, as the official ASR crop
            end = json.loads((d / "interrupt.json").read_text())[0]["timestamp"][1]
            assert all(c["timestamp"][0] >= end for c in json.loads((d / "output.json").read_text())["chunks"])
