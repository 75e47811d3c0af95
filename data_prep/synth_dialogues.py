"""Synthetic two-party spoken dialogues with video and background-model events, as webdataset shards.

    python -m data_prep.synth_dialogues --out data/synthetic_tiny --episodes 96 --seed 0

Each episode is a short conversation (~6-14 s, 2-5 turns) between a user and the model, built from templates
(greetings, facts, arithmetic, counting, spelling, small talk, questions about the video, tool lookups). Both
sides are spoken by espeak-ng with different voices and placed on one timeline with human-like gaps (median
~200 ms, some overlaps). A bouncing ball on a plain background is the video (80x80 RGB, 5 fps); some questions
are about it. In ~30% of episodes the model delegates ("let me check"), a background result ("result: 444")
arrives 1-2 s later and the model then says the answer. Everything is deterministic from ``--seed``: episode i
depends only on (seed, i), and shards are byte-identical across runs.

Output in ``--out``: ``shard-%06d.tar`` (``Episode.to_sample()`` per episode), ``tokenizer.json`` (byte-level BPE
on all spoken words and background texts), ``dmel_ranges.json`` (per-channel dMel ranges), ``manifest.json`` (written last; its presence means the set is
complete).

Read in this order: ``data_prep.synth_content`` (what is said: templates, scenarios), ``data_prep.synth_timeline``
(speaking the lines and placing them on one clock: gaps, barge-ins, coughs, pauses, noise, event labels),
``data_prep.synth_video`` (the bouncing ball), then ``make_episode`` and ``generate`` here (one episode from
(seed, index); the set written through ``data_prep.shards.ShardSetWriter``).
"""

from __future__ import annotations

import argparse
import importlib
import math
import multiprocessing as mp
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tml.data.espeak import EspeakVoice
from data_prep.shards import ShardSetWriter, episode_seconds
from data_prep.synth_content import (SCENARIO_TOPICS, SCENARIOS, TOPICS, Line, closer, opener, pick,
                                     topic_tool)
from data_prep.synth_timeline import (SAMPLE_RATE, Spoken, add_noise, cough, fit_length, label_events, mix_tracks,
                                      place_overlay, sample_gap, speak_line)
from data_prep.synth_video import BACKGROUNDS, BALL_COLOURS, VIDEO_FPS, VIDEO_SIZE, VideoSpec, render_video
from tml.streams.episode import Episode
from tml.text.tokenizer import SPECIAL_TOKENS, train_bpe

GENERATOR = "data_prep.synth_dialogues"
GENERATOR_VERSION = "2.3"  # 2.1: delegate events; 2.2: long_talk scenario, mix flags, event counts in the manifest;
# 2.3: wait_request.quiet_from (after the model's acknowledgement)
TURN_QUANTUM = 0.2  # episode durations are whole micro-turns (200 ms)
USER_VOICES = ("en-us", "en-us+m3", "en-us+f2", "en-us+m7", "en-us-nyc")
MODEL_VOICE = "en+f3"  # British English, female variant: one consistent model persona
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # byte alphabet + special tokens
LICENSE = "synthetic (espeak-ng, GPL-3.0 voices data); generated text CC0"


@dataclass
class SynthConfig:
    out: str = "data/synthetic_tiny"
    episodes: int = 96
    seed: int = 0
    shard_size: int = 24  # 96 episodes -> 4 shards, so 4 data-loader workers / ranks each get one
    vocab_size: int = 512
    min_duration: float = 6.0
    max_duration: float = 14.0
    background_prob: float = 0.2  # episodes with a background-model lookup (the others: see SCENARIOS)
    backchannel_prob: float = 0.25  # episodes where the model says "right." during a long user turn
    listener_sound_prob: float = 0.3  # episodes where the user says "mhm", coughs or false-starts during a model turn
    pause_prob: float = 0.25  # episodes where a long user turn has a mid-sentence pause (not a turn end)
    noise_prob: float = 0.4  # episodes with background noise on the user's microphone
    noise_snrs_db: tuple = (5.0, 10.0, 20.0)
    scenario: str | None = None  # force one scenario for every episode (tool or a key of SCENARIOS)
    scenario_weights: dict | None = None  # the scenario mix (keys of SCENARIOS; absent ones get 0); None = SCENARIOS
    require: dict | None = None  # minimum count per phenomenon (keys of EVENT_COUNTS); fewer fails the run
    workers: int = 2


# What evaluation needs events of, counted from an episode's labels (the manifest records the totals):
# barge_in: the user interrupts the model while it speaks (it should stop); listener_sound: a cough, "mhm" or false
# start of the user while the model speaks (it should go on); wait_window: the user asked for quiet (it should stay
# silent); reply_gap: a user turn the model should answer.
EVENT_COUNTS = {"barge_in": "interruption", "listener_sound": "non_interruption", "wait_window": "wait_request",
                "reply_gap": "expected_response"}


def count_events(events: list[dict]) -> dict[str, int]:
    """Phenomenon -> number of its labelled events in ``events`` (one episode's ``meta["events"]``)."""
    return {name: sum(e["type"] == typ for e in events) for name, typ in EVENT_COUNTS.items()}


def parse_mix(text: str, keys, flag: str, cast=float) -> dict:
    """``"a=1,b=2"`` -> {"a": 1.0, "b": 2.0}; a key outside ``keys`` or a bad number is a usage error naming it."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in keys:
            raise ValueError(f"{flag}: {part!r} is not NAME=VALUE with NAME one of {', '.join(keys)}")
        try:
            out[key.strip()] = cast(value)
        except ValueError:
            raise ValueError(f"{flag}: {part!r}: {value!r} is not a number") from None
        if out[key.strip()] < 0:
            raise ValueError(f"{flag}: {part!r} is negative")
    return out


def make_episode(index: int, cfg: SynthConfig) -> Episode:
    """Episode ``index`` of the set with seed ``cfg.seed``.

    Text, timing plan and video depend only on (seed, index). The audio also depends on espeak-ng's internal state
    left by earlier calls in this process (a few samples of jitter), which is why ``generate`` runs every episode
    in a fresh process.
    """
    rng = random.Random(f"{GENERATOR}:{cfg.seed}:{index}")  # str seeds hash with sha512: stable across runs
    user_voice = EspeakVoice(rng.choice(USER_VOICES), rng.randint(150, 190), rng.randint(30, 70))
    model_voice = EspeakVoice(MODEL_VOICE, rng.randint(160, 185), rng.randint(50, 65))
    radius = rng.randint(6, 14)
    video = VideoSpec(ball=rng.choice(list(BALL_COLOURS)), background=rng.choice(list(BACKGROUNDS)), radius=radius,
                      x0=rng.uniform(radius, VIDEO_SIZE - 1 - radius), y0=rng.uniform(radius, VIDEO_SIZE - 1 - radius),
                      vx=rng.choice([-1, 1]) * rng.uniform(10, 40), vy=rng.choice([-1, 1]) * rng.uniform(10, 40))

    if cfg.scenario is not None and cfg.scenario != "tool" and cfg.scenario not in SCENARIOS:
        raise ValueError(f"--scenario={cfg.scenario!r}: choose tool or one of {', '.join(SCENARIOS)}")
    if cfg.scenario == "tool" or (cfg.scenario is None and rng.random() < cfg.background_prob):
        scenario = "tool"
    else:
        mix = SCENARIOS if cfg.scenario_weights is None else {k: cfg.scenario_weights.get(k, 0.0) for k in SCENARIOS}
        scenario = cfg.scenario or rng.choices(list(mix), weights=list(mix.values()))[0]
    topic = topic_tool if scenario == "tool" else SCENARIO_TOPICS.get(scenario) or rng.choice(TOPICS)
    main = topic(rng, video)
    phenomena = []
    # Silence that is not a turn end: a pause inside a long plain user turn.
    long_user = [ln for ln in main if ln.speaker == "user" and ln.kind == "turn" and ln.at is None
                 and len(ln.text.split()) >= 5]
    if long_user and rng.random() < cfg.pause_prob:
        ln = long_user[0]
        ln.pause_after, ln.pause = rng.randint(1, len(ln.text.split()) - 3), round(rng.uniform(0.6, 1.2), 3)
        phenomena.append("mid_turn_pause")
    blocks = [main]
    timed = any(ln.at is not None for ln in main)
    if len(main) <= 3 and rng.random() < 0.6:
        blocks.insert(0, opener(rng))
    if sum(map(len, blocks)) <= 3 and not timed and rng.random() < 0.5:
        blocks.append(closer(rng))

    voices = {"user": user_voice, "model": model_voice}
    spoken: list[list[Spoken]] = []
    prev: Line | None = None
    for block in blocks:
        spoken.append([])
        for line in block:
            wave, words = speak_line(line, voices[line.speaker])
            spoken[-1].append(Spoken(line, wave, words, sample_gap(rng, prev, line)))
            prev = line
    overlays = []
    if rng.random() < cfg.backchannel_prob:
        line = Line("model", pick(rng, ["right.", "okay.", "I see.", "yeah.", "uh huh."]), "backchannel")
        overlays.append(Spoken(line, *speak_line(line, model_voice), gap=0.0))
    if rng.random() < cfg.listener_sound_prob:  # the user makes a sound during a long model turn; the model goes on
        what = rng.choice(["backchannel", "cough", "false_start"])
        if what == "cough":
            overlays.append(Spoken(Line("user", "", "cough"), cough(rng), [], gap=0.0))
        else:
            text = pick(rng, ["mhm.", "yeah.", "right."] if what == "backchannel" else ["uh,", "I,", "so,"])
            line = Line("user", text, what)
            overlays.append(Spoken(line, *speak_line(line, user_voice), gap=0.0))
    lead, tail = rng.uniform(0.2, 0.8), rng.uniform(0.3, 1.0)

    turns, end = fit_length(spoken, main[0], lead, tail, cfg.max_duration)  # drops lines that do not fit
    for ov in overlays:
        if place_overlay(rng, turns, ov):
            turns = sorted(turns + [ov], key=lambda s: s.start)
            phenomena.append(f"{ov.line.speaker}_{ov.line.kind}")

    duration = math.ceil(max(end + tail, cfg.min_duration) / TURN_QUANTUM - 1e-9) * TURN_QUANTUM
    duration = round(duration, 3)
    audio, words, background = mix_tracks(turns, duration)
    noise = None
    if rng.random() < cfg.noise_prob:  # background noise on the user's microphone
        noise = {"stream": "user", "type": rng.choice(["white", "pink"]), "snr_db": rng.choice(cfg.noise_snrs_db)}
        spans = [(s.start, s.end) for s in turns if s.line.speaker == "user"]
        audio["user"] = add_noise(rng, audio["user"], spans, noise["snr_db"], noise["type"]).clamp_(-1.0, 1.0)
        phenomena.append("noise")
    said = [s for s in turns if s.line.kind not in ("backchannel", "cough", "false_start")]
    overlap = any(b.start < a.end and a.line.speaker != b.line.speaker for a, b in zip(said, said[1:]))
    phenomena += [scenario] + (["overlap"] if overlap else [])

    turn_meta = []
    for s in turns:
        m = {"speaker": s.line.speaker, "start": round(s.start, 4), "end": round(s.end, 4),
             "text": s.line.text, "kind": s.line.kind}
        if s.line.kind == "delegate":
            m.update(query=s.line.query, result=s.line.result)
        if s.cut is not None:
            m["interrupted"] = True
        turn_meta.append(m)
    meta = {
        "generator": GENERATOR, "version": GENERATOR_VERSION, "seed": cfg.seed, "index": index,
        "voices": {k: {"name": v.name, "rate": v.rate, "pitch": v.pitch} for k, v in voices.items()},
        "topic": topic.__name__.removeprefix("topic_"), "scenario": scenario, "phenomena": sorted(set(phenomena)),
        "turns": turn_meta,
        "events": label_events(turns, background, video),
        "noise": noise,
        "video": {"ball": video.ball, "background": video.background, "radius": video.radius,
                  "squares": [list(q) for q in video.squares]},
    }
    return Episode(key=f"s{cfg.seed}_{index:06d}", duration=duration, sample_rate=SAMPLE_RATE, audio=audio,
                   words=words, video=render_video(video, round(duration * VIDEO_FPS)), video_fps=float(VIDEO_FPS),
                   background=background, meta=meta)


# ---------------------------------------------------------------------------------------------------------------
# The set: shards, tokenizer, manifest
# ---------------------------------------------------------------------------------------------------------------

def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core; espeak and torch stay single-threaded inside it


def _episode_sample(job: tuple[int, dict]) -> tuple[dict, dict, list[str], list[str], dict[str, int]]:
    """(index, SynthConfig as dict) -> (webdataset sample, its ``episode_seconds``, texts for the tokenizer,
    phenomena, event counts), in a worker."""
    ep = make_episode(job[0], SynthConfig(**job[1]))
    texts = [t["text"] for t in ep.meta["turns"] if t["text"]] + [e.text for e in ep.background]
    return ep.to_sample(), episode_seconds(ep), texts, ep.meta["phenomena"], count_events(ep.meta["events"])


def _episode_pool(workers: int):
    """A pool that runs every episode in a fresh process forked from a server that has never spoken.

    espeak-ng carries synthesis state (glottal phase, pitch flutter) from one call to the next and its API cannot
    reset it, so audio would depend on which episodes a process spoke before. One process per episode, forked
    from a clean server, makes every episode a pure function of (seed, index): shards are byte-identical across
    runs, worker counts and whatever the calling process did before.
    """
    ctx = mp.get_context("forkserver")
    # The server imports the heavy dependencies once, so forks of it start in milliseconds. Not this module
    # itself: under `python -m` the workers import it as __mp_main__, and a preloaded copy would make runpy warn.
    ctx.set_forkserver_preload(["torch", "torchaudio", "tml.streams.episode", "tml.data.espeak"])
    return ctx.Pool(workers, initializer=_worker_init, maxtasksperchild=1)


def generate(cfg: SynthConfig) -> dict:
    """Write the whole set into ``cfg.out`` through ``ShardSetWriter`` (shards in ``out/.partial`` until all are
    written, ``manifest.json`` removed first and written last); returns the manifest."""
    if cfg.episodes < 1 or cfg.shard_size < 1:
        raise ValueError(f"--episodes={cfg.episodes} and --shard-size={cfg.shard_size} must be >= 1")
    if cfg.scenario is not None and cfg.scenario != "tool" and cfg.scenario not in SCENARIOS:
        raise ValueError(f"--scenario={cfg.scenario!r}: choose tool or one of {', '.join(SCENARIOS)}")
    if cfg.scenario_weights is not None and (set(cfg.scenario_weights) - set(SCENARIOS)
                                             or sum(cfg.scenario_weights.values()) <= 0):
        raise ValueError(f"--scenario-weights={cfg.scenario_weights}: names must be among {', '.join(SCENARIOS)} "
                         f"and the weights must not all be 0")
    if cfg.require is not None and set(cfg.require) - set(EVENT_COUNTS):
        raise ValueError(f"--require={cfg.require}: names must be among {', '.join(EVENT_COUNTS)}")
    if cfg.vocab_size < MIN_VOCAB:
        raise ValueError(f"--vocab-size={cfg.vocab_size}: a byte-level BPE needs at least {MIN_VOCAB} ids")

    # Jobs carry the config as a dict and the worker is looked up in the importable module (not __main__ under
    # `python -m`), so the forked workers can unpickle both.
    jobs = [(i, asdict(cfg)) for i in range(cfg.episodes)]
    worker = importlib.import_module(GENERATOR)._episode_sample
    texts: list[str] = []
    phenomena: dict[str, int] = {}
    events = dict.fromkeys(EVENT_COUNTS, 0)
    # One shard holds shard_size episodes whatever their bytes (webdataset's own 3 GB cap, as before the writer).
    with ShardSetWriter(cfg.out, shard_size=cfg.shard_size, max_shard_bytes=int(3e9)) as writer, \
            _episode_pool(max(1, min(cfg.workers, cfg.episodes))) as pool:
        for sample, seconds, ep_texts, ep_phenomena, ep_events in pool.imap(worker, jobs):
            for k, v in ep_events.items():
                events[k] += v
            for ph in ep_phenomena:
                phenomena[ph] = phenomena.get(ph, 0) + 1
            writer.write_sample(sample, seconds, source="synthetic", license=LICENSE)
            texts += ep_texts
        short = {k: (events[k], n) for k, n in (cfg.require or {}).items() if events[k] < n}
        if short:  # the set cannot measure what it was made for: no manifest, so nothing uses it by mistake
            raise ValueError("the set has too few events: " + ", ".join(f"{k} {have} < --require {k}={n}"
                                                                        for k, (have, n) in short.items())
                             + "; raise --episodes or the scenario weights / probabilities that make them")
        with tempfile.TemporaryDirectory() as tmp:
            tok = train_bpe(texts, cfg.vocab_size, Path(tmp) / "tokenizer.json")
            tokenizer = (Path(tmp) / "tokenizer.json").read_bytes()
        writer.info.update({
            "generator": GENERATOR, "version": GENERATOR_VERSION, "seed": cfg.seed, "sample_rate": SAMPLE_RATE,
            "video": {"fps": VIDEO_FPS, "height": VIDEO_SIZE, "width": VIDEO_SIZE},
            "voices": {"user": list(USER_VOICES), "model": [MODEL_VOICE]},
            "tokenizer": "tokenizer.json", "vocab_size": tok.vocab_size,
            "phenomena": dict(sorted(phenomena.items())),  # episodes showing each scenario / phenomenon
            "events": events,  # labelled events per phenomenon (count_events), what evaluation has power on
            "mix": {"scenario_weights": cfg.scenario_weights or SCENARIOS, "background_prob": cfg.background_prob,
                    "backchannel_prob": cfg.backchannel_prob, "listener_sound_prob": cfg.listener_sound_prob,
                    "pause_prob": cfg.pause_prob, "noise_prob": cfg.noise_prob},
            "license": LICENSE,
        })
        return writer.close(extra_files={"tokenizer.json": tokenizer})


def main(argv: list[str] | None = None) -> dict:
    d = SynthConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=d.out, help="output directory")
    p.add_argument("--episodes", type=int, default=d.episodes)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--shard-size", type=int, default=d.shard_size, help="episodes per shard")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="BPE vocabulary size")
    p.add_argument("--workers", type=int, default=min(d.workers, os.cpu_count() or 1), help="processes")
    p.add_argument("--scenario", default=None, help=f"make every episode this scenario: tool, {', '.join(SCENARIOS)}")
    mix = p.add_argument_group("mix", "how often each interaction phenomenon occurs (probabilities per episode)")
    mix.add_argument("--scenario-weights", default=None,
                     help="scenario mix of the episodes without a background lookup, e.g. interrupt=0.3,wait=0.2,"
                          "long_talk=0.2,dialogue=0.3 (unnamed scenarios get 0; default: "
                          + ",".join(f"{k}={v}" for k, v in SCENARIOS.items()) + ")")
    mix.add_argument("--background-prob", type=float, default=d.background_prob,
                     help="episodes with a background-model lookup (tool scenario)")
    mix.add_argument("--listener-sound-prob", type=float, default=d.listener_sound_prob,
                     help="episodes where the user coughs / says mhm / false-starts while the model speaks")
    mix.add_argument("--backchannel-prob", type=float, default=d.backchannel_prob,
                     help="episodes where the model says a backchannel during a long user turn")
    mix.add_argument("--pause-prob", type=float, default=d.pause_prob,
                     help="episodes where a long user turn has a mid-sentence pause")
    mix.add_argument("--noise-prob", type=float, default=d.noise_prob, help="episodes with microphone noise")
    p.add_argument("--require", default=None,
                   help="fail unless the set has at least this many labelled events, e.g. barge_in=30,"
                        f"listener_sound=30,wait_window=30,reply_gap=40 (names: {', '.join(EVENT_COUNTS)})")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        for key in ("background_prob", "listener_sound_prob", "backchannel_prob", "pause_prob", "noise_prob"):
            if not 0.0 <= getattr(a, key) <= 1.0:
                raise ValueError(f"--{key.replace('_', '-')}={getattr(a, key)}: a probability in [0, 1]")
        cfg = SynthConfig(out=a.out, episodes=a.episodes, seed=a.seed, shard_size=a.shard_size,
                          vocab_size=a.vocab_size, workers=a.workers, scenario=a.scenario,
                          scenario_weights=None if a.scenario_weights is None else
                          parse_mix(a.scenario_weights, SCENARIOS, "--scenario-weights"),
                          require=None if a.require is None else parse_mix(a.require, EVENT_COUNTS, "--require", int),
                          background_prob=a.background_prob, listener_sound_prob=a.listener_sound_prob,
                          backchannel_prob=a.backchannel_prob, pause_prob=a.pause_prob, noise_prob=a.noise_prob)
        m = generate(cfg)
    except ValueError as e:  # bad arguments: a usage error, not a traceback
        p.error(str(e))
    print(f"{GENERATOR}: {m['episodes']} episodes, {m['hours']:.3f} h, {len(m['shards'])} shards, "
          f"vocab {m['vocab_size']}, seed {m['seed']} -> {cfg.out} in {time.perf_counter() - t0:.1f} s; events "
          + ", ".join(f"{k} {v}" for k, v in m["events"].items()))
    return m


if __name__ == "__main__":
    main()