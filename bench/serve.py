"""Live serving on this machine: how many concurrent sessions keep real time, next to one session in the same run.

    python bench/serve.py --checkpoint RUN_DIR --sessions 1 2 4 --seconds 10

Starts recipes/serve.py on a free loopback port, then for each N streams N different noise-burst recordings at once,
each paced in real time by tml.tools.client. Per N: compute per micro-turn (model + vocoder; mean and p95), its
ratio to N = 1's, the round trip a client measures (last sample of a micro-turn sent -> its audio received; median
and p95), the final lag on the playback clock, and whether every session kept real time (lag under one micro-turn
throughout). Prints `uptime`: the load shares the cores with everything else running.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tml.tools.client import stream  # noqa: E402


def recording(seed: int, seconds: float, sr: int = 16000) -> torch.Tensor:
    """Noise bursts of 0.4-1.2 s between silences of 0.2-0.8 s (different per seed)."""
    g = torch.Generator().manual_seed(seed)
    x, t = torch.zeros(int(seconds * sr)), 0.0
    while t < seconds:
        t += 0.2 + 0.6 * float(torch.rand((), generator=g))
        n = int((0.4 + 0.8 * float(torch.rand((), generator=g))) * sr)
        a = int(t * sr)
        x[a : a + n] = 0.1 * torch.randn(x[a : a + n].numel(), generator=g)
        t += n / sr
    return x


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args(argv)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "recipes/serve.py", f"checkpoint={args.checkpoint}", "port=0",
                               f"serve.max_sessions={max(args.sessions)}", "hydra.run.dir=outputs/bench_serve"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    line = server.stdout.readline()
    if "serving" not in line:
        raise SystemExit(f"the server did not start: {line!r}")
    url = "ws://127.0.0.1:" + line.split("http://127.0.0.1:")[1].split("/")[0] + "/ws"
    rows = []
    try:
        for n in args.sessions:
            async def run_all(n=n):
                return await asyncio.gather(*(stream(url, recording(k, args.seconds), 16000, realtime=True)
                                              for k in range(n)))

            results = asyncio.run(run_all())
            turns = [t for r in results for t in r["turns"]]
            compute = [t["compute_ms"] for t in turns]
            rtt = [t["round_trip_ms"] for t in turns]
            mean = lambda key: sum(t[key] for t in turns) / len(turns)  # noqa: E731
            rows.append({"sessions": n, "compute_mean_ms": mean("compute_ms"), "compute_p95_ms": pct(compute, .95),
                         "model_mean_ms": mean("model_ms"), "vocoder_mean_ms": mean("vocoder_ms"),
                         "rtt_median_ms": pct(rtt, .5), "rtt_p95_ms": pct(rtt, .95),
                         "final_lag_max_ms": max(r["turns"][-1]["lag_ms"] for r in results),
                         "real_time": not any(t["behind"] for t in turns)})
            base = rows[0]["compute_mean_ms"]
            r = rows[-1]
            print(f"{n} session(s): compute {r['compute_mean_ms']:.1f} ms mean ({r['compute_mean_ms'] / base:.2f}x "
                  f"one session's; model {r['model_mean_ms']:.1f}, vocoder {r['vocoder_mean_ms']:.1f}), p95 "
                  f"{r['compute_p95_ms']:.1f}; round trip median {r['rtt_median_ms']:.1f} ms, "
                  f"p95 {r['rtt_p95_ms']:.1f}; final lag max {r['final_lag_max_ms']:.0f} ms; "
                  f"{'kept real time' if r['real_time'] else 'FELL BEHIND real time'}", flush=True)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    return rows


if __name__ == "__main__":
    main()
