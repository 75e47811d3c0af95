"""What a bounded streaming context costs in quality: held-out loss of a checkpoint with the full context vs a sliding
window (optionally with attention sinks), computed by the training forward under the mask a windowed session
attends with (tested equal to the session: tests/test_streaming.py::test_bounded_cache_equals_a_banded_training_mask).

    python bench/context_window.py checkpoint=RUN_DIR data=HELDOUT_DIR [episodes=12] [chain=3] [windows=250,500,1000]

Held-out episodes are chained ``chain`` at a time into one long session (one document), so contexts run past the
training rows' length, where a window matters. Prints mean text / word / audio loss per context, over all targets
and over the targets past position ``windows[-1]``.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tml.eval.loading import load_run, read_episodes  # noqa: E402
from tml.streams import Batch, Kind  # noqa: E402
from tml.streams.interleave import interleave  # noqa: E402
from tml.streams.pack import collate  # noqa: E402


def chained(pieces):
    """Episodes' tokens back to back as one session."""
    cat = lambda name: torch.cat([getattr(p, name) for p in pieces])  # noqa: E731
    micro = torch.cat([p.micro_turn + sum(q.num_turns for q in pieces[:i]) for i, p in enumerate(pieces)])
    return replace(pieces[0], key="+".join(p.key for p in pieces), num_turns=sum(p.num_turns for p in pieces),
                   kind=cat("kind"), stream=cat("stream"), micro_turn=micro,
                   payload={f: cat(f) for f in pieces[0].payload})


def chained_sessions(run, episodes, n: int):
    """Held-out episodes ``n`` at a time, back to back: yields (tokens, packed batch of one row [1, L])."""
    for g in range(0, len(episodes) - n + 1, n):
        tok = chained([interleave(e, run.layout, run.dmel, run.text) for e in episodes[g : g + n]])
        yield tok, collate([[tok]], tok.kind.numel())


def main() -> None:
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    torch.set_num_threads(int(args.get("threads", 1)))
    run = load_run(args["checkpoint"])
    episodes = read_episodes(args["data"], limit=int(args.get("episodes", 12)))
    n = int(args.get("chain", 3))
    windows = [int(w) for w in args.get("windows", "250,500,1000").split(",")]
    contexts = [("full", 0, 0)] + [(f"window {w}", w, 0) for w in windows] + [(f"window {windows[-1]} + 4 sinks",
                                                                                 windows[-1], 4)]
    sums = {c[0]: {} for c in contexts}
    lengths = []
    for tok, batch in chained_sessions(run, episodes, n):
        L = tok.kind.numel()
        lengths.append(L)
        full = Batch.attention_mask(batch)
        i = torch.arange(L)
        # target position of each text / audio target (row-major), to split "past the last window"
        t_text = i[batch.target_kind[0] == Kind.TEXT]
        t_audio = i[batch.target_kind[0] == Kind.AUDIO]
        for name, w, sinks in contexts:
            mask = full if not w else full & (((i[:, None] - i[None, :]) < w) | (i[None, :] < sinks))

            class Masked(Batch):
                def attention_mask(self, _m=mask):
                    return _m

            with torch.no_grad():
                out = run.model(Masked(**batch.__dict__))
            tt = batch.target_text[batch.target_kind == Kind.TEXT]
            words = tt != run.text.pad_id
            for part, sel_t, sel_a in (("all", torch.ones_like(t_text, dtype=torch.bool), torch.ones_like(t_audio, dtype=torch.bool)),
                                        ("late", t_text >= windows[-1], t_audio >= windows[-1])):
                # the heads' per-target losses (dMel: per mel-channel bin; flow: per position)
                vals = {"text": out.text_loss[sel_t], "words": out.text_loss[sel_t & words],
                        "audio": out.audio_loss[sel_a]}
                for key, per_target in vals.items():
                    s = sums[name].setdefault(f"{part}/{key}", [0.0, 0])
                    s[0] += float(per_target.double().sum())
                    s[1] += per_target.numel()
    print(f"{len(lengths)} sessions of {min(lengths)}-{max(lengths)} positions ({n} held-out episodes each), "
          f"checkpoint {run.step_dir}")
    keys = [f"{p}/{k}" for p in ("all", "late") for k in ("text", "words", "audio")]
    print(f"{'context':24} " + " ".join(f"{k:>12}" for k in keys))
    for name, _, _ in contexts:
        print(f"{name:24} " + " ".join(f"{sums[name][k][0] / max(sums[name][k][1], 1):>12.4f}" for k in keys))
    print(f"(late = targets at positions >= {windows[-1]}; losses in nats: text per token, words per non-pad token, "
          f"audio per mel-channel bin, or per position for the flow head)")


if __name__ == "__main__":
    main()
