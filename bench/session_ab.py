"""One streaming step of this checkout against another checkout's ``StreamingSession``, alternating in one process.

    python bench/session_ab.py --baseline /path/to/other/checkout [--configs tiny] [--batches 1 4 16] [--seconds 60]
                               [--reps 6] [--turns 3] [--baseline-dense-max 0]

On a machine whose load changes by the minute, two bench runs minutes apart differ by more than a small change;
alternating the two sessions' steps in one process puts both under the same load. The baseline's
``tml/eval/session.py`` is loaded beside this one and runs on this checkout's model code (so it measures what the
session does around the model: sampling, inputs, bookkeeping); ``--baseline-dense-max`` sets ``MoE.DECODE_DENSE_MAX``
for the baseline's steps (0: the per-expert decode loop the dense path replaced). The baseline's session imports this
checkout's modules, so it must share their layout (a checkout from before the modality modules, 424be3d, fails at
its imports; compare within one layout). Sessions are placed at
``--seconds`` as ``bench/streaming.py`` places them (random cache contents, silent dMel input). Prints per config and
B the fastest CPU ms per micro-turn of each (and the medians) over ``--reps`` x ``--turns`` steps, and the ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import streaming as bench  # noqa: E402
from tml.audio.dmel import DMelTokenizer  # noqa: E402
from tml.eval import session as this  # noqa: E402
from tml.model.moe import MoE  # noqa: E402
from tml.streams import LayoutConfig, MicroTurnLayout  # noqa: E402


def load_baseline(checkout: str):
    path = Path(checkout) / "tml" / "eval" / "session.py"
    if not path.is_file():
        raise SystemExit(f"--baseline {checkout}: no tml/eval/session.py there (give a checkout of this repository)")
    spec = importlib.util.spec_from_file_location("baseline_session", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_session"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--configs", nargs="+", default=["tiny"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--baseline-dense-max", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load_baseline(args.baseline)
    layout = MicroTurnLayout(LayoutConfig())
    dense = MoE.DECODE_DENSE_MAX
    print(f"# load average {os.getloadavg()}", flush=True)
    for name in args.configs:
        model = bench.build(name)
        for B in args.batches:
            runs = {}
            for tag, mod in (("baseline", base), ("this", this)):
                s = mod.StreamingSession(model, layout, DMelTokenizer(), mod.SessionConfig(), sessions=B)
                bench.fill(s, args.seconds * 1000 // layout.cfg.micro_turn_ms * layout.length)
                silence = torch.zeros(layout.frames_per_turn, layout.cfg.n_mels, dtype=torch.long)
                runs[tag] = (s, [mod.MicroTurnInputs(user_audio=silence) for _ in range(B)], [])
            for _ in range(args.reps):
                for tag, (s, inputs, ms) in runs.items():
                    MoE.DECODE_DENSE_MAX = args.baseline_dense_max if tag == "baseline" else dense
                    s.step_many(inputs)  # warm-up after the switch
                    c0 = time.process_time()
                    for _ in range(args.turns):
                        s.step_many(inputs)
                    ms.append(1000 * (time.process_time() - c0) / args.turns)
            MoE.DECODE_DENSE_MAX = dense
            b, t = runs["baseline"][2], runs["this"][2]
            print(f"{name:6} B={B:<3} {args.seconds}s: baseline {min(b):7.1f} ms (median {statistics.median(b):.1f}), "
                  f"this {min(t):7.1f} ms (median {statistics.median(t):.1f}), ratio {min(b) / min(t):.2f}", flush=True)
    print(f"# load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
