"""Stream a recording through a running server (recipes/serve.py) as a live user would, and keep what came back.

    python -m tml.tools.client --wav input.wav                      # real time, ws://127.0.0.1:8765/ws
    python -m tml.tools.client --wav input.wav --fast --out run/    # as fast as the server answers (tests)

The wav (any rate; channels averaged) is resampled to the server's rate (read from its /status) and sent in 20 ms
frames of 16-bit PCM, paced by the wall clock unless --fast. Writes to --out: ``dialogue.wav`` (stereo: user left,
model right, each model micro-turn placed where a listener hears it, tml.eval.clock), ``model.wav`` and
``turns.jsonl`` (the server's per-micro-turn messages plus the measured round trip: from sending the micro-turn's
last sample to receiving its audio). Prints a summary: micro-turns, compute, real-time factor, round trip, lag.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.request
from pathlib import Path

import torch

FRAME_MS = 20


def server_status(url: str) -> dict:
    """The server's /status document (sample rate, micro-turn length, sessions in use) for ws://HOST:PORT/ws."""
    http = url.replace("ws://", "http://", 1).replace("wss://", "https://", 1).rsplit("/", 1)[0] + "/status"
    with urllib.request.urlopen(http, timeout=10) as r:
        return json.loads(r.read())


def to_wire(wave: torch.Tensor, fmt: str) -> bytes:
    """float [samples] in [-1, 1] -> little-endian bytes in the wire format (s16le rounds and clips)."""
    if fmt == "s16le":
        return (wave * 32768.0).round().clamp(-32768, 32767).to(torch.int16).numpy().astype("<i2").tobytes()
    return wave.float().clamp(-1, 1).numpy().astype("<f4").tobytes()


async def stream(url: str, wave: torch.Tensor, sample_rate: int, realtime: bool = True, fmt: str = "s16le") -> dict:
    """Send ``wave`` [samples] at ``sample_rate`` through the server at ``url`` and collect its answers.

    Returns {"ready": the server's ready message, "turns": [turn message + "audio" float [samples_per_turn] +
    "round_trip_ms"], "done": the done message, "warnings": [messages], "user": float [samples] as sent, at the
    server's rate}. Raises RuntimeError with the server's message when it answers with an error."""
    import torchaudio
    from websockets.asyncio.client import connect

    rate = server_status(url)["sample_rate"]
    if sample_rate != rate:
        wave = torchaudio.functional.resample(wave, sample_rate, rate)
    frame = rate * FRAME_MS // 1000
    async with connect(url, max_size=None, compression=None) as ws:
        await ws.send(json.dumps({"type": "start", "format": fmt, "sample_rate": rate}))
        ready = json.loads(await ws.recv())
        if ready.get("type") != "ready":
            raise RuntimeError(f"server at {url} refused the session: {ready.get('message', ready)}")
        n = ready["samples_per_turn"]
        completed_at: dict[int, float] = {}  # micro-turn -> when its last sample was sent

        async def send() -> None:
            t0 = time.perf_counter()
            for k, i in enumerate(range(0, wave.numel(), frame)):
                if realtime:
                    await asyncio.sleep(max(0.0, t0 + k * FRAME_MS / 1000 - time.perf_counter()))
                piece = wave[i : i + frame]
                await ws.send(to_wire(piece, fmt))
                now = time.perf_counter()
                for t in range(i // n, (i + piece.numel()) // n):
                    completed_at.setdefault(t, now)
                await asyncio.sleep(0)  # let the receiver run between frames
            await ws.send(json.dumps({"type": "end"}))

        sender = asyncio.create_task(send())
        turns, warnings, done, meta = [], [], None, None
        async for message in ws:
            if isinstance(message, bytes):
                meta["audio"] = torch.frombuffer(bytearray(message), dtype=torch.float32).clone()
                arrived = completed_at.get(meta["turn"], time.perf_counter())  # the padded last turn: sent with "end"
                meta["round_trip_ms"] = 1000 * (time.perf_counter() - arrived)
                turns.append(meta)
                continue
            msg = json.loads(message)
            if msg["type"] == "turn":
                meta = msg
            elif msg["type"] == "warning":
                warnings.append(msg["message"])
            elif msg["type"] == "done":
                done = msg
            elif msg["type"] == "error":
                sender.cancel()
                raise RuntimeError(f"server at {url}: {msg['message']}")
        await sender
    user = torch.nn.functional.pad(wave, (0, len(turns) * n - wave.numel()))
    return {"ready": ready, "turns": turns, "done": done, "warnings": warnings, "user": user}


def write_outputs(result: dict, out_dir: str | Path) -> Path:
    """dialogue.wav, model.wav and turns.jsonl of a ``stream`` result (see the module docstring)."""
    from tml.audio.wav import write_wav
    from tml.eval.clock import place_on_playback_clock

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rate, user, turns = result["ready"]["sample_rate"], result["user"], result["turns"]
    model = (place_on_playback_clock(torch.cat([t["audio"] for t in turns]), result["ready"]["samples_per_turn"],
                                     [t["plays_at_s"] for t in turns], rate, user.numel()) if turns else user * 0)
    write_wav(out / "dialogue.wav", torch.stack([user, model]), rate)
    write_wav(out / "model.wav", model, rate)
    (out / "turns.jsonl").write_text("".join(json.dumps({k: v for k, v in t.items() if k != "audio"}) + "\n"
                                             for t in turns))
    return out


def summary(result: dict) -> str:
    turns = result["turns"]
    if not turns:
        return "no micro-turns"
    mean = lambda key: sum(t[key] for t in turns) / len(turns)  # noqa: E731
    rtt = sorted(t["round_trip_ms"] for t in turns)
    said = " ".join(t["text"].strip() for t in turns if t["text"].strip())
    return (f"{len(turns)} micro-turns: compute {mean('compute_ms'):.1f} ms mean (model {mean('model_ms'):.1f}, "
            f"vocoder {mean('vocoder_ms'):.1f}), real-time factor {mean('rtf'):.3f}, round trip "
            f"{rtt[len(rtt) // 2]:.1f} ms median / {rtt[-1]:.1f} ms max, final lag {turns[-1]['lag_ms']:.0f} ms, "
            f"{len(result['warnings'])} behind-real-time warnings; the model wrote: {said[:200]!r}")


def main(argv: list[str] | None = None) -> dict:
    from tml.audio.wav import read_wav

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wav", required=True, help="the user's side: a WAV file (any rate, channels averaged)")
    p.add_argument("--url", default="ws://127.0.0.1:8765/ws", help="the server's WebSocket address")
    p.add_argument("--out", default="client_out", help="directory for dialogue.wav, model.wav, turns.jsonl")
    p.add_argument("--fast", action="store_true", help="send as fast as possible instead of in real time")
    p.add_argument("--format", default="s16le", choices=["s16le", "f32le"], help="wire format of the user audio")
    args = p.parse_args(argv)
    wave, sr = read_wav(args.wav)
    result = asyncio.run(stream(args.url, wave.mean(0), sr, realtime=not args.fast, fmt=args.format))
    out = write_outputs(result, args.out)
    print(summary(result), flush=True)
    print(f"wrote {out / 'dialogue.wav'}, {out / 'model.wav'}, {out / 'turns.jsonl'}", flush=True)
    return result


if __name__ == "__main__":
    main()
