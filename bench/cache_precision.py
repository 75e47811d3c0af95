"""What a bfloat16 KV cache (``session.cache_dtype=bfloat16``) costs in quality: held-out episodes chained into long
sessions (as bench/context_window.py chains them) run teacher-forced through streaming sessions that keep their keys
and values in float32 and in bfloat16, both with the same window, next to the training forward under that window's
mask.

    python bench/cache_precision.py checkpoint=RUN_DIR data=HELDOUT_DIR [episodes=12] [chain=3] [window=1000]

Prints per context the mean text / word / audio loss (nats, as bench/context_window.py), the largest and the mean
difference of its logits from the float32 session's, and how often their argmax agrees with the float32 session's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from context_window import chained_sessions  # noqa: E402
from tml.eval.generate import turn_outputs, turn_positions  # noqa: E402
from tml.eval.loading import load_run, read_episodes  # noqa: E402
from tml.eval.session import MicroTurnInputs, SessionConfig, StreamingSession  # noqa: E402
from tml.streams import Batch, Kind  # noqa: E402


def session_logits(run, tok, cfg: SessionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Text logits [text targets, vocab] and audio logits [audio targets, S, C, bins] of a teacher-forced session."""
    session = StreamingSession(run.model, run.layout, run.dmel, cfg, run.text.pad_id)
    outs = [session.step(MicroTurnInputs(positions=turn_positions(tok, run.layout, t)),
                         force=turn_outputs(tok, run.layout, t)) for t in range(tok.num_turns)]
    return torch.cat([o.text_logits for o in outs]), torch.cat([o.audio_logits for o in outs])


def main() -> None:
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    torch.set_num_threads(int(args.get("threads", 1)))
    run = load_run(args["checkpoint"])
    episodes = read_episodes(args["data"], limit=int(args.get("episodes", 12)))
    n, window = int(args.get("chain", 3)), int(args.get("window", 1000))
    names = ["training forward", "session float32", "session bfloat16"]
    sums = {name: {} for name in names}
    lengths = []
    for tok, batch in chained_sessions(run, episodes, n):
        L = tok.kind.numel()
        lengths.append(L)
        i = torch.arange(L)
        mask = Batch.attention_mask(batch) & ((i[:, None] - i[None, :]) < window)

        class Masked(Batch):
            def attention_mask(self, _m=mask):
                return _m

        with torch.no_grad():
            out = run.model(Masked(**batch.__dict__))
        logits = {"training forward": (out.text_logits, out.audio_logits)}
        for dtype in ("float32", "bfloat16"):
            logits[f"session {dtype}"] = session_logits(run, tok, SessionConfig(cache_window=window, cache_dtype=dtype))
        target_text = batch.target_text[batch.target_kind == Kind.TEXT]
        words = target_text != run.text.pad_id
        target_audio = batch.payload["target_audio"]
        ref_text, ref_audio = logits["session float32"]
        for name in names:
            text, audio = logits[name]
            text_loss = F.cross_entropy(text.float(), target_text, reduction="none")
            audio_loss = F.cross_entropy(audio.float().reshape(-1, audio.shape[-1]), target_audio.reshape(-1),
                                         reduction="none")
            vals = {"text": (float(text_loss.double().sum()), text_loss.numel()),
                    "words": (float(text_loss[words].double().sum()), int(words.sum())),
                    "audio": (float(audio_loss.double().sum()), audio_loss.numel()),
                    "agree": (float((text.argmax(-1) == ref_text.argmax(-1)).sum()
                                    + (audio.argmax(-1) == ref_audio.argmax(-1)).sum()),
                              ref_text.shape[0] + ref_audio[..., 0].numel())}
            for key, (s, c) in vals.items():
                acc = sums[name].setdefault(key, [0.0, 0])
                acc[0] += s
                acc[1] += c
            diffs = torch.cat([(text - ref_text).abs().flatten(), (audio - ref_audio).abs().flatten()])
            sums[name]["max_diff"] = max(sums[name].get("max_diff", 0.0), float(diffs.max()))
            acc = sums[name].setdefault("mean_diff", [0.0, 0])
            acc[0] += float(diffs.double().sum())
            acc[1] += diffs.numel()
            scale = sums[name].setdefault("max_logit", [0.0, 1])
            scale[0] = max(scale[0], float(ref_text.abs().max()), float(ref_audio.abs().max()))
    print(f"{len(lengths)} sessions of {min(lengths)}-{max(lengths)} positions ({n} held-out episodes each), window "
          f"{window}, checkpoint {run.step_dir}")
    print(f"largest |logit| of the float32 session: {sums[names[1]]['max_logit'][0]:.1f}")
    print(f"{'context':18} {'text':>8} {'words':>8} {'audio':>8} {'|logit - fp32 session|: max':>28} {'mean':>9} "
          f"{'argmax = fp32 session':>22}")
    for name in names:
        m = {k: v[0] / max(v[1], 1) for k, v in sums[name].items() if k != "max_diff"}
        print(f"{name:18} {m['text']:>8.4f} {m['words']:>8.4f} {m['audio']:>8.4f} {sums[name]['max_diff']:>28.2e} "
              f"{m['mean_diff']:>9.2e} {m['agree']:>22.4%}")
    print("(losses in nats: text per token, words per non-pad token, audio per mel-channel bin; argmax over text "
          "targets and audio channel bins)")


if __name__ == "__main__":
    main()
