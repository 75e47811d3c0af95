"""Evaluation labels from word alignments, for recorded conversations that carry no event labels: turn ends,
barge-ins and backchannels, read from when each speaker's words start and end. The recorded model-side speaker is
taken as the reference behaviour (what a good model would have done).

Rules (seconds; the defaults match ``tml.eval.duplex.MetricConfig``):

* utterance: one speaker's consecutive words with gaps shorter than ``pause_s``;
* backchannel: an utterance of at most ``backchannel_max_s`` that starts while the other speaker is mid-utterance
  (a short answer after the other speaker has finished is a turn);
* turn end that expects a response (``expected_response`` at the user's last word end): a user turn after which the
  model's next turn starts before the user speaks again, within ``max_response_s``;
* barge-in (``interruption`` at the user's first word): a user turn that starts inside a model utterance which then
  ends before the user's turn does (the model yielded);
* backchannel during model speech (``non_interruption``, what="backchannel"): a user backchannel inside a model
  utterance that goes on after it.

The output follows the schema of ``tml.streams.episode`` (``utterance_start`` / ``utterance_end`` with ``kind`` turn
or backchannel, plus the events above), so ``tml.eval.evaluate.labels_from_events`` reads it like synthetic labels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tml.streams.episode import Word

log = logging.getLogger(__name__)


@dataclass
class Utterance:
    speaker: str
    start: float
    end: float
    text: str
    kind: str = "turn"  # turn | backchannel


def utterances(words: list[Word], speaker: str, pause_s: float) -> list[Utterance]:
    """A speaker's words (any order) grouped into utterances at gaps of ``pause_s`` or more."""
    out: list[Utterance] = []
    for w in sorted(words, key=lambda w: w.start):
        if out and w.start - out[-1].end < pause_s:
            out[-1].end = max(out[-1].end, w.end)
            out[-1].text += " " + w.text
        else:
            out.append(Utterance(speaker, w.start, w.end, w.text))
    return out


def _inside(t: float, u: Utterance) -> bool:
    return u.start < t < u.end


def events_from_words(words: dict[str, list[Word]], pause_s: float = 0.5, backchannel_max_s: float = 1.0,
                      max_response_s: float = 5.0) -> list[dict]:
    """``{"user": [Word], "model": [Word]}`` -> event labels (``meta["events"]`` schema), sorted by time."""
    model = utterances(words.get("model", []), "model", pause_s)
    user = utterances(words.get("user", []), "user", pause_s)
    for mine, other in ((model, user), (user, model)):
        for u in mine:
            if u.end - u.start <= backchannel_max_s and any(_inside(u.start, o) for o in other):
                u.kind = "backchannel"
    events = []
    for u in model + user:
        events.append({"type": "utterance_start", "time": u.start, "speaker": u.speaker, "text": u.text,
                       "kind": u.kind})
        events.append({"type": "utterance_end", "time": u.end, "speaker": u.speaker, "kind": u.kind})
    model_turns = [m for m in model if m.kind == "turn"]
    user_turns = [u for u in user if u.kind == "turn"]
    for i, u in enumerate(user_turns):
        next_user = user_turns[i + 1].start if i + 1 < len(user_turns) else float("inf")
        reply = next((m for m in model_turns if u.end <= m.start < min(next_user, u.end + max_response_s)), None)
        if reply is not None:
            events.append({"type": "expected_response", "time": u.end, "speaker": "model", "by": reply.start,
                           "reason": "derived from word alignments"})
        talking = next((m for m in model if _inside(u.start, m)), None)
        if talking is not None and talking.end < u.end:
            events.append({"type": "interruption", "time": u.start, "speaker": "user", "target": "model",
                           "stop_by": talking.end})
    for u in user:
        if u.kind == "backchannel" and any(_inside(u.start, m) and m.end > u.end for m in model):
            events.append({"type": "non_interruption", "time": u.start, "speaker": "user", "what": "backchannel"})
    return sorted(events, key=lambda e: e["time"])


# What each metric needs, for the warning when an evaluation had none of it.
NEEDS = {"turn_taking": "user turns followed by a model turn (expected_response labels)",
         "interruption": "user barge-ins while the responder spoke (interruption labels)",
         "false_barge_in": "coughs / backchannels while the responder spoke (non_interruption labels)",
         "backchannel": "user turns of 3 s or more",
         "silence_compliance": "requests to wait (wait_request labels)",
         "on_time": "timed or visual cues (timer / visual labels)",
         "answer_accuracy": "expected answers (utterances of kind answer)",
         "delegation": "delegations (delegate labels)"}


def warn_unmeasured(metrics: dict, episodes: int) -> list[str]:
    """Log one warning per metric that had nothing to measure (None in ``metrics``); returns the metric names."""
    empty = [k for k, v in metrics.items() if v is None]
    for prefix, need in NEEDS.items():
        names = [k for k in empty if k.startswith(prefix)]
        if names:
            log.warning("%s: nothing to measure in %d episodes: they hold no %s", ", ".join(names), episodes, need)
    return empty
