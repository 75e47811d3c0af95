"""Duplex interaction metrics: what makes full-duplex conversation good, measured from the model's own output.

Inputs are one episode's labels (``DuplexLabels``: when the user spoke and what the model was expected to do) and
the model's side as a speech-activity track on the mel clock (10 ms frames) plus its text with micro-turn times.
Every metric is a plain function of those two, so a scripted stand-in can be checked against hand-computed values.

Definitions (all times in seconds):
* speech onset: the first frame of a run of at least ``min_speech_s`` of model speech activity;
* turn-taking latency: user end of speech (of a turn that expects an answer) -> first model onset after it
  (missing when none within ``max_latency_s``); an onset up to ``overlap_s`` before the end (a reply that overlaps
  the user's last syllables, as ~18% of human turn switches do) takes the turn with latency 0, as Full-Duplex-Bench
  clips latency at 0;
* interruption: the user barges in at time i while the model speaks; stop latency = i -> first moment the model has
  been silent for ``min_silence_s``; stopped if that happens within ``max_stop_s``;
* false barge-in: a cough / backchannel at time c while the model speaks; counted when the model stops within
  ``false_stop_s`` (it should not; the window is short so that a turn that simply ends later is not counted);
* backchannel rate: share of long user turns during which the model produced speech shorter than
  ``max_backchannel_s``;
* silence compliance: share of "wait / be quiet" windows in which the model spoke less than ``quiet_tolerance`` of
  the window. A window opens when the reference speaker's acknowledgement ("take your time") ends; the first
  ``quiet_grace_s`` of it are not counted, so an acknowledgement heard up to that much later than the reference's
  (the latency a reply is allowed) is not taken for speaking through the wait; a speech run still going when the
  counted span starts is the model's own acknowledgement, heard later or rendered longer than the reference's, if
  it ends within ``ack_overrun_s``, and is not counted either; one that goes on is talking through the wait and
  counts whole;
* on-time rate: share of timed cues (time-aware or visual tasks) with a model onset within ``on_time_tol_s``;
* text accuracy: share of expected answers whose words appear in the model's text written after the question;
* delegation rate: share of expected delegations (time, query) for which the model's text holds a closed
  ``<delegate> ... </delegate>`` span with the query's words, opened within ``delegate_tol_s`` of that time.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field

import torch


@dataclass
class DuplexLabels:
    """What one episode asks of the model (times in seconds from its start)."""

    duration: float
    response_turns: list[tuple[float, float]] = field(default_factory=list)  # user turns that expect an answer
    interruptions: list[float] = field(default_factory=list)  # barge-in onsets: the model should stop
    false_barge_ins: list[float] = field(default_factory=list)  # coughs / backchannels: it should not stop
    # listener sounds the reference's line ends soon after (it stops anyway): measured apart, not as coughs
    sounds_at_line_end: list[float] = field(default_factory=list)
    long_user_turns: list[tuple[float, float]] = field(default_factory=list)  # where a backchannel fits
    quiet_windows: list[tuple[float, float]] = field(default_factory=list)  # asked to wait: stay silent
    timed_cues: list[float] = field(default_factory=list)  # act ("now!", count) at these times
    answers: list[tuple[float, str]] = field(default_factory=list)  # (question end, expected answer text)
    delegations: list[tuple[float, str]] = field(default_factory=list)  # (time, query) to hand to the background


@dataclass
class MetricConfig:
    frame_s: float = 0.01  # activity track resolution (the mel hop)
    min_speech_s: float = 0.1
    min_silence_s: float = 0.2
    max_latency_s: float = 5.0
    overlap_s: float = 0.3  # an onset this close before the user's end of turn takes the turn (latency 0)
    max_stop_s: float = 1.5
    false_stop_s: float = 0.5
    max_backchannel_s: float = 1.0
    quiet_tolerance: float = 0.05
    quiet_grace_s: float = 0.5  # a late acknowledgement may run this far into a wait window
    ack_overrun_s: float = 1.0  # ... and a longer-worded one this much further (a run going on at the counted start)
    on_time_tol_s: float = 0.5
    delegate_tol_s: float = 2.0


def speech_activity(log_mel: torch.Tensor, threshold: float) -> torch.Tensor:
    """bool [frames]: frames whose mean log-mel exceeds ``threshold`` (log10 power; speech is ~-2, silence -7)."""
    return log_mel.float().mean(-1) > threshold


def _runs(active: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) frame index runs of True."""
    a = active.to(torch.int8)
    edges = torch.diff(torch.cat([a.new_zeros(1), a, a.new_zeros(1)]))
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends))


def onsets(active: torch.Tensor, cfg: MetricConfig) -> list[float]:
    """Times of speech onsets (runs of at least ``min_speech_s``)."""
    min_len = round(cfg.min_speech_s / cfg.frame_s)
    return [s * cfg.frame_s for s, e in _runs(active) if e - s >= min_len]


def _stop_time(active: torch.Tensor, t: float, cfg: MetricConfig) -> float | None:
    """First time >= t at which the model has been silent for ``min_silence_s`` (the silence's start)."""
    need = round(cfg.min_silence_s / cfg.frame_s)
    start = round(t / cfg.frame_s)
    silent = ~active[start:]
    for s, e in _runs(silent):
        if e - s >= need or start + e == active.numel():  # a silence that lasts to the end counts
            return (start + s) * cfg.frame_s
    return None


def _speaking_at(active: torch.Tensor, t: float, cfg: MetricConfig) -> bool:
    i = round(t / cfg.frame_s)
    return bool(active[max(0, i - 5) : i + 1].any())  # speaking within the last 50 ms


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def delegate_spans(text_by_time: list[tuple[float, str]]) -> list[tuple[float, str]]:
    """(time its ``<delegate>`` was written, the text inside) of every closed span, in time order; a span may
    run over several entries (the model writes a few tokens per micro-turn)."""
    spans, opened, inside = [], None, []
    for t, text in sorted(text_by_time, key=lambda x: x[0]):
        for piece in re.findall(r"</?delegate>|[^\s<]+|<", text):
            if piece == "<delegate>":
                opened, inside = t, []
            elif piece == "</delegate>" and opened is not None:
                spans.append((opened, " ".join(inside)))
                opened = None
            elif opened is not None:
                inside.append(piece)
    return spans


def episode_metrics(labels: DuplexLabels, active: torch.Tensor, text_by_time: list[tuple[float, str]],
                    cfg: MetricConfig | None = None) -> dict:
    """Raw per-episode measurements (lists of latencies and 0/1 outcomes); ``aggregate`` summarises episodes.

    Args:
        active: bool [frames] model speech activity on the ``cfg.frame_s`` clock.
        text_by_time: (time, text) the model wrote, e.g. one entry per micro-turn.
    """
    cfg = cfg or MetricConfig()
    on = onsets(active, cfg)
    out: dict[str, list] = {k: [] for k in ("latency", "missed_turns", "stop_latency", "stopped", "false_stop",
                                            "backchannel", "quiet_ok", "on_time", "answer_ok", "delegated",
                                            "stop_at_line_end")}
    for start, end in labels.response_turns:
        nxt = [o for o in on if max(start, end - cfg.overlap_s) <= o <= end + cfg.max_latency_s]
        if nxt:
            out["latency"].append(max(0.0, nxt[0] - end))
        else:
            out["missed_turns"].append(1)
    for i in labels.interruptions:
        if not _speaking_at(active, i, cfg):
            continue  # nothing to interrupt
        stop = _stop_time(active, i, cfg)
        ok = stop is not None and stop - i <= cfg.max_stop_s
        out["stopped"].append(int(ok))
        if ok:
            out["stop_latency"].append(stop - i)
    for key, sounds in (("false_stop", labels.false_barge_ins), ("stop_at_line_end", labels.sounds_at_line_end)):
        for c in sounds:
            if _speaking_at(active, c, cfg):
                stop = _stop_time(active, c, cfg)
                out[key].append(int(stop is not None and stop - c <= cfg.false_stop_s))
    for s, e in labels.long_user_turns:
        a, b = round(s / cfg.frame_s), round(e / cfg.frame_s)
        runs = [(x, y) for x, y in _runs(active[a:b]) if (y - x) * cfg.frame_s <= cfg.max_backchannel_s
                and (y - x) * cfg.frame_s >= cfg.min_speech_s]
        out["backchannel"].append(int(bool(runs)))
    for s, e in labels.quiet_windows:
        a, b = round((s + cfg.quiet_grace_s) / cfg.frame_s), round(e / cfg.frame_s)
        spoken = active[a:b].clone()
        runs = _runs(spoken)
        if runs and runs[0][0] == 0:  # the acknowledgement still going: excused if it ends within ack_overrun_s
            ack = runs[0][1]
            if ack * cfg.frame_s <= cfg.ack_overrun_s + 1e-9:
                spoken[:ack] = False
        out["quiet_ok"].append(int(spoken.float().mean().item() <= cfg.quiet_tolerance if b > a else 1))
    for t in labels.timed_cues:
        out["on_time"].append(int(any(abs(o - t) <= cfg.on_time_tol_s for o in on)))
    for after, expected in labels.answers:
        said = set(_words(" ".join(txt for t, txt in text_by_time if t >= after)))
        want = _words(expected)
        out["answer_ok"].append(int(bool(want) and all(w in said for w in want)))
    spans = delegate_spans(text_by_time)
    for t, query in labels.delegations:
        out["delegated"].append(int(any(abs(s - t) <= cfg.delegate_tol_s and _words(q) == _words(query)
                                        for s, q in spans)))
    return out


def aggregate(per_episode: list[dict]) -> dict:
    """Sum raw measurements over episodes into the reported metrics (None where nothing was measured)."""
    pool = {k: [x for ep in per_episode for x in ep[k]] for k in per_episode[0]} if per_episode else {}

    def mean(xs):
        return sum(xs) / len(xs) if xs else None

    lat = sorted(pool.get("latency", []))
    n_turns = len(lat) + len(pool.get("missed_turns", []))
    return {
        "turn_taking_latency_mean_s": mean(lat),
        "turn_taking_latency_median_s": statistics.median(lat) if lat else None,
        "turn_taking_latency_p90_s": lat[math.ceil(0.9 * len(lat)) - 1] if lat else None,  # nearest rank
        "turn_taking_response_rate": len(lat) / n_turns if n_turns else None,
        "interruption_stop_rate": mean(pool.get("stopped", [])),
        "interruption_stop_latency_mean_s": mean(pool.get("stop_latency", [])),
        "false_barge_in_rate": mean(pool.get("false_stop", [])),
        "backchannel_rate": mean(pool.get("backchannel", [])),
        "silence_compliance": mean(pool.get("quiet_ok", [])),
        "on_time_rate": mean(pool.get("on_time", [])),
        "answer_accuracy": mean(pool.get("answer_ok", [])),
        "delegation_rate": mean(pool.get("delegated", [])),
        "counts": {k: len(v) for k, v in pool.items()},
    }
