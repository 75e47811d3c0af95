"""Per-micro-turn compute of streaming sessions next to its FLOP floor, measured in the same run.

    python bench/streaming.py [--configs tiny small] [--lengths 10 60 300] [--batches 1 4 16] [--window 1000]
                              [--full-context] [--cache-dtype float32] [--compile] [--turns 10] [--threads 1]
                              [--json]

For each config, session length and batch size B, every session of a batched session is placed at that length (its
cache slots filled as a prefill would fill them, with random keys and values: a step costs what it attends to, not
what the keys hold), then ``--turns`` micro-turns are timed (median, after one warm-up). Columns:

- ``ms/turn``: one step advancing all B sessions by one micro-turn (11 input positions as one chunk, 9 output
  positions one after another in the default layout), median wall time; ``cpu ms``: the same steps' process CPU
  time. With one thread the CPU time is what the step costs on an otherwise idle core, so on a shared, loaded
  machine ``cpu ms`` (and the peak, also taken as CPU time) are the comparable numbers; the header prints the load.
- ``floor ms``: the step's FLOPs at this run's measured fp32 matmul peak (2048^2 matmul, same threads, best of 5
  by CPU time): per position
  ``2 x`` backbone matmul weights (experts: top_k of them) ``+ 4 x n_layers x attended keys x n_heads x head_dim``,
  plus each head only where it predicts (text head at 4, dMel head at 5 positions per micro-turn), times B.
- ``x floor``: cpu ms over floor ms.
- ``mem ms``: the step's memory floor: the bytes it must read at this run's read bandwidth (summing a 256 MiB
  tensor, CPU time, best of 3). Each of its sequential forwards (the input chunk, then every output position but the
  held-back last) reads the backbone's weights (the experts its tokens can reach: top_k per token, at most all) and
  every layer's cached keys and values of all B sessions (in ``--cache-dtype``); the text and dMel heads are read
  where they predict. A one-position step cannot reuse weights or cache between positions (they do not fit the
  caches), so this, not the FLOP floor, bounds a decode step; ``x mem``: cpu ms over mem ms.
- ``RTF``: cpu ms / 200 ms: the batch keeps all B sessions live while it is below 1 (aggregate real-time factor);
  ``wall RTF`` the same from wall time.
- ``full-context`` rows (``--window 0``, B = 1) show what an unbounded cache costs at each length.
- ``--compile``: ``session.compile`` (output positions through the compiled one-position step, where the model's
  experts decode dense; the warm-up step compiles, once per batch size).
"""

from __future__ import annotations

import argparse
import json
import os
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
from tml.model.flops import active_matmul_params  # noqa: E402
from tml.streams import Kind, LayoutConfig, MicroTurnLayout, Stream  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def build(name: str) -> InteractionModel:
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                              OmegaConf.load(ROOT / "configs" / "model" / f"{name}.yaml")))
    cfg.vocab_size = 512
    torch.manual_seed(0)
    return InteractionModel(cfg).eval()


def matmul_peak_gflops(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def read_gbps(mib: int = 256, reps: int = 3) -> float:
    """Memory read bandwidth of one sum over a tensor far larger than the caches, GB/s by CPU time."""
    a = torch.ones(mib * 2**20 // 4)
    a.sum()
    return a.numel() * 4 / min(_timed(a.sum) for _ in range(reps)) / 1e9


def _timed(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def floor_flops(model: InteractionModel, layout: MicroTurnLayout, context: int) -> float:
    """Forward FLOPs of one micro-turn of one session whose queries attend to ``context`` keys (see docstring)."""
    cfg = model.cfg
    S, C, NB = cfg.frames_per_audio_position, cfg.n_mels, cfg.dmel_bins
    text_head, audio_head = cfg.vocab_size * cfg.dim, cfg.dim * S * C * NB
    backbone = active_matmul_params(cfg) - text_head - audio_head
    n_text = layout.count(Stream.MODEL, Kind.TEXT)
    n_audio = layout.count(Stream.MODEL, Kind.AUDIO)
    attention = 4 * cfg.n_layers * context * cfg.n_heads * cfg.head_dim
    return layout.length * (2 * backbone + attention) + 2 * n_text * text_head + 2 * n_audio * audio_head


def floor_bytes(model: InteractionModel, layout: MicroTurnLayout, context: int, B: int, kv_bytes: int = 4) -> float:
    """Bytes one step of ``B`` sessions must read (fp32 weights, ``kv_bytes`` per cached key or value element): per
    sequential forward the backbone weights its tokens reach plus every layer's cached keys and values, and each
    head where it predicts (see the module docstring)."""
    cfg = model.cfg
    S, C, NB = cfg.frames_per_audio_position, cfg.n_mels, cfg.dmel_bins
    text_head, audio_head = cfg.vocab_size * cfg.dim, cfg.dim * S * C * NB
    backbone = active_matmul_params(cfg) - text_head - audio_head  # with top_k experts per MoE layer
    moe_layers = sum(1 for layer in model.layers if layer.moe)
    expert = 3 * cfg.dim * cfg.moe.hidden_dim
    outputs = layout.count(Stream.MODEL, Kind.TEXT) + layout.count(Stream.MODEL, Kind.AUDIO)
    chunk_tokens = B * (layout.length - outputs + 1)
    total = 0.0
    for tokens in [chunk_tokens] + [B] * (outputs - 1):  # the input chunk, then the output positions one by one
        experts = min(cfg.moe.num_experts, tokens * cfg.moe.top_k)
        weights = backbone + moe_layers * (experts - cfg.moe.top_k) * expert
        kv = 2 * cfg.n_layers * B * cfg.num_kv_heads * context * cfg.head_dim
        total += 4 * weights + kv_bytes * kv
    return total + 4 * (layout.count(Stream.MODEL, Kind.TEXT) * text_head + layout.count(Stream.MODEL, Kind.AUDIO)
                        * audio_head)


def fill(session: StreamingSession, positions: int) -> None:
    """Put every session at ``positions``: the cache slots that a real prefill would leave occupied hold random keys
    and values (the step's cost depends on how many keys it attends to, not on their values; a real prefill of 16
    small-model sessions would cost minutes of CPU per row of the table)."""
    cache, cfg = session.cache, session.model.cfg
    B = session.sessions
    if positions:
        cap = cache.capacity if cache.window else max(cache.capacity, 2 * positions)
        # the session's cache precision (a baseline checkout's KVCache may predate KVCache.dtype: float32 then)
        dtype = getattr(cache, "dtype", None) or torch.float32
        cache._allocate(B, cfg.num_kv_heads, cfg.head_dim, dtype, "cpu", cap)
        held = torch.arange(max(0, positions - (cap - cache.sinks)), positions)
        if cache.sinks:
            held = torch.cat([torch.arange(min(cache.sinks, positions)), held[held >= cache.sinks]])
        slots = cache._slots(held, cap)
        cache.pos[:, slots] = held
        cache.end = int(slots.max()) + 1
        cache.k.normal_()
        cache.v.normal_()
    for r in session.rows:
        r.position = positions
        r.turn = positions // session.layout.length


def measure(model: InteractionModel, name: str, seconds: int, B: int, window: int, turns: int, peak: float,
            gbps: float, cache_dtype: str = "float32", compile: bool = False) -> dict:
    layout = MicroTurnLayout(LayoutConfig())
    cfg = SessionConfig(cache_window=window, max_context=max(65536, (seconds * 5 + 10) * layout.length),
                        cache_dtype=cache_dtype, compile=compile)
    session = StreamingSession(model, layout, DMelTokenizer(), cfg, sessions=B)
    past = seconds * 1000 // layout.cfg.micro_turn_ms * layout.length
    fill(session, past)
    silence = torch.zeros(layout.frames_per_turn, layout.cfg.n_mels, dtype=torch.long)
    inputs = [MicroTurnInputs(user_audio=silence) for _ in range(B)]
    session.step_many(inputs)  # warm-up (with --compile: the compilation)
    times, cpu = [], []
    for _ in range(turns):
        c0 = time.process_time()
        times.append(session.step_many(inputs)[0].compute_s)
        cpu.append(time.process_time() - c0)
    wall_ms, step_ms = 1000 * statistics.median(times), 1000 * statistics.median(cpu)
    context = min(past + layout.length, window) if window else past + layout.length
    floor_ms = 1000 * B * floor_flops(model, layout, context) / (peak * 1e9)
    kv_bytes = session.cache.k.element_size()
    mem_ms = 1000 * floor_bytes(model, layout, context, B, kv_bytes) / (gbps * 1e9)
    return {"config": name, "session_s": seconds, "sessions": B, "window": window, "cache_dtype": cache_dtype,
            "compile": compile, "wall_ms": wall_ms,
            "cpu_ms": step_ms, "floor_ms": floor_ms, "x_floor": step_ms / floor_ms, "mem_ms": mem_ms,
            "x_mem": step_ms / mem_ms,
            "rtf": step_ms / layout.cfg.micro_turn_ms, "wall_rtf": wall_ms / layout.cfg.micro_turn_ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "small"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[10, 60, 300])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--window", type=int, default=SessionConfig().cache_window,
                    help="session cache window in positions (the default session's)")
    ap.add_argument("--full-context", action="store_true", help="also time B = 1 without a window")
    ap.add_argument("--cache-dtype", default=SessionConfig().cache_dtype, help="session.cache_dtype: float32, bfloat16")
    ap.add_argument("--compile", action="store_true",
                    help="session.compile: torch.compile'd output positions (windowed rows only)")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peak, gbps = matmul_peak_gflops(), read_gbps()
    print(f"# fp32 matmul peak {peak:.1f} GFLOP/s, read {gbps:.1f} GB/s ({args.threads} threads); load average "
          f"{os.getloadavg()}", flush=True)
    if not args.json:
        print(f"{'config':6} {'session':>7} {'window':>6} {'B':>3} {'ms/turn':>8} {'cpu ms':>8} {'floor ms':>8} "
              f"{'x floor':>7} {'mem ms':>7} {'x mem':>6} {'RTF':>6} {'wall RTF':>8}")
    for name in args.configs:
        model = build(name)
        compile = args.compile and model.decodes_dense(1)  # what session.compile needs (SessionConfig)
        if args.compile and not args.json:
            print(f"# {name}: output positions {'compiled' if compile else 'eager (its experts decode one by one)'}")
        runs = [(s, B, args.window) for s in args.lengths for B in args.batches]
        if args.full_context:
            runs += [(s, 1, 0) for s in args.lengths]
        for seconds, B, window in runs:
            r = measure(model, name, seconds, B, window, args.turns, peak, gbps, args.cache_dtype,
                        compile and window > 0)
            if args.json:
                print(json.dumps(r), flush=True)
            else:
                print(f"{name:6} {seconds:>6}s {window or 'full':>6} {B:>3} {r['wall_ms']:>8.1f} {r['cpu_ms']:>8.1f} "
                      f"{r['floor_ms']:>8.2f} {r['x_floor']:>7.1f} {r['mem_ms']:>7.2f} {r['x_mem']:>6.1f} "
                      f"{r['rtf']:>6.3f} {r['wall_rtf']:>8.3f}", flush=True)
    print(f"# load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
