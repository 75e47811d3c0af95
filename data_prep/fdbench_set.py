"""Write held-out synthetic episodes as a Full-Duplex-Bench v1 / v1.5 set, so the benchmark loop runs offline.

    python -m data_prep.fdbench_set --data data/synthetic_heldout --out data/fdbench_synth

Each task folder holds one sample folder per labelled event (IDs 0, 1, ...), in the official layout
(``tml.eval.fdbench``), plus ``source.json`` (episode key, event, and ``offset``: the episode time of the sample's
t = 0) for traceability. Inputs are the user's side only, at 16 kHz, starting ``LEAD_S`` before the user utterance
that sets up the event (as the official samples start with the turn that is answered; earlier turns would let a
reply to them count as the first word); annotation times are on the sample's clock:

    v1/smooth_turn_taking/ID   an ``expected_response``: the user's turn, then ``--tail`` s of silence;
                               turn_taking.json [turn end, the recorded model's start]
    v1/pause_handling/ID       a user ``pause``: the utterance holding the pause, up to its end (no tail: any turn
                               the model takes is taken during the user's turn); pause.json [pause start, end]
    v1/user_interruption/ID    an ``interruption``: from the user turn before it (the context) to the end of the
                               interrupting utterance, then ``--tail`` s (the recorded model's reply is not in it:
                               the system under test speaks in between); interrupt.json {context, interrupt,
                               [start, end]}, context.wav, interrupt.wav
    v1/backchannel/ID          a user turn of >= 3 s; the recorded model's backchannels inside it, where it has
                               any, become the reference distribution in ``icc_gt_distribution.json`` (the official
                               binning: 0.2 s windows)
    v1.5/user_interruption/ID  as v1's, with clean_input.wav (the interruption silenced) and metadata.json
    v1.5/user_backchannel/ID   a user "mhm" / "yeah" during a model turn, from the user turn before it to its end +
                               ``--tail`` s; clean_input.wav without it; metadata.json

Not built (our synthetic labels have no such events): v1.5 talking_to_other and background_speech. Events whose
utterance cannot be found are counted and reported, never dropped silently.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import Counter
from pathlib import Path

import torch

from tml.audio.wav import write_wav
from tml.eval.fdbench import window_distribution
from tml.eval.loading import read_episodes

LONG_TURN_S = 3.0  # tml.eval.evaluate.LONG_USER_TURN_S: a user turn long enough for a backchannel
LEAD_S = 0.5  # audio kept before the utterance a sample starts with


def _turns(ep, speaker: str) -> list[dict]:
    return [t for t in ep.meta.get("turns", []) if t["speaker"] == speaker]


def _cut(user: torch.Tensor, sr: int, end: float, tail: float, start: float = 0.0) -> torch.Tensor:
    """user[start:end] followed by ``tail`` seconds of silence."""
    a, b = round(start * sr), min(round(end * sr), user.numel())
    return torch.cat([user[a:b], torch.zeros(round(tail * sr))])


class SetWriter:
    def __init__(self, out: Path, tail: float):
        self.out, self.tail = Path(out), tail
        self.next_id: Counter = Counter()
        self.skipped: Counter = Counter()
        self.gt: dict[str, list[float]] = {}

    def sample(self, task: str, ep, event: dict, offset: float) -> Path:
        d = self.out / task / str(self.next_id[task])
        self.next_id[task] += 1
        d.mkdir(parents=True)
        (d / "source.json").write_text(json.dumps({"episode": ep.key, "event": event, "offset": offset}))
        return d

    def episode(self, ep) -> None:
        sr, user = ep.sample_rate, ep.audio["user"]
        users, models = _turns(ep, "user"), _turns(ep, "model")
        r = lambda x: round(x, 4)  # noqa: E731
        for e in ep.meta.get("events", []):
            typ, t = e.get("type"), float(e.get("time", 0.0))
            if typ == "expected_response":
                turn = next((u for u in users if abs(u["end"] - t) < 1e-3), None)
                if turn is None:
                    self.skipped["expected_response: user turn not found"] += 1
                    continue
                a = max(0.0, turn["start"] - LEAD_S)
                d = self.sample("v1/smooth_turn_taking", ep, e, a)
                write_wav(d / "input.wav", _cut(user, sr, t, self.tail, a), sr)
                (d / "turn_taking.json").write_text(json.dumps(
                    [{"text": "[TURN-TAKING]", "timestamp": [r(t - a), r(float(e.get("start", t)) - a)]}]))
            elif typ == "pause" and e.get("speaker") == "user":
                turn = next((u for u in users if u["start"] <= t <= u["end"]), None)
                if turn is None:
                    self.skipped["pause: no user utterance holds it"] += 1
                    continue
                a = max(0.0, turn["start"] - LEAD_S)
                d = self.sample("v1/pause_handling", ep, e, a)
                write_wav(d / "input.wav", _cut(user, sr, turn["end"], 0.0, a), sr)
                (d / "pause.json").write_text(json.dumps(
                    [{"text": "[PAUSE]", "timestamp": [r(t - a), r(float(e["end"]) - a)]}]))
            elif typ == "interruption":
                cut = next((u for u in users if abs(u["start"] - t) < 1e-3 and u["kind"] == "interrupt"), None)
                ctx = next((u for u in reversed(users) if u["end"] <= t and u["kind"] == "turn"), None)
                if cut is None or ctx is None:
                    self.skipped["interruption: utterance or its context not found"] += 1
                    continue
                a = max(0.0, ctx["start"] - LEAD_S)
                for task in ("v1/user_interruption", "v1.5/user_interruption"):
                    d = self.sample(task, ep, e, a)
                    x = _cut(user, sr, cut["end"], self.tail, a)
                    write_wav(d / "input.wav", x, sr)
                    if task.startswith("v1/"):
                        write_wav(d / "context.wav", user[round(ctx["start"] * sr): round(ctx["end"] * sr)], sr)
                        write_wav(d / "interrupt.wav", user[round(t * sr): round(cut["end"] * sr)], sr)
                        (d / "interrupt.json").write_text(json.dumps(
                            [{"context": ctx["text"], "interrupt": cut["text"], "timestamp": [r(t - a), r(cut["end"] - a)]}]))
                    else:
                        self._v15(d, x, sr, ctx["text"], cut["text"], r(t - a), r(cut["end"] - a))
            elif typ == "non_interruption" and e.get("what") == "backchannel" and e.get("speaker") == "user":
                said = next((u for u in users if abs(u["start"] - t) < 1e-3), None)
                ctx = next((u for u in reversed(users) if u["end"] <= t and u["kind"] == "turn"), None)
                if said is None:
                    self.skipped["user backchannel: utterance not found"] += 1
                    continue
                a = max(0.0, ctx["start"] - LEAD_S) if ctx else 0.0
                d = self.sample("v1.5/user_backchannel", ep, e, a)
                x = _cut(user, sr, float(e["end"]), self.tail, a)
                write_wav(d / "input.wav", x, sr)
                self._v15(d, x, sr, ctx["text"] if ctx else "", said["text"], r(t - a), r(float(e["end"]) - a))
        for u in users:
            if u["kind"] != "turn" or u["end"] - u["start"] < LONG_TURN_S:
                continue
            a = max(0.0, u["start"] - LEAD_S)
            d = self.sample("v1/backchannel", ep, {"type": "long_user_turn", "time": u["start"], "end": u["end"]}, a)
            x = _cut(user, sr, u["end"], 0.0, a)
            write_wav(d / "input.wav", x, sr)
            bcs = [(m["start"] - a, m["end"] - a) for m in models
                   if m["kind"] == "backchannel" and u["start"] <= m["start"] < u["end"]]
            if bcs:
                self.gt[d.name] = window_distribution(bcs, x.numel() / sr)

    @staticmethod
    def _v15(d: Path, x: torch.Tensor, sr: int, context: str, current: str, start: float, end: float) -> None:
        clean = x.clone()
        clean[round(start * sr): round(end * sr)] = 0
        write_wav(d / "clean_input.wav", clean, sr)
        (d / "metadata.json").write_text(json.dumps(
            {"context_text": context, "current_turn_text": current, "timestamps": [start, end]}))

    def finish(self) -> dict:
        if self.gt:
            (self.out / "v1/backchannel/icc_gt_distribution.json").write_text(json.dumps(self.gt))
        summary = {"samples": dict(self.next_id), "skipped": dict(self.skipped), "tail_s": self.tail,
                   "backchannel_references": len(self.gt)}
        (self.out / "fdbench_set.json").write_text(json.dumps(summary, indent=2))
        return summary


def write_set(data: str | Path, out: str | Path, episodes: int = 0, tail: float = 3.0) -> dict:
    """Episodes of the synthetic set ``data`` (the first ``episodes``; 0 = all) -> an FD-bench layout in ``out``
    (replaced if it exists). Returns {"samples": per task, "skipped": per reason, "backchannel_references"}."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    writer = SetWriter(out, tail)
    for ep in read_episodes(data, limit=episodes):
        writer.episode(ep)
    return writer.finish()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a synthetic data set (data_prep.synth_dialogues --out)")
    p.add_argument("--out", required=True, help="root of the FD-bench layout to write (replaced)")
    p.add_argument("--episodes", type=int, default=0, help="use the first N episodes (0 = all)")
    p.add_argument("--tail", type=float, default=3.0, help="seconds of silence after the event for a reply")
    a = p.parse_args(argv)
    summary = write_set(a.data, a.out, a.episodes, a.tail)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
