"""Recorded two-party conversations (one channel per speaker, time-aligned transcripts) -> webdataset shards.

    python -m data_prep.ingest_conversations --format moshi  --src train.jsonl --out data/mine --license CC-BY-4.0
    python -m data_prep.ingest_conversations --format fisher --src corpus/ --model-speaker B --out data/fisher
    python -m data_prep.ingest_conversations --format json   --src corpus/ --out data/mine
    python -m data_prep.ingest_conversations --format hf     --src saved_or_audiofolder/ --out data/mine

Formats (``--model-speaker`` names which side is the model; the other side is the user):

* ``moshi`` (moshi-finetune): a .jsonl of ``{"path", "duration"}`` (paths relative to the .jsonl or absolute);
  each stereo .wav (any rate, e.g. 24 kHz) has the model on the left channel and the user on the right, and a .json
  beside it holds ``{"alignments": [[word, [start, end], speaker], ...]}`` (whisper-timestamped output: words may
  carry a leading space, which is stripped) with speaker ``SPEAKER_MAIN`` (left) or another label (right).
  ``--model-speaker main`` (default) or ``other``.
* ``fisher`` (Fisher / Switchboard style): ``NAME.txt`` transcripts with lines ``START END A: text`` (``#`` lines
  and blank lines ignored) beside ``NAME.wav`` (channel 0 = A, channel 1 = B) or ``NAME.A.wav`` + ``NAME.B.wav``.
  ``--model-speaker A`` or ``B``. Segment words get times spread over the segment in proportion to their length.
* ``json`` (simple, documented here): ``NAME.json`` = ``{"audio": "NAME.wav", "channels": {"model": 0, "user": 1}}``
  or ``{"audio": {"model": "m.wav", "user": "u.wav"}}``, plus ``"segments": [{"speaker": "model"|"user", "start",
  "end", "text", "words": [[word, start, end], ...] (optional)}]`` and optional ``"source"`` / ``"license"``.
* ``hf``: a local ``datasets`` data set, saved with ``save_to_disk`` or an ``audiofolder`` directory
  (``metadata.jsonl`` or ``.csv`` with ``file_name``; read directly, as ``datasets`` would need torchcodec), whose rows have a stereo ``audio`` column (model left, as moshi) and
  an ``alignments`` column in the moshi form as a JSON string, or as a list of ``{"word", "start", "end",
  "speaker"}`` (Arrow cannot hold the mixed-type moshi lists). Audio is read from its bytes by tml (no decoder package needed).

Audio is 16-bit PCM WAV at any rate, resampled to ``--sample-rate``. Conversations are cut into episodes of at most
``--chunk-s`` seconds (words go to the chunk in which they start). A conversation or chunk that cannot be used
(unreadable audio, missing or malformed transcript, mono where two channels are needed, streams of different
lengths, NaN) is skipped, counted and named in the manifest's ``skipped`` and in the output. A single bad word
(empty after stripping, or timed outside the audio / ending before it starts) drops only that word, as
moshi-finetune does: counted by reason in the manifest's ``skipped_words``. A byte-level BPE is trained on the
transcripts unless ``--tokenizer`` brings one. An ``--out`` that is not empty is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torchaudio

from data_prep.shards import ShardSetWriter
from tml.audio.wav import AudioFormatError, decode_wav, read_wav
from tml.data.checks import check_episode
from tml.streams.episode import Episode, EpisodeError, Word
from tml.text.tokenizer import train_bpe

GENERATOR = "data_prep.ingest_conversations"
STREAMS = ("model", "user")


class IngestError(ValueError):
    """One input cannot be used; ``reason`` is a short code, the message names the file."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Conversation:
    name: str  # unique, becomes the episode key prefix
    sample_rate: int
    audio: dict[str, torch.Tensor]  # "model" / "user" -> float32 [samples]
    words: dict[str, list[Word]]
    source: str
    license: str


# ---------------------------------------------------------------------------------------------------------------
# Readers: each yields Conversation or IngestError per input, never stops on one bad input
# ---------------------------------------------------------------------------------------------------------------

def _wav(path: Path, channels: int | None = None) -> tuple[torch.Tensor, int]:
    if not path.exists():
        raise IngestError(f"{path}: audio file not found", "missing_audio")
    try:
        w, sr = read_wav(path)
    except AudioFormatError as e:
        raise IngestError(str(e), "unreadable_audio") from e
    if channels is not None and w.shape[0] != channels:
        raise IngestError(f"{path}: {w.shape[0]} channel(s), need {channels} (one per speaker)", "wrong_channels")
    return w, sr


def _json(path: Path) -> dict:
    if not path.exists():
        raise IngestError(f"{path}: transcript not found", "missing_transcript")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IngestError(f"{path}: not valid JSON ({e})", "bad_transcript") from e


def _alignment_words(alignments, model_is_main: bool, where: str) -> dict[str, list[Word]]:
    """moshi ``[[word, [start, end], speaker], ...]`` (or that as a JSON string, or a list of ``{"word", "start",
    "end", "speaker"}``: the forms an Arrow table can hold) -> words per stream."""
    words: dict[str, list[Word]] = {"model": [], "user": []}
    try:
        if isinstance(alignments, str):
            alignments = json.loads(alignments)
        alignments = [(a.get("word", a.get("text")), (a["start"], a["end"]), a["speaker"]) if isinstance(a, dict)
                      else a for a in alignments]
        for text, (start, end), speaker in alignments:
            main = speaker == "SPEAKER_MAIN"
            words["model" if main == model_is_main else "user"].append(Word(str(text), float(start), float(end)))
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise IngestError(f"{where}: alignments must be [[word, [start, end], speaker], ...] ({e})",
                          "bad_transcript") from e
    return words


def read_moshi(jsonl: Path, model_speaker: str, license: str) -> Iterator[Conversation | IngestError]:
    if model_speaker not in ("main", "other"):
        raise ValueError(f"--model-speaker={model_speaker!r}: the moshi layout takes main (left) or other (right)")
    main = model_speaker == "main"
    for i, line in enumerate(jsonl.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            try:
                item = json.loads(line)
                path = Path(item["path"])
                duration = float(item["duration"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise IngestError(f"{jsonl}:{i + 1}: need {{\"path\", \"duration\"}} ({e})", "bad_index") from e
            path = path if path.is_absolute() else jsonl.parent / path
            w, sr = _wav(path, 2)
            if abs(w.shape[1] / sr - duration) > 0.5:
                raise IngestError(f"{path}: {w.shape[1] / sr:.2f} s of audio but {jsonl.name} says {duration} s",
                                  "length_mismatch")
            left, right = w[0], w[1]
            words = _alignment_words(_json(path.with_suffix(".json")).get("alignments"), main, str(path))
            audio = {"model": left, "user": right} if main else {"model": right, "user": left}
            yield Conversation(path.stem, sr, audio, words, f"moshi:{jsonl.name}", license)
        except IngestError as e:
            yield e


def _spread(text: str, start: float, end: float) -> list[Word]:
    """Words of a segment with times spread over it in proportion to their length (+1 for the space)."""
    toks = text.split()
    total = sum(len(t) + 1 for t in toks)
    out, t = [], start
    for tok in toks:
        d = (end - start) * (len(tok) + 1) / total
        out.append(Word(tok, round(t, 4), round(t + d, 4)))
        t += d
    return out


FISHER_LINE = re.compile(r"^\s*([0-9.]+)\s+([0-9.]+)\s+([AB]):\s*(.*)$")


def read_fisher(src: Path, model_speaker: str, license: str) -> Iterator[Conversation | IngestError]:
    if model_speaker not in ("A", "B"):
        raise ValueError(f"--model-speaker={model_speaker!r}: the fisher layout takes A or B")
    for txt in sorted(src.glob("*.txt")):
        try:
            stem = txt.with_suffix("")
            if stem.with_suffix(".wav").exists():
                w, sr = _wav(stem.with_suffix(".wav"), 2)
                chans = {"A": w[0], "B": w[1]}
            else:
                (a, sra), (b, srb) = (_wav(Path(f"{stem}.{s}.wav"), 1) for s in "AB")
                if sra != srb:
                    raise IngestError(f"{stem}.A.wav is at {sra} Hz, {stem}.B.wav at {srb} Hz", "wrong_sample_rate")
                if abs(a.shape[1] - b.shape[1]) > 0.2 * sra:
                    raise IngestError(f"{stem}.A.wav and .B.wav differ in length ({a.shape[1] / sra:.2f} vs "
                                      f"{b.shape[1] / sra:.2f} s)", "length_mismatch")
                n = min(a.shape[1], b.shape[1])
                chans, sr = {"A": a[0, :n], "B": b[0, :n]}, sra
            words: dict[str, list[Word]] = {"model": [], "user": []}
            for k, line in enumerate(txt.read_text().splitlines()):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                m = FISHER_LINE.match(line)
                if m is None:
                    raise IngestError(f"{txt}:{k + 1}: expected 'START END A: text', got {line[:60]!r}",
                                      "bad_transcript")
                start, end, spk, text = float(m[1]), float(m[2]), m[3], m[4]  # end < start: words dropped later
                words["model" if spk == model_speaker else "user"] += _spread(text, start, end)
            other = "B" if model_speaker == "A" else "A"
            yield Conversation(stem.name, sr, {"model": chans[model_speaker], "user": chans[other]}, words,
                               f"fisher:{src.name}", license)
        except IngestError as e:
            yield e


def read_json(src: Path, license: str) -> Iterator[Conversation | IngestError]:
    for path in sorted(src.glob("*.json")):
        try:
            info = _json(path)
            audio_spec = info.get("audio")
            if isinstance(audio_spec, str):
                w, sr = _wav(path.parent / audio_spec)
                ch = info.get("channels", {"model": 0, "user": 1})
                if max(ch.values()) >= w.shape[0]:
                    raise IngestError(f"{path}: channels {ch} but {audio_spec} has {w.shape[0]}", "wrong_channels")
                audio = {s: w[ch[s]] for s in STREAMS}
            elif isinstance(audio_spec, dict):
                loaded = {s: _wav(path.parent / audio_spec[s], 1) for s in STREAMS}
                rates = {s: r for s, (_, r) in loaded.items()}
                if len(set(rates.values())) > 1:
                    raise IngestError(f"{path}: streams at different rates {rates}", "wrong_sample_rate")
                audio, sr = {s: x[0] for s, (x, _) in loaded.items()}, rates["model"]
            else:
                raise IngestError(f"{path}: \"audio\" must be a file name or {{\"model\": ..., \"user\": ...}}",
                                  "bad_transcript")
            words: dict[str, list[Word]] = {"model": [], "user": []}
            for k, seg in enumerate(info.get("segments", [])):
                try:
                    spk = seg["speaker"]
                    if spk not in STREAMS:
                        raise ValueError(f"speaker {spk!r} is not model or user")
                    if seg.get("words"):
                        words[spk] += [Word(str(t), float(a), float(b)) for t, a, b in seg["words"]]
                    else:
                        words[spk] += _spread(seg["text"], float(seg["start"]), float(seg["end"]))
                except (KeyError, TypeError, ValueError) as e:
                    raise IngestError(f"{path}: segments[{k}] is malformed ({e})", "bad_transcript") from e
            yield Conversation(path.stem, sr, audio, words, info.get("source", f"json:{src.name}"),
                               info.get("license", license))
        except IngestError as e:
            yield e


def _audiofolder_rows(src: Path) -> Iterator[dict]:
    """Rows of an ``audiofolder`` directory (``metadata.jsonl`` or ``metadata.csv`` with ``file_name``), read
    directly: ``datasets``' own audiofolder builder needs the torchcodec decoder to build its audio column."""
    import csv

    if (src / "metadata.jsonl").exists():
        rows = [json.loads(x) for x in (src / "metadata.jsonl").read_text().splitlines() if x.strip()]
    elif (src / "metadata.csv").exists():
        rows = list(csv.DictReader((src / "metadata.csv").read_text().splitlines()))
    else:
        raise ValueError(f"{src}: neither a save_to_disk data set (dataset_info.json / state.json) nor an audiofolder "
                         f"(metadata.jsonl or metadata.csv with file_name)")
    for row in rows:
        name = row.pop("file_name", None)
        yield {**row, "audio": {"path": str(src / name) if name else None, "bytes": None}}


def read_hf(src: Path, model_speaker: str, license: str) -> Iterator[Conversation | IngestError]:
    if model_speaker not in ("main", "other"):
        raise ValueError(f"--model-speaker={model_speaker!r}: hf rows follow moshi: main (left) or other (right)")
    if (src / "dataset_info.json").exists() or (src / "state.json").exists():
        import datasets

        ds = datasets.load_from_disk(str(src))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[next(iter(ds))]
        for col in ("audio", "alignments"):
            if col not in ds.column_names:
                raise ValueError(f"{src}: the data set has columns {ds.column_names}; it needs 'audio' and "
                                 f"'alignments'")
        rows: Iterator[dict] = iter(ds.cast_column("audio", datasets.Audio(decode=False)))  # tml reads the bytes
    else:
        rows = _audiofolder_rows(src)
    for i, row in enumerate(rows):
        where = f"{src}[{i}]"
        try:
            a = row.get("audio") or {}
            name = Path(a.get("path") or f"row{i:06d}").stem
            data = a.get("bytes")
            if data is None and a.get("path"):
                if not Path(a["path"]).exists():
                    raise IngestError(f"{where}: audio file {a['path']} not found", "missing_audio")
                data = Path(a["path"]).read_bytes()
            if data is None:
                raise IngestError(f"{where}: audio has neither bytes nor a path", "missing_audio")
            try:
                w, sr = decode_wav(data, f"{where} ({name})")
            except AudioFormatError as e:
                raise IngestError(str(e), "unreadable_audio") from e
            if w.shape[0] != 2:
                raise IngestError(f"{where} ({name}): {w.shape[0]} channel(s), need 2", "wrong_channels")
            if "alignments" not in row:
                raise IngestError(f"{where} ({name}): no alignments", "missing_transcript")
            main = model_speaker == "main"
            words = _alignment_words(row["alignments"], main, where)
            audio = {"model": w[0], "user": w[1]} if main else {"model": w[1], "user": w[0]}
            yield Conversation(name, sr, audio, words, f"hf:{src.name}", license)
        except IngestError as e:
            yield e


# ---------------------------------------------------------------------------------------------------------------
# Conversation -> episodes
# ---------------------------------------------------------------------------------------------------------------

def clean_words(words: dict[str, list[Word]], total: float, where: str) -> tuple[dict[str, list[Word]], list[dict]]:
    """Strip each word's text; drop (and report) a word that is empty or timed outside ``[0, total]`` / backwards.
    Returns the kept words per stream and one ``{"input", "reason", "message"}`` per dropped word."""
    kept: dict[str, list[Word]] = {}
    dropped = []
    for s, ws in words.items():
        kept[s] = []
        for w in ws:
            text = w.text.strip() if isinstance(w.text, str) else ""
            if not text:
                reason, why = "empty_word", "has no text"
            elif not (math.isfinite(w.start) and math.isfinite(w.end)) or w.start < 0 or w.end < w.start \
                    or w.start > total + 0.2:
                reason, why = "mistimed_word", f"at [{w.start}, {w.end}] lies outside the {total:.2f} s of audio " \
                                               f"or ends before it starts"
            else:
                kept[s].append(Word(text, w.start, w.end))
                continue
            dropped.append({"input": where, "reason": reason, "message": f"{where}: {s} word {w.text!r} {why}"})
    return kept, dropped


def to_episodes(conv: Conversation, sample_rate: int, chunk_s: float, meta: dict
                ) -> tuple[list[Episode], list[dict]]:
    """Resample to ``sample_rate``, cut into chunks of at most ``chunk_s`` (whole 200 ms micro-turns); a word belongs
    to the chunk in which it starts (its end is clipped to the chunk). Bad words are dropped (``clean_words``) and
    returned as the second value; raises IngestError for a bad conversation."""
    sr = conv.sample_rate
    n = {s: w.numel() for s, w in conv.audio.items()}
    if abs(n["model"] - n["user"]) > 0.2 * sr:
        raise IngestError(f"{conv.name}: model and user audio differ in length ({n['model'] / sr:.2f} vs "
                          f"{n['user'] / sr:.2f} s)", "length_mismatch")
    audio = {s: w[: min(n.values())].to(torch.float32) for s, w in conv.audio.items()}
    if sr != sample_rate:
        audio = {s: torchaudio.functional.resample(w, sr, sample_rate) for s, w in audio.items()}
    total = audio["model"].numel() / sample_rate
    conv_words, dropped = clean_words(conv.words, total, conv.name)
    chunk = max(0.2, math.floor(chunk_s / 0.2 + 1e-9) * 0.2)
    episodes = []
    k, t0 = 0, 0.0
    while total - t0 >= 0.2 - 1e-9:
        dur = round(min(chunk, math.floor((total - t0) / 0.2 + 1e-9) * 0.2), 3)
        a, b = round(t0 * sample_rate), round((t0 + dur) * sample_rate)
        words = {s: [Word(w.text, round(w.start - t0, 4), round(min(w.end, t0 + dur) - t0, 4))
                     for w in ws if t0 <= w.start < t0 + dur] for s, ws in conv_words.items()}
        episodes.append(Episode(key=f"{conv.name}_{k:04d}", duration=dur, sample_rate=sample_rate,
                                audio={s: audio[s][a:b] for s in STREAMS}, words=words,
                                meta={**meta, "conversation": conv.name, "chunk": k, "offset": round(t0, 3),
                                      "source": conv.source, "license": conv.license}))
        k, t0 = k + 1, t0 + dur
    return episodes, dropped


def ingest(fmt: str, src: Path, out: Path, model_speaker: str | None = None, license: str = "unknown",
           sample_rate: int = 16000, chunk_s: float = 60.0, shard_size: int = 64, max_shard_mb: float = 256,
           vocab_size: int = 512, tokenizer: Path | None = None, log=print, overwrite: bool = False) -> dict:
    """Read ``src`` in format ``fmt`` and write shards, tokenizer and manifest into ``out``; returns the manifest.
    A non-empty ``out`` is refused unless ``overwrite`` (then its shards and manifest are replaced)."""
    readers = {"moshi": lambda: read_moshi(src, model_speaker or "main", license),
               "fisher": lambda: read_fisher(src, model_speaker or "A", license),
               "json": lambda: read_json(src, license),
               "hf": lambda: read_hf(src, model_speaker or "main", license)}
    if fmt not in readers:
        raise ValueError(f"--format={fmt!r}: choose one of {', '.join(readers)}")
    if not src.exists():
        raise ValueError(f"--src={src} does not exist")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out={out} is not empty ({len(list(out.iterdir()))} entries): pass --overwrite to replace "
                         f"the data set in it, or choose another directory")
    meta = {"generator": GENERATOR, "format": fmt, "model_speaker": model_speaker}
    writer = ShardSetWriter(out, shard_size, int(max_shard_mb * (1 << 20)), generator=GENERATOR, format=fmt,
                            src=str(src), model_speaker=model_speaker, sample_rate=sample_rate, chunk_s=chunk_s,
                            tokenizer="tokenizer.json")
    texts: list[str] = []
    dropped_words: list[dict] = []
    with writer:
        for item in readers[fmt]():
            if isinstance(item, IngestError):
                writer.skip(str(item).split(":")[0], item.reason, str(item))
                log(f"skipped [{item.reason}] {item}")
                continue
            try:
                episodes, dropped = to_episodes(item, sample_rate, chunk_s, meta)
                for ep in episodes:
                    check_episode(ep, sample_rate)
            except (IngestError, EpisodeError) as e:
                writer.skip(item.name, e.reason, str(e))
                log(f"skipped [{e.reason}] {e}")
                continue
            for d in dropped:
                log(f"dropped word [{d['reason']}] {d['message']}")
            dropped_words += dropped
            for ep in episodes:
                writer.write(ep, item.source, item.license)
                texts += [" ".join(w.text for w in ws) for ws in ep.words.values() if ws]
        if not writer.shards:
            raise ValueError(f"no usable conversation in {src} ({len(writer.skipped)} skipped: "
                             f"{[s['message'] for s in writer.skipped[:3]]})")
        tok_path = writer.partial / "tokenizer.json"
        if tokenizer is not None:
            shutil.copy(tokenizer, tok_path)
        else:
            train_bpe(texts, vocab_size, tok_path)
        reasons: dict[str, int] = {}
        for d in dropped_words:
            reasons[d["reason"]] = reasons.get(d["reason"], 0) + 1
        writer.info["skipped_words"] = {"count": len(dropped_words), "by_reason": reasons, "words": dropped_words}
        return writer.close({"tokenizer.json": tok_path.read_bytes()})


def main(argv: list[str] | None = None) -> dict:
    class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass  # the layouts as written in the docstring, plus each option's default

    p = argparse.ArgumentParser(prog="python -m data_prep.ingest_conversations", description=__doc__,
                                formatter_class=Help)
    p.add_argument("--format", required=True, choices=["moshi", "fisher", "json", "hf"])
    p.add_argument("--src", required=True, type=Path, help=".jsonl (moshi) or directory")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--model-speaker", default=None, help="moshi/hf: main|other (default main); fisher: A|B (A)")
    p.add_argument("--license", default="unknown", help="licence of the recordings (goes into the manifest)")
    p.add_argument("--sample-rate", type=int, default=16000)
    p.add_argument("--chunk-s", type=float, default=60.0, help="longest episode; longer conversations are cut")
    p.add_argument("--shard-size", type=int, default=64, help="most episodes per shard")
    p.add_argument("--max-shard-mb", type=float, default=256, help="target shard size")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--tokenizer", type=Path, default=None, help="use this tokenizer.json instead of training one")
    p.add_argument("--overwrite", action="store_true", help="replace the data set in a non-empty --out")
    a = p.parse_args(argv)
    try:
        m = ingest(a.format, a.src, a.out, a.model_speaker, a.license, a.sample_rate, a.chunk_s, a.shard_size,
                   a.max_shard_mb, a.vocab_size, a.tokenizer, log=lambda s: print(s, file=sys.stderr),
                   overwrite=a.overwrite)
    except ValueError as e:
        p.error(str(e))
    print(f"{GENERATOR}: {m['episodes']} episodes, {m['hours']:.4f} h, {len(m['shards'])} shards, "
          f"{m['skipped']['count']} inputs skipped {m['skipped']['by_reason']}, {m['skipped_words']['count']} words "
          f"dropped {m['skipped_words']['by_reason']} -> {a.out}")
    return m


if __name__ == "__main__":
    main()
