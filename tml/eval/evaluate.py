"""Duplex evaluation: stream held-out episodes' user side through a responder, measure what it did.

A *responder* is anything with ``step(MicroTurnInputs) -> MicroTurnOutputs``: a ``StreamingSession`` over a
checkpoint (or an untrained model), or ``SilenceRuleResponder``, the classic baseline that starts talking after a
fixed stretch of user silence. Each episode is replayed micro-turn by micro-turn (user audio, video frames and the
recorded background results at their arrival times). What the responder said is placed on the playback clock
(``tml.eval.clock``: micro-turn t's output is heard from its playback start, one micro-turn after its input at the
earliest, later when compute falls behind) and heard by a listener's VAD (``tml.eval.vad``: Silero by default on the
vocoded audio; the mean-log-mel threshold on the mel itself as the documented fallback). That activity and the text
are scored against the episode's event labels by ``tml.eval.duplex``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from tml.audio.dmel import DMelTokenizer
from tml.data.espeak import speak
from tml.eval.duplex import DuplexLabels, MetricConfig, episode_metrics, speech_activity
from tml.eval.clock import place_on_playback_clock, playback_starts
from tml.eval.session import LiveLogMel, MicroTurnInputs, MicroTurnOutputs
from tml.eval.vad import VADConfig, activity, segments_to_frames, speech_segments_many
from tml.eval.word_events import warn_unmeasured
from tml.streams.episode import Episode
from tml.streams.layout import MicroTurnLayout, Stream
from tml.streams.modalities import Kind
from tml.text.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

LONG_USER_TURN_S = 3.0  # user turns at least this long invite a backchannel
# A cough or backchannel tests going on only where the reference's line goes on this long after it: the 0.5 s in
# which a stop counts (MetricConfig.false_stop_s) and 0.5 s for a model whose words run shorter than the
# reference's. Nearer the line's end the reference stops too (12 of the 82 sounds of the first held-out set came
# within 0.5 s of it, 50 within 1 s); those are measured apart (``DuplexLabels.sounds_at_line_end``).
LISTENER_SOUND_CLEAR_S = 1.0
VAD_GROUP = 32  # episodes whose heard audio one batched Silero pass scores (memory: their waves, twice)


def labels_from_events(events: list[dict], duration: float) -> DuplexLabels:
    """``Episode.meta["events"]`` (schema in ``tml.streams.episode``) -> what the metrics check. Unknown types are
    ignored."""
    labels = DuplexLabels(duration=duration)
    model_ends = sorted(float(e["time"]) for e in events
                        if e.get("type") == "utterance_end" and e.get("speaker") == "model")
    starts: dict[str, dict] = {}
    last_user_end = 0.0
    for e in events:
        typ, t = e.get("type"), float(e.get("time", 0.0))
        if typ == "utterance_start":
            starts[e.get("speaker", "")] = e
            if e.get("speaker") == "model" and e.get("kind") == "answer" and e.get("text"):
                labels.answers.append((last_user_end, e["text"]))
        elif typ == "utterance_end" and e.get("speaker") == "user":
            s = starts.get("user")
            if s is not None and s.get("kind") == "turn" and t - float(s["time"]) >= LONG_USER_TURN_S:
                labels.long_user_turns.append((float(s["time"]), t))
            last_user_end = t
        elif typ == "expected_response":
            labels.response_turns.append((float(starts.get("user", {}).get("time", t)), t))
        elif typ == "interruption":
            labels.interruptions.append(t)
        elif typ == "non_interruption":
            line_end = next((x for x in model_ends if x > t), None)
            near_end = line_end is not None and line_end - t < LISTENER_SOUND_CLEAR_S
            (labels.sounds_at_line_end if near_end else labels.false_barge_ins).append(t)
        elif typ == "wait_request":
            until = e.get("until")
            labels.quiet_windows.append((float(e.get("quiet_from", t)), float(until) if until is not None else duration))
        elif typ == "timer":
            labels.timed_cues.append(float(e.get("target", t)))
        elif typ == "visual" and e.get("what") == "wall_hit":
            labels.timed_cues.append(t)
        elif typ == "delegate" and e.get("speaker", "model") == "model":
            labels.delegations.append((t, str(e.get("query", ""))))
    return labels


@dataclass
class Reply:
    """A canned reply for ``SilenceRuleResponder``: its speech as dMel bins [frames, n_mels] (e.g. an espeak phrase,
    so that a listener's VAD hears speech) and its words as (frame offset, token ids) in the order spoken."""

    bins: torch.Tensor
    words: list[tuple[int, list[int]]] = field(default_factory=list)


def canned_reply(text: str, dmel: DMelTokenizer, tokenizer: TextTokenizer, voice: str = "en+f3",
                 rate: int = 175) -> Reply:
    """``text`` spoken by espeak-ng (``tml.data.espeak``) as a ``Reply`` for the silence-rule baseline: its dMel bins
    [frames, n_mels] (so a listener's VAD hears speech, not a hum) and each word's token ids at the mel frame where
    the word starts."""
    wave, words = speak(text, voice, rate, 50, dmel.cfg.sample_rate)
    bins = dmel.encode(wave)
    hop_s = dmel.cfg.hop_length / dmel.cfg.sample_rate
    return Reply(bins, [(min(round(w.start / hop_s), bins.shape[0] - 1), tokenizer.word_ids(w.text)) for w in words])


class SilenceRuleResponder:
    """Baseline: after the user has spoken, once their audio has been silent for ``gap_s``, speak for ``speak_s``.

    Activity is the user's mean log-mel per 10 ms frame above ``threshold`` (the rule's own energy detector); the
    rule runs at frame resolution inside each micro-turn, on the same clock as a model's output. Without ``reply``
    its "speech" is a constant mid-range dMel frame (a hum no VAD calls speech: only the log-mel fallback hears
    it); with ``reply`` it says that phrase instead (``speak_s`` is then the phrase's length) and writes its words
    on the text stream in the micro-turn where each starts (spilling to the next micro-turn when the slots are full).
    """

    def __init__(self, layout: MicroTurnLayout, dmel: DMelTokenizer, gap_s: float = 0.3, speak_s: float = 1.0,
                 threshold: float = -5.0, text_pad_id: int = 0, reply: Reply | None = None):
        self.layout, self.dmel, self.reply = layout, dmel, reply
        self.gap = round(gap_s * 1000 / layout.cfg.mel_hop_ms)
        self.speak = round(speak_s * 1000 / layout.cfg.mel_hop_ms) if reply is None else reply.bins.shape[0]
        self.threshold, self.pad_id = threshold, text_pad_id
        self.live_mel = LiveLogMel(layout, dmel)
        self.user_spoke = False
        self.silent_run = 0
        self.speaking_left = 0
        self.turn = 0
        self.voice = torch.full((layout.cfg.n_mels,), layout.cfg.dmel_bins * 3 // 4, dtype=torch.long)
        self.text_queue: list[int] = []

    def step(self, inputs: MicroTurnInputs) -> MicroTurnOutputs:
        F, C = self.layout.frames_per_turn, self.layout.cfg.n_mels
        user_active = speech_activity(self.live_mel(inputs.user_audio), self.threshold)
        bins = self.dmel.silence_bins(F) if self.reply is not None else torch.zeros(F, C, dtype=torch.long)
        for f in range(F):
            if user_active[f]:
                self.user_spoke, self.silent_run, self.speaking_left = True, 0, 0
            else:
                self.silent_run += 1
                if self.user_spoke and self.silent_run == self.gap:
                    self.speaking_left, self.user_spoke = self.speak, False
            if self.speaking_left > 0:
                if self.reply is None:
                    bins[f] = self.voice
                else:
                    k = self.speak - self.speaking_left  # frame of the reply
                    bins[f] = self.reply.bins[k]
                    self.text_queue += [i for at, ids in self.reply.words if at == k for i in ids]
                self.speaking_left -= 1
        slots = self.layout.count(Stream.MODEL, Kind.TEXT)
        text_ids = (self.text_queue[:slots] + [self.pad_id] * slots)[:slots]
        self.text_queue = self.text_queue[slots:]
        out = MicroTurnOutputs(turn=self.turn, text_ids=text_ids, audio_bins=bins,
                               mel=self.dmel.decode(bins), wave=None, text_logits=torch.zeros(0), audio_logits=None,
                               background_ids=[], compute_s=0.0)
        self.turn += 1
        return out


@dataclass
class EpisodeRun:
    key: str
    model_mel: torch.Tensor  # [frames, n_mels] what the responder said, as log-mel
    user_mel: torch.Tensor  # [frames, n_mels]
    text_by_turn: list[tuple[int, str]]  # (micro-turn, decoded text) where it wrote something; heard: ``heard_text``
    compute_s: list[float]  # per micro-turn
    text_ids: list[list[int]] = field(default_factory=list)  # per micro-turn: the text slots it wrote (pad included)


def episode_inputs(episode: Episode, layout: MicroTurnLayout, text: TextTokenizer) -> list[MicroTurnInputs]:
    """``episode``'s input side as a live stream delivers it: per micro-turn the user audio, the video frame
    showing at its start, and the recorded background results arriving in it."""
    cfg = layout.cfg
    T, n = layout.num_turns(episode.duration), layout.samples_per_turn
    turn_s = cfg.micro_turn_ms / 1000
    user = episode.audio["user"]
    user = torch.nn.functional.pad(user, (0, max(0, T * n - user.numel())))
    arrivals: dict[int, list[int]] = {}
    for e in episode.background:
        arrivals.setdefault(layout.turn_of(e.time), []).extend(i for w in e.text.split() for i in text.word_ids(w))
    inputs = []
    for t in range(T):
        frame = None
        if episode.video is not None:
            f = int(t * turn_s * episode.video_fps + 1e-6)
            frame = episode.video[f] if f < episode.video.shape[0] else None
        inputs.append(MicroTurnInputs(user_audio=user[t * n : (t + 1) * n], video_frame=frame,
                                      background_text=arrivals.get(t, [])))
    return inputs


class _Recorder:
    """Collects one episode's outputs into an ``EpisodeRun``."""

    def __init__(self, episode: Episode, layout: MicroTurnLayout, text: TextTokenizer):
        self.episode, self.layout, self.text = episode, layout, text
        self.inputs = episode_inputs(episode, layout, text)
        self.mels, self.said, self.times, self.ids = [], [], [], []

    def add(self, t: int, out: MicroTurnOutputs) -> None:
        self.mels.append(out.mel)
        self.times.append(out.compute_s)
        self.ids.append(list(out.text_ids))
        words = self.text.decode(out.text_ids)
        if words.strip():
            self.said.append((t, words))

    def run(self, dmel: DMelTokenizer) -> EpisodeRun:
        T, n = len(self.inputs), self.layout.samples_per_turn
        user = self.episode.audio["user"]
        user = torch.nn.functional.pad(user, (0, max(0, T * n - user.numel())))
        return EpisodeRun(self.episode.key, torch.cat(self.mels),
                          dmel.log_mel(user[: T * n])[: T * self.layout.frames_per_turn], self.said, self.times,
                          self.ids)


def run_episode(responder, episode: Episode, layout: MicroTurnLayout, dmel: DMelTokenizer,
                text: TextTokenizer) -> EpisodeRun:
    """Replay ``episode``'s inputs through ``responder`` one micro-turn at a time."""
    rec = _Recorder(episode, layout, text)
    for t, inputs in enumerate(rec.inputs):
        rec.add(t, responder.step(inputs))
    return rec.run(dmel)


def run_episodes(make_sessions, episodes: list[Episode], layout: MicroTurnLayout, dmel: DMelTokenizer,
                 text: TextTokenizer, batch_size: int = 16) -> list[EpisodeRun]:
    """Replay many episodes at once: ``make_sessions(n)`` gives a responder with ``step_many`` and ``keep`` (a
    batched ``StreamingSession``) that advances n episodes per step; each episode's session ends with it. Episodes
    go in groups of ``batch_size``, longest first, so groups waste little. Each run equals ``run_episode``'s with
    a fresh single session (same seeds); ``compute_s`` is the batched step's time. Returns runs in input order."""
    runs: list[EpisodeRun | None] = [None] * len(episodes)
    order = sorted(range(len(episodes)), key=lambda i: -layout.num_turns(episodes[i].duration))
    for g in range(0, len(order), batch_size):
        group = order[g : g + batch_size]
        recs = [_Recorder(episodes[i], layout, text) for i in group]
        responder, live, t = make_sessions(len(group)), list(range(len(group))), 0
        while live:
            for j, out in zip(live, responder.step_many([recs[j].inputs[t] for j in live])):
                recs[j].add(t, out)
            t += 1
            still = [k for k, j in enumerate(live) if t < len(recs[j].inputs)]
            if len(still) < len(live):
                live = [live[k] for k in still]
                if live:
                    responder.keep(still)
        for i, rec in zip(group, recs):
            runs[i] = rec.run(dmel)
    return runs


def playback_schedule(run: EpisodeRun, layout: MicroTurnLayout, realtime: bool = False) -> list[float]:
    """When each micro-turn's output of ``run`` plays (s, input clock): ``tml.eval.clock.playback_starts`` with the
    measured compute per micro-turn, or as if compute were instantaneous (``realtime=True``: (t + 1) * 0.2 s)."""
    return playback_starts(len(run.compute_s), layout.cfg.micro_turn_ms / 1000, None if realtime else run.compute_s)


def heard_text(run: EpisodeRun, layout: MicroTurnLayout, realtime: bool = False) -> list[tuple[float, str]]:
    """(time a listener gets it, text) of what the responder wrote: micro-turn t's text at its playback start."""
    starts = playback_schedule(run, layout, realtime)
    return [(starts[t], words) for t, words in run.text_by_turn]


def heard_model_side(run: EpisodeRun, layout: MicroTurnLayout, dmel: DMelTokenizer, vocoder=None,
                     realtime: bool = False, wave: bool = True) -> torch.Tensor:
    """What a listener hears of the responder: its audio placed on the playback clock (``tml.eval.clock``), with the
    measured compute per micro-turn (``realtime=True``: as if compute were instantaneous). ``wave=True``: float
    [samples] through ``vocoder`` (default Griffin-Lim); ``wave=False``: its log-mel [frames, n_mels] (silence at
    the log floor before the first output). Same length as the user side."""
    cfg = layout.cfg
    T = len(run.compute_s)
    starts = playback_schedule(run, layout, realtime)
    if not wave:
        floor = dmel.decode(dmel.silence_bins(1))[0].min().item()
        return place_on_playback_clock(run.model_mel, layout.frames_per_turn, starts, 1000 / cfg.mel_hop_ms,
                                       run.user_mel.shape[0], fill=floor)
    samples = dmel.to_wave(run.model_mel, vocoder)
    samples = torch.nn.functional.pad(samples, (0, max(0, T * layout.samples_per_turn - samples.numel())))
    return place_on_playback_clock(samples, layout.samples_per_turn, starts, cfg.sample_rate,
                                   T * layout.samples_per_turn)


def model_activity(run: EpisodeRun, layout: MicroTurnLayout, dmel: DMelTokenizer, vad: VADConfig | None = None,
                   vocoder=None, realtime: bool = False) -> torch.Tensor:
    """bool [frames] on the 10 ms mel clock: where a listener's VAD hears the responder speak (``heard_model_side``
    through ``tml.eval.vad``; the log-mel fallback reads the placed mel directly, no vocoder)."""
    vad = (vad or VADConfig()).validate()
    n = run.user_mel.shape[0]
    if vad.method == "logmel":
        return speech_activity(heard_model_side(run, layout, dmel, vocoder, realtime, wave=False), vad.logmel_threshold)
    heard = heard_model_side(run, layout, dmel, vocoder, realtime)
    return activity(heard, layout.cfg.sample_rate, layout.cfg.mel_hop_ms / 1000, vad, n_frames=n)


def model_activities(runs: list[EpisodeRun], layout: MicroTurnLayout, dmel: DMelTokenizer,
                     vad: VADConfig | None = None, vocoder=None, realtime: bool = False
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """``model_activity`` of every run, the Silero VAD run on all of them at once
    (``tml.eval.vad.speech_segments_many``; the log-mel fallback per run). Returns (activity bool [frames] per run,
    the heard wave per run: float [samples], None with the log-mel fallback)."""
    vad = (vad or VADConfig()).validate()
    if vad.method == "logmel":
        return [model_activity(r, layout, dmel, vad, vocoder, realtime) for r in runs], [None] * len(runs)
    heard = [heard_model_side(r, layout, dmel, vocoder, realtime) for r in runs]
    segments = speech_segments_many(heard, layout.cfg.sample_rate, vad)
    hop_s = layout.cfg.mel_hop_ms / 1000
    return [segments_to_frames(seg, r.user_mel.shape[0], hop_s) for seg, r in zip(segments, runs)], heard


def score_episode(run: EpisodeRun, episode: Episode, layout: MicroTurnLayout, dmel: DMelTokenizer,
                  vad: VADConfig | None = None, cfg: MetricConfig | None = None, vocoder=None,
                  realtime: bool = False) -> dict:
    """Duplex metrics of one replayed episode, with the responder's activity as a listener's VAD hears it."""
    labels = labels_from_events(episode.meta.get("events", []), episode.duration)
    return episode_metrics(labels, model_activity(run, layout, dmel, vad, vocoder, realtime),
                           heard_text(run, layout, realtime), cfg)


def plot_timeline(path, run: EpisodeRun, episode: Episode, user_active: torch.Tensor, model_active: torch.Tensor,
                  hop_s: float = 0.01) -> None:
    """Both streams' speech activity (bool [frames] on the ``hop_s`` clock) over time, with the labelled events."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    user, model = user_active.float(), model_active.float()
    t = torch.arange(user.numel()) * hop_s
    fig, ax = plt.subplots(figsize=(12, 2.6))
    ax.fill_between(t, 1.1, 1.1 + 0.8 * user, step="post", color="tab:blue", label="user speech")
    ax.fill_between(t, 0.0, 0.8 * model[: t.numel()], step="post", color="tab:orange", label="model speech")
    colours = {"expected_response": "green", "interruption": "red", "non_interruption": "grey",
               "wait_request": "purple", "timer": "black", "visual": "brown"}
    for e in episode.meta.get("events", []):
        if e.get("type") in colours:
            ax.axvline(float(e["time"]), color=colours[e["type"]], lw=1, ls="--")
    ax.set_yticks([0.4, 1.5], ["model", "user"])
    ax.set_xlabel("seconds")
    ax.set_title(f"{run.key}: dashed = labels (green expected response, red barge-in, grey cough/backchannel, "
                 f"purple wait, black timer, brown visual)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_latencies(path, per_episode: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    for ax, key, title in ((axes[0], "latency", "turn-taking latency (s)"),
                           (axes[1], "stop_latency", "interruption stop latency (s)")):
        xs = [x for ep in per_episode for x in ep[key]]
        spread = max(xs) - min(xs) if xs else 0.0
        ax.hist(xs, bins=20 if spread > 1e-6 else 1, color="tab:orange")  # equal values up to rounding: one bin
        ax.set_title(f"{title}, n={len(xs)}", fontsize=9)
        if not xs:
            ax.text(0.5, 0.5, "no data: nothing to measure\n(see the warnings)", transform=ax.transAxes,
                    ha="center", va="center", fontsize=9, color="grey")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig


def evaluate(make_responder, episodes: list[Episode], layout: MicroTurnLayout, dmel: DMelTokenizer,
             text: TextTokenizer, out_dir, vad: VADConfig | None = None, n_wavs: int = 3, n_timelines: int = 4,
             vocoder=None, realtime: bool = False, metrics: MetricConfig | None = None, make_sessions=None,
             batch_size: int = 16) -> dict:
    """Run a fresh responder (``make_responder()``) on every episode, or with ``make_sessions(n)`` (a batched
    ``StreamingSession`` of n sessions) ``batch_size`` episodes at a time (``run_episodes``: the same outputs, many
    times faster; each micro-turn's measured compute is then the batched step's); write ``eval.json``, latency
    histograms,
    per-episode timelines and a few stereo .wav files (user left, responder right, as heard on the playback clock)
    into ``out_dir``. Activity: ``vad`` (Silero by default), see ``model_activity``; the VAD runs over
    ``VAD_GROUP`` episodes at once (``model_activities``), in both modes. Returns what ``eval.json``
    holds: {"metrics": pooled metrics (``tml.eval.duplex.aggregate``), "per_episode": raw measurements}."""
    import json
    from pathlib import Path

    from tml.audio.wav import write_wav
    from tml.eval.duplex import aggregate

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vad = (vad or VADConfig()).validate()
    hop_s = layout.cfg.mel_hop_ms / 1000
    if make_sessions is not None:
        runs = run_episodes(make_sessions, episodes, layout, dmel, text, batch_size)
    else:
        runs = [run_episode(make_responder(), episode, layout, dmel, text) for episode in episodes]
    per_episode, compute, lag = [], [], 0.0
    actives, heard = [], []
    for g in range(0, len(runs), VAD_GROUP):  # what a listener hears, the VAD over a group of episodes at once
        a, w = model_activities(runs[g : g + VAD_GROUP], layout, dmel, vad, vocoder, realtime)
        actives += a
        heard += [x if g + j < n_wavs else None for j, x in enumerate(w)]  # kept only for the .wav files
    for i, (episode, run, model_active) in enumerate(zip(episodes, runs, actives)):
        labels = labels_from_events(episode.meta.get("events", []), episode.duration)
        m = episode_metrics(labels, model_active, heard_text(run, layout, realtime), metrics)
        per_episode.append(m)
        compute += run.compute_s
        starts = playback_schedule(run, layout, realtime)
        lag = max([lag] + [s - (t + 1) * layout.cfg.micro_turn_ms / 1000 for t, s in enumerate(starts)])
        if i < n_timelines:
            user = episode.audio["user"]
            user_active = activity(user, episode.sample_rate, hop_s, vad, n_frames=run.user_mel.shape[0])
            plot_timeline(out_dir / f"timeline_{episode.key}.png", run, episode, user_active, model_active, hop_s)
        if i < n_wavs:
            mine = heard[i] if heard[i] is not None else heard_model_side(run, layout, dmel, vocoder, realtime)
            user = episode.audio["user"]
            n = min(user.numel(), mine.numel())
            write_wav(out_dir / f"dialogue_{episode.key}.wav", torch.stack([user[:n], mine[:n]]), dmel.cfg.sample_rate)
    plot_latencies(out_dir / "latencies.png", per_episode)
    result = aggregate(per_episode)
    warn_unmeasured(result, len(episodes))
    result["episodes"] = len(episodes)
    result["activity"] = vad.method
    result["compute_ms_per_micro_turn"] = 1000 * sum(compute) / max(len(compute), 1)
    result["real_time_factor"] = result["compute_ms_per_micro_turn"] / layout.cfg.micro_turn_ms
    result["playback"] = "realtime" if realtime else "measured compute"
    result["max_lag_s"] = lag  # the most any output played behind a real-time model (compute backlog)
    out = {"metrics": result, "per_episode": per_episode}
    (out_dir / "eval.json").write_text(json.dumps(out, indent=2))
    return out


def evaluate_seeds(make_responder, episodes: list[Episode], layout: MicroTurnLayout, dmel: DMelTokenizer,
                   text: TextTokenizer, out_dir, eval_cfg=None, vad: VADConfig | None = None, realtime: bool = False,
                   make_baseline=None, vocoder=None, metrics: MetricConfig | None = None, make_sessions=None,
                   batch_size: int = 16) -> dict:
    """Evaluation with power (``tml.eval.report``): replay every episode once per seed of ``eval_cfg.seeds`` with a
    fresh ``make_responder(seed)`` (or ``batch_size`` episodes at a time through ``make_sessions(seed, n)``, a batched
    session: see ``evaluate``) (into ``out_dir/seed_S``), and once with ``make_baseline()`` if given (into
    ``out_dir/baseline``); summarise each metric with its event count and a bootstrap CI over episodes. Writes
    ``report.json`` and ``report.md`` (the table) into ``out_dir`` and returns the report dict."""
    import json
    from pathlib import Path

    from tml.eval.report import EvalConfig, summarise, table

    eval_cfg = (eval_cfg or EvalConfig()).validate()
    out_dir = Path(out_dir)
    per_seed, pooled = [], {}
    for i, seed in enumerate(eval_cfg.seeds):  # wavs and timelines of the first seed only (they cost time)
        r = evaluate(lambda: make_responder(seed), episodes, layout, dmel, text, out_dir / f"seed_{seed}", vad,
                     n_wavs=3 if i == 0 else 0, n_timelines=4 if i == 0 else 0, vocoder=vocoder, realtime=realtime,
                     metrics=metrics, batch_size=batch_size,
                     make_sessions=None if make_sessions is None else lambda n: make_sessions(seed, n))
        per_seed.append(r["per_episode"])
        pooled[seed] = r["metrics"]
    first = pooled[eval_cfg.seeds[0]]
    report = {"episodes": len(episodes), "seeds": list(eval_cfg.seeds), "playback": first["playback"],
              "activity": first["activity"],
              "ci": f"{eval_cfg.confidence:.0%} percentile bootstrap over episodes ({eval_cfg.bootstrap} resamples)",
              "model": summarise(per_seed, eval_cfg), "baseline": None,
              "real_time_factor": {s: m["real_time_factor"] for s, m in pooled.items()},
              "max_lag_s": max(m["max_lag_s"] for m in pooled.values())}
    if make_baseline is not None:
        b = evaluate(make_baseline, episodes, layout, dmel, text, out_dir / "baseline", vad, vocoder=vocoder,
                     realtime=realtime, metrics=metrics)
        report["baseline"] = summarise([b["per_episode"]], eval_cfg)
    report["warning"] = None
    if report["max_lag_s"] > layout.cfg.micro_turn_ms / 1000:  # a backlog: every later latency carries it
        report["warning"] = (f"compute fell behind real time (real-time factor up to "
                             f"{max(report['real_time_factor'].values()):.2f}): outputs played up to "
                             f"{report['max_lag_s']:.2f} s late, and the latencies include that; realtime=true "
                             f"measures the model as if this machine kept up")
        log.warning(report["warning"])
    report["table"] = table(report["model"], report["baseline"])
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(
        f"{len(episodes)} episodes, seeds {list(eval_cfg.seeds)}, playback clock ({report['playback']}), activity: "
        f"{report['activity']}; value = mean over seeds, [{report['ci']}], n = events per seed\n\n"
        f"{report['table']}\n" + (f"\nWarning: {report['warning']}\n" if report["warning"] else ""))
    return report
