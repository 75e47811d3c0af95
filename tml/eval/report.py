"""Evaluation with power: each duplex metric over several sampling seeds, with its event count, a confidence interval
over episodes, and a flag instead of a number where too few events were seen.

A sampled decoder gives a different conversation for every seed, and a held-out set has a few dozen events of each
kind, so one number from one seed says little. ``summarise`` takes the raw per-episode measurements of
``tml.eval.duplex.episode_metrics`` for every seed (the same episodes each time) and reports, per metric:

* value: the metric over all events of a seed (a rate, or the median / p90 latency), averaged over the seeds;
* events_per_seed: how many events it was measured on (e.g. barge-ins that came while the model was speaking);
* ci: a percentile bootstrap over episodes: resample the held-out episodes with replacement (an episode's events
  from every seed travel together, so the interval covers both the held-out set's size and the sampling noise),
  recompute the seed-averaged value, take the central ``confidence`` share. Episodes, not events, are resampled
  because events of one episode are not independent (same voice, same noise, same model state);
* flag: set, and value / ci left out, when fewer than ``min_events`` events per seed were seen.

    report = summarise(per_seed, EvalConfig())          # per_seed: [seeds][episodes] dicts
    print(table(report, baseline_report))               # a markdown table, baseline side by side
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class EvalConfig:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # sampling seeds; each replays every episode
    min_events: int = 10  # fewer events per seed: the metric is flagged, not reported as a number
    bootstrap: int = 2000  # bootstrap resamples of the episodes
    confidence: float = 0.95
    baseline: bool = True  # also run the silence-rule baseline on the same episodes

    def validate(self) -> "EvalConfig":
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"eval.seeds={self.seeds}: give at least one seed, each once (3 or more for a mean)")
        if self.min_events < 1 or self.bootstrap < 100 or not 0 < self.confidence < 1:
            raise ValueError(f"eval.min_events={self.min_events} must be >= 1, eval.bootstrap={self.bootstrap} >= 100 "
                             f"and eval.confidence={self.confidence} in (0, 1)")
        return self


STOP_WITHIN_S = 0.5  # a barge-in is handled when the model is silent within this (issue 15's bar)


def _stops_within(ep: dict, seconds: float) -> list[float]:
    """One value per barge-in that came while the model spoke: 1 if it stopped within ``seconds``. ``stopped`` has one
    entry per such barge-in, ``stop_latency`` the latencies of those that stopped within ``MetricConfig.max_stop_s``
    (1.5 s), so the ones within ``seconds`` are counted from the latencies."""
    k = sum(1 for x in ep["stop_latency"] if x <= seconds)
    return [1.0] * k + [0.0] * (len(ep["stopped"]) - k)


@dataclass(frozen=True)
class Metric:
    name: str
    events: Callable[[dict], list[float]]  # one episode's raw measurements -> one value per event
    statistic: str  # mean | median | p90
    better: str  # higher | lower
    what: str  # what an event is


METRICS = [
    Metric("response_rate", lambda ep: [1.0] * len(ep["latency"]) + [0.0] * len(ep["missed_turns"]), "mean",
           "higher", "reply gaps"),
    Metric("latency_median_s", lambda ep: ep["latency"], "median", "lower", "answered reply gaps"),
    Metric("latency_p90_s", lambda ep: ep["latency"], "p90", "lower", "answered reply gaps"),
    Metric("barge_in_stop_rate", lambda ep: _stops_within(ep, STOP_WITHIN_S), "mean", "higher",
           "barge-ins while it speaks"),
    Metric("cough_stop_rate", lambda ep: ep["false_stop"], "mean", "lower", "coughs / backchannels while it speaks"),
    Metric("wait_speak_rate", lambda ep: [1.0 - x for x in ep["quiet_ok"]], "mean", "lower", "wait windows"),
    Metric("on_time_rate", lambda ep: ep["on_time"], "mean", "higher", "timed cues"),
    Metric("answer_accuracy", lambda ep: ep["answer_ok"], "mean", "higher", "expected answers"),
    Metric("delegation_rate", lambda ep: ep["delegated"], "mean", "higher", "expected delegations"),
]


def statistic(kind: str, xs: list[float]) -> float | None:
    """mean / median / p90 (nearest rank, as ``tml.eval.duplex.aggregate``) of xs; None when xs is empty."""
    if not xs:
        return None
    if kind == "mean":
        return sum(xs) / len(xs)
    if kind == "median":
        return statistics.median(xs)
    if kind == "p90":
        return sorted(xs)[math.ceil(0.9 * len(xs)) - 1]
    raise ValueError(f"statistic {kind!r}: choose mean, median or p90")


def _seed_mean(kind: str, per_seed_events: list[list[list[float]]], episodes) -> float | None:
    """The statistic over the chosen episodes' events, per seed, averaged over the seeds that have any event."""
    values = [statistic(kind, [v for i in episodes for v in eps[i]]) for eps in per_seed_events]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarise(per_seed: list[list[dict]], cfg: EvalConfig | None = None) -> dict:
    """Per-seed, per-episode raw measurements (``per_seed[s][e]``, the same episodes in the same order for every
    seed) -> {metric name: {value, ci, events_per_seed, seeds, flag, better, what}} (see module docstring)."""
    cfg = (cfg or EvalConfig()).validate()
    n_episodes = {len(eps) for eps in per_seed}
    if len(n_episodes) != 1 or 0 in n_episodes:
        raise ValueError(f"summarise needs the same, non-zero number of episodes for every seed, got "
                         f"{[len(eps) for eps in per_seed]}")
    E = n_episodes.pop()
    resamples = np.random.default_rng(0).integers(0, E, size=(cfg.bootstrap, E))
    everything = range(E)
    out = {}
    for m in METRICS:
        events = [[m.events(ep) for ep in eps] for eps in per_seed]  # [seeds][episodes][events]
        counts = [sum(len(x) for x in eps) for eps in events]
        per_seed_value = [statistic(m.statistic, [v for x in eps for v in x]) for eps in events]
        entry = {"value": None, "ci": None, "events_per_seed": counts, "seeds": per_seed_value, "flag": None,
                 "better": m.better, "what": m.what}
        mean_count = sum(counts) / len(counts)
        if mean_count < cfg.min_events:
            entry["flag"] = f"too few events: {mean_count:g} per seed < {cfg.min_events}"
        else:
            boots = [v for b in resamples if (v := _seed_mean(m.statistic, events, b)) is not None]
            lo, hi = np.quantile(boots, [(1 - cfg.confidence) / 2, (1 + cfg.confidence) / 2])
            entry.update(value=_seed_mean(m.statistic, events, everything), ci=[float(lo), float(hi)])
        out[m.name] = entry
    return out


def _cell(e: dict | None) -> str:
    if e is None:
        return "-"
    n = "/".join(str(c) for c in e["events_per_seed"])
    if e["value"] is None:
        return f"flagged ({e['flag']}; n={n})"
    return f"{e['value']:.3f} [{e['ci'][0]:.3f}, {e['ci'][1]:.3f}] n={n}"


def table(model: dict, baseline: dict | None = None, model_name: str = "model",
          baseline_name: str = "silence rule") -> str:
    """A markdown table of ``summarise`` results: value [CI] and events per seed, the baseline beside the model."""
    lines = [f"| metric (events) | {model_name} | {baseline_name} | {model_name} better |", "|---|---|---|---|"]
    for m in METRICS:
        a, b = model.get(m.name), (baseline or {}).get(m.name)
        better = "-"
        if a and b and a["value"] is not None and b["value"] is not None:
            wins = a["value"] > b["value"] if m.better == "higher" else a["value"] < b["value"]
            better = "yes" if wins else "no"
        lines.append(f"| {m.name} ({m.what}; {m.better} is better) | {_cell(a)} | {_cell(b)} | {better} |")
    return "\n".join(lines)
