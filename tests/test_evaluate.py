"""Duplex evaluation end to end: a scripted responder's latencies equal the hand-computed ones; the recipe runs on
a real checkpoint."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from tml.audio.dmel import DMelTokenizer
from tml.audio.wav import read_wav, write_wav
from tml.eval.evaluate import (SilenceRuleResponder, evaluate, evaluate_seeds, heard_text, labels_from_events,
                               run_episode)
from tml.eval.report import EvalConfig
from tml.eval.vad import VADConfig
from tml.streams import Episode, LayoutConfig, MicroTurnLayout
from tml.text.tokenizer import train_bpe

SR = 16000


def noise_episode() -> Episode:
    """User noise bursts at 0.2-1.0 s and 2.0-2.6 s (clear speech-like energy in every mel channel)."""
    g = torch.Generator().manual_seed(0)
    user = torch.zeros(4 * SR)
    for a, b in ((0.2, 1.0), (2.0, 2.6)):
        user[int(a * SR) : int(b * SR)] = 0.1 * torch.randn(int((b - a) * SR), generator=g)
    events = [
        {"type": "utterance_start", "time": 0.2, "speaker": "user", "kind": "turn"},
        {"type": "utterance_end", "time": 1.0, "speaker": "user", "kind": "turn"},
        {"type": "expected_response", "time": 1.0, "speaker": "model", "by": 2.0},
        {"type": "timer", "time": 0.5, "target": 1.3, "tolerance": 0.5},
        {"type": "interruption", "time": 2.0, "speaker": "user", "target": "model", "stop_by": 2.3},
        {"type": "utterance_start", "time": 2.0, "speaker": "user", "kind": "interrupt"},
        {"type": "utterance_end", "time": 2.6, "speaker": "user", "kind": "interrupt"},
        {"type": "expected_response", "time": 2.6, "speaker": "model", "by": 3.6},
        {"type": "non_interruption", "time": 3.2, "speaker": "user", "what": "cough"},
        {"type": "delegate", "time": 3.4, "speaker": "model", "query": "12 * 7"},
        {"type": "something_new", "time": 3.5},  # unknown types are ignored
    ]
    return Episode(key="noise", duration=4.0, sample_rate=SR, audio={"user": user, "model": torch.zeros(4 * SR)},
                   meta={"events": events})


def test_labels_from_events():
    labels = labels_from_events(noise_episode().meta["events"], 4.0)
    assert [e for _, e in labels.response_turns] == [1.0, 2.6]
    assert labels.interruptions == [2.0] and labels.false_barge_ins == [3.2] and labels.timed_cues == [1.3]
    assert labels.delegations == [(3.4, "12 * 7")]


def test_a_listener_sound_near_the_line_end_is_not_a_cough_test():
    # The model's line runs 1.0-5.0 s. A cough at 2.0 s leaves 3 s of it: a stop within 0.5 s is a false stop. One
    # at 4.4 s comes 0.6 s before the line ends, where the reference stops too: measured apart. The model (10 ms
    # frames) speaks 1.0-2.3 s and 2.6-4.6 s: it stops 0.3 s after the first cough and 0.2 s after the second.
    from tml.eval.duplex import episode_metrics

    events = [{"type": "utterance_start", "time": 1.0, "speaker": "model", "kind": "long_talk"},
              {"type": "non_interruption", "time": 2.0, "speaker": "user", "what": "cough"},
              {"type": "non_interruption", "time": 4.4, "speaker": "user", "what": "backchannel"},
              {"type": "utterance_end", "time": 5.0, "speaker": "model", "kind": "long_talk"}]
    labels = labels_from_events(events, 6.0)
    assert labels.false_barge_ins == [2.0] and labels.sounds_at_line_end == [4.4]
    active = torch.zeros(600, dtype=torch.bool)
    active[100:230] = active[260:460] = True
    m = episode_metrics(labels, active, [])
    assert m["false_stop"] == [1] and m["stop_at_line_end"] == [1]


def test_silence_rule_latencies_equal_the_hand_computation(tmp_path):
    # A 10 ms frame is speech while its 25 ms window overlaps the noise, so after noise ending at e the first silent
    # frame is ceil((e + 0.0125) / 0.01): 102 for e = 1.0, 262 for e = 2.6. With a 0.3 s gap (30 frames) the rule
    # speaks from the 30th silent frame: 1.31 s and 2.91 s on the input clock, heard 0.2 s later (playback clock):
    # 1.51 s and 3.11 s, latencies 0.51 s. The user cuts in at 2.0: the rule is silent from frame 200 on (frame
    # 199's window holds only 40 tapered noise samples), heard from 2.2: stop latency 0.2. It goes on through the
    # cough at 3.2 s, and its onset heard at 1.51 s is within 0.5 s of the timer target 1.3 s. Its constant-frame
    # hum is speech only to the log-mel fallback (Silero hears none: tests/test_vad.py), which this arithmetic uses.
    layout, dmel = MicroTurnLayout(LayoutConfig()), DMelTokenizer()
    text = train_bpe(["hello there"] * 10, 300, tmp_path / "tokenizer.json")
    result = evaluate(lambda: SilenceRuleResponder(layout, dmel, gap_s=0.3, speak_s=1.0), [noise_episode()], layout,
                      dmel, text, tmp_path / "out", VADConfig(method="logmel"))
    per = json.loads((tmp_path / "out" / "eval.json").read_text())["per_episode"][0]
    assert per["latency"] == pytest.approx([0.51, 0.51], abs=1e-9)
    assert per["stopped"] == [1] and per["stop_latency"] == pytest.approx([0.2], abs=1e-9)
    assert per["false_stop"] == [0] and per["on_time"] == [1]
    assert result["metrics"]["turn_taking_latency_mean_s"] == pytest.approx(0.51)
    assert result["metrics"]["interruption_stop_rate"] == 1.0 and result["metrics"]["false_barge_in_rate"] == 0.0
    for name in ("latencies.png", "timeline_noise.png", "dialogue_noise.wav"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_evaluate_recipe_on_a_real_checkpoint(tmp_path, tiny_run):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    run = tiny_run
    for responder, seeds in (("model", [0, 1]), ("silence_rule", [0])):
        out = tmp_path / f"eval_{responder}"
        proc = subprocess.run([sys.executable, "recipes/evaluate.py", f"checkpoint={run}", f"responder={responder}",
                               "episodes=2", f"eval.seeds=[{','.join(map(str, seeds))}]", f"hydra.run.dir={out}"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for seed in seeds:
            result = json.loads((out / f"seed_{seed}" / "eval.json").read_text())
            assert result["metrics"]["episodes"] == 2 and len(result["per_episode"]) == 2
            assert (out / f"seed_{seed}" / "latencies.png").exists()
        assert list((out / "seed_0").glob("timeline_*.png")) and list((out / "seed_0").glob("dialogue_*.wav"))
        report = json.loads((out / "report.json").read_text())
        assert report["seeds"] == seeds and (report["baseline"] is not None) == (responder == "model")
        # two episodes hold far fewer than 10 barge-ins: flagged, never a number
        barge = report["model"]["barge_in_stop_rate"]
        assert barge["value"] is None and barge["flag"].startswith("too few events")
        assert "| barge_in_stop_rate" in (out / "report.md").read_text() and "flagged" in proc.stdout
        log = (out / "evaluate.log").read_text()  # what it printed, in its log file
        assert proc.stdout.strip() and all(line in log for line in proc.stdout.splitlines())
    wav = tmp_path / "user.wav"
    write_wav(wav, noise_episode().audio["user"][: SR], SR)
    out = tmp_path / "converse"
    proc = subprocess.run([sys.executable, "recipes/converse.py", f"checkpoint={run}", f"input={wav}",
                           f"hydra.run.dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("micro-turn ") == 5  # 1 s = 5 micro-turns, each with its compute time
    assert (out / "converse.log").read_text().count("micro-turn ") == 5
    stereo, sr = read_wav(out / "dialogue.wav")
    assert sr == SR and stereo.shape == (2, SR)
    # the model's side on the playback clock: nothing is heard before micro-turn 0's output plays at 0.2 s + compute
    assert stereo[1, :3200].abs().max() == 0


class ScriptedResponder:
    """A policy with a known delay: after the user has spoken, it speaks (a loud constant frame, and the word "yes")
    in the output of the ``n``-th fully silent input micro-turn, for ``speak_turns`` micro-turns, and reports
    ``compute_s`` per micro-turn. The user is "speaking" in a micro-turn when its input samples are not all zero."""

    def __init__(self, layout, dmel, text, n: int, speak_turns: int = 3, compute_s: float = 0.0):
        self.layout, self.dmel, self.n, self.speak_turns, self.compute_s = layout, dmel, n, speak_turns, compute_s
        self.word = text.word_ids("yes")
        self.pad = text.pad_id
        self.silent_turns, self.spoke, self.left, self.turn = 0, False, 0, 0

    def step(self, inputs):
        from tml.eval.session import MicroTurnOutputs

        if inputs.user_audio.abs().max() > 0:
            self.spoke, self.silent_turns = True, 0
        else:
            self.silent_turns += 1
            if self.spoke and self.silent_turns == self.n:
                self.left, self.spoke = self.speak_turns, False
        F, C = self.layout.frames_per_turn, self.layout.cfg.n_mels
        speaking = self.left > 0
        bins = torch.full((F, C), 12 if speaking else 0, dtype=torch.long)
        ids = (self.word if speaking and self.left == self.speak_turns else []) + [self.pad] * 4
        self.left -= int(speaking)
        self.turn += 1
        return MicroTurnOutputs(turn=self.turn - 1, text_ids=ids[:4], audio_bins=bins, mel=self.dmel.decode(bins),
                                wave=None, text_logits=torch.zeros(0), audio_logits=None, background_ids=[],
                                compute_s=self.compute_s)


def scripted_turn(tmp_path):
    """The scripted episode's pieces: the user speaks (noise) from 0.2 s to 1.0 s of 3 s and expects a reply by 2 s.
    Returns (layout, dmel, text tokenizer, user wave [3 * SR], events)."""
    layout, dmel = MicroTurnLayout(LayoutConfig()), DMelTokenizer()
    text = train_bpe(["yes no maybe"] * 10, 300, tmp_path / "tokenizer.json")
    user = torch.zeros(3 * SR)
    user[int(0.2 * SR) : int(1.0 * SR)] = 0.1 * torch.randn(int(0.8 * SR), generator=torch.Generator().manual_seed(0))
    events = [{"type": "utterance_start", "time": 0.2, "speaker": "user", "kind": "turn"},
              {"type": "utterance_end", "time": 1.0, "speaker": "user", "kind": "turn"},
              {"type": "expected_response", "time": 1.0, "speaker": "model", "by": 2.0}]
    return layout, dmel, text, user, events


@pytest.mark.parametrize("n, compute_s, realtime", [(1, 0.0, False), (2, 0.0, False), (2, 0.05, False),
                                                    (2, 0.05, True)])
def test_scripted_reply_delay_is_measured_exactly_on_the_playback_clock(tmp_path, n, compute_s, realtime):
    # The user speaks in micro-turns 1..4 (0.2-1.0 s) and stops at e = 1.0 s. The responder's n-th silent input
    # micro-turn is 4 + n; its output is computed once that input has arrived, at (4 + n + 1) * 0.2 s, and plays then
    # (plus compute, when measured: a constant 0.05 s < 0.2 s never builds a backlog). So the latency is
    # (5 + n) * 0.2 - 1.0 = n * 0.2 (+ compute): one micro-turn more than placing output at its own micro-turn would say.
    layout, dmel, text, user, events = scripted_turn(tmp_path)
    events = events + [{"type": "utterance_start", "time": 1.0, "speaker": "model", "kind": "answer", "text": "yes"}]
    episode = Episode(key="scripted", duration=3.0, sample_rate=SR, audio={"user": user, "model": torch.zeros(3 * SR)},
                      meta={"events": events})
    delay = n * 0.2 + (0.0 if realtime else compute_s)
    run = run_episode(ScriptedResponder(layout, dmel, text, n, compute_s=compute_s), episode, layout, dmel, text)
    assert run.text_by_turn == [(4 + n, "yes")]
    assert heard_text(run, layout, realtime) == [(pytest.approx(1.0 + delay, abs=1e-9), "yes")]
    result = evaluate(lambda: ScriptedResponder(layout, dmel, text, n, compute_s=compute_s), [episode], layout, dmel,
                      text, tmp_path / "out", VADConfig(method="logmel"), n_wavs=0, n_timelines=0, realtime=realtime)
    per = result["per_episode"][0]
    assert per["latency"] == pytest.approx([delay], abs=1e-9)
    assert per["answer_ok"] == [1]
    assert result["metrics"]["max_lag_s"] == pytest.approx(0.0 if realtime else compute_s, abs=1e-9)


def test_evaluate_seeds_reports_counts_intervals_and_the_baseline(tmp_path):
    # 12 copies of the scripted episode, three seeds: the responder replying after 1 micro-turn answers every reply
    # gap at 0.2 s, the "baseline" replying after 3 at 0.6 s; 12 events per seed, intervals collapse on the value.
    # Then a responder whose compute (0.3 s per 0.2 s micro-turn) falls behind: the report warns.
    layout, dmel, text, user, events = scripted_turn(tmp_path)
    episodes = [Episode(key=f"ep{i}", duration=3.0, sample_rate=SR, audio={"user": user, "model": 0 * user},
                        meta={"events": events}) for i in range(12)]
    seen = []

    def make(seed):
        seen.append(seed)
        return ScriptedResponder(layout, dmel, text, 1)

    report = evaluate_seeds(make, episodes, layout, dmel, text, tmp_path / "out", EvalConfig(), VADConfig("logmel"),
                            realtime=True, make_baseline=lambda: ScriptedResponder(layout, dmel, text, 3))
    assert sorted(set(seen)) == [0, 1, 2] and len(seen) == 3 * 12  # a fresh responder per episode and seed
    lat = report["model"]["latency_median_s"]
    assert lat["value"] == pytest.approx(0.2) and lat["ci"] == pytest.approx([0.2, 0.2]) and lat["events_per_seed"] == [12] * 3
    assert report["baseline"]["latency_median_s"]["value"] == pytest.approx(0.6)
    assert report["model"]["response_rate"]["value"] == 1.0 and report["warning"] is None
    rows = {line.split(" (")[0]: line for line in (tmp_path / "out" / "report.md").read_text().splitlines()}
    assert rows["| latency_median_s"].endswith("| yes |") and "n=12/12/12" in rows["| latency_median_s"]
    assert (tmp_path / "out" / "seed_2" / "eval.json").exists() and (tmp_path / "out" / "baseline" / "eval.json").exists()
    slow = evaluate_seeds(lambda seed: ScriptedResponder(layout, dmel, text, 1, compute_s=0.3), episodes[:1], layout,
                          dmel, text, tmp_path / "slow", EvalConfig(seeds=[0]), VADConfig("logmel"))
    # micro-turn t is ready at 0.3 * (t + 1) (compute back to back), due at 0.2 * (t + 1): lag 0.3 + 0.1 * t, 1.7 s at t=14
    assert slow["max_lag_s"] == pytest.approx(1.7) and "realtime=true" in slow["warning"]


def test_batched_evaluation_equals_one_episode_at_a_time(tmp_path):
    # Three episodes of different lengths (sessions leave the batch as their episode ends), sampled at temperature 1:
    # the batched run writes, per episode, exactly what a fresh single session writes. (Not greedy: an untrained
    # model's logits sit near ties, and kernels for different batch sizes differ by ~1e-7, enough to flip an argmax
    # on some CPUs; a draw at temperature 1 flips only when its uniform lands within that of a boundary.)
    from tml.eval.evaluate import run_episode, run_episodes
    from tml.eval.session import SessionConfig, StreamingSession
    from tml.model import InteractionModel, ModelConfig, MoEConfig
    from tml.model.sampling import SamplingConfig

    layout, dmel = MicroTurnLayout(LayoutConfig()), DMelTokenizer()
    text = train_bpe(["hello there"] * 10, 300, tmp_path / "tokenizer.json")
    torch.manual_seed(0)
    model = InteractionModel(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=text.vocab_size,
                                         moe=MoEConfig(hidden_dim=64, num_experts=4, top_k=2))).eval()
    cfg = SessionConfig(sampling=SamplingConfig(text_temperature=1.0, audio_temperature=1.0, seed=3))
    base = noise_episode()
    episodes = []
    for key, seconds in (("a", 1.6), ("b", 4.0), ("c", 2.4)):
        n = int(seconds * SR)
        episodes.append(Episode(key=key, duration=seconds, sample_rate=SR,
                                audio={k: v[:n] for k, v in base.audio.items()}, meta=base.meta))
    single = [run_episode(StreamingSession(model, layout, dmel, cfg, text.pad_id), e, layout, dmel, text)
              for e in episodes]
    batched = run_episodes(lambda n: StreamingSession(model, layout, dmel, cfg, text.pad_id, sessions=n), episodes,
                           layout, dmel, text, batch_size=2)
    for s, b in zip(single, batched):
        assert s.key == b.key and s.text_by_turn == b.text_by_turn and s.text_ids == b.text_ids
        assert s.model_mel.shape == b.model_mel.shape and torch.equal(s.model_mel, b.model_mel)
    assert [r.model_mel.shape[0] for r in batched] == [160, 400, 240]
