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
on all spoken words and background texts), ``manifest.json`` (written last; its presence means the set is
complete).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from data_prep.espeak import EspeakVoice
from tml.streams.episode import BackgroundEvent, Episode, Word
from tml.text.tokenizer import SPECIAL_TOKENS, train_bpe

GENERATOR = "data_prep.synth_dialogues"
GENERATOR_VERSION = "1.0"
SAMPLE_RATE = 16000
VIDEO_FPS = 5
VIDEO_SIZE = 80
TURN_QUANTUM = 0.2  # episode durations are whole micro-turns (200 ms)
USER_VOICES = ("en-us", "en-us+m3", "en-us+f2", "en-us+m7", "en-us-nyc")
MODEL_VOICE = "en+f3"  # British English, female variant: one consistent model persona
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # byte alphabet + special tokens


@dataclass
class SynthConfig:
    out: str = "data/synthetic_tiny"
    episodes: int = 96
    seed: int = 0
    shard_size: int = 24  # 96 episodes -> 4 shards, so 4 data-loader workers / ranks each get one
    vocab_size: int = 512
    min_duration: float = 6.0
    max_duration: float = 14.0
    background_prob: float = 0.3  # episodes with a background-model lookup
    backchannel_prob: float = 0.25  # episodes where the model says "right." during a long user turn
    workers: int = 2


# ---------------------------------------------------------------------------------------------------------------
# Text: templates and slot vocabularies
# ---------------------------------------------------------------------------------------------------------------

NAMES = ["Anna", "Ben", "Chloe", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack", "Maya", "Noah",
         "Olivia", "Sam", "Lucy", "Omar"]
CAPITALS = {"France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo",
            "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
            "Greece": "Athens", "Ireland": "Dublin", "Poland": "Warsaw", "Chile": "Santiago", "India": "New Delhi",
            "Portugal": "Lisbon"}
CITIES = ["Paris", "Tokyo", "London", "Berlin", "Madrid", "Cairo", "Sydney", "Toronto", "Boston", "Lima", "Oslo",
          "Rome", "Seattle", "Dublin"]
WEATHER = ["sunny", "cloudy", "rainy", "windy", "foggy", "snowy", "clear"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
FAVOURITES = {"colour": ["blue", "green", "red", "yellow", "purple", "orange"],
              "food": ["pasta", "soup", "rice", "pizza", "salad", "noodles", "bread"],
              "animal": ["cat", "dog", "horse", "owl", "fox", "rabbit", "dolphin"],
              "season": ["spring", "summer", "autumn", "winter"],
              "sport": ["tennis", "football", "swimming", "running", "chess"]}
ACTIVITIES = ["go for a walk", "visit my sister", "read a book", "cook dinner", "watch a film", "go swimming",
              "clean the kitchen", "play football", "bake some bread", "meet a friend"]
WHEN = ["later", "this evening", "tomorrow", "on Saturday", "after lunch", "tonight", "next week"]
SPELL_WORDS = ["cat", "dog", "sun", "tree", "book", "fish", "milk", "rain", "blue", "star", "moon", "bird"]
UNITS = [("grams", "kilograms", 1000), ("metres", "kilometres", 1000), ("minutes", "hours", 60),
         ("seconds", "minutes", 60), ("centimetres", "metres", 100), ("days", "weeks", 7)]
# Ball / background colours for the video, with their names (the vision questions ask about them).
BALL_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 70), "blue": (40, 80, 220), "yellow": (235, 215, 40),
                "orange": (245, 140, 30), "purple": (140, 60, 190), "white": (245, 245, 245)}
BACKGROUNDS = {"grey": (128, 128, 128), "black": (15, 15, 15), "dark blue": (20, 30, 70),
               "dark green": (20, 60, 35), "brown": (90, 60, 40)}

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def num_words(n: int) -> str:
    """0 <= n < 1000 -> English words ("forty-two"), so numbers appear both as digits and as words."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + num_words(rest))


def say_num(rng: random.Random, n: int) -> str:
    return num_words(n) if n < 100 and rng.random() < 0.5 else str(n)


@dataclass
class Line:
    """One scripted utterance; ``gap`` is the silence before it (negative = overlap with the previous turn)."""

    speaker: str  # user | model
    text: str
    kind: str = "turn"  # turn | delegate (model hands off to the background model) | answer | backchannel
    result: str | None = None  # for kind=delegate: the background result text
    query: str | None = None  # for kind=delegate: what was asked of the background model
    result_delay: float = 0.0  # for kind=delegate: seconds from the end of this line to the result


@dataclass
class VideoSpec:
    ball: str
    background: str
    radius: int
    x0: float
    y0: float
    vx: float  # px/s
    vy: float


def _pick(rng: random.Random, options: list[str]) -> str:
    return rng.choice(options)


def opener(rng: random.Random) -> list[Line]:
    name = rng.choice(NAMES)
    hi = _pick(rng, ["hi there.", "hello.", "hey.", "good morning.", "good afternoon.", f"hi, it's {name}."])
    hello = f"hello {name}!" if "it's" in hi else _pick(rng, ["hello!", "hi!", "hey!"])
    how, reply = rng.choice([
        ("how are you?", _pick(rng, [f"{hello} I'm doing well, thanks.", f"{hello} I'm fine, thank you."])),
        ("how is it going?", _pick(rng, [f"{hello} all good here.", f"{hello} pretty well, thanks."])),
        ("are you there?", _pick(rng, ["yes, I'm here. how can I help?", f"{hello} yes, I'm listening."])),
        ("can you help me?", _pick(rng, ["of course. what do you need?", f"{hello} sure, go ahead."])),
    ])
    return [Line("user", f"{hi} {how}"), Line("model", reply)]


def closer(rng: random.Random) -> list[Line]:
    thanks = _pick(rng, ["thanks!", "thank you.", "great, thanks a lot.", "okay, thanks.", "perfect, thank you."])
    reply = _pick(rng, ["you're welcome.", "any time!", "happy to help.", "no problem.", "my pleasure."])
    return [Line("user", thanks), Line("model", reply)]


def topic_capital(rng: random.Random, video: VideoSpec) -> list[Line]:
    country = rng.choice(list(CAPITALS))
    city = CAPITALS[country]
    if rng.random() < 0.5:
        return [Line("user", f"what is the capital of {country}?"),
                Line("model", _pick(rng, [f"the capital of {country} is {city}.", f"it's {city}.",
                                          f"{city} is the capital of {country}."]))]
    return [Line("user", f"which country is {city} in?"),
            Line("model", _pick(rng, [f"{city} is in {country}.", f"that would be {country}."]))]


def topic_arithmetic(rng: random.Random, video: VideoSpec) -> list[Line]:
    a, b = rng.randint(1, 12), rng.randint(1, 12)
    op, c = rng.choice([("plus", a + b), ("times", a * b), ("minus", a - b) if a >= b else ("plus", a + b)])
    q = _pick(rng, [f"what is {say_num(rng, a)} {op} {say_num(rng, b)}?",
                    f"can you tell me {say_num(rng, a)} {op} {say_num(rng, b)}?"])
    lines = [Line("user", q), Line("model", f"{say_num(rng, a)} {op} {say_num(rng, b)} is {say_num(rng, c)}.")]
    if rng.random() < 0.5:
        d = rng.randint(1, 9)
        lines += [Line("user", f"and plus {say_num(rng, d)}?"),
                  Line("model", _pick(rng, [f"that makes {say_num(rng, c + d)}.", f"then it's {c + d}."]))]
    return lines


def topic_counting(rng: random.Random, video: VideoSpec) -> list[Line]:
    a = rng.randint(1, 15)
    b = a + rng.randint(3, 5)
    seq = ", ".join(num_words(i) for i in range(a, b + 1))
    return [Line("user", f"can you count from {num_words(a)} to {num_words(b)}?"),
            Line("model", f"sure. {seq}.")]


def topic_days(rng: random.Random, video: VideoSpec) -> list[Line]:
    if rng.random() < 0.5:
        i = rng.randrange(7)
        return [Line("user", f"what day comes after {DAYS[i]}?"),
                Line("model", f"after {DAYS[i]} comes {DAYS[(i + 1) % 7]}.")]
    i = rng.randrange(12)
    return [Line("user", f"which month comes before {MONTHS[i]}?"),
            Line("model", f"{MONTHS[i - 1]} comes before {MONTHS[i]}.")]


def topic_spelling(rng: random.Random, video: VideoSpec) -> list[Line]:
    w = rng.choice(SPELL_WORDS)
    return [Line("user", f"how do you spell {w}?"),
            Line("model", f"{w} is spelled {' '.join(w.upper())}.")]


def topic_favourite(rng: random.Random, video: VideoSpec) -> list[Line]:
    thing = rng.choice(list(FAVOURITES))
    mine, theirs = rng.sample(FAVOURITES[thing], 2)
    return [Line("user", f"what is your favourite {thing}?"),
            Line("model", f"I like {mine}. what about you?"),
            Line("user", _pick(rng, [f"I prefer {theirs}.", f"mine is {theirs}.", f"probably {theirs}."])),
            Line("model", _pick(rng, [f"{theirs} is a good choice.", f"oh, {theirs} is nice too.",
                                      f"I can see why you like {theirs}."]))]


def topic_plans(rng: random.Random, video: VideoSpec) -> list[Line]:
    w = rng.choice(["lovely", "rainy", "cold", "warm", "windy", "quiet"])
    act, when = rng.choice(ACTIVITIES), rng.choice(WHEN)
    return [Line("user", f"what a {w} day."),
            Line("model", _pick(rng, [f"yes, it is really {w}. any plans?", "it is. what are you up to?"])),
            Line("user", f"I want to {act} {when}."),
            Line("model", _pick(rng, ["that sounds fun.", "nice, enjoy it!", "good idea.", "sounds lovely."]))]


def topic_video(rng: random.Random, video: VideoSpec) -> list[Line]:
    size = "big" if video.radius >= 10 else "small"
    q = rng.choice(["ball", "background", "size"])
    if q == "ball":
        return [Line("user", _pick(rng, ["what colour is the ball?", "can you see the ball? what colour is it?"])),
                Line("model", _pick(rng, [f"the ball is {video.ball}.", f"it's a {video.ball} ball."]))]
    if q == "background":
        return [Line("user", "what colour is the background?"),
                Line("model", f"the background is {video.background}.")]
    return [Line("user", "is the ball big or small?"),
            Line("model", f"it's a {size} {video.ball} ball.")]


def topic_tool(rng: random.Random, video: VideoSpec) -> list[Line]:
    """Delegation: the model hands the request to the background model and answers when the result arrives."""
    delay = round(rng.uniform(1.0, 2.0), 3)
    wait = _pick(rng, ["let me check.", "one moment, let me check.", "let me look that up.", "hold on, checking."])
    kind = rng.choice(["multiply", "weather", "convert"])
    if kind == "multiply":
        a, b = rng.randint(13, 99), rng.randint(11, 29)
        return [Line("user", f"what is {a} times {b}?"),
                Line("model", wait, "delegate", f"result: {a * b}", f"{a} * {b}", delay),
                Line("model", _pick(rng, [f"{a} times {b} is {a * b}.", f"it's {a * b}."]), "answer")]
    if kind == "weather":
        city, w, t = rng.choice(CITIES), rng.choice(WEATHER), rng.randint(-5, 32)
        temp = f"{t}" if t >= 0 else f"minus {-t}"
        return [Line("user", f"what is the weather like in {city}?"),
                Line("model", wait, "delegate", f"result: {w}, {t} degrees", f"weather {city}", delay),
                Line("model", f"it is {w} in {city}, {temp} degrees.", "answer")]
    small, big, k = rng.choice(UNITS)
    n = rng.randint(2, 9)
    return [Line("user", f"how many {small} are in {num_words(n)} {big}?"),
            Line("model", wait, "delegate", f"result: {n * k} {small}", f"{n} {big} in {small}", delay),
            Line("model", f"{num_words(n)} {big} is {n * k} {small}.", "answer")]


TOPICS = [topic_capital, topic_arithmetic, topic_counting, topic_days, topic_spelling, topic_favourite,
          topic_plans, topic_video]


# ---------------------------------------------------------------------------------------------------------------
# Audio: speak lines, place them on one timeline
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Spoken:
    line: Line
    wave: torch.Tensor  # float32 [samples], trimmed to the speech (first word start .. last word end)
    words: list[Word]  # times relative to the start of ``wave``
    gap: float  # silence before this line (negative = overlap)
    start: float = 0.0  # absolute, set by the layout

    @property
    def dur(self) -> float:
        return self.wave.numel() / SAMPLE_RATE


def speak_line(line: Line, voice: EspeakVoice) -> tuple[torch.Tensor, list[Word]]:
    """Speak a line and trim it to its speech, so placement times are speech onsets."""
    wave, words = voice.speak(line.text, SAMPLE_RATE)
    a, b = round(words[0].start * SAMPLE_RATE), round(words[-1].end * SAMPLE_RATE)
    t0 = a / SAMPLE_RATE
    return wave[a:b].clone(), [Word(w.text, w.start - t0, w.end - t0) for w in words]


def sample_gap(rng: random.Random, prev: Line | None, line: Line) -> float:
    if prev is None:
        return 0.0  # the first line starts after the episode's lead-in instead
    if prev.kind == "delegate":
        return prev.result_delay + rng.uniform(0.25, 0.6)  # wait for the result, then react to it
    if prev.speaker == line.speaker:
        return rng.uniform(0.35, 0.8)  # same speaker goes on after a pause
    # Turn switch: median 200 ms, ~18% overlaps (negative), a few long pauses (conversation-analysis stats).
    return min(max(rng.gauss(0.2, 0.22), -0.3), 1.0)


def layout(turns: list[Spoken], lead: float) -> float:
    """Set ``start`` of every turn (the first at ``lead`` seconds); returns the end of the last one."""
    last_end = {"user": -1.0, "model": -1.0}
    prev: Spoken | None = None
    for s in turns:
        if prev is None:
            s.start = lead
        else:
            prev_end = prev.start + prev.dur
            # An overlap only eats the tail of the previous turn, and a speaker never overlaps itself.
            s.start = max(prev_end + s.gap, prev.start + 0.3, last_end[s.line.speaker] + 0.15)
        last_end[s.line.speaker] = s.start + s.dur
        prev = s
    return max(last_end.values())


def place_backchannel(rng: random.Random, turns: list[Spoken], bc: Spoken) -> bool:
    """Put a model backchannel after a word in the middle of a long user turn, clear of other model speech."""
    model_spans = [(t.start, t.start + t.dur) for t in turns if t.line.speaker == "model"]
    for u in [t for t in turns if t.line.speaker == "user" and t.dur >= 1.5]:
        inner = [w for w in u.words[:-1] if 0.3 * u.dur <= w.end <= 0.7 * u.dur]
        rng.shuffle(inner)
        for w in inner:
            t = u.start + w.end + 0.15
            if all(t + bc.dur + 0.2 <= a or t - 0.2 >= b for a, b in model_spans):
                bc.start = t
                return True
    return False


# ---------------------------------------------------------------------------------------------------------------
# Video: a ball bouncing on a plain background
# ---------------------------------------------------------------------------------------------------------------

def _bounce(p0: torch.Tensor, v: float, t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Position of a point moving at ``v`` from ``p0`` and reflecting off walls at lo/hi (triangle wave)."""
    span = hi - lo
    u = torch.remainder(p0 - lo + v * t, 2 * span)
    return lo + torch.where(u <= span, u, 2 * span - u)


def render_video(spec: VideoSpec, n_frames: int, fps: float = VIDEO_FPS, size: int = VIDEO_SIZE) -> torch.Tensor:
    """uint8 [n_frames, size, size, 3]: a ``spec.ball`` disc on a ``spec.background`` field."""
    t = torch.arange(n_frames, dtype=torch.float32) / fps
    x = _bounce(torch.tensor(spec.x0), spec.vx, t, spec.radius, size - 1 - spec.radius)
    y = _bounce(torch.tensor(spec.y0), spec.vy, t, spec.radius, size - 1 - spec.radius)
    grid = torch.arange(size, dtype=torch.float32)
    inside = ((grid[None, None, :] - x[:, None, None]) ** 2
              + (grid[None, :, None] - y[:, None, None]) ** 2) <= spec.radius ** 2  # [frames, H, W]
    bg = torch.tensor(BACKGROUNDS[spec.background], dtype=torch.uint8)
    fg = torch.tensor(BALL_COLOURS[spec.ball], dtype=torch.uint8)
    return torch.where(inside[..., None], fg, bg).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# One episode
# ---------------------------------------------------------------------------------------------------------------

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

    topic = topic_tool if rng.random() < cfg.background_prob else rng.choice(TOPICS)
    main = topic(rng, video)
    blocks = [main]
    if len(main) <= 3 and rng.random() < 0.6:
        blocks.insert(0, opener(rng))
    if sum(map(len, blocks)) <= 3 and rng.random() < 0.5:
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
    bc = None
    if rng.random() < cfg.backchannel_prob:
        line = Line("model", _pick(rng, ["right.", "okay.", "I see.", "yeah.", "uh huh."]), "backchannel")
        bc = Spoken(line, *speak_line(line, model_voice), gap=0.0)
    lead, tail = rng.uniform(0.2, 0.8), rng.uniform(0.3, 1.0)

    # Too long: drop the greeting, then the closing; the main topic always stays.
    while True:
        turns = [s for block in spoken for s in block]
        end = layout(turns, lead)
        if end + tail <= cfg.max_duration or len(spoken) == 1:
            break
        spoken.pop(0 if spoken[0][0].line is not main[0] else -1)
    if bc is not None and place_backchannel(rng, turns, bc):
        turns = sorted(turns + [bc], key=lambda s: s.start)

    duration = math.ceil(max(end + tail, cfg.min_duration) / TURN_QUANTUM - 1e-9) * TURN_QUANTUM
    duration = round(duration, 3)
    n = round(duration * SAMPLE_RATE)
    audio = {"user": torch.zeros(n), "model": torch.zeros(n)}
    words: dict[str, list[Word]] = {"user": [], "model": []}
    background: list[BackgroundEvent] = []
    for s in turns:
        a = round(s.start * SAMPLE_RATE)
        track = audio[s.line.speaker]
        track[a:a + s.wave.numel()] += s.wave[: n - a]
        words[s.line.speaker] += [Word(w.text, round(s.start + w.start, 4), round(s.start + w.end, 4))
                                  for w in s.words]
        if s.line.kind == "delegate":
            background.append(BackgroundEvent(round(s.start + s.dur + s.line.result_delay, 3), s.line.result))
    for k in audio:
        audio[k] = audio[k].clamp_(-1.0, 1.0)

    turn_meta = []
    for s in turns:
        m = {"speaker": s.line.speaker, "start": round(s.start, 4), "end": round(s.start + s.dur, 4),
             "text": s.line.text, "kind": s.line.kind}
        if s.line.kind == "delegate":
            m.update(query=s.line.query, result=s.line.result)
        turn_meta.append(m)
    meta = {
        "generator": GENERATOR, "version": GENERATOR_VERSION, "seed": cfg.seed, "index": index,
        "voices": {k: {"name": v.name, "rate": v.rate, "pitch": v.pitch} for k, v in voices.items()},
        "topic": topic.__name__.removeprefix("topic_"),
        "turns": turn_meta,
        "video": {"ball": video.ball, "background": video.background, "radius": video.radius},
    }
    return Episode(key=f"s{cfg.seed}_{index:06d}", duration=duration, sample_rate=SAMPLE_RATE, audio=audio,
                   words=words, video=render_video(video, round(duration * VIDEO_FPS)), video_fps=float(VIDEO_FPS),
                   background=background, meta=meta)


# ---------------------------------------------------------------------------------------------------------------
# The set: shards, tokenizer, manifest
# ---------------------------------------------------------------------------------------------------------------

def _worker_init() -> None:
    torch.set_num_threads(1)  # one process per core; espeak and torch stay single-threaded inside it


def _episode_sample(job: tuple[int, dict]) -> tuple[dict, float, list[str]]:
    """(index, SynthConfig as dict) -> (webdataset sample, duration, texts for the tokenizer), in a worker."""
    ep = make_episode(job[0], SynthConfig(**job[1]))
    texts = [t["text"] for t in ep.meta["turns"]] + [e.text for e in ep.background]
    return ep.to_sample(), ep.duration, texts


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
    ctx.set_forkserver_preload(["torch", "torchaudio", "tml.streams.episode", "data_prep.espeak"])
    return ctx.Pool(workers, initializer=_worker_init, maxtasksperchild=1)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def generate(cfg: SynthConfig) -> dict:
    """Write the whole set into ``cfg.out``; returns the manifest.

    Shards are written into ``out/.partial`` and moved in only when all are done; ``manifest.json`` is removed
    first and written last (atomically), so an interrupted run never leaves a manifest next to incomplete shards.
    """
    import webdataset as wds  # heavy import, only needed here

    if cfg.episodes < 1 or cfg.shard_size < 1:
        raise ValueError(f"--episodes={cfg.episodes} and --shard-size={cfg.shard_size} must be >= 1")
    if cfg.vocab_size < MIN_VOCAB:
        raise ValueError(f"--vocab-size={cfg.vocab_size}: a byte-level BPE needs at least {MIN_VOCAB} ids")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    partial = out / ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()

    # Jobs carry the config as a dict and the worker is looked up in the importable module (not __main__ under
    # `python -m`), so the forked workers can unpickle both.
    jobs = [(i, asdict(cfg)) for i in range(cfg.episodes)]
    worker = importlib.import_module(GENERATOR)._episode_sample
    texts: list[str] = []
    durations: list[float] = []
    counts: dict[str, int] = {}
    writer = wds.ShardWriter(str(partial / "shard-%06d.tar"), maxcount=cfg.shard_size, verbose=0,
                             mtime=0.0)  # fixed mtime: same seed -> byte-identical shards
    with _episode_pool(max(1, min(cfg.workers, cfg.episodes))) as pool:
        for sample, dur, ep_texts in pool.imap(worker, jobs):
            writer.write(sample)
            name = Path(writer.fname).name
            counts[name] = counts.get(name, 0) + 1
            durations.append(dur)
            texts += ep_texts
    writer.close()

    tok = train_bpe(texts, cfg.vocab_size, partial / "tokenizer.json")
    for old in out.glob("shard-*.tar"):  # stale shards of an earlier, larger run
        old.unlink()
    shards = []
    for name in sorted(counts):
        os.replace(partial / name, out / name)
        shards.append({"name": name, "episodes": counts[name], "sha256": _sha256(out / name)})
    os.replace(partial / "tokenizer.json", out / "tokenizer.json")
    partial.rmdir()
    manifest = {
        "generator": GENERATOR, "version": GENERATOR_VERSION, "seed": cfg.seed, "episodes": cfg.episodes,
        "hours": round(sum(durations) / 3600, 6), "shards": shards, "sample_rate": SAMPLE_RATE,
        "video": {"fps": VIDEO_FPS, "height": VIDEO_SIZE, "width": VIDEO_SIZE},
        "voices": {"user": list(USER_VOICES), "model": [MODEL_VOICE]},
        "tokenizer": "tokenizer.json", "vocab_size": tok.vocab_size,
        "license": "synthetic (espeak-ng, GPL-3.0 voices data); generated text CC0",
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / "manifest.json")
    return manifest


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
    a = p.parse_args(argv)
    cfg = SynthConfig(out=a.out, episodes=a.episodes, seed=a.seed, shard_size=a.shard_size,
                      vocab_size=a.vocab_size, workers=a.workers)
    t0 = time.perf_counter()
    try:
        m = generate(cfg)
    except ValueError as e:  # bad arguments: a usage error, not a traceback
        p.error(str(e))
    print(f"{GENERATOR}: {m['episodes']} episodes, {m['hours']:.3f} h, {len(m['shards'])} shards, "
          f"vocab {m['vocab_size']}, seed {m['seed']} -> {cfg.out} in {time.perf_counter() - t0:.1f} s")
    return m


if __name__ == "__main__":
    main()
