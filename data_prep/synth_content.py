"""What is said in a synthetic dialogue: slot vocabularies, templates (topics) and the interaction scenarios, as
scripted ``Line``s. Where the lines land on the clock is ``data_prep.synth_timeline``'s job; a scenario that times
lines (timers, paced counting, reactions to the video) gives them an ``at`` rule."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

from data_prep.synth_video import BALL_COLOURS, VIDEO_SIZE, VideoSpec

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


def pick(rng: random.Random, options: list[str]) -> str:
    return rng.choice(options)


def opener(rng: random.Random) -> list[Line]:
    name = rng.choice(NAMES)
    hi = pick(rng, ["hi there.", "hello.", "hey.", "good morning.", "good afternoon.", f"hi, it's {name}."])
    hello = f"hello {name}!" if "it's" in hi else pick(rng, ["hello!", "hi!", "hey!"])
    how, reply = rng.choice([
        ("how are you?", pick(rng, [f"{hello} I'm doing well, thanks.", f"{hello} I'm fine, thank you."])),
        ("how is it going?", pick(rng, [f"{hello} all good here.", f"{hello} pretty well, thanks."])),
        ("are you there?", pick(rng, ["yes, I'm here. how can I help?", f"{hello} yes, I'm listening."])),
        ("can you help me?", pick(rng, ["of course. what do you need?", f"{hello} sure, go ahead."])),
    ])
    return [Line("user", f"{hi} {how}"), Line("model", reply)]


def closer(rng: random.Random) -> list[Line]:
    thanks = pick(rng, ["thanks!", "thank you.", "great, thanks a lot.", "okay, thanks.", "perfect, thank you."])
    reply = pick(rng, ["you're welcome.", "any time!", "happy to help.", "no problem.", "my pleasure."])
    return [Line("user", thanks), Line("model", reply)]


def topic_capital(rng: random.Random, video: VideoSpec) -> list[Line]:
    country = rng.choice(list(CAPITALS))
    city = CAPITALS[country]
    if rng.random() < 0.5:
        return [Line("user", f"what is the capital of {country}?"),
                Line("model", pick(rng, [f"the capital of {country} is {city}.", f"it's {city}.",
                                          f"{city} is the capital of {country}."]))]
    return [Line("user", f"which country is {city} in?"),
            Line("model", pick(rng, [f"{city} is in {country}.", f"that would be {country}."]))]


def topic_arithmetic(rng: random.Random, video: VideoSpec) -> list[Line]:
    a, b = rng.randint(1, 12), rng.randint(1, 12)
    op, c = rng.choice([("plus", a + b), ("times", a * b), ("minus", a - b) if a >= b else ("plus", a + b)])
    q = pick(rng, [f"what is {say_num(rng, a)} {op} {say_num(rng, b)}?",
                    f"can you tell me {say_num(rng, a)} {op} {say_num(rng, b)}?"])
    lines = [Line("user", q), Line("model", f"{say_num(rng, a)} {op} {say_num(rng, b)} is {say_num(rng, c)}.")]
    if rng.random() < 0.5:
        d = rng.randint(1, 9)
        lines += [Line("user", f"and plus {say_num(rng, d)}?"),
                  Line("model", pick(rng, [f"that makes {say_num(rng, c + d)}.", f"then it's {c + d}."]))]
    return lines


def topic_counting(rng: random.Random, video: VideoSpec) -> list[Line]:
    a = rng.randint(1, 15)
    b = a + rng.randint(3, 5)
    seq = ", ".join(num_words(i) for i in range(a, b + 1))
    return [Line("user", f"can you count from {num_words(a)} to {num_words(b)}?"),
            Line("model", f"{seq}.")]


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
            Line("user", pick(rng, [f"I prefer {theirs}.", f"mine is {theirs}.", f"probably {theirs}."])),
            Line("model", pick(rng, [f"{theirs} is a good choice.", f"oh, {theirs} is nice too.",
                                      f"I can see why you like {theirs}."]))]


def topic_plans(rng: random.Random, video: VideoSpec) -> list[Line]:
    w = rng.choice(["lovely", "rainy", "cold", "warm", "windy", "quiet"])
    act, when = rng.choice(ACTIVITIES), rng.choice(WHEN)
    return [Line("user", f"what a {w} day."),
            Line("model", pick(rng, [f"yes, it is really {w}. any plans?", "it is. what are you up to?"])),
            Line("user", f"I want to {act} {when}."),
            Line("model", pick(rng, ["that sounds fun.", "nice, enjoy it!", "good idea.", "sounds lovely."]))]


def topic_video(rng: random.Random, video: VideoSpec) -> list[Line]:
    size = "big" if video.radius >= 10 else "small"
    q = rng.choice(["ball", "background", "size"])
    if q == "ball":
        return [Line("user", pick(rng, ["what colour is the ball?", "can you see the ball? what colour is it?"])),
                Line("model", pick(rng, [f"the ball is {video.ball}.", f"it's a {video.ball} ball."]))]
    if q == "background":
        return [Line("user", "what colour is the background?"),
                Line("model", f"the background is {video.background}.")]
    return [Line("user", "is the ball big or small?"),
            Line("model", f"it's a {size} {video.ball} ball.")]


def topic_tool(rng: random.Random, video: VideoSpec) -> list[Line]:
    """Delegation: the model hands the request to the background model and answers when the result arrives."""
    delay = round(rng.uniform(1.0, 2.0), 3)
    wait = pick(rng, ["let me check.", "one moment, let me check.", "let me look that up.", "hold on, checking."])
    kind = rng.choice(["multiply", "weather", "convert"])
    if kind == "multiply":
        a, b = rng.randint(13, 99), rng.randint(11, 29)
        return [Line("user", f"what is {a} times {b}?"),
                Line("model", wait, "delegate", f"result: {a * b}", f"{a} * {b}", delay),
                Line("model", pick(rng, [f"{a} times {b} is {a * b}.", f"it's {a * b}."]), "answer")]
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
    "the story begins in a small village by the sea, where an old fisherman lived with his daughter and "
    "their very lazy cat.",
]


def topic_interrupt(rng: random.Random, video: VideoSpec) -> list[Line]:
    """Barge-in: the user cuts a long model turn short; the model stops within a few hundred ms and listens."""
    if rng.random() < 0.5:
        a = rng.randint(1, 8)
        ask, talk = f"can you count from {num_words(a)} to {num_words(a + 12)}?", \
            ", ".join(num_words(i) for i in range(a, a + 13)) + "."
    else:
        ask, talk = pick(rng, ["can you tell me something?", "what do you think about that?",
                                "can you explain it to me?"]), rng.choice(LONG_TALK)
    follow = rng.choice([topic_capital, topic_days, topic_spelling, topic_arithmetic])(rng, video)[:2]
    for ln in follow:
        ln.optional = True
    return [Line("user", ask), Line("model", talk),
            Line("user", pick(rng, ["wait, stop.", "sorry, hold on.", "stop, stop.", "wait a second."]), "interrupt",
                 barge=rng.uniform(0.3, 0.6), stop_delay=round(rng.uniform(0.1, 0.35), 3)),
            Line("model", pick(rng, ["okay.", "sure, go ahead.", "yes?"])), *follow]


def topic_long_talk(rng: random.Random, video: VideoSpec) -> list[Line]:
    """The model talks for several seconds without being cut off: where a listener's cough or "mhm" lands
    (``listener_sound_prob``) and the model must go on talking."""
    if rng.random() < 0.4:
        a = rng.randint(1, 8)
        ask, talk = f"can you count from {num_words(a)} to {num_words(a + 10)}?", \
            ", ".join(num_words(i) for i in range(a, a + 11)) + "."
    else:
        ask, talk = pick(rng, ["can you tell me something?", "can you explain it to me?", "tell me a story."]), \
            rng.choice(LONG_TALK)
    return [Line("user", ask), Line("model", talk),
            Line("user", pick(rng, ["thanks, that was nice.", "okay, got it.", "great, thank you."]), optional=True),
            Line("model", pick(rng, ["you're welcome.", "any time!", "glad to help."]), optional=True)]


def topic_wait(rng: random.Random, video: VideoSpec) -> list[Line]:
    """The user asks for quiet; the model acknowledges and stays silent through a long pause that is not its turn."""
    q = rng.choice([topic_capital, topic_days, topic_arithmetic])(rng, video)[:2]
    return [Line("user", pick(rng, ["hold on, let me think.", "please wait a moment.", "be quiet for a second.",
                                     "just a moment, please."]), "wait"),
            # One acknowledgement, and no long answer opens like it: the tiny model, unsure which request it heard,
            # took the most common opening ("sure." before every count and story) and talked through the wait.
            Line("model", "take your time."),
            Line("user", "okay, I'm back. " + q[0].text, gap=round(rng.uniform(2.0, 4.0), 3)), q[1]]


def topic_timer(rng: random.Random, video: VideoSpec) -> list[Line]:
    """Time-aware: the model speaks when the requested number of seconds has passed."""
    n = rng.randint(3, 8)
    return [Line("user", f"tell me when {num_words(n)} seconds have passed.", "timer_request", tag="req",
                 result_delay=float(n)),
            Line("model", pick(rng, ["okay, starting now.", "sure, I'll tell you.", "okay."])),
            Line("model", pick(rng, ["now.", f"{num_words(n)} seconds have passed.", "time is up."]), "timer",
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

    return [Line("user", pick(rng, ["say now when the ball hits the wall.", "tell me when the ball touches a wall."])),
            Line("model", pick(rng, ["okay, watching.", "sure."]))] + \
        [Line("model", "now!", "now", at=next_hit, result_delay=reaction) for _ in range(rng.randint(2, 3))] + \
        [Line("user", pick(rng, ["okay, that's enough.", "great, thanks."]))]


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
    return [Line("user", pick(rng, ["how many squares did you see?", "how many squares appeared?"]),
                 at=lambda placed, prev_end: max(prev_end + 0.3, last + 0.5)),
            Line("model", pick(rng, [f"I saw {num_words(n)} {word}.", f"{num_words(n)} {word}."]))]


# Scenario mix for the episodes without a background-model lookup (weights; the mix is counted in the manifest).
# long_talk has weight 0 by default (the default set stays as it was); interaction recipes raise it.
SCENARIOS = {"dialogue": 0.4, "interrupt": 0.14, "wait": 0.1, "timer": 0.08, "count_pace": 0.08, "wall": 0.1,
             "squares": 0.1, "long_talk": 0.0}
SCENARIO_TOPICS = {"interrupt": topic_interrupt, "wait": topic_wait, "timer": topic_timer,
                   "count_pace": topic_count_pace, "wall": topic_wall, "squares": topic_squares,
                   "long_talk": topic_long_talk}
