"""Duplex evaluation throughput: held-out episodes one session at a time vs many episodes in one batched session,
measured in the same run on the same (untrained, same-shape) model, with the metrics of both compared.

    python bench/evaluation.py --data DIR [--episodes 24] [--config tiny] [--batch-size 24] [--modes single batched]

Prints the wall and CPU time of each mode (CPU time is the comparable one on a loaded machine), the speedup and
whether every metric of eval.json agrees (scored with ``realtime=True``: output placed as if compute kept real time,
so the comparison does not hinge on timing noise).
``--modes single`` alone also runs on older checkouts (PYTHONPATH=that checkout): the "before" figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tml.audio.dmel import DMelTokenizer  # noqa: E402
from tml.data.loader import read_manifest  # noqa: E402
from tml.eval.evaluate import evaluate  # noqa: E402
from tml.eval.loading import read_episodes  # noqa: E402
from tml.eval.session import SessionConfig, StreamingSession  # noqa: E402
from tml.model import InteractionModel, ModelConfig  # noqa: E402
from tml.streams import LayoutConfig, MicroTurnLayout  # noqa: E402
from tml.text.tokenizer import TextTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--episodes", type=int, default=24)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--modes", nargs="+", default=["single", "batched"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    text = TextTokenizer.load(Path(args.data) / read_manifest(args.data).get("tokenizer", "tokenizer.json"))
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                              OmegaConf.load(ROOT / "configs" / "model" / f"{args.config}.yaml")))
    cfg.vocab_size = text.vocab_size
    torch.manual_seed(0)
    model = InteractionModel(cfg).eval()
    layout, dmel = MicroTurnLayout(LayoutConfig()), DMelTokenizer()
    episodes = read_episodes(args.data, limit=args.episodes)
    seconds = sum(e.duration for e in episodes)
    results, times, cpu = {}, {}, {}
    for mode in args.modes:
        with tempfile.TemporaryDirectory() as out:
            t0, c0 = time.perf_counter(), time.process_time()
            if mode == "single":
                r = evaluate(lambda: StreamingSession(model, layout, dmel, SessionConfig(), text.pad_id), episodes,
                             layout, dmel, text, out, n_wavs=0, n_timelines=0, realtime=True)
            else:
                r = evaluate(None, episodes, layout, dmel, text, out, n_wavs=0, n_timelines=0, realtime=True,
                             make_sessions=lambda n: StreamingSession(model, layout, dmel, SessionConfig(), text.pad_id,
                                                                      sessions=n), batch_size=args.batch_size)
            times[mode], cpu[mode] = time.perf_counter() - t0, time.process_time() - c0
            results[mode] = json.loads((Path(out) / "eval.json").read_text())
        print(f"{mode:8}: {len(episodes)} episodes ({seconds:.0f} s of conversation) in {times[mode]:.1f} s wall, "
              f"{cpu[mode]:.1f} s CPU (CPU RTF {cpu[mode] / seconds:.3f}); load average {os.getloadavg()}", flush=True)
    if len(times) == 2:
        a, b = results["single"], results["batched"]
        timing = ("compute_ms_per_micro_turn", "real_time_factor", "max_lag_s")  # measured compute, not behaviour
        differ = [k for k in a["metrics"] if k not in timing and a["metrics"][k] != b["metrics"].get(k)]
        differ += [f"episode {i}" for i, (x, y) in enumerate(zip(a["per_episode"], b["per_episode"])) if x != y]
        same = not differ
        if differ:
            print(f"differ: {differ}")
        print(f"speedup batched / single: {times['single'] / times['batched']:.1f}x wall, "
              f"{cpu['single'] / cpu['batched']:.1f}x CPU; metrics identical: {same}")


if __name__ == "__main__":
    main()
