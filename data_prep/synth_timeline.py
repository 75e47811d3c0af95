"""Timeline mixing for the synthetic set: speak scripted lines, place them on one clock (human gaps, barge-ins,
timed lines), fit the episode's length, overlay coughs and backchannels, mix each speaker's track, add microphone
noise, and label the events evaluation measures."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tml.data.espeak import EspeakVoice
from data_prep.synth_content import Line
from data_prep.synth_video import VideoSpec
from tml.streams.episode import BackgroundEvent, Word

SAMPLE_RATE = 16000

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


# A listener sound starts at least this long before the end of the line it lands in: one near the end is no test of
# going on (the line ends anyway; 50 of the 82 in the first held-out set came within 1 s of it, 12 within the 0.5 s
# in which the metric counts a stop).
OVERLAY_CLEAR_S = 1.5


def place_overlay(rng: random.Random, turns: list[Spoken], ov: Spoken) -> bool:
    """Put a short sound of ``ov``'s speaker (backchannel, cough, false start) after a word in the middle of a long
    turn of the other speaker, ``OVERLAY_CLEAR_S`` or more before its end, clear of ``ov``'s speaker's own speech."""
    me = ov.line.speaker
    mine = [(t.start, t.end) for t in turns if t.line.speaker == me]
    for u in [t for t in turns if t.line.speaker != me and t.dur >= 1.5 and t.cut is None]:
        inner = [w for w in u.words[:-1] if 0.3 * u.dur <= w.end <= u.dur - 0.15 - OVERLAY_CLEAR_S]
        rng.shuffle(inner)
        for w in inner:
            t = u.start + w.end + 0.15
            if all(t + ov.dur + 0.2 <= a or t - 0.2 >= b for a, b in mine):
                ov.start = t
                return True
    return False


def fit_length(spoken: list[list[Spoken]], main_first: Line, lead: float, tail: float,
               max_duration: float) -> tuple[list[Spoken], float]:
    """Lay out the blocks of spoken lines (greeting, main topic, closing) from ``lead`` seconds on; while the episode
    would end past ``max_duration`` (``tail`` of silence included), drop the greeting, then the closing, then optional
    lines of the main topic (whose first line is ``main_first``) from its end. Returns (placed turns, end of the last)."""
    while True:
        turns = [s for block in spoken for s in block]
        end = layout(turns, lead)
        if end + tail <= max_duration:
            return turns, end
        if len(spoken) > 1:
            spoken.pop(0 if spoken[0][0].line is not main_first else -1)
        elif spoken[0][-1].line.optional:
            spoken[0].pop()
        else:
            return turns, end


def mix_tracks(turns: list[Spoken], duration: float) -> tuple[dict[str, torch.Tensor], dict[str, list[Word]],
                                                              list[BackgroundEvent]]:
    """Placed turns -> each speaker's track (float32 [duration * SAMPLE_RATE], clamped to [-1, 1]), its words on the
    episode clock (sorted by start) and the background results the model's delegations bring back."""
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
    return audio, words, background


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


def label_events(turns: list[Spoken], background: list[BackgroundEvent], video: VideoSpec) -> list[dict]:
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
            # The model acknowledges ("take your time") and is quiet from the end of that until the go-ahead.
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

