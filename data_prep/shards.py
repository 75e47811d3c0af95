"""Write episodes into webdataset shards with a provenance manifest, atomically.

    with ShardSetWriter(out, shard_size=64, max_shard_bytes=256 << 20) as w:
        w.write(episode, source="fisher", license="LDC")
        w.skip("conv_0042.wav", "unreadable_audio", "not a WAV file")
    manifest = w.manifest  # also written to out/manifest.json

Shards go to ``out/.partial`` and move in only when all are written; ``manifest.json`` is removed first and written
last, so a data set with a manifest is complete. The manifest records per shard its sha256, episode count and
hours; ``dmel_ranges.json`` (per-channel dMel ranges, ``data_prep.fit_dmel``) is written beside them; for the set
the hours per stream (audio and speech, i.e. inside word spans), the sources with their licences
and episode counts, and every skipped input with its reason. Files already in ``out`` other than old shards and the
manifest are left alone.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tml.streams.episode import Episode
from tml.checksum import sha256


def episode_seconds(ep: Episode) -> dict:
    """What the manifest counts of an episode: its duration and, per stream, the seconds of audio and of speech
    (inside word spans)."""
    return {"duration": ep.duration, "audio": {s: wave.numel() / ep.sample_rate for s, wave in ep.audio.items()},
            "speech": {s: sum(w.end - w.start for w in words) for s, words in ep.words.items()}}


class ShardSetWriter:
    def __init__(self, out: str | Path, shard_size: int = 64, max_shard_bytes: int = 256 << 20, **info):
        import webdataset as wds

        if shard_size < 1 or max_shard_bytes < 1:
            raise ValueError(f"shard_size={shard_size} and max_shard_bytes={max_shard_bytes} must be >= 1")
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "manifest.json").unlink(missing_ok=True)
        self.partial = self.out / ".partial"
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir()
        self.writer = wds.ShardWriter(str(self.partial / "shard-%06d.tar"), maxcount=shard_size,
                                      maxsize=max_shard_bytes, verbose=0, mtime=0.0)
        self.info = info
        self.shards: dict[str, dict] = {}
        self.sources: dict[str, dict] = {}
        self.hours = {"audio": {}, "speech": {}}
        self.skipped: list[dict] = []
        self.manifest: dict | None = None

    def write(self, ep: Episode, source: str, license: str) -> None:
        self.write_sample(ep.to_sample(), episode_seconds(ep), source, license)

    def write_sample(self, sample: dict, seconds: dict, source: str, license: str) -> None:
        """Write an episode already encoded by ``Episode.to_sample`` (e.g. in a worker process), with what the
        manifest counts of it, ``episode_seconds(ep)``."""
        self.writer.write(sample)
        name = Path(self.writer.fname).name
        shard = self.shards.setdefault(name, {"name": name, "episodes": 0, "hours": 0.0})
        shard["episodes"] += 1
        shard["hours"] += seconds["duration"] / 3600
        src = self.sources.setdefault(source, {"license": license, "episodes": 0, "hours": 0.0})
        src["episodes"] += 1
        src["hours"] += seconds["duration"] / 3600
        for what in ("audio", "speech"):
            for stream, secs in seconds[what].items():
                self.hours[what][stream] = self.hours[what].get(stream, 0.0) + secs / 3600

    def skip(self, what: str, reason: str, message: str) -> None:
        self.skipped.append({"input": what, "reason": reason, "message": message})

    def close(self, extra_files: dict[str, bytes] | None = None) -> dict:
        """Move the shards (and ``extra_files``, name -> bytes) in and write the manifest; returns it."""
        self.writer.close()
        for old in self.out.glob("shard-*.tar"):  # stale shards of an earlier, larger run
            old.unlink()
        shards = []
        for name in sorted(self.shards):
            os.replace(self.partial / name, self.out / name)
            s = self.shards[name]
            shards.append({**s, "hours": round(s["hours"], 6), "sha256": sha256(self.out / name)})
        for name, data in (extra_files or {}).items():
            (self.out / name).write_bytes(data)
        shutil.rmtree(self.partial, ignore_errors=True)
        from data_prep.fit_dmel import RANGES_FILE, fit_dir

        ranges = fit_dir(self.out, [s["name"] for s in shards])  # per-channel dMel ranges beside the shards
        r = lambda d: {k: round(v, 6) for k, v in sorted(d.items())}  # noqa: E731
        reasons: dict[str, int] = {}
        for s in self.skipped:
            reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
        self.manifest = {
            **self.info,
            "episodes": sum(s["episodes"] for s in shards),
            "hours": round(sum(s["hours"] for s in self.shards.values()), 6),
            "hours_per_stream": {k: r(v) for k, v in self.hours.items()},
            "sources": {k: {**v, "hours": round(v["hours"], 6)} for k, v in sorted(self.sources.items())},
            "shards": shards,
            "dmel_ranges": RANGES_FILE if ranges else None,
            "skipped": {"count": len(self.skipped), "by_reason": reasons, "inputs": self.skipped},
        }
        tmp = self.out / "manifest.json.tmp"
        tmp.write_text(json.dumps(self.manifest, indent=2) + "\n")
        os.replace(tmp, self.out / "manifest.json")
        return self.manifest

    def __enter__(self) -> "ShardSetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # leave no manifest next to a half-written set
            self.writer.close()
            shutil.rmtree(self.partial, ignore_errors=True)
