"""Data-path speed on this machine, each number next to a baseline measured in the same run.

    python bench/data.py --data data/synthetic_tiny

1. dMel encode, one thread: x real time per core, next to the torchaudio mel spectrogram alone (what dMel adds is
   the log and the binning) and to WAV decoding.
2. Packed-batch loader: seconds of interaction delivered per second per worker (num_workers=0 and 2), next to
   reading the raw tar files without decoding anything. Goal: >= 100x real time per worker.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tml.audio.dmel import DMelTokenizer  # noqa: E402
from tml.audio.wav import decode_wav  # noqa: E402
from tml.data.loader import LoaderConfig, PackedBatchLoader  # noqa: E402
from tml.streams import LayoutConfig, MicroTurnLayout  # noqa: E402
from tml.text.tokenizer import TextTokenizer  # noqa: E402


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_encode(data: Path, seconds: float) -> None:
    torch.set_num_threads(1)
    shard = sorted(data.glob("shard-*.tar"))[0]
    wavs = [s["user.wav"] for s in wds.tarfile_samples([{"url": str(shard)}])]
    waves = [decode_wav(w)[0][0] for w in wavs]
    audio = torch.cat(waves)
    reps = max(1, int(seconds * 16000 / audio.numel()))
    audio = audio.repeat(reps)[: int(seconds * 16000)]
    dur = audio.numel() / 16000
    tok = DMelTokenizer()
    t_dmel = best_of(lambda: tok.encode(audio))
    t_mel = best_of(lambda: tok.mel(audio))
    t_wav = best_of(lambda: [decode_wav(w) for w in wavs]) * (dur / (sum(w.numel() for w in waves) / 16000))
    print(f"dMel encode, 1 thread, {dur:.0f} s of speech:")
    print(f"  dMel encode          {dur / t_dmel:8.0f}x real time   (goal >= 1000x)")
    print(f"  baseline: mel only   {dur / t_mel:8.0f}x real time   -> dMel costs {t_dmel / t_mel:.2f}x the mel")
    print(f"  baseline: WAV decode {dur / t_wav:8.0f}x real time")


def bench_loader(data: Path, batches: int) -> None:
    layout = MicroTurnLayout(LayoutConfig())
    text = TextTokenizer.load(data / "tokenizer.json")
    manifest = json.loads((data / "manifest.json").read_text())
    hours = manifest["hours"]

    def raw():
        n = 0
        for s in manifest["shards"]:
            for _ in wds.tarfile_samples([{"url": str(data / s["name"])}]):
                n += 1
        return n

    t_raw = best_of(raw, 2)
    print(f"packed-batch loader ({manifest['episodes']} episodes, {hours * 3600:.0f} s, seq_len 1000, batch 2):")
    print(f"  baseline: raw tar read, no decode  {hours * 3600 / t_raw:8.0f}x real time")
    turn_s = layout.cfg.micro_turn_ms / 1000
    for workers in (0, 2):
        torch.set_num_threads(1)
        loader = PackedBatchLoader(data, LoaderConfig(seq_len=1000, micro_batch_size=2, num_workers=workers),
                                   layout, DMelTokenizer(), text)
        next(loader)  # start workers / warm up
        t0 = time.perf_counter()
        turns = 0
        for _ in range(batches):
            b = next(loader)
            turns += int((b.doc_ids >= 0).sum()) // layout.length
        dt = time.perf_counter() - t0
        loader.close()
        rate = turns * turn_s / dt
        per = rate / max(1, workers)
        print(f"  loader num_workers={workers}: {rate:8.0f}x real time in all, {per:8.0f}x per worker   "
              f"(goal >= 100x per worker; {rate / (hours * 3600 / t_raw):.3f} of the raw read)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/synthetic_tiny"))
    p.add_argument("--seconds", type=float, default=120.0, help="audio to encode")
    p.add_argument("--batches", type=int, default=40)
    a = p.parse_args()
    if not (a.data / "manifest.json").exists():
        sys.exit(f"{a.data}/manifest.json not found: python -m data_prep.synth_dialogues --out {a.data} "
                 f"--episodes 96 --seed 0")
    bench_encode(a.data, a.seconds)
    bench_loader(a.data, a.batches)


if __name__ == "__main__":
    main()
