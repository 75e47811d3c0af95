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
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from data_prep.espeak import EspeakVoice
from data_prep.fit_dmel import RANGES_FILE, fit_dir
from tml.checksum import sha256
from tml.streams.episode import BackgroundEvent, Episode, Word
from tml.text.tokenizer import SPECIAL_TOKENS, train_bpe

GENERATOR = "data_prep.synth_dialogues"
GENERATOR_VERSION = "2.3"  # 2.1: delegate events; 2.2: long_talk scenario, mix flags, event counts in the manifest;
# 2.3: wait_request.quiet_from (after the model's acknowledgement)
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
    """One scripted utterance, placed after the previous one with a sampled human gap unless told otherwise:

    * ``at(placed, prev_end)``: absolute start time in seconds, given the lines placed so far by ``tag`` (timers,
      paced counting, reactions to the video);
    * ``barge``: a user line that starts this fraction into the previous (model) line; the model stops talking
      ``stop_delay`` seconds later (the interrupted line is cut there);
    * ``pause_after``/``pause``: a silence of ``pause`` seconds after word ``pause_after`` (not a turn end).
    """

    speaker: str  # user | model
    text: str
    # turn | delegate (model hands off to the background model) | answer | backchannel | interrupt | wait (user
    # asks for quiet) | timer_request | count | now (reaction to the video) | cough | false_start
    kind: str = "turn"
    result: str | None = None  # for kind=delegate: the background result text
    query: str | None = None  # for kind=delegate: what was asked of the background model
    result_delay: float = 0.0  # for kind=delegate: seconds from the end of this line to the result
    tag: str | None = None
    at: Callable[[dict, float], float] | None = None
    gap: float | None = None  # fixed silence before the line instead of a sampled one
    barge: float | None = None
    stop_delay: float = 0.2
    pause_after: int | None = None
    pause: float = 0.0
    optional: bool = False  # may be dropped (from the end) when the episode would run past max_duration


@dataclass
class VideoSpec:
    ball: str
    background: str
    radius: int
    x0: float
    y0: float
    vx: float  # px/s
    vy: float
    squares: list = field(default_factory=list)  # (t0, t1, x, y, side, colour name): squares that appear

    def wall_hits(self, size: int = 80) -> list[float]:
        """Times (s, > 0) at which the ball touches a wall: x or y reaches radius or size-1-radius."""
        hits = []
        for p0, v in ((self.x0, self.vx), (self.y0, self.vy)):
            span, u0 = size - 1 - 2 * self.radius, p0 - self.radius
            m = math.floor(u0 / span) + (1 if v > 0 else 0)
            for _ in range(40):
                t = (m * span - u0) / v
                if t > 0:
                    hits.append(t)
                m += 1 if v > 0 else -1
        return sorted(hits)


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


# --- interaction phenomena beyond plain turn-taking (each a scenario; events are derived from the line kinds) ---

LONG_TALK = [
    "well, there are many things to consider. first it depends on the season, then on where you want to go, and "
    "of course on how much time you have.",
    "let me explain. you mix the flour with the water, then you add a little salt, and after that you leave the "
    "dough to rest for about an hour.",
    "sure. the story begins in a small village by the sea, where an old fisherman lived with his daughter and "
    "their very lazy cat.",
]


def topic_interrupt(rng: random.Random, video: VideoSpec) -> list[Line]:
    """Barge-in: the user cuts a long model turn short; the model stops within a few hundred ms and listens."""
    if rng.random() < 0.5:
        a = rng.randint(1, 8)
        ask, talk = f"can you count from {num_words(a)} to {num_words(a + 12)}?", \
            "sure. " + ", ".join(num_words(i) for i in range(a, a + 13)) + "."
    else:
        ask, talk = _pick(rng, ["can you tell me something?", "what do you think about that?",
                                "can you explain it to me?"]), rng.choice(LONG_TALK)
    follow = rng.choice([topic_capital, topic_days, topic_spelling, topic_arithmetic])(rng, video)[:2]
    for ln in follow:
        ln.optional = True
    return [Line("user", ask), Line("model", talk),
            Line("user", _pick(rng, ["wait, stop.", "sorry, hold on.", "stop, stop.", "wait a second."]), "interrupt",
                 barge=rng.uniform(0.3, 0.6), stop_delay=round(rng.uniform(0.1, 0.35), 3)),
            Line("model", _pick(rng, ["okay.", "sure, go ahead.", "yes?"])), *follow]


def topic_long_talk(rng: random.Random, video: VideoSpec) -> list[Line]:
    """The model talks for several seconds without being cut off: where a listener's cough or "mhm" lands
    (``listener_sound_prob``) and the model must go on talking."""
    if rng.random() < 0.4:
        a = rng.randint(1, 8)
        ask, talk = f"can you count from {num_words(a)} to {num_words(a + 10)}?", \
            "sure. " + ", ".join(num_words(i) for i in range(a, a + 11)) + "."
    else:
        ask, talk = _pick(rng, ["can you tell me something?", "can you explain it to me?", "tell me a story."]), \
            rng.choice(LONG_TALK)
    return [Line("user", ask), Line("model", talk),
            Line("user", _pick(rng, ["thanks, that was nice.", "okay, got it.", "great, thank you."]), optional=True),
            Line("model", _pick(rng, ["you're welcome.", "any time!", "glad to help."]), optional=True)]


def topic_wait(rng: random.Random, video: VideoSpec) -> list[Line]:
    """The user asks for quiet; the model acknowledges and stays silent through a long pause that is not its turn."""
    q = rng.choice([topic_capital, topic_days, topic_arithmetic])(rng, video)[:2]
    return [Line("user", _pick(rng, ["hold on, let me think.", "please wait a moment.", "be quiet for a second.",
                                     "just a moment, please."]), "wait"),
            Line("model", _pick(rng, ["sure, take your time.", "okay.", "no problem."])),
            Line("user", "okay, I'm back. " + q[0].text, gap=round(rng.uniform(2.0, 4.0), 3)), q[1]]


def topic_timer(rng: random.Random, video: VideoSpec) -> list[Line]:
    """Time-aware: the model speaks when the requested number of seconds has passed."""
    n = rng.randint(3, 8)
    return [Line("user", f"tell me when {num_words(n)} seconds have passed.", "timer_request", tag="req",
                 result_delay=float(n)),
            Line("model", _pick(rng, ["okay, starting now.", "sure, I'll tell you.", "okay."])),
            Line("model", _pick(rng, ["now.", f"{num_words(n)} seconds have passed.", "time is up."]), "timer",
                 at=lambda placed, prev_end: placed["req"].end + n)]


def topic_count_pace(rng: random.Random, video: VideoSpec) -> list[Line]:
    """Counting aloud at a requested pace: number i is due ``i * pace`` after the model's go."""
    pace, said = rng.choice([(1.0, "one number per second"), (1.5, "one number every one and a half seconds"),
                             (2.0, "one number every two seconds")])
    k = rng.randint(3, min(5, int(8 / pace)))  # the count fits in the episode
    lines = [Line("user", f"count to {num_words(k)}, {said}."), Line("model", "okay.", tag="go")]
    for i in range(1, k + 1):
        lines.append(Line("model", num_words(i), "count", result_delay=pace,
                          at=lambda placed, prev_end, i=i: placed["go"].end + i * pace))
    return lines


def topic_wall(rng: random.Random, video: VideoSpec) -> list[Line]:
    """Visual timing: "say now" each time the ball touches a wall (the reaction lags the hit by ~250 ms)."""
    video.vx = math.copysign(rng.uniform(30, 40), video.vx)  # fast enough to hit a wall every ~1.5 s
    hits = video.wall_hits(VIDEO_SIZE)
    reaction = round(rng.uniform(0.2, 0.35), 3)

    def next_hit(placed: dict, prev_end: float) -> float:
        return next(h for h in hits if h + reaction >= prev_end + 0.15) + reaction

    return [Line("user", _pick(rng, ["say now when the ball hits the wall.", "tell me when the ball touches a wall."])),
            Line("model", _pick(rng, ["okay, watching.", "sure."]))] + \
        [Line("model", "now!", "now", at=next_hit, result_delay=reaction) for _ in range(rng.randint(2, 3))] + \
        [Line("user", _pick(rng, ["okay, that's enough.", "great, thanks."]))]


def topic_squares(rng: random.Random, video: VideoSpec) -> list[Line]:
    """Visual counting: squares appear one after another; asked afterwards, the model says how many it saw."""
    n, t = rng.randint(1, 4), rng.uniform(0.4, 1.0)
    for _ in range(n):
        dur, side = rng.uniform(0.8, 1.4), rng.randint(10, 18)
        video.squares.append((round(t, 3), round(t + dur, 3), rng.randint(0, VIDEO_SIZE - side),
                              rng.randint(0, VIDEO_SIZE - side), side, rng.choice(list(BALL_COLOURS))))
        t += dur + rng.uniform(0.3, 0.8)
    last = video.squares[-1][1]
    word = "square" if n == 1 else "squares"
    return [Line("user", _pick(rng, ["how many squares did you see?", "how many squares appeared?"]),
                 at=lambda placed, prev_end: max(prev_end + 0.3, last + 0.5)),
            Line("model", _pick(rng, [f"I saw {num_words(n)} {word}.", f"{num_words(n)} {word}."]))]


# Scenario mix for the episodes without a background-model lookup (weights; the mix is counted in the manifest).
# long_talk has weight 0 by default (the default set stays as it was); interaction recipes raise it.
SCENARIOS = {"dialogue": 0.4, "interrupt": 0.14, "wait": 0.1, "timer": 0.08, "count_pace": 0.08, "wall": 0.1,
             "squares": 0.1, "long_talk": 0.0}
SCENARIO_TOPICS = {"interrupt": topic_interrupt, "wait": topic_wait, "timer": topic_timer,
                   "count_pace": topic_count_pace, "wall": topic_wall, "squares": topic_squares,
                   "long_talk": topic_long_talk}

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
    cut: float | None = None  # set by the layout when the line is interrupted: seconds of it that are spoken

    @property
    def full_dur(self) -> float:
        return self.wave.numel() / SAMPLE_RATE

    @property
    def dur(self) -> float:
        return self.full_dur if self.cut is None else min(self.cut, self.full_dur)

    @property
    def end(self) -> float:
        return self.start + self.dur


def speak_line(line: Line, voice: EspeakVoice) -> tuple[torch.Tensor, list[Word]]:
    """Speak a line and trim it to its speech, so placement times are speech onsets. A line with ``pause_after``
    is spoken in two parts with ``pause`` seconds of silence between them."""
    if line.pause_after is not None:
        parts = line.text.split()
        k = line.pause_after + 1
        a = Line(line.speaker, " ".join(parts[:k]))
        b = Line(line.speaker, " ".join(parts[k:]))
        wa, xa = speak_line(a, voice)
        wb, xb = speak_line(b, voice)
        off = (wa.numel() + round(line.pause * SAMPLE_RATE)) / SAMPLE_RATE
        wave = torch.cat([wa, torch.zeros(round(line.pause * SAMPLE_RATE)), wb])
        return wave, xa + [Word(w.text, w.start + off, w.end + off) for w in xb]
    wave, words = voice.speak(line.text, SAMPLE_RATE)
    a, b = round(words[0].start * SAMPLE_RATE), round(words[-1].end * SAMPLE_RATE)
    t0 = a / SAMPLE_RATE
    return wave[a:b].clone(), [Word(w.text, w.start - t0, w.end - t0) for w in words]


def cough(rng: random.Random) -> torch.Tensor:
    """A cough-like burst (band-passed noise with a fast attack and decay), 0.2-0.35 s; not speech, no words."""
    import torchaudio.functional as AF

    n = round(rng.uniform(0.2, 0.35) * SAMPLE_RATE)
    g = torch.Generator().manual_seed(rng.randrange(2 ** 31))
    noise = torch.randn(n, generator=g)
    t = torch.arange(n) / SAMPLE_RATE
    env = (1 - torch.exp(-t / 0.01)) * torch.exp(-t / 0.08)
    x = AF.bandpass_biquad(noise * env, SAMPLE_RATE, rng.uniform(500, 1200), Q=0.7)
    return (0.4 * x / x.abs().max().clamp_min(1e-6)).to(torch.float32)


def sample_gap(rng: random.Random, prev: Line | None, line: Line) -> float:
    if prev is None:
        return 0.0  # the first line starts after the episode's lead-in instead
    if line.gap is not None:
        return line.gap
    if prev.kind == "delegate":
        return prev.result_delay + rng.uniform(0.25, 0.6)  # wait for the result, then react to it
    if prev.speaker == line.speaker:
        return rng.uniform(0.35, 0.8)  # same speaker goes on after a pause
    # Turn switch: median 200 ms, ~18% overlaps (negative), a few long pauses (conversation-analysis stats).
    return min(max(rng.gauss(0.2, 0.22), -0.3), 1.0)


def layout(turns: list[Spoken], lead: float) -> float:
    """Set ``start`` (and ``cut`` of interrupted lines) of every turn, the first at ``lead`` seconds; returns the end
    of the last one. Idempotent, so it can run again after lines are dropped."""
    last_end = {"user": -1.0, "model": -1.0}
    placed: dict[str, Spoken] = {}
    prev: Spoken | None = None
    for s in turns:
        s.cut = None
    for s in turns:
        line = s.line
        if prev is None:
            s.start = lead
        elif line.barge is not None and prev.line.speaker != line.speaker:
            s.start = prev.start + line.barge * prev.full_dur  # barge in: the interrupted line stops soon after
            prev.cut = s.start + line.stop_delay - prev.start
            last_end[prev.line.speaker] = prev.end
        elif line.at is not None:
            s.start = max(line.at(placed, prev.end), prev.start + 0.3, last_end[line.speaker] + 0.15)
        else:
            # An overlap only eats the tail of the previous turn, and a speaker never overlaps itself.
            s.start = max(prev.end + s.gap, prev.start + 0.3, last_end[line.speaker] + 0.15)
        last_end[line.speaker] = s.end
        if line.tag:
            placed[line.tag] = s
        prev = s
    return max(last_end.values())


def place_overlay(rng: random.Random, turns: list[Spoken], ov: Spoken) -> bool:
    """Put a short sound of ``ov``'s speaker (backchannel, cough, false start) after a word in the middle of a long
    turn of the other speaker, clear of ``ov``'s speaker's own speech."""
    me = ov.line.speaker
    mine = [(t.start, t.end) for t in turns if t.line.speaker == me]
    for u in [t for t in turns if t.line.speaker != me and t.dur >= 1.5 and t.cut is None]:
        inner = [w for w in u.words[:-1] if 0.3 * u.dur <= w.end <= 0.7 * u.dur]
        rng.shuffle(inner)
        for w in inner:
            t = u.start + w.end + 0.15
            if all(t + ov.dur + 0.2 <= a or t - 0.2 >= b for a, b in mine):
                ov.start = t
                return True
    return False


def add_noise(rng: random.Random, x: torch.Tensor, speech: list[tuple[float, float]], snr_db: float,
              kind: str) -> torch.Tensor:
    """Add white or pink noise to ``x`` at ``snr_db`` relative to the mean power of its speech spans."""
    g = torch.Generator().manual_seed(rng.randrange(2 ** 31))
    noise = torch.randn(x.numel(), generator=g)
    if kind == "pink":  # 1/f power: scale the spectrum by 1/sqrt(f)
        spec = torch.fft.rfft(noise)
        f = torch.arange(spec.numel(), dtype=torch.float32).clamp_min(1.0)
        noise = torch.fft.irfft(spec / f.sqrt(), n=x.numel())
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    for a, b in speech:
        mask[round(a * SAMPLE_RATE): round(b * SAMPLE_RATE)] = True
    p_speech = x[mask].pow(2).mean() if mask.any() else torch.tensor(1e-4)
    noise = noise * (p_speech / (noise.pow(2).mean() * 10 ** (snr_db / 10))).sqrt()
    return x + noise


# ---------------------------------------------------------------------------------------------------------------
# Video: a ball bouncing on a plain background
# ---------------------------------------------------------------------------------------------------------------

def _bounce(p0: torch.Tensor, v: float, t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Position of a point moving at ``v`` from ``p0`` and reflecting off walls at lo/hi (triangle wave)."""
    span = hi - lo
    u = torch.remainder(p0 - lo + v * t, 2 * span)
    return lo + torch.where(u <= span, u, 2 * span - u)


def render_video(spec: VideoSpec, n_frames: int, fps: float = VIDEO_FPS, size: int = VIDEO_SIZE) -> torch.Tensor:
    """uint8 [n_frames, size, size, 3]: a ``spec.ball`` disc on a ``spec.background`` field, plus ``spec.squares``
    while they are visible."""
    t = torch.arange(n_frames, dtype=torch.float32) / fps
    x = _bounce(torch.tensor(spec.x0), spec.vx, t, spec.radius, size - 1 - spec.radius)
    y = _bounce(torch.tensor(spec.y0), spec.vy, t, spec.radius, size - 1 - spec.radius)
    grid = torch.arange(size, dtype=torch.float32)
    inside = ((grid[None, None, :] - x[:, None, None]) ** 2
              + (grid[None, :, None] - y[:, None, None]) ** 2) <= spec.radius ** 2  # [frames, H, W]
    bg = torch.tensor(BACKGROUNDS[spec.background], dtype=torch.uint8)
    fg = torch.tensor(BALL_COLOURS[spec.ball], dtype=torch.uint8)
    video = torch.where(inside[..., None], fg, bg).contiguous()
    for t0, t1, sx, sy, side, colour in spec.squares:
        on = (t >= t0) & (t < t1)
        video[on, sy:sy + side, sx:sx + side] = torch.tensor(BALL_COLOURS[colour], dtype=torch.uint8)
    return video


# ---------------------------------------------------------------------------------------------------------------
# One episode
# ---------------------------------------------------------------------------------------------------------------

def _events(turns: list[Spoken], background: list[BackgroundEvent], video: VideoSpec) -> list[dict]:
    """Event labels (schema in ``tml.streams.episode``) from the placed lines, sorted by time."""
    ev: list[dict] = []
    r = lambda t: round(t, 4)  # noqa: E731
    main = [s for s in turns if s.line.kind not in ("backchannel", "cough", "false_start")]
    for s in turns:
        k, who = s.line.kind, s.line.speaker
        if k == "cough":
            ev.append({"type": "non_interruption", "time": r(s.start), "end": r(s.end), "speaker": who, "what": "cough"})
            continue
        ev.append({"type": "utterance_start", "time": r(s.start), "speaker": who, "text": s.line.text, "kind": k})
        ev.append({"type": "utterance_end", "time": r(s.end), "speaker": who, "kind": k,
                   **({"interrupted": True} if s.cut is not None else {})})
        if k in ("backchannel", "false_start") and who == "user":
            ev.append({"type": "non_interruption", "time": r(s.start), "end": r(s.end), "speaker": who, "what": k})
        if k == "interrupt":
            ev.append({"type": "interruption", "time": r(s.start), "speaker": who, "target": "model",
                       "stop_by": r(s.start + s.line.stop_delay + 0.1)})
        if s.line.pause_after is not None:
            i = s.line.pause_after
            ev.append({"type": "pause", "time": r(s.start + s.words[i].end), "end": r(s.start + s.words[i + 1].start),
                       "speaker": who})
        if k == "delegate":  # what the model writes (not says) when it hands the request over: interleave
            ev.append({"type": "delegate", "time": r(s.end), "speaker": who, "query": s.line.query})
        if k == "wait":
            back = next((t for t in main if t.start > s.end and t.line.speaker == "user"), None)
            # The model acknowledges ("okay, take your time") and is quiet from the end of that until the go-ahead.
            ack = next((t for t in main if t.start > s.start and t.line.speaker == "model"), None)
            quiet = r(ack.end) if ack is not None and (back is None or ack.end < back.start) else r(s.end)
            ev.append({"type": "wait_request", "time": r(s.end), "quiet_from": quiet,
                       "until": r(back.start) if back else None})
        if k == "timer_request":
            ev.append({"type": "timer", "time": r(s.end), "target": r(s.end + s.line.result_delay), "tolerance": 0.5,
                       "what": "seconds"})
        if k == "count":
            ev.append({"type": "timer", "time": r(s.start), "target": r(s.start), "tolerance": 0.3, "what": "count",
                       "text": s.line.text})
        if k == "now":
            ev.append({"type": "visual", "time": r(s.start - s.line.result_delay), "what": "wall_hit",
                       "answer": "now", "by": r(s.start + 0.5)})
    for t0, t1, *_ in video.squares:
        ev.append({"type": "visual", "time": t0, "end": t1, "what": "square_appears"})
    for e in background:
        ev.append({"type": "background_result", "time": e.time, "text": e.text})
    for a, b in zip(main, main[1:]):  # the model should answer a user turn that it does not overlap
        if a.line.speaker == "user" and b.line.speaker == "model" and a.line.kind != "wait":
            ev.append({"type": "expected_response", "time": r(a.end), "start": r(b.start), "speaker": "model",
                       "by": r(max(b.start, a.end) + 1.0)})
    return sorted(ev, key=lambda e: (e["time"], e["type"]))


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
        line = Line("model", _pick(rng, ["right.", "okay.", "I see.", "yeah.", "uh huh."]), "backchannel")
        overlays.append(Spoken(line, *speak_line(line, model_voice), gap=0.0))
    if rng.random() < cfg.listener_sound_prob:  # the user makes a sound during a long model turn; the model goes on
        what = rng.choice(["backchannel", "cough", "false_start"])
        if what == "cough":
            overlays.append(Spoken(Line("user", "", "cough"), cough(rng), [], gap=0.0))
        else:
            text = _pick(rng, ["mhm.", "yeah.", "right."] if what == "backchannel" else ["uh,", "I,", "so,"])
            line = Line("user", text, what)
            overlays.append(Spoken(line, *speak_line(line, user_voice), gap=0.0))
    lead, tail = rng.uniform(0.2, 0.8), rng.uniform(0.3, 1.0)

    # Too long: drop the greeting, then the closing, then optional lines of the main topic from its end.
    while True:
        turns = [s for block in spoken for s in block]
        end = layout(turns, lead)
        if end + tail <= cfg.max_duration:
            break
        if len(spoken) > 1:
            spoken.pop(0 if spoken[0][0].line is not main[0] else -1)
        elif spoken[0][-1].line.optional:
            spoken[0].pop()
        else:
            break
    for ov in overlays:
        if place_overlay(rng, turns, ov):
            turns = sorted(turns + [ov], key=lambda s: s.start)
            phenomena.append(f"{ov.line.speaker}_{ov.line.kind}")

    duration = math.ceil(max(end + tail, cfg.min_duration) / TURN_QUANTUM - 1e-9) * TURN_QUANTUM
    duration = round(duration, 3)
    n = round(duration * SAMPLE_RATE)
    audio = {"user": torch.zeros(n), "model": torch.zeros(n)}
    words: dict[str, list[Word]] = {"user": [], "model": []}
    background: list[BackgroundEvent] = []
    for s in turns:
        a = round(s.start * SAMPLE_RATE)
        w = s.wave[: round(s.dur * SAMPLE_RATE)].clone()
        if s.cut is not None:  # an interrupted speaker stops with a 20 ms fade, mid-word if need be
            f = min(w.numel(), SAMPLE_RATE // 50)
            w[w.numel() - f:] *= torch.linspace(1, 0, f)
        track = audio[s.line.speaker]
        track[a:a + w.numel()] += w[: n - a]
        words[s.line.speaker] += [Word(x.text, round(s.start + x.start, 4), round(s.start + min(x.end, s.dur), 4))
                                  for x in s.words if x.start < s.dur]
        if s.line.kind == "delegate":
            background.append(BackgroundEvent(round(s.start + s.dur + s.line.result_delay, 3), s.line.result))
    for k in audio:
        audio[k] = audio[k].clamp_(-1.0, 1.0)
    words = {k: sorted(v, key=lambda x: x.start) for k, v in words.items()}
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
        "events": _events(turns, background, video),
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
    torch.set_num_threads(1)  # one process per core; espeak and torch stay single-threaded inside it


def _episode_sample(job: tuple[int, dict]) -> tuple[dict, float, list[str], list[str], dict[str, int]]:
    """(index, SynthConfig as dict) -> (webdataset sample, duration, texts for the tokenizer, phenomena, event
    counts), in a worker."""
    ep = make_episode(job[0], SynthConfig(**job[1]))
    texts = [t["text"] for t in ep.meta["turns"] if t["text"]] + [e.text for e in ep.background]
    return ep.to_sample(), ep.duration, texts, ep.meta["phenomena"], count_events(ep.meta["events"])


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


def generate(cfg: SynthConfig) -> dict:
    """Write the whole set into ``cfg.out``; returns the manifest.

    Shards are written into ``out/.partial`` and moved in only when all are done; ``manifest.json`` is removed
    first and written last (atomically), so an interrupted run never leaves a manifest next to incomplete shards.
    """
    import webdataset as wds  # heavy import, only needed here

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
    phenomena: dict[str, int] = {}
    events = dict.fromkeys(EVENT_COUNTS, 0)
    writer = wds.ShardWriter(str(partial / "shard-%06d.tar"), maxcount=cfg.shard_size, verbose=0,
                             mtime=0.0)  # fixed mtime: same seed -> byte-identical shards
    with _episode_pool(max(1, min(cfg.workers, cfg.episodes))) as pool:
        for sample, dur, ep_texts, ep_phenomena, ep_events in pool.imap(worker, jobs):
            for k, v in ep_events.items():
                events[k] += v
            for ph in ep_phenomena:
                phenomena[ph] = phenomena.get(ph, 0) + 1
            writer.write(sample)
            name = Path(writer.fname).name
            counts[name] = counts.get(name, 0) + 1
            durations.append(dur)
            texts += ep_texts
    writer.close()
    short = {k: (events[k], n) for k, n in (cfg.require or {}).items() if events[k] < n}
    if short:  # the set cannot measure what it was made for: no manifest, so nothing uses it by mistake
        raise ValueError("the set has too few events: " + ", ".join(f"{k} {have} < --require {k}={n}" for k, (have, n)
                                                                    in short.items())
                         + "; raise --episodes or the scenario weights / probabilities that make them")

    tok = train_bpe(texts, cfg.vocab_size, partial / "tokenizer.json")
    for old in out.glob("shard-*.tar"):  # stale shards of an earlier, larger run
        old.unlink()
    shards = []
    for name in sorted(counts):
        os.replace(partial / name, out / name)
        shards.append({"name": name, "episodes": counts[name], "sha256": sha256(out / name)})
    os.replace(partial / "tokenizer.json", out / "tokenizer.json")
    partial.rmdir()
    ranges = fit_dir(out, [s["name"] for s in shards])  # per-channel dMel ranges beside the shards
    manifest = {
        "generator": GENERATOR, "version": GENERATOR_VERSION, "seed": cfg.seed, "episodes": cfg.episodes,
        "hours": round(sum(durations) / 3600, 6), "shards": shards, "sample_rate": SAMPLE_RATE,
        "video": {"fps": VIDEO_FPS, "height": VIDEO_SIZE, "width": VIDEO_SIZE},
        "voices": {"user": list(USER_VOICES), "model": [MODEL_VOICE]},
        "tokenizer": "tokenizer.json", "vocab_size": tok.vocab_size,
        "phenomena": dict(sorted(phenomena.items())),  # episodes showing each scenario / phenomenon
        "events": events,  # labelled events per phenomenon (count_events), what evaluation has power on
        "mix": {"scenario_weights": cfg.scenario_weights or SCENARIOS, "background_prob": cfg.background_prob,
                "backchannel_prob": cfg.backchannel_prob, "listener_sound_prob": cfg.listener_sound_prob,
                "pause_prob": cfg.pause_prob, "noise_prob": cfg.noise_prob},
        "dmel_ranges": RANGES_FILE if ranges else None,
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
