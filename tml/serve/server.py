"""A live server: one ``StreamingSession`` per WebSocket connection, and the static page, from one process.

Library: ``websockets`` (17.4, in the lock), the maintained asyncio WebSocket implementation for Python. It is a
library, not a framework: one ``serve()`` call, a coroutine per connection, and a ``process_request`` hook that
answers plain HTTP GETs, which is all the static page needs. No web framework, no second server, no build step.

Wire protocol (one connection = one session; JSON in text frames, audio in binary frames):

    client -> {"type": "start", "format": "s16le" | "f32le", "sample_rate": 16000}   first message
    server -> {"type": "ready", "sample_rate", "samples_per_turn", "micro_turn_ms", "output_format": "f32le", ...}
    client -> binary frames of user audio, mono, any number of whole samples per frame (f32 full scale is +-1)
    server -> per micro-turn, in order: {"type": "turn", "turn", "text", "text_ids", "compute_ms", "model_ms",
              "vocoder_ms", "rtf", "lag_ms", "plays_at_s", "behind", "queued"} then one binary frame: the model's
              audio for that micro-turn, samples_per_turn float32 little-endian samples
    server -> {"type": "warning", "message"} when it falls behind real time (and again every 5 s while behind)
    client -> {"type": "end"}: the server pads the last partial micro-turn with silence, answers every queued
              micro-turn, sends {"type": "done", "turns", "padded_samples"} and closes
    server -> {"type": "error", "message"} and a close (1007 bad data, 1008 protocol, 1013 server full, 1011 a
              failed micro-turn) on a bad frame; only that connection is affected

Timing: micro-turn t's input is complete when its last sample arrives; the session then steps it (on a worker
thread, so a slow session never blocks the event loop or another connection), the streaming vocoder turns its
log-mel into samples, and both go out. ``plays_at_s`` and ``lag_ms`` come from ``tml.eval.clock`` (the one
definition of when a listener hears output): lag is how long after its input ended this micro-turn plays (its own
compute, plus any backlog). A model that keeps real time has lag below one micro-turn; when compute per micro-turn
exceeds the micro-turn's length (``rtf`` > 1) the lag passes it, ``behind`` turns true and the client is warned.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from tml.audio.vocoder import GriffinLimVocoder, StreamingVocoder
from tml.eval.clock import PlaybackClock, place_on_playback_clock
from tml.eval.session import MicroTurnInputs, StreamingSession
from tml.errors import ConfigError

log = logging.getLogger("tml.serve")
WEB = Path(__file__).parent / "web"
PAGES = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript"),
         "/capture.js": ("capture.js", "text/javascript")}
FORMATS = {"s16le": 2, "f32le": 4}  # wire format -> bytes per sample
START_TIMEOUT_S = 10.0
BEHIND_REPEAT_S = 5.0


@dataclass
class ServeConfig:
    max_sessions: int = 4  # concurrent connections; one more gets an error message and a close, not a hang
    threads: int = 1  # torch intra-op threads; sessions step in parallel on their own worker threads
    vocoder_iters: int = 32  # Griffin-Lim iterations per micro-turn of model audio
    record_dir: str = ""  # when set, each session writes user.wav, dialogue.wav, turns.jsonl into a subdirectory
    max_frame_bytes: int = 1 << 20  # largest accepted WebSocket message
    max_backlog_s: float = 30.0  # audio queued ahead of the model beyond this is refused (a client far faster than
    # real time would otherwise grow the server's memory without bound)


class ProtocolError(Exception):
    """A client broke the protocol; ``code`` is the WebSocket close code sent with the error message."""

    def __init__(self, message: str, code: int = 1008):
        super().__init__(message)
        self.code = code


def parse_start(message: str | bytes, sample_rate: int) -> str:
    """The first message -> the declared wire format. Raises ProtocolError naming what is wrong."""
    if not isinstance(message, str):
        raise ProtocolError('the first message must be JSON text {"type": "start", "format": "s16le" or "f32le", '
                            f'"sample_rate": {sample_rate}}}, got a binary frame of {len(message)} bytes')
    try:
        start = json.loads(message)
    except json.JSONDecodeError as e:
        raise ProtocolError(f"the first message is not JSON ({e}): {message[:80]!r}") from None
    if not isinstance(start, dict) or start.get("type") != "start":
        raise ProtocolError(f'the first message must have "type": "start", got {message[:80]!r}')
    fmt, rate = start.get("format"), start.get("sample_rate")
    if fmt not in FORMATS:
        raise ProtocolError(f"start.format={fmt!r}: must be one of {sorted(FORMATS)}")
    if rate != sample_rate:
        raise ProtocolError(f"start.sample_rate={rate!r}: this checkpoint's layout takes {sample_rate} Hz mono; "
                            f"resample on the client (the page and tml.tools.client do)", code=1007)
    return fmt


def decode_frame(data: bytes, fmt: str) -> torch.Tensor:
    """One binary frame -> float32 samples [n] in [-1, 1]. Raises ProtocolError (close code 1007) for a frame that
    does not hold whole samples or, for f32le, holds values that are not full-scale audio."""
    width = FORMATS[fmt]
    if len(data) % width:
        raise ProtocolError(f"audio frame of {len(data)} bytes is not a whole number of {width}-byte {fmt} samples",
                            code=1007)
    if fmt == "s16le":
        return torch.frombuffer(bytearray(data), dtype=torch.int16).float() / 32768.0
    x = torch.frombuffer(bytearray(data), dtype=torch.float32)
    bad = ~torch.isfinite(x) | (x.abs() > 1.0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ProtocolError(f"f32le frame is not audio: sample {i} of {x.numel()} is {float(x[i])} (float32 audio "
                            f"must be finite and within [-1, 1])", code=1007)
    return x


class LiveSession:
    """One connection's state: the streaming session, the streaming vocoder, the playback clock, the input buffer,
    and (for recording) everything heard."""

    def __init__(self, session: StreamingSession, vocoder: StreamingVocoder, text, record: bool):
        self.session, self.vocoder, self.text = session, vocoder, text
        lay = session.layout
        self.n, self.sample_rate = lay.samples_per_turn, lay.cfg.sample_rate
        self.micro_turn_s = lay.cfg.micro_turn_ms / 1000
        self.clock = PlaybackClock(self.micro_turn_s)
        self.pending = torch.zeros(0)
        self.record = record
        self.user: list[torch.Tensor] = []
        self.model: list[torch.Tensor] = []
        self.turns: list[dict] = []

    def feed(self, samples: torch.Tensor) -> list[torch.Tensor]:
        """Buffer samples; return the micro-turns [samples_per_turn] they complete."""
        self.pending = torch.cat([self.pending, samples])
        k = self.pending.numel() // self.n
        chunks = list(self.pending[: k * self.n].view(k, self.n))
        self.pending = self.pending[k * self.n:].clone()
        return chunks

    def flush(self) -> tuple[list[torch.Tensor], int]:
        """The last partial micro-turn padded with silence (if any) and the number of padded samples."""
        if self.pending.numel() == 0:
            return [], 0
        pad = self.n - self.pending.numel()
        return self.feed(torch.zeros(pad)), pad

    def step(self, user: torch.Tensor) -> tuple[dict, bytes]:
        """One micro-turn (runs on a worker thread) -> the turn message and the model's audio as f32le bytes."""
        out = self.session.step(MicroTurnInputs(user_audio=user))
        t0 = time.perf_counter()
        wave = self.vocoder(out.mel).float()
        vocoder_s = time.perf_counter() - t0
        compute_s = out.compute_s + vocoder_s
        plays_at = self.clock.add(compute_s)
        meta = {"type": "turn", "turn": out.turn, "text": self.text.decode(out.text_ids), "text_ids": out.text_ids,
                "compute_ms": 1000 * compute_s, "model_ms": 1000 * out.compute_s, "vocoder_ms": 1000 * vocoder_s,
                "rtf": compute_s / self.micro_turn_s, "lag_ms": 1000 * self.clock.lag_s, "plays_at_s": plays_at,
                # lag >= this micro-turn's compute always; above one micro-turn, compute has not kept real time
                # (now or earlier: a backlog never drains, playback cannot overlap)
                "behind": self.clock.lag_s > self.micro_turn_s + 1e-9}
        if self.record:
            self.user.append(user)
            self.model.append(wave)
            self.turns.append(meta)
        return meta, wave.numpy().astype("<f4").tobytes()

    def write(self, out_dir: Path) -> None:
        """user.wav, dialogue.wav (stereo: user left, model right where a listener hears it) and turns.jsonl."""
        from tml.audio.wav import write_wav

        out_dir.mkdir(parents=True, exist_ok=True)
        user = torch.cat(self.user) if self.user else torch.zeros(0)
        model = (place_on_playback_clock(torch.cat(self.model), self.n, [m["plays_at_s"] for m in self.turns],
                                         self.sample_rate, user.numel()) if self.model else torch.zeros(0))
        write_wav(out_dir / "user.wav", user, self.sample_rate)
        write_wav(out_dir / "dialogue.wav", torch.stack([user, model]), self.sample_rate)
        (out_dir / "turns.jsonl").write_text("".join(json.dumps(m) + "\n" for m in self.turns))


class Server:
    """Connections -> sessions. ``make_session()`` builds a fresh StreamingSession (the model is shared: inference
    mutates no module state, each session owns its KV caches and generator)."""

    def __init__(self, make_session: Callable[[], StreamingSession], text, cfg: ServeConfig | None = None,
                 name: str = ""):
        self.make_session, self.text, self.cfg, self.name = make_session, text, cfg or ServeConfig(), name
        if self.cfg.max_sessions < 1 or self.cfg.vocoder_iters < 1:
            raise ConfigError(f"serve.max_sessions={self.cfg.max_sessions} and serve.vocoder_iters="
                              f"{self.cfg.vocoder_iters}: both must be >= 1")
        probe = make_session()
        self.layout, self.dmel_cfg = probe.layout, probe.dmel.cfg
        # Warm up (first calls pay one-time setup: allocator, kernels, the vocoder's least-squares solver), so the
        # first user's first micro-turn does not open with a backlog that, by the playback clock, never drains.
        LiveSession(probe, self._vocoder(), text, record=False).step(torch.zeros(probe.layout.samples_per_turn))
        self.pool = ThreadPoolExecutor(self.cfg.max_sessions, thread_name_prefix="session")
        self.active: set[int] = set()
        self.ids = itertools.count()

    def _vocoder(self) -> StreamingVocoder:
        return StreamingVocoder(GriffinLimVocoder(self.dmel_cfg, self.cfg.vocoder_iters), self.dmel_cfg)

    # -- HTTP: the page and a status document -------------------------------------------------------------------
    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?")[0]
        if path == "/ws":
            return None  # the WebSocket handshake
        if path == "/status":
            return _response(200, json.dumps(self.status()).encode(), "application/json")
        if path in PAGES:
            name, kind = PAGES[path]
            return _response(200, (WEB / name).read_bytes(), kind)
        return _response(404, f"no page at {path}: the page is /, the WebSocket /ws, the status /status\n".encode(),
                         "text/plain; charset=utf-8")

    def status(self) -> dict:
        lay = self.layout
        return {"sessions": len(self.active), "max_sessions": self.cfg.max_sessions, "checkpoint": self.name,
                "sample_rate": lay.cfg.sample_rate, "micro_turn_ms": lay.cfg.micro_turn_ms,
                "samples_per_turn": lay.samples_per_turn}

    # -- one connection ---------------------------------------------------------------------------------------
    async def handler(self, conn: ServerConnection) -> None:
        if len(self.active) >= self.cfg.max_sessions:
            await _fail(conn, f"server full: all serve.max_sessions={self.cfg.max_sessions} sessions are in use; "
                              f"try again when one ends", 1013)
            log.info("refused a connection: %d of %d sessions in use", len(self.active), self.cfg.max_sessions)
            return
        sid = next(self.ids)
        self.active.add(sid)  # no await since the check above: the event loop cannot admit two into one slot
        live = None
        try:
            try:
                first = await asyncio.wait_for(conn.recv(), START_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise ProtocolError(f"no start message within {START_TIMEOUT_S:.0f} s") from None
            fmt = parse_start(first, self.layout.cfg.sample_rate)
            live = LiveSession(self.make_session(), self._vocoder(), self.text, bool(self.cfg.record_dir))
            await conn.send(json.dumps({**self.status(), "type": "ready", "session": sid, "format": fmt,
                                        "output_format": "f32le"}))
            log.info("session %d started (%s), %d of %d in use", sid, fmt, len(self.active), self.cfg.max_sessions)
            await self._stream(conn, live, fmt, sid)
        except ProtocolError as e:
            log.info("session %d: %s", sid, e)
            await _fail(conn, str(e), e.code)
        except ConnectionClosed:
            pass
        finally:
            self.active.discard(sid)
            if live is not None and self.cfg.record_dir:
                live.write(Path(self.cfg.record_dir) / f"session_{sid:04d}")
            log.info("session %d ended after %d micro-turns; %d of %d in use", sid,
                     live.clock.turns if live else 0, len(self.active), self.cfg.max_sessions)

    async def _stream(self, conn: ServerConnection, live: LiveSession, fmt: str, sid: int) -> None:
        """Read audio into micro-turns while a worker task steps them in order; returns when the client ends or
        leaves. The worker is always finished before this returns, so the session is never used after."""
        queue: asyncio.Queue[torch.Tensor | None] = asyncio.Queue()
        worker = asyncio.create_task(self._work(conn, live, queue, sid))
        try:
            async for message in conn:
                if isinstance(message, str):
                    if _is_end(message):
                        chunks, padded = live.flush()
                        for c in chunks:
                            queue.put_nowait(c)
                        queue.put_nowait(None)
                        if await worker:
                            await conn.send(json.dumps({"type": "done", "turns": live.clock.turns,
                                                        "padded_samples": padded}))
                            await conn.close(1000, "done")
                        return
                    raise ProtocolError(f'unexpected text message {message[:80]!r}: audio goes in binary frames, '
                                        f'and the only text message after "start" is {{"type": "end"}}')
                for chunk in live.feed(decode_frame(message, fmt)):
                    queue.put_nowait(chunk)
                if queue.qsize() * live.micro_turn_s > self.cfg.max_backlog_s:
                    raise ProtocolError(f"more than serve.max_backlog_s={self.cfg.max_backlog_s:g} s of audio queued "
                                        f"ahead of the model: send audio in real time")
        finally:
            if not worker.done():  # left, or sent a bad frame: drop what is queued, let the step in flight finish
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)
                await worker

    async def _work(self, conn: ServerConnection, live: LiveSession, queue: asyncio.Queue, sid: int) -> bool:
        """Step queued micro-turns in order and send each result; False when the connection went away."""
        loop = asyncio.get_running_loop()
        warned_at = -math.inf
        while (chunk := await queue.get()) is not None:
            waiting = queue.qsize()
            try:
                meta, audio = await loop.run_in_executor(self.pool, live.step, chunk)
            except Exception as e:  # a bug or a model error: this session ends with a message, the others go on
                log.exception("session %d: micro-turn %d failed", sid, live.clock.turns)
                await _fail(conn, f"internal error in micro-turn {live.clock.turns}: {type(e).__name__}: {e}", 1011)
                return False
            meta["queued"] = waiting
            try:
                if meta["behind"] and time.monotonic() - warned_at > BEHIND_REPEAT_S:
                    warned_at = time.monotonic()
                    msg = (f"behind real time: micro-turn {meta['turn']}'s output plays {meta['lag_ms']:.0f} ms after "
                           f"its input ended (a real-time model: under {1000 * live.micro_turn_s:.0f} ms); this "
                           f"micro-turn took {meta['compute_ms']:.0f} ms (real-time factor {meta['rtf']:.2f}), and a "
                           f"backlog from slower ones never drains because playback cannot overlap")
                    log.warning("session %d: %s", sid, msg)
                    await conn.send(json.dumps({"type": "warning", "message": msg}))
                await conn.send(json.dumps(meta))
                await conn.send(audio)
            except ConnectionClosed:
                return False
        return True

    async def run(self, host: str, port: int, on_ready: Callable[[str, int], None] | None = None) -> None:
        """Serve until cancelled or sent SIGTERM / SIGINT. ``on_ready(host, port)`` is called with the bound address
        (port 0 picks one)."""
        stop = asyncio.get_running_loop().create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
        async with serve(self.handler, host, port, process_request=self.process_request, compression=None,
                         max_size=self.cfg.max_frame_bytes) as server:
            bound = server.sockets[0].getsockname()
            if on_ready is not None:
                on_ready(bound[0], bound[1])
            await stop
            log.info("stopping: closing %d sessions", len(self.active))
        self.pool.shutdown(wait=True, cancel_futures=True)


def _response(status: int, body: bytes, content_type: str) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-store"), ("Connection", "close")])
    return Response(status, "OK" if status == 200 else "Not Found", headers, body)


def _is_end(message: str) -> bool:
    try:
        return json.loads(message) == {"type": "end"}
    except json.JSONDecodeError:
        return False


async def _fail(conn: ServerConnection, message: str, code: int) -> None:
    """Send an error message and close with ``code``; the client may already be gone."""
    try:
        await conn.send(json.dumps({"type": "error", "message": message}))
        await conn.close(code, message[:120])
    except ConnectionClosed:
        pass


def serve_forever(server: Server, host: str, port: int) -> None:
    """Run ``server`` on ``host:port`` until interrupted, printing the page's address (flushed: tests read it)."""
    if sys.byteorder != "little":
        raise RuntimeError("tml.serve reads and writes little-endian audio with torch.frombuffer: a little-endian "
                           "machine is required")

    logging.getLogger("websockets").setLevel(logging.WARNING)  # not one line per page request

    def ready(h: str, p: int) -> None:
        if h not in ("127.0.0.1", "::1"):
            print(f"note: host={h} is reachable from other machines, with no authentication; browsers allow the "
                  f"microphone only on https or localhost pages (tunnel: ssh -L {p}:127.0.0.1:{p} ...)", flush=True)
        print(f"serving {server.name or 'a checkpoint'} on http://{h}:{p}/ (WebSocket ws://{h}:{p}/ws, "
              f"up to {server.cfg.max_sessions} sessions)", flush=True)

    asyncio.run(server.run(host, port, ready))
