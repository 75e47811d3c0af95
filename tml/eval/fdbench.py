"""Full-Duplex-Bench v1 / v1.5 (github.com/DanielLin94144/Full-Duplex-Bench, ``v1_v1.5/``): export and scoring.

Layout (one folder per sample under a task root; the official ``--root_dir``)::

    ROOT/ID/input.wav            the user's side (any rate)
    ROOT/ID/turn_taking.json     [{"text": "[TURN-TAKING]", "timestamp": [user turn end, ...]}]
    ROOT/ID/pause.json           [{"text": "[PAUSE]", "timestamp": [pause start, pause end]}]
    ROOT/ID/interrupt.json       [{"context", "interrupt", "timestamp": [interrupt start, interrupt end]}]
    ROOT/ID/metadata.json        v1.5: {"context_text", "current_turn_text", "timestamps": [start, end]}
    ROOT/ID/clean_input.wav      v1.5: the same without the overlap event
    ROOT/ID/output.wav           written by a system: mono, t=0 and length of input.wav (here always 16 kHz)
    ROOT/ID/output.json          {"text", "chunks": [{"text": word, "timestamp": [start, end]}]}

Scoring, as the official scripts define it (``python -m tml.eval.fdbench score root=ROOT task=TASK``):

* take-turn rule (``eval_smooth_turn_taking.py``, ``eval_pause_handling.py``, ``eval_user_interruption.py``): no
  words -> TOR 0; words spanning less than 1 s (last word's end - first word's start) and at most 3 words -> 0;
  else 1. Latency = first word start - reference time (turn end: ``turn_taking.json[0].timestamp[0]``; interruption
  end: ``interrupt.json[0].timestamp[1]``), averaged over TOR = 1 samples with negatives clipped to 0.
  A ``None`` word end counts as its start (the pause script's rule; the other two scripts would raise).
* smooth_turn_taking: TOR (higher is better) and latency. pause_handling: TOR only (lower is better).
  user_interruption: TOR and latency; the GPT-4-judged relevance rating needs a paid API and is out of scope here.
  The official pipeline transcribes only the audio after the interruption's end (``get_transcript/asr.py``), so
  ``output.json`` holds only later words: ``export`` keeps the same words.
* backchannel (``eval_backchannel.py``): Silero segments of ``output.wav`` (seconds rounded to 0.1 s, as
  ``get_speech_timestamps(return_seconds=True)`` gives them). A segment over 3 s sets TOR 1 and stops the scan;
  otherwise the words overlapping it decide: > 3 words -> 1, else under 1 s with <= 2 words -> 0, else 1 (the last
  segment scanned decides the sample's TOR); every segment of <= 3 s scanned counts as a backchannel. Frequency =
  backchannels / output duration. JSD (only with ``icc_gt_distribution.json``, keyed by sample ID): backchannel
  windows counted per 0.2 s bin (bins ``int(d / 0.2) + 1``, each interval adds 1 to bins ``int(s / 0.2)`` ..
  ``int(e / 0.2)``), + 1e-10, normalised; the reference linearly resampled to that length; Jensen-Shannon
  *distance* (scipy's ``jensenshannon``: square root, natural log); 1 when there is no backchannel. Means and
  population standard deviations over samples (JSD over the samples the reference file has).
* timing (v1.5 ``get_timing.py``): Silero segments of input.wav merged over gaps <= 0.6 s and of output.wav over
  gaps <= 0.5 s (both at 16 kHz, default Silero settings); ``latency_stop_list``: overlaps of user and model
  segments, the shortest per end time (ms); ``latency_resp_list``: [user end, next model start after it], the
  latest user end per model start. Written to ``latency_intervals.json`` per folder; the summary here reports the
  mean lengths (the official script writes only the per-folder files).

Deliberate differences (each where the official script would crash or mis-time, never where it gives a number):
folders without ``output.json`` are listed in ``missing`` (the official scripts skip them silently, so the numbers
agree); backchannel samples the reference file lacks are listed in ``no_reference`` (a KeyError there); a task with no TOR = 1 sample reports latency None (division by zero there); output.wav at another rate
than 16 kHz is resampled before Silero (the backchannel script feeds it as if 16 kHz).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from tml.data.loader import DataError
from tml.eval.vad import VADConfig, merge_segments, speech_segments

TURN_DURATION_S = 1.0  # words spanning less than this ...
TURN_MAX_WORDS = 3  # ... and at most this many words are not a turn
BC_WINDOW_S, BC_EPS, BC_TURN_S = 0.2, 1e-10, 3.0  # eval_backchannel.py
USER_MERGE_GAP_S, MODEL_MERGE_GAP_S = 0.6, 0.5  # get_timing.py
ANNOTATION = {"smooth_turn_taking": "turn_taking.json", "pause_handling": "pause.json",
              "user_interruption": "interrupt.json"}
TASKS = ("smooth_turn_taking", "pause_handling", "user_interruption", "backchannel", "timing")


class FDBenchError(DataError):
    """A sample folder or file is missing or malformed; the message names it (a recipe prints it as one line)."""


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------

def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FDBenchError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise FDBenchError(f"{path}: not valid JSON ({e})") from None


def sample_dirs(root: Path) -> list[Path]:
    """Sample folders of a task root, sorted by name (numbers numerically)."""
    root = Path(root)
    if not root.is_dir():
        raise FDBenchError(f"root={root} is not a folder (point it at one task's folder of sample IDs)")
    dirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    return sorted(dirs, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))


def read_chunks(path: Path) -> list[dict]:
    """``output.json``'s word chunks, each {"text", "timestamp": [start, end]} (end may be None)."""
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("chunks"), list):
        raise FDBenchError(f"{path}: expected {{\"text\": ..., \"chunks\": [...]}}")
    for i, c in enumerate(data["chunks"]):
        ts = c.get("timestamp") if isinstance(c, dict) else None
        if not isinstance(ts, (list, tuple)) or len(ts) != 2 or ts[0] is None:
            raise FDBenchError(f"{path}: chunk {i} needs \"timestamp\": [start, end] with a start, got {c!r}")
    return data["chunks"]


# ---------------------------------------------------------------------------------------------------------------
# The take-turn rule and the v1 tasks
# ---------------------------------------------------------------------------------------------------------------

def take_turn(chunks: list[dict]) -> int:
    """1 if the words count as taking the turn (see module docstring), else 0."""
    if not chunks:
        return 0
    last = chunks[-1]["timestamp"]
    span = (last[1] if last[1] is not None else last[0]) - chunks[0]["timestamp"][0]
    return 0 if span < TURN_DURATION_S and len(chunks) <= TURN_MAX_WORDS else 1


def _ci95(xs: list[float]) -> list[float] | None:
    """Normal-approximation 95% interval of the mean (None below 2 values)."""
    if len(xs) < 2:
        return None
    m, h = statistics.fmean(xs), 1.96 * statistics.stdev(xs) / math.sqrt(len(xs))
    return [m - h, m + h]


def score_turns(root: Path, task: str) -> dict:
    """smooth_turn_taking / pause_handling / user_interruption: per-sample TOR and latency, and their means."""
    per, missing = [], []
    for d in sample_dirs(root):
        if not (d / "output.json").exists():
            missing.append(d.name)
            continue
        chunks = read_chunks(d / "output.json")
        tor = take_turn(chunks)
        rec = {"id": d.name, "tor": tor, "words": len(chunks)}
        if task != "pause_handling":
            ann = _read_json(d / ANNOTATION[task])
            try:
                ref = float(ann[0]["timestamp"][0 if task == "smooth_turn_taking" else 1])
            except (KeyError, IndexError, TypeError, ValueError):
                raise FDBenchError(f"{d / ANNOTATION[task]}: expected [{{\"timestamp\": [start, end], ...}}]") from None
            rec["reference_s"] = ref
            if tor:
                rec["latency_raw"] = chunks[0]["timestamp"][0] - ref
                rec["latency"] = max(0.0, rec["latency_raw"])
        per.append(rec)
    if missing:
        print(f"fdbench: {len(missing)} sample folders under {root} have no output.json and are not scored: "
              f"{missing[:10]}{' ...' if len(missing) > 10 else ''}", file=sys.stderr)
    tors = [r["tor"] for r in per]
    lats = [r["latency"] for r in per if "latency" in r]
    out = {"task": task, "samples": len(per), "missing": missing, "tor": statistics.fmean(tors) if tors else None,
           "tor_ci95": _ci95(tors), "turns_taken": sum(tors)}
    if task != "pause_handling":
        out.update(latency=statistics.fmean(lats) if lats else None, latency_ci95=_ci95(lats))
    if task == "user_interruption":
        out["relevance"] = "not scored: the official rating is GPT-4-judged (paid API), out of scope"
    out["per_sample"] = per
    return out


# ---------------------------------------------------------------------------------------------------------------
# Backchannel
# ---------------------------------------------------------------------------------------------------------------

def _words_in(chunks: list[dict], start: float, end: float) -> list[str]:
    """Words overlapping [start, end] by eval_backchannel.py's three conditions (None ends handled as there)."""
    out = []
    for c in chunks:
        s, e = c["timestamp"]
        if s is None or (e is None and s < end):
            continue
        e = s if e is None else e
        if (s >= start and e <= end) or (s <= end and e > end) or (s <= start and e > start):
            out.append(c["text"])
    return out


def backchannels(segments: list[tuple[float, float]], chunks: list[dict]) -> tuple[int, list[tuple[float, float]]]:
    """(TOR, backchannel intervals) of one output from its VAD segments (seconds) and words."""
    tor, found = 0, []
    for s, e in segments:
        dur = e - s
        if dur > BC_TURN_S:
            tor = 1
            break
        n = len(_words_in(chunks, s, e))
        tor = 1 if n > 3 or dur >= 1 or n > 2 else 0
        found.append((s, e))
    return tor, found


def window_distribution(intervals: list[tuple[float, float]], duration: float) -> list[float]:
    """Backchannel intervals counted per 0.2 s window, + 1e-10, normalised (eval_backchannel.py)."""
    counts = [0.0] * (int(duration / BC_WINDOW_S) + 1)
    for s, e in intervals:
        for i in range(int(s / BC_WINDOW_S), int(e / BC_WINDOW_S) + 1):
            if i < len(counts):
                counts[i] += 1
    counts = [c + BC_EPS for c in counts]
    total = sum(counts)
    return [c / total for c in counts]


def js_distance(p: list[float], q: list[float]) -> float:
    """Jensen-Shannon distance with natural log, both normalised first (scipy.spatial.distance.jensenshannon)."""
    p_t, q_t = torch.tensor(p, dtype=torch.float64), torch.tensor(q, dtype=torch.float64)
    p_t, q_t = p_t / p_t.sum(), q_t / q_t.sum()
    m = (p_t + q_t) / 2

    def rel(a, b):  # scipy.special.rel_entr: a log(a/b), 0 where a = 0
        return torch.where(a > 0, a * torch.log(a / b), torch.zeros_like(a))

    return math.sqrt(max(0.0, float((rel(p_t, m).sum() + rel(q_t, m).sum()) / 2)))


def _resample_linear(values: list[float], n: int) -> list[float]:
    """``values`` at x = linspace(0, 1, len) linearly interpolated at linspace(0, 1, n) (scipy interp1d)."""
    if len(values) == 1:
        return [values[0]] * n
    out = []
    for i in range(n):
        x = i / (n - 1) * (len(values) - 1) if n > 1 else 0.0
        k = min(int(x), len(values) - 2)
        out.append(values[k] + (x - k) * (values[k + 1] - values[k]))
    return out


def score_backchannel(root: Path, gt_path: Path | None = None, vad: VADConfig | None = None) -> dict:
    """Backchannel TOR, frequency and (with a reference distribution) JSD over the digit-named sample folders."""
    from tml.audio.wav import read_wav

    gt = _read_json(Path(gt_path)) if gt_path else None
    per, missing, no_reference = [], [], []
    for d in sample_dirs(root):
        if not d.name.isdigit():
            continue  # the official script reads only digit-named folders
        if not (d / "output.wav").exists() or not (d / "output.json").exists():
            missing.append(d.name)
            continue
        wave, sr = read_wav(d / "output.wav")
        duration = wave.shape[-1] / sr
        segs = [(max(round(s, 1), 0.0), min(round(e, 1), duration)) for s, e in speech_segments(wave, sr, vad)]
        tor, found = backchannels(segs, read_chunks(d / "output.json"))
        rec = {"id": d.name, "tor": tor, "backchannels": len(found), "frequency": len(found) / duration}
        if gt is not None and d.name not in gt:
            no_reference.append(d.name)
        elif gt is not None:
            if not found:
                rec["jsd"] = 1.0
            else:
                pred = window_distribution(found, duration)
                rec["jsd"] = js_distance(pred, _resample_linear([float(x) for x in gt[d.name]], len(pred)))
        per.append(rec)

    def stats(key):
        xs = [r[key] for r in per if key in r]
        return (statistics.fmean(xs), statistics.pstdev(xs)) if xs else (None, None)

    out = {"task": "backchannel", "samples": len(per), "missing": missing}
    for key in ("tor", "frequency") + (("jsd",) if gt is not None else ()):
        out[key], out[f"{key}_std"] = stats(key)
    if gt is not None:
        out["jsd_samples"], out["no_reference"] = len(per) - len(no_reference), no_reference
    out["per_sample"] = per
    return out


# ---------------------------------------------------------------------------------------------------------------
# v1.5 timing
# ---------------------------------------------------------------------------------------------------------------

def stop_intervals(user: list[tuple[float, float]], model: list[tuple[float, float]]) -> list[list[float]]:
    """Overlaps of user and model speech, the shortest per end time (ms), sorted by end (get_timing.overlaps)."""
    raw, i, j = [], 0, 0
    while i < len(user) and j < len(model):
        s, e = max(user[i][0], model[j][0]), min(user[i][1], model[j][1])
        if e > s:
            raw.append((s, e))
        if user[i][1] < model[j][1]:
            i += 1
        else:
            j += 1
    best: dict[int, tuple[float, float]] = {}
    for s, e in raw:
        k = int(round(e * 1000))
        if k not in best or e - s < best[k][1] - best[k][0]:
            best[k] = (s, e)
    return [[round(s, 3), round(e, 3)] for s, e in sorted(best.values(), key=lambda x: x[1])]


def response_intervals(user: list[tuple[float, float]], model: list[tuple[float, float]]) -> list[list[float]]:
    """[user end, first model start after it], keeping the latest user end per model start (get_timing)."""
    starts = [s for s, _ in model]
    best: dict[int, list[float]] = {}
    for _, ue in user:
        nxt = next((s for s in starts if s > ue), None)
        if nxt is None:
            continue
        k, cand = int(round(nxt * 1000)), [round(ue, 3), round(nxt, 3)]
        if k not in best or cand[0] > best[k][0]:
            best[k] = cand
    return [iv for _, iv in sorted(best.items(), key=lambda kv: kv[1][1])]


def score_timing(root: Path, vad: VADConfig | None = None, prefix: str = "") -> dict:
    """Write ``latency_intervals.json`` in every folder with ``{prefix}input.wav`` and ``{prefix}output.wav``;
    return the per-folder intervals and the mean stop / response interval lengths."""
    from tml.audio.wav import read_wav

    per = []
    for d in sample_dirs(root):
        fi, fo = d / f"{prefix}input.wav", d / f"{prefix}output.wav"
        if not (fi.exists() and fo.exists()):
            continue
        user = merge_segments(speech_segments(*read_wav(fi), vad), USER_MERGE_GAP_S)
        model = merge_segments(speech_segments(*read_wav(fo), vad), MODEL_MERGE_GAP_S)
        data = {"latency_stop_list": stop_intervals(user, model), "latency_resp_list": response_intervals(user, model)}
        (d / f"{prefix}latency_intervals.json").write_text(json.dumps(data, indent=2))
        per.append({"id": d.name, **data})
    stops = [e - s for r in per for s, e in r["latency_stop_list"]]
    resps = [e - s for r in per for s, e in r["latency_resp_list"]]
    return {"task": "timing", "samples": len(per), "stop_intervals": len(stops),
            "stop_latency": statistics.fmean(stops) if stops else None, "response_intervals": len(resps),
            "response_latency": statistics.fmean(resps) if resps else None, "per_sample": per}


def score(root: str | Path, task: str, gt: str | Path | None = None, vad: VADConfig | None = None) -> dict:
    """Score one task root (see module docstring)."""
    root = Path(root)
    if task in ANNOTATION:
        return score_turns(root, task)
    if task == "backchannel":
        if gt is None and (root / "icc_gt_distribution.json").exists():
            gt = root / "icc_gt_distribution.json"
        return score_backchannel(root, gt, vad)
    if task == "timing":
        return score_timing(root, vad)
    raise FDBenchError(f"task={task!r}: choose one of {', '.join(TASKS)}")


# ---------------------------------------------------------------------------------------------------------------
# Export: what a tml responder said -> output.wav / output.json
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class WordTime:
    text: str
    start: float
    end: float


def words_on_playback_clock(text_ids_by_turn: list[list[int]], starts: list[float], turn_s: float,
                            tokenizer) -> list[WordTime]:
    """The words a model wrote on its text stream, timed as a listener hears them.

    A token in text slot j of k in micro-turn t is placed at ``starts[t] + j / k * turn_s`` (its micro-turn's
    playback start, ``tml.eval.clock``); a word runs from its first token's place to the end of its last token's
    slot. Words begin at tokens with a leading space (byte-level BPE); special tokens (and everything inside
    ``<delegate> ... </delegate>``, which is written, not spoken) are not words.
    """
    words: list[WordTime] = []
    special = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id}
    inside_delegate = False
    for t, ids in enumerate(text_ids_by_turn):
        k = max(len(ids), 1)
        for j, i in enumerate(ids):
            i = int(i)
            if i == tokenizer.delegate_id:
                inside_delegate = True
            elif i == tokenizer.end_delegate_id:
                inside_delegate = False
            if i in special or i in (tokenizer.delegate_id, tokenizer.end_delegate_id) or inside_delegate:
                continue
            piece = tokenizer.tok.decode([i], skip_special_tokens=False)
            a, b = starts[t] + j / k * turn_s, starts[t] + (j + 1) / k * turn_s
            if piece.startswith(" ") or not words:
                if piece.strip():
                    words.append(WordTime(piece.strip(), a, b))
            else:
                words[-1].text += piece.strip()
                words[-1].end = b
    return words


def snap_to_speech(words: list[WordTime], segments: list[tuple[float, float]], turn_s: float) -> list[WordTime]:
    """Text-stream times are micro-turn slots: a word written in micro-turn t is heard somewhere in its audio. A word
    whose slot time falls in silence moves to the first speech onset (``segments``: the VAD on the heard output)
    within ``turn_s`` after it, as an ASR would time it; words with no speech that near keep their slot times."""
    out = []
    for w in words:
        inside = any(s <= w.start < e for s, e in segments)
        onset = next((s for s, _ in segments if w.start <= s < w.start + turn_s), None)
        start = w.start if inside or onset is None else onset
        out.append(WordTime(w.text, start, max(w.end, start)))
    return out


def write_output(folder: Path, wave: torch.Tensor, sample_rate: int, words: list[WordTime], prefix: str = "",
                 not_before: float | None = None) -> None:
    """``{prefix}output.wav`` (mono ``wave``) and ``{prefix}output.json`` in ``folder``. ``not_before``: keep only
    words starting at or after it (user_interruption: the official ASR hears only the audio after the
    interruption's end)."""
    from tml.audio.wav import write_wav

    folder = Path(folder)
    write_wav(folder / f"{prefix}output.wav", wave, sample_rate)
    kept = [w for w in words if not_before is None or w.start >= not_before]
    chunks = [{"text": w.text, "timestamp": [round(w.start, 4), round(w.end, 4)]} for w in kept]
    (folder / f"{prefix}output.json").write_text(json.dumps({"text": " ".join(w.text for w in kept),
                                                             "chunks": chunks}, indent=2))


def load_asr(spec: str):
    """``"module:function"`` of a user-installed ASR -> the callable ``fn(wave [samples], sample_rate) ->
    [(word, start_s, end_s)]``. tml ships none and downloads none (the official pipeline uses NeMo's
    parakeet-tdt-0.6b-v2, ``get_transcript/asr.py``); a wrapper around it, installed by the user, plugs in here."""
    import importlib

    mod, _, fn = spec.partition(":")
    if not mod or not fn:
        raise FDBenchError(f"asr={spec!r}: give it as module:function")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise FDBenchError(f"asr={spec!r}: cannot import it ({e}); install that ASR yourself, tml downloads "
                           f"nothing") from e


def export_sample(folder: Path, make_responder, layout, dmel, text, prefix: str = "", task: str = "",
                  vocoder=None, realtime: bool = False, asr=None) -> dict:
    """Stream ``folder/{prefix}input.wav`` through a fresh responder in real-time order (``run_episode``: the same
    micro-turn loop as evaluate) and write ``{prefix}output.wav`` (what a listener hears: the responder's audio on
    the playback clock, 16 kHz mono, t = 0 and length of the input) and ``{prefix}output.json`` (words from the
    responder's own text stream, ``words_on_playback_clock`` then ``snap_to_speech``; or from ``asr`` on
    output.wav). Returns
    {"micro_turns", "compute_ms", "words"}."""
    import torchaudio.functional as AF

    from tml.audio.wav import read_wav
    from tml.eval.clock import playback_starts
    from tml.eval.evaluate import heard_model_side, run_episode
    from tml.streams.episode import Episode

    folder = Path(folder)
    wave, sr = read_wav(folder / f"{prefix}input.wav")
    wave = wave.mean(0) if wave.ndim == 2 else wave
    rate = layout.cfg.sample_rate
    if sr != rate:
        wave = AF.resample(wave, sr, rate)
    n_in, n = wave.numel(), layout.samples_per_turn
    T = -(-n_in // n)
    user = torch.nn.functional.pad(wave, (0, T * n - n_in))
    turn_s = layout.cfg.micro_turn_ms / 1000
    ep = Episode(key=folder.name, duration=T * turn_s, sample_rate=rate, audio={"user": user, "model": user * 0})
    run = run_episode(make_responder(), ep, layout, dmel, text)
    heard = heard_model_side(run, layout, dmel, vocoder, realtime)[:n_in]
    not_before = None
    if task == "user_interruption" and (folder / "interrupt.json").exists():
        not_before = float(_read_json(folder / "interrupt.json")[0]["timestamp"][1])
    if asr is not None:  # the official way: transcribe what a listener hears (after the interruption, if any)
        skip = round((not_before or 0.0) * rate)
        words = [WordTime(str(w), float(s) + skip / rate, float(e) + skip / rate) for w, s, e in asr(heard[skip:], rate)]
    else:
        starts = playback_starts(T, turn_s, None if realtime else run.compute_s)
        words = words_on_playback_clock(run.text_ids, starts, turn_s, text)
        words = [w for w in words if w.start < n_in / rate]  # heard after output.wav ends: no ASR would hear them
        words = snap_to_speech(words, speech_segments(heard, rate), turn_s)
    write_output(folder, heard, rate, words, prefix, not_before)
    return {"micro_turns": T, "compute_ms": [1000 * c for c in run.compute_s],
            "words": sum(1 for w in words if not_before is None or w.start >= not_before)}


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def _summary(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "per_sample"}


def main(argv: list[str] | None = None) -> dict:
    """``python -m tml.eval.fdbench score root=ROOT task=TASK [gt=icc_gt_distribution.json] [vad=silero|logmel]``:
    prints the summary as JSON and writes ``ROOT/fdbench_TASK.json`` (summary and per-sample values)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "score":
        raise SystemExit(main.__doc__)
    opts = {}
    for a in argv[1:]:
        if "=" not in a:
            raise SystemExit(f"fdbench: expected key=value, got {a!r}\n{main.__doc__}")
        k, v = a.split("=", 1)
        opts[k] = v
    unknown = set(opts) - {"root", "task", "gt", "vad"}
    if unknown or "root" not in opts or "task" not in opts:
        raise SystemExit(f"fdbench: need root= and task= (unknown: {sorted(unknown)})\n{main.__doc__}")
    result = score(opts["root"], opts["task"], opts.get("gt"), VADConfig(method=opts.get("vad", "silero")))
    Path(opts["root"], f"fdbench_{opts['task']}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(_summary(result), indent=2))
    return result


if __name__ == "__main__":
    main()
