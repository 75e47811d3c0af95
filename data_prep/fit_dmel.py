"""Fit per-channel dMel ranges to a data set and write them beside its shards as ``dmel_ranges.json``.

    python -m data_prep.fit_dmel --data data/synthetic_tiny
    python recipes/pretrain.py data.dmel.ranges_file=data/synthetic_tiny/dmel_ranges.json

The generators (``synth_dialogues``, ``ingest_conversations``) call ``fit_dir`` before they write the manifest, so
every data set carries its ranges. Both audio streams of the first ``max_hours`` of episodes are used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torchaudio
import webdataset as wds

from tml.audio.dmel import DMelConfig, DMelError, DMelTokenizer, fit_channel_ranges
from tml.streams.episode import Episode

RANGES_FILE = "dmel_ranges.json"


def fit_dir(data_dir: str | Path, shard_names: list[str], max_hours: float = 5.0,
            cfg: DMelConfig | None = None) -> dict | None:
    """Fit ranges on the shards ``shard_names`` of ``data_dir``; writes ``data_dir/dmel_ranges.json`` and returns
    it, or returns None (and says why) when there is too little audio to fit (the global range then applies)."""
    cfg = cfg or DMelConfig()
    tok = DMelTokenizer(cfg)
    mels, seconds = [], 0.0
    for name in shard_names:
        for sample in wds.tarfile_samples([{"url": str(Path(data_dir) / name)}]):
            ep = Episode.from_sample(sample)
            for w in ep.audio.values():
                if ep.sample_rate != cfg.sample_rate:
                    w = torchaudio.functional.resample(w, ep.sample_rate, cfg.sample_rate)
                mels.append(tok.log_mel(w))
            seconds += ep.duration
            if seconds >= max_hours * 3600:
                break
        if seconds >= max_hours * 3600:
            break
    try:
        fitted = fit_channel_ranges(mels)
    except DMelError as e:
        print(f"fit_dmel: no per-channel ranges for {data_dir}: {e}", file=sys.stderr)
        return None
    ranges = {**fitted, "hours": round(seconds / 3600, 4), "sample_rate": cfg.sample_rate,
              "n_fft": cfg.n_fft, "hop_length": cfg.hop_length, "n_mels": cfg.n_mels}
    (Path(data_dir) / RANGES_FILE).write_text(json.dumps(ranges) + "\n")
    return ranges


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="data set directory (with manifest.json)")
    p.add_argument("--max-hours", type=float, default=5.0)
    a = p.parse_args(argv)
    manifest = json.loads((a.data / "manifest.json").read_text())
    r = fit_dir(a.data, [s["name"] for s in manifest["shards"]], a.max_hours)
    if r is None:
        raise SystemExit(1)
    print(f"fit_dmel: {r['frames']} frames ({r['hours']} h) -> {a.data / RANGES_FILE}; log_min "
          f"{min(r['log_min']):.2f}..{max(r['log_min']):.2f}, log_max {min(r['log_max']):.2f}..{max(r['log_max']):.2f}")
    return r


if __name__ == "__main__":
    main()
