"""Per-micro-turn compute of the streaming session at several session lengths, next to full-sequence recompute
(what a model without a KV cache pays for every micro-turn), measured in the same run.

    python bench/streaming.py [--configs tiny small] [--lengths 10 60 300] [--turns 10] [--window 0] [--json]

The session is prefilled to each length (in chunks, through the same cached path), then ``--turns`` micro-turns
are timed: 11 input positions as one chunk plus 9 output positions one at a time (tiny layout). Real-time factor
= compute per micro-turn / 200 ms; below 1 keeps up with a live conversation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tml.audio.dmel import DMelTokenizer  # noqa: E402
from tml.eval.session import MicroTurnInputs, SessionConfig, StreamingSession  # noqa: E402
from tml.model import InteractionModel, ModelConfig  # noqa: E402
from tml.streams import Kind, LayoutConfig, MicroTurnLayout, Stream  # noqa: E402
from tml.streams.pack import collate  # noqa: E402
from tml.streams.interleave import EpisodeTokens  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FULL_RECOMPUTE_MAX = 12_000  # positions: beyond this the [L, L] attention mask of the plain forward is > 10 GB


def build(name: str) -> InteractionModel:
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                              OmegaConf.load(ROOT / "configs" / "model" / f"{name}.yaml")))
    cfg.vocab_size = 512
    torch.manual_seed(0)
    return InteractionModel(cfg).eval()


def silent_tokens(layout: MicroTurnLayout, turns: int) -> EpisodeTokens:
    kinds = torch.tensor([int(k) if k != Kind.PATCH else int(Kind.PAD) for k in layout.kinds] * turns)
    streams = torch.tensor([int(s) for s in layout.streams] * turns)
    n_audio = int((kinds == Kind.AUDIO).sum())
    return EpisodeTokens(key="bench", num_turns=turns, kind=kinds, stream=streams,
                         micro_turn=torch.arange(turns).repeat_interleave(layout.length),
                         text_ids=torch.zeros_like(kinds), audio_bins=torch.zeros(n_audio, 4, 80, dtype=torch.long),
                         patches=torch.zeros(0, 40, 40, 3, dtype=torch.uint8), patch_rc=torch.zeros(0, 2, dtype=torch.long))


def prefill(session: StreamingSession, layout: MicroTurnLayout, turns: int, chunk_turns: int = 50) -> None:
    """Fill the cache with ``turns`` silent micro-turns, ``chunk_turns`` at a time."""
    done = 0
    while done < turns:
        n = min(chunk_turns, turns - done)
        tok = silent_tokens(layout, n)
        session._forward(tok.kind.tolist(), tok.stream.tolist(), tok.text_ids.tolist(), tok.audio_bins,
                         tok.patches, tok.patch_rc)
        done += n
    session.turn = turns


def measure(name: str, seconds: int, turns: int, window: int) -> dict:
    model = build(name)
    layout = MicroTurnLayout(LayoutConfig())
    session = StreamingSession(model, layout, DMelTokenizer(), SessionConfig(cache_window=window))
    past = seconds * 1000 // layout.cfg.micro_turn_ms
    with torch.no_grad():
        prefill(session, layout, past)
    silence = torch.zeros(layout.frames_per_turn, layout.cfg.n_mels, dtype=torch.long)
    times = [session.step(MicroTurnInputs(user_audio=silence)).compute_s for _ in range(turns)]
    step_ms = 1000 * statistics.median(times)
    full_ms = None
    positions = (past + 1) * layout.length
    if positions <= FULL_RECOMPUTE_MAX:
        batch = collate([[silent_tokens(layout, past + 1)]], positions)
        with torch.no_grad():
            model(batch)  # warm-up
            t0 = time.perf_counter()
            model(batch)
            full_ms = 1000 * (time.perf_counter() - t0)
    return {"config": name, "session_s": seconds, "positions": positions, "step_ms": step_ms,
            "rtf": step_ms / layout.cfg.micro_turn_ms, "full_recompute_ms": full_ms,
            "speedup_vs_recompute": full_ms / step_ms if full_ms else None, "window": window}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "small"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[10, 60, 300])
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--window", type=int, default=0, help="session cache window in positions (0 = unbounded)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.json:
        print(f"{'config':8} {'session':>8} {'positions':>9} {'ms/turn':>9} {'RTF':>6} {'recompute ms':>13} {'speedup':>8}")
    for name in args.configs:
        for seconds in args.lengths:
            r = measure(name, seconds, args.turns, args.window)
            if args.json:
                print(json.dumps(r))
            else:
                full = f"{r['full_recompute_ms']:.1f}" if r["full_recompute_ms"] else "n/a (mem)"
                sp = f"{r['speedup_vs_recompute']:.1f}x" if r["speedup_vs_recompute"] else "-"
                print(f"{name:8} {seconds:>7}s {r['positions']:>9} {r['step_ms']:>9.1f} {r['rtf']:>6.3f} {full:>13} {sp:>8}",
                      flush=True)


if __name__ == "__main__":
    main()
