"""One streaming step of this checkout against another checkout's, alternating in one process.

    python bench/session_ab.py --baseline /path/to/other/checkout [--configs tiny] [--batches 1 4 16] [--seconds 60]
                               [--reps 6] [--turns 3] [--baseline-dense-max N]

On a machine whose load changes by the minute, two bench runs minutes apart differ by more than a small change;
alternating the two sessions' steps in one process puts both under the same load. The baseline checkout's whole
``tml`` package (model, session, streams) is imported beside this one as a second set of modules (``load_checkout``),
so the comparison covers everything a step runs; each side builds its own model from the same config and seed
(the same weights while the initialisation is unchanged). ``--baseline-dense-max`` sets the baseline's
``MoE.DECODE_DENSE_MAX`` (0: its per-expert decode loop). The baseline must have this checkout's
``StreamingSession`` and ``KVCache`` interface (``bench/streaming.py``'s ``fill`` places its sessions). Sessions are
placed at ``--seconds`` as ``bench/streaming.py`` places them (random cache contents, silent dMel input). Prints per
config and B the fastest CPU ms per micro-turn of each (and the medians) over ``--reps`` x ``--turns`` steps, and the
ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import streaming as bench  # noqa: E402


def _tml_modules() -> list[str]:
    return [k for k in sys.modules if k == "tml" or k.startswith("tml.")]


def load_checkout(root: Path | None) -> SimpleNamespace:
    """The classes a step needs from the ``tml`` package of checkout ``root`` (None: this one). Another checkout's
    package is imported under the same names with this one's modules moved aside, then moved back: each set of
    modules keeps references to its own (nothing in a step imports ``tml`` at call time). ``active()`` puts a set
    back in ``sys.modules`` for what looks classes up by module name (OmegaConf's type checks)."""
    names = ("tml.eval.session", "tml.model", "tml.model.moe", "tml.audio.dmel", "tml.streams")
    if root is None:
        mods = [importlib.import_module(n) for n in names]
    else:
        if not (root / "tml" / "eval" / "session.py").is_file():
            raise SystemExit(f"--baseline {root}: no tml/eval/session.py there (give a checkout of this repository)")
        saved = {k: sys.modules.pop(k) for k in _tml_modules()}
        sys.path.insert(0, str(root))
        try:
            mods = [importlib.import_module(n) for n in names]
        finally:
            own = {k: sys.modules.pop(k) for k in _tml_modules()}
            sys.path.remove(str(root))
            sys.modules.update(saved)
    own = {k: sys.modules[k] for k in _tml_modules()} if root is None else own

    @contextlib.contextmanager
    def active():
        saved = {k: sys.modules.pop(k) for k in _tml_modules()}
        sys.modules.update(own)
        try:
            yield
        finally:
            for k in _tml_modules():
                del sys.modules[k]
            sys.modules.update(saved)

    session, model, moe, dmel, streams = mods
    return SimpleNamespace(session=session, InteractionModel=model.InteractionModel, ModelConfig=model.ModelConfig,
                           MoE=moe.MoE, DMelTokenizer=dmel.DMelTokenizer, streams=streams, active=active)


def build(ns: SimpleNamespace, name: str):
    """``bench/streaming.py``'s model ``name`` (vocabulary 512, seed 0) from this set of modules."""
    with ns.active():
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ns.ModelConfig),
                                                  OmegaConf.load(ROOT / "configs" / "model" / f"{name}.yaml")))
    cfg.vocab_size = 512
    torch.manual_seed(0)
    return ns.InteractionModel(cfg).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--configs", nargs="+", default=["tiny"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--baseline-dense-max", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dtype", default=None, help="this side's session.cache_dtype (default: its default)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sides = {"baseline": load_checkout(Path(args.baseline).resolve()), "this": load_checkout(None)}
    if args.baseline_dense_max is not None:
        sides["baseline"].MoE.DECODE_DENSE_MAX = args.baseline_dense_max
    print(f"# load average {os.getloadavg()}", flush=True)
    for name in args.configs:
        models = {tag: build(ns, name) for tag, ns in sides.items()}
        for B in args.batches:
            runs = {}
            for tag, ns in sides.items():
                mod, streams = ns.session, ns.streams
                with ns.active():
                    layout = streams.MicroTurnLayout(streams.LayoutConfig())
                    scfg = mod.SessionConfig()
                    if tag == "this" and args.cache_dtype:
                        scfg.cache_dtype = args.cache_dtype
                    s = mod.StreamingSession(models[tag], layout, ns.DMelTokenizer(), scfg, sessions=B)
                bench.fill(s, args.seconds * 1000 // layout.cfg.micro_turn_ms * layout.length)
                silence = torch.zeros(layout.frames_per_turn, layout.cfg.n_mels, dtype=torch.long)
                runs[tag] = (s, [mod.MicroTurnInputs(user_audio=silence) for _ in range(B)], [])
            for _ in range(args.reps):
                for s, inputs, ms in runs.values():
                    s.step_many(inputs)  # warm-up after the switch
                    c0 = time.process_time()
                    for _ in range(args.turns):
                        s.step_many(inputs)
                    ms.append(1000 * (time.process_time() - c0) / args.turns)
            b, t = runs["baseline"][2], runs["this"][2]
            print(f"{name:6} B={B:<3} {args.seconds}s: baseline {min(b):7.1f} ms (median {statistics.median(b):.1f}), "
                  f"this {min(t):7.1f} ms (median {statistics.median(t):.1f}), ratio {min(b) / min(t):.2f}", flush=True)
    print(f"# load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
