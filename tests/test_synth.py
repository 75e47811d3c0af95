"""Synthetic dialogues: real espeak-ng speech into real webdataset shards, read back and checked by hand rules."""

import hashlib
import json
import random
import statistics

import pytest
import torch
import webdataset as wds

from tml.data.espeak import speak
from data_prep.synth_content import Line
from data_prep.synth_dialogues import SynthConfig, main, make_episode
from data_prep.synth_timeline import sample_gap
from tml.streams.episode import Episode
from tml.text import TextTokenizer

SR = 16000


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "set"
    out.mkdir()
    (out / "shard-000009.tar").write_bytes(b"stale shard of an earlier run")
    main(["--out", str(out), "--episodes", "2", "--seed", "7", "--shard-size", "1", "--vocab-size", "300",
          "--workers", "1"])
    manifest = json.loads((out / "manifest.json").read_text())
    shards = [str(out / s["name"]) for s in manifest["shards"]]
    episodes = [Episode.from_sample(s) for s in wds.WebDataset(shards, shardshuffle=False)]
    return out, manifest, episodes


def frame_rms(x: torch.Tensor, hop: int = 160) -> torch.Tensor:
    return x[: x.numel() // hop * hop].view(-1, hop).pow(2).mean(1).sqrt()


def test_manifest_matches_shards(synth):
    out, manifest, episodes = synth
    assert manifest["episodes"] == 2 and len(episodes) == 2
    assert [s["episodes"] for s in manifest["shards"]] == [1, 1]
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [s["name"] for s in manifest["shards"]]
    for s in manifest["shards"]:
        assert hashlib.sha256((out / s["name"]).read_bytes()).hexdigest() == s["sha256"]
    assert manifest["hours"] == pytest.approx(sum(e.duration for e in episodes) / 3600, abs=1e-5)
    assert manifest["sample_rate"] == SR and manifest["video"] == {"fps": 5, "height": 80, "width": 80}
    assert not (out / ".partial").exists()
    tok = TextTokenizer.load(out / manifest["tokenizer"])
    assert tok.pad_id == 0 and tok.vocab_size == manifest["vocab_size"]
    for e in episodes:
        for w in e.words["user"] + e.words["model"]:
            assert tok.decode(tok.word_ids(w.text)) == w.text


def test_episode_streams_are_consistent(synth):
    _, _, episodes = synth
    assert len({e.key for e in episodes}) == 2
    for e in episodes:
        assert 6.0 <= e.duration <= 14.0
        n = round(e.duration * SR)
        assert e.audio["user"].shape == e.audio["model"].shape == (n,)
        assert e.video.dtype == torch.uint8 and e.video.shape == (round(e.duration * 5), 80, 80, 3)
        assert not torch.equal(e.video[0], e.video[-1])  # the ball moves
        for stream in ("user", "model"):
            ws = e.words[stream]
            assert ws, stream
            assert all(0.0 <= w.start <= w.end <= e.duration for w in ws)
            assert all(a.start <= b.start and a.end <= b.start + 1e-4 for a, b in zip(ws, ws[1:]))
        assert e.meta["voices"]["user"]["name"] != e.meta["voices"]["model"]["name"]
        assert 2 <= len([t for t in e.meta["turns"] if t["kind"] != "backchannel"]) <= 10


def test_audio_energy_follows_words(synth):
    """Speech inside each word's span; (digital) silence outside every word (and cough) of that stream, unless the
    stream has background noise."""
    _, _, episodes = synth
    for e in episodes:
        for stream in ("user", "model"):
            if (e.meta["noise"] or {}).get("stream") == stream:
                continue
            x = e.audio[stream]
            for w in e.words[stream]:
                seg = x[round(w.start * SR): round(w.end * SR)]
                assert seg.pow(2).mean().sqrt() > 0.01, (e.key, stream, w)
            inside = torch.zeros(x.numel() // 160, dtype=torch.bool)
            coughs = [(c["time"], c["end"]) for c in e.meta["events"] if c.get("what") == "cough"
                      and c["speaker"] == stream]
            for a, b in [(w.start, w.end) for w in e.words[stream]] + coughs:  # 10 ms frames (+1 frame of margin)
                inside[max(0, int(a * 100) - 1): int(b * 100) + 2] = True
            assert frame_rms(x)[~inside].max() < 1e-3, (e.key, stream)


def test_delegation_result_arrives_before_the_answer():
    ep = make_episode(0, SynthConfig(seed=1, background_prob=1.0, backchannel_prob=0.0))
    (event,) = ep.background
    turns = ep.meta["turns"]
    ask = next(t for t in turns if t["kind"] == "delegate")
    answer = next(t for t in turns if t["kind"] == "answer")
    assert event.text == ask["result"] and event.text.startswith("result: ")
    assert 1.0 <= event.time - ask["end"] <= 2.0 + 1e-3
    assert event.time < answer["start"] and answer["speaker"] == "model"


def test_turn_switch_gaps_are_human_like():
    rng = random.Random(0)
    gaps = [sample_gap(rng, Line("user", "a"), Line("model", "b")) for _ in range(2000)]
    assert 0.15 <= statistics.median(gaps) <= 0.25
    assert 0.05 <= sum(g < 0 for g in gaps) / len(gaps) <= 0.35  # some overlaps, mostly gaps


def test_same_seed_same_bytes(synth, tmp_path):
    """Byte-identical shards for the same seed, whatever the worker count and what this process spoke before."""
    _, manifest, _ = synth
    speak("something else first, to change espeak's state in this process", "en+f3", 150, 70)
    main(["--out", str(tmp_path), "--episodes", "2", "--seed", "7", "--shard-size", "1", "--vocab-size", "300",
          "--workers", "2"])
    again = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]


def test_espeak_words_and_voices_differ():
    wave_a, words = speak("hello there, how are you?", "en-us", 170, 40)
    wave_b, _ = speak("hello there, how are you?", "en+f3", 170, 60)
    assert wave_a.dtype == torch.float32 and wave_a.ndim == 1
    assert [w.text for w in words] == ["hello", "there,", "how", "are", "you?"]
    assert all(a.end <= b.start for a, b in zip(words, words[1:]))
    assert words[-1].end <= wave_a.numel() / SR
    assert not torch.equal(wave_a[: wave_b.numel()], wave_b[: wave_a.numel()])
