"""Interaction metrics against training steps, from the checkpoints a run kept, beside its held-out loss.

    python -m tml.tools.interaction_curves --run outputs/interaction/main --data data/interaction_heldout \
        --episodes 24 --out docs/interaction_curves.png

Every kept checkpoint (``RUN/checkpoints/step_*``) replays the first ``--episodes`` held-out episodes through its
``StreamingSession`` (sampled floor decision, the default decoder) for each ``--seeds`` value, heard on the playback
clock (``realtime``: output of micro-turn t at (t + 1) * 0.2 s, compute not counted, so the curve does not depend
on how busy the machine was) by ``--vad`` (log-mel by default: fast, and the model's own dMel has no noise floor).
The silence-rule baseline is scored once on the same episodes. Writes ``--out`` (PNG: one panel per metric, the
baseline dashed, the target dotted; the last panel the held-out loss from ``RUN/metrics.jsonl``) and a JSON beside it
with every value and its event count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path


# (key, title, target, higher is better) for each plotted metric; targets are the issue's.
CURVES = [
    ("response_rate", "response rate", 0.9, True),
    ("latency_median_s", "median turn-taking latency (s)", 0.5, False),
    ("latency_p90_s", "p90 turn-taking latency (s)", 1.0, False),
    ("barge_in_stop_rate", "stops within 0.5 s of a barge-in", 0.9, True),
    ("cough_stop_rate", "stops on a cough / backchannel", 0.2, False),
    ("wait_speak_rate", "speaks in a wait window", 0.1, False),
]


def curve_metrics(per_episode: list[dict], stop_s: float = 0.5) -> dict:
    """Raw per-episode measurements (``tml.eval.duplex.episode_metrics``, pooled over seeds) -> the plotted
    metrics and their event counts (``n_<key>``). A barge-in counts as handled when the model was silent within
    ``stop_s``; events are the ones that came while the model was speaking."""
    pool = {k: [x for ep in per_episode for x in ep[k]] for k in per_episode[0]}
    lat = sorted(pool["latency"])
    turns = len(lat) + len(pool["missed_turns"])
    stops = [x <= stop_s for x in pool["stop_latency"]]

    def rate(hits, n):
        return hits / n if n else None

    return {
        "response_rate": rate(len(lat), turns), "n_response_rate": turns,
        "latency_median_s": statistics.median(lat) if lat else None, "n_latency_median_s": len(lat),
        "latency_p90_s": lat[-(-9 * len(lat) // 10) - 1] if lat else None, "n_latency_p90_s": len(lat),
        "barge_in_stop_rate": rate(sum(stops), len(pool["stopped"])), "n_barge_in_stop_rate": len(pool["stopped"]),
        "cough_stop_rate": rate(sum(pool["false_stop"]), len(pool["false_stop"])),
        "n_cough_stop_rate": len(pool["false_stop"]),
        "wait_speak_rate": rate(len(pool["quiet_ok"]) - sum(pool["quiet_ok"]), len(pool["quiet_ok"])),
        "n_wait_speak_rate": len(pool["quiet_ok"]),
    }


def summary(per_seed: list[list[dict]], min_events: int = 10, resamples: int = 1000,
            confidence: float = 0.95) -> dict:
    """Each plotted metric over several sampling seeds (``per_seed[s][e]``: raw measurements of episode e under
    seed s, the same episodes for every seed): the per-seed value averaged over seeds, a percentile bootstrap CI
    over episodes (an episode's events of every seed travel together), the events per seed, and a flag instead of
    a value below ``min_events`` events per seed."""
    import random

    E = len(per_seed[0])
    rng = random.Random(0)
    draws = [[rng.randrange(E) for _ in range(E)] for _ in range(resamples)]

    def value(key, idx):
        vals = [curve_metrics([eps[i] for i in idx])[key] for eps in per_seed]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    out = {}
    for key, *_ in CURVES:
        n = [curve_metrics(eps)[f"n_{key}"] for eps in per_seed]
        entry = {"events_per_seed": n, "value": None, "ci": None, "flag": None}
        if sum(n) / len(n) < min_events:
            entry["flag"] = f"too few events ({sum(n) / len(n):g} per seed < {min_events})"
        else:
            boots = sorted(v for d in draws if (v := value(key, d)) is not None)
            lo, hi = boots[int((1 - confidence) / 2 * len(boots))], boots[int((1 + confidence) / 2 * len(boots)) - 1]
            entry.update(value=value(key, range(E)), ci=[lo, hi])
        out[key] = entry
    at_end = [[x for ep in eps for x in ep.get("stop_at_line_end", [])] for eps in per_seed]
    out["sounds_at_line_end"] = {"events_per_seed": [len(x) for x in at_end],
                                 "stop_rate": sum(map(sum, at_end)) / max(1, sum(map(len, at_end)))}
    return out


def table(model: dict, baseline: dict | None = None) -> str:
    """Markdown: value [95% CI] (events per seed) per metric, the baseline beside it, and the issue's target."""
    def cell(e):
        n = "/".join(map(str, e["events_per_seed"]))
        return f"{e['flag']}, n={n}" if e["value"] is None else \
            f"{e['value']:.2f} [{e['ci'][0]:.2f}, {e['ci'][1]:.2f}] (n={n})"

    rows = ["| metric | target | model | silence rule |", "|---|---|---|---|"]
    for key, title, target, higher in CURVES:
        rows.append(f"| {title} | {'>=' if higher else '<='} {target} | {cell(model[key])} | "
                    f"{cell(baseline[key]) if baseline else '-'} |")
    if model.get("sounds_at_line_end", {}).get("events_per_seed"):
        from tml.eval.evaluate import LISTENER_SOUND_CLEAR_S

        e = model["sounds_at_line_end"]
        rows.append(f"\nNot counted as coughs: listener sounds under {LISTENER_SOUND_CLEAR_S:g} s before the reference's "
                    f"line ends (it stops too), n={'/'.join(map(str, e['events_per_seed']))}, stopped within 0.5 s "
                    f"at {e['stop_rate']:.2f}.")
    return "\n".join(rows)


def _replay(make, episodes, run, vad, out: Path, make_sessions=None) -> list[dict]:
    """Per-episode measurements of one responder over ``episodes`` (read back from the eval.json that
    ``tml.eval.evaluate.evaluate`` writes, which holds them whatever it returns). ``make_sessions(n)``: a batched
    ``StreamingSession`` of n sessions, 16 episodes at a time (each episode's outputs as its own session's)."""
    from tml.eval.evaluate import evaluate

    evaluate(make, episodes, run.layout, run.dmel, run.text, out, vad, n_wavs=0, n_timelines=0, realtime=True,
             make_sessions=make_sessions)
    return json.loads((out / "eval.json").read_text())["per_episode"]


def sampling_overrides(specs: list[str]) -> dict:
    """["words_given_speech=never", "text_temperature=0.7"] -> {field: value typed like its SamplingConfig default}."""
    from tml.model.sampling import SamplingConfig

    defaults, out = SamplingConfig(), {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep or not hasattr(defaults, key):
            raise SystemExit(f"--sampling {spec!r}: expected FIELD=VALUE with FIELD one of "
                             f"{', '.join(f for f in vars(defaults))}")
        default = getattr(defaults, key)
        if default is None:  # an optional number (floor_temperature_speaking): "none" keeps it unset
            out[key] = None if value.lower() == "none" else float(value)
        else:
            out[key] = type(default)(value)
    return out


def checkpoint_curves(run_dir: Path, data: str, episodes: int, seeds: list[int], vad_method: str,
                      steps: list[int] | None = None, baseline: bool = True, floor: str = "sample",
                      floor_temperature: float = 1.0, sampling: dict | None = None) -> dict:
    """``sampling``: further ``SamplingConfig`` fields for the model's sessions (e.g. {"words_given_speech": "never"}).

    {"steps": [...], "model": [metrics per step], "raw": [per step: [per seed: [per episode measurements]]],
    "baseline": metrics, "baseline_raw": [per episode], "val": [(step, val/loss/text, ...)]}."""
    from tml.eval.evaluate import SilenceRuleResponder, canned_reply
    from tml.eval.loading import load_run, read_episodes
    from tml.eval.session import SessionConfig, StreamingSession
    from tml.eval.vad import VADConfig

    vad = VADConfig(method=vad_method)
    eps = read_episodes(data, limit=episodes)
    dirs = sorted((run_dir / "checkpoints").glob("step_*"))
    if steps:
        dirs = [d for d in dirs if int(d.name.removeprefix("step_")) in steps]
    if not dirs:
        raise FileNotFoundError(f"no checkpoints step_* in {run_dir / 'checkpoints'} (steps {steps})")
    out = {"run": str(run_dir), "data": data, "episodes": len(eps), "seeds": seeds, "vad": vad_method,
           "playback": "realtime", "floor": floor, "floor_temperature": floor_temperature,
           "sampling": sampling or {}, "steps": [], "model": [],
           "raw": []}
    tmp = Path(tempfile.mkdtemp(prefix="curves_"))
    for d in dirs:
        run = load_run(d)
        per_seed = []
        for seed in seeds:
            cfg = SessionConfig()
            cfg = replace(cfg, sampling=replace(cfg.sampling, seed=seed, floor=floor,
                                                floor_temperature=floor_temperature, **(sampling or {})))
            per_seed.append(_replay(None, eps, run, vad, tmp / f"{d.name}_{seed}",
                                    make_sessions=lambda n: StreamingSession(run.model, run.layout, run.dmel, cfg,
                                                                             run.text.pad_id, sessions=n)))
        step = int(d.name.removeprefix("step_"))
        out["steps"].append(step)
        out["model"].append(curve_metrics([ep for per in per_seed for ep in per]))
        out["raw"].append(per_seed)
        print(f"step {step}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in out["model"][-1].items()), flush=True)
    if baseline:
        reply = canned_reply("okay, I hear you.", run.dmel, run.text)
        out["baseline_raw"] = _replay(
            lambda: SilenceRuleResponder(run.layout, run.dmel, 0.3, threshold=-5.0, text_pad_id=run.text.pad_id,
                                         reply=reply), eps, run, vad, tmp / "baseline")
        out["baseline"] = curve_metrics(out["baseline_raw"])
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        out["val"] = [{k: r[k] for k in ("step", "val/loss/text", "val/loss/text_words", "val/loss/audio")}
                      for r in rows if "val/loss" in r]
        out["train"] = [{k: r[k] for k in ("step", "loss/text", "loss/text_words", "loss/audio")}
                        for r in rows if r["step"] % 50 == 0]
    return out


def plot(curves: dict, path: Path, others: dict[str, dict] | None = None) -> None:
    """One panel per metric of ``CURVES`` (model vs step, baseline dashed, target dotted) plus the losses.
    ``others``: more runs (label -> curves) drawn on the same axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {"model": curves, **(others or {})}
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    axes = axes.flatten()
    for ax, (key, title, target, higher) in zip(axes, CURVES):
        for i, (label, c) in enumerate(runs.items()):
            xs = [s for s, m in zip(c["steps"], c["model"]) if m[key] is not None]
            ys = [m[key] for m in c["model"] if m[key] is not None]
            ax.plot(xs, ys, "o-", color=f"C{i}", label=label)
        b = curves.get("baseline", {}).get(key)
        if b is not None:
            ax.axhline(b, color="grey", ls="--", label="silence rule")
        ax.axhline(target, color="green", ls=":", label=f"target ({'>=' if higher else '<='} {target})")
        n = curves["model"][-1][f"n_{key}"]
        ax.set_title(f"{title}\n(events at the last step: {n})", fontsize=9)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    ax = axes[len(CURVES)]
    for i, (label, c) in enumerate(runs.items()):
        if c.get("val"):
            steps = [r["step"] for r in c["val"]]
            ax.plot(steps, [r["val/loss/text_words"] for r in c["val"]], "o-", color=f"C{i}",
                    label=f"{label} held-out words")
            ax.plot(steps, [r["val/loss/audio"] for r in c["val"]], "s--", color=f"C{i}",
                    label=f"{label} held-out audio")
        if c.get("train") and label == "model":
            tr = c["train"]
            ax.plot([r["step"] for r in tr], [r["loss/text_words"] for r in tr], color="black", lw=0.6,
                    label="train words")
    ax.set_title("losses (nats): text words, audio bins", fontsize=9)
    ax.set_xlabel("step")
    ax.legend(fontsize=6)
    axes[-1].axis("off")
    fig.suptitle(f"{curves['run']}: {curves['episodes']} held-out episodes x seeds {curves['seeds']}, playback "
                 f"clock, {curves['vad']} activity", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table_main(paths: list[str], step: int | None = None) -> str:
    """The table of one step (default: the last) from curve JSONs of the same run and episodes whose seeds add up
    (e.g. seeds 0,1 in one process and 2 with the baseline in another)."""
    per_seed, base = [], None
    for path in paths:
        c = json.loads(Path(path).read_text())
        i = c["steps"].index(step) if step is not None else -1
        per_seed += c["raw"][i]
        base = c.get("baseline_raw", base)
    md = table(summary(per_seed), summary([base]) if base else None)
    print(md)
    return md


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a pretrain run dir with checkpoints/step_*")
    p.add_argument("--data", required=True, help="held-out episodes (another seed than training)")
    p.add_argument("--episodes", type=int, default=24, help="the first N held-out episodes")
    p.add_argument("--seeds", default="0", help="sampling seeds, comma separated")
    p.add_argument("--vad", default="logmel", choices=["logmel", "silero"], help="how speech activity is heard")
    p.add_argument("--steps", default="", help="only these steps, comma separated (default: every kept one)")
    p.add_argument("--compare", action="append", default=[], help="LABEL=JSON of another run's curves to overlay")
    p.add_argument("--no-baseline", action="store_true", help="skip the silence-rule baseline")
    p.add_argument("--floor", default="sample", help="speak/silent decision: sample (default) | greedy | none")
    p.add_argument("--floor-temperature", type=float, default=1.0,
                   help="floor head: draw from sigmoid(logit / T) (sampling.floor_temperature; 1 = as trained)")
    p.add_argument("--sampling", action="append", default=[], metavar="FIELD=VALUE",
                   help="another SamplingConfig field for the model, e.g. floor_temperature_speaking=0.5 (repeatable)")
    p.add_argument("--out", required=True, help="PNG; the JSON goes beside it")
    a = p.parse_args(argv)
    curves = checkpoint_curves(Path(a.run), a.data, a.episodes, [int(s) for s in a.seeds.split(",")], a.vad,
                               [int(s) for s in a.steps.split(",") if s], baseline=not a.no_baseline,
                               floor=a.floor, floor_temperature=a.floor_temperature,
                               sampling=sampling_overrides(a.sampling))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(curves, indent=1))
    others = {}
    for spec in a.compare:
        label, _, path = spec.partition("=")
        others[label] = json.loads(Path(path).read_text())
    plot(curves, out, others)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return curves


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["table"]:  # python -m tml.tools.interaction_curves table A.json [B.json ...]
        table_main(sys.argv[2:])
    else:
        main()
