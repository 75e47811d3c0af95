"""The live server (recipes/serve.py) in a real process on a real checkpoint: each connection gets exactly what a local
StreamingSession produces for its audio (same seed, sampled text), concurrently, in order; a client that drops
disturbs no one; bad frames get an error; the session limit refuses cleanly; the CLI client writes the dialogue."""

import asyncio
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from websockets.asyncio.client import connect
from websockets.sync.client import connect as sync_connect

from conftest import ROOT
from tml.audio.vocoder import GriffinLimVocoder, StreamingVocoder
from tml.audio.wav import read_wav, write_wav
from tml.eval.loading import load_run
from tml.eval.session import MicroTurnInputs, SessionConfig, StreamingSession
from tml.serve.server import ServeConfig
from tml.tools.client import server_status, stream

SR = 16000
MAX_SESSIONS = 2
TEXT_TEMPERATURE = 1.0  # sampled text: the comparison rests on the seed, not on greedy decoding


def session_config() -> SessionConfig:
    cfg = SessionConfig()  # the recipe's defaults, with the same override the server gets
    cfg.sampling.text_temperature = TEXT_TEMPERATURE
    return cfg


def start_server(checkpoint: Path, out: Path, *overrides: str) -> tuple[subprocess.Popen, str]:
    """recipes/serve.py on a free loopback port; returns (process, ws url) once it listens."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "recipes/serve.py", f"checkpoint={checkpoint}", "port=0",
                             f"hydra.run.dir={out}", f"serve.max_sessions={MAX_SESSIONS}",
                             f"serve.record_dir={out / 'sessions'}",
                             f"session.sampling.text_temperature={TEXT_TEMPERATURE}", *overrides],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # "serving ... on http://127.0.0.1:PORT/ ..." (blocks until it listens)
    if "serving" not in line:
        proc.kill()
        raise AssertionError(f"server did not start: {line!r}\n{proc.stderr.read()[-3000:]}")
    port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
    return proc, f"ws://127.0.0.1:{port}/ws"


def stop_server(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve")
    proc, url = start_server(tiny_run, out)
    yield url, out
    stop_server(proc)


@pytest.fixture(scope="module")
def run(tiny_run):
    return load_run(tiny_run)


def user_a() -> torch.Tensor:
    """2 s: noise bursts (speech-like energy in every mel channel) between silences."""
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(2 * SR)
    for a, b in ((1600, 11200), (17600, 27200)):  # 0.1-0.7 s and 1.1-1.7 s
        x[a:b] = 0.2 * torch.randn(b - a, generator=g)
    return x


def user_b() -> torch.Tensor:
    """1.9 s (not a whole number of micro-turns): a rising tone, then silence."""
    t = torch.arange(int(1.9 * SR)) / SR
    return torch.where(t < 1.2, 0.3 * torch.sin(2 * math.pi * (200 + 300 * t) * t), torch.zeros(()))


def s16(x: torch.Tensor) -> torch.Tensor:
    """What the server reads from 16-bit PCM on the wire."""
    return (x * 32768).round().clamp(-32768, 32767) / 32768


def local_reference(run, wave: torch.Tensor) -> list[tuple[list[int], torch.Tensor]]:
    """(text ids, audio) per micro-turn from a StreamingSession and streaming vocoder run here on ``wave`` (padded
    with silence to whole micro-turns), on one thread as the server's sessions are."""
    session = StreamingSession(run.model, run.layout, run.dmel, session_config(), run.text.pad_id)
    vocoder = StreamingVocoder(GriffinLimVocoder(run.dmel.cfg, ServeConfig().vocoder_iters), run.dmel.cfg)
    n = run.layout.samples_per_turn
    wave = torch.nn.functional.pad(wave, (0, -wave.numel() % n))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = []
        for chunk in wave.view(-1, n):
            o = session.step(MicroTurnInputs(user_audio=chunk))
            out.append((o.text_ids, vocoder(o.mel).float()))
        return out
    finally:
        torch.set_num_threads(threads)


def assert_matches(result: dict, reference: list) -> None:
    turns = result["turns"]
    assert [t["turn"] for t in turns] == list(range(len(reference)))  # all of them, in order
    for t, (ids, audio) in zip(turns, reference):
        assert t["text_ids"] == ids, f"micro-turn {t['turn']}"
        assert torch.equal(t["audio"], audio), f"micro-turn {t['turn']}: audio differs"
    assert result["done"]["turns"] == len(reference)


def wait_for_sessions(url: str, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while server_status(url)["sessions"] != n:
        assert time.monotonic() < deadline, f"server still holds {server_status(url)['sessions']} sessions, not {n}"
        time.sleep(0.05)


def test_two_concurrent_clients_each_get_their_own_local_session(server, run):
    url, _ = server
    a, b = user_a(), user_b()

    async def both():
        return await asyncio.gather(stream(url, a, SR, realtime=False, fmt="f32le"),
                                    stream(url, torch.nn.functional.interpolate(b[None, None], scale_factor=3,
                                                                                mode="linear")[0, 0],
                                           3 * SR, realtime=False, fmt="s16le"))

    ra, rb = asyncio.run(both())
    assert_matches(ra, local_reference(run, a))
    # b went out at 48 kHz: the client resampled it to 16 kHz and sent 16-bit PCM; the server padded the last
    # partial micro-turn with silence and said so
    import torchaudio

    b16 = torchaudio.functional.resample(torch.nn.functional.interpolate(b[None, None], scale_factor=3,
                                                                         mode="linear")[0, 0], 3 * SR, SR)
    assert_matches(rb, local_reference(run, s16(b16)))
    assert rb["done"]["padded_samples"] == 10 * 3200 - b16.numel()
    for t in ra["turns"]:  # the playback clock: never before the input ended; lag = start - input end
        assert t["plays_at_s"] >= 0.2 * (t["turn"] + 1)
        assert t["lag_ms"] == pytest.approx(1000 * (t["plays_at_s"] - 0.2 * (t["turn"] + 1)))
        assert t["compute_ms"] == pytest.approx(t["model_ms"] + t["vocoder_ms"])


def test_a_client_dropping_mid_stream_does_not_disturb_another(server, run):
    url, _ = server
    a, b = user_a(), user_b()

    async def drop_b():
        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "start", "format": "f32le", "sample_rate": SR}))
            assert json.loads(await ws.recv())["type"] == "ready"
            await ws.send(b[: SR].numpy().astype("<f4").tobytes())  # 5 micro-turns queued
            await ws.recv()  # the first answer is on its way
            ws.transport.abort()  # gone without a closing handshake

    async def both():
        return (await asyncio.gather(stream(url, a, SR, realtime=True, fmt="f32le"), drop_b()))[0]

    assert_matches(asyncio.run(both()), local_reference(run, a))
    wait_for_sessions(url, 0)  # the dropped session's slot is free again


def test_bad_frames_get_an_error_on_that_connection_only(server, run):
    url, _ = server
    a = user_a()

    async def bad(first, then=None):
        async with connect(url) as ws:
            await ws.send(first)
            if then is not None:
                assert json.loads(await ws.recv())["type"] == "ready"
                for frame in then if isinstance(then, list) else [then]:
                    await ws.send(frame)
            async for m in ws:  # the backlog case may see turns and warnings before its error
                if isinstance(m, str) and json.loads(m)["type"] == "error":
                    break
            await ws.wait_closed()
            return json.loads(m), ws.close_code

    start = lambda fmt, rate=SR: json.dumps({"type": "start", "format": fmt, "sample_rate": rate})  # noqa: E731
    nan = torch.tensor([0.0, float("nan")]).numpy().astype("<f4").tobytes()

    async def scenario():
        async with connect(url) as healthy:  # a good session open across all the bad ones
            await healthy.send(start("f32le"))
            assert json.loads(await healthy.recv())["type"] == "ready"
            await healthy.send(a[:4800].numpy().astype("<f4").tobytes())
            errors = [await bad(start("s16le", 48000)),
                      await bad(start("s16le"), b"\x00\x01\x02"),
                      await bad(start("f32le"), nan),
                      await bad(start("f32le"), "hello"),
                      await bad(b"\x00\x00\x00\x00"),
                      await bad(json.dumps({"type": "start", "format": "mp3", "sample_rate": SR})),
                      await bad(start("s16le"), [bytes(2 * 8 * SR)] * 4)]  # 32 s at once, the model far behind
            await healthy.send(a[4800:].numpy().astype("<f4").tobytes())
            await healthy.send(json.dumps({"type": "end"}))
            turns = []
            async for m in healthy:
                if isinstance(m, bytes):
                    turns[-1]["audio"] = torch.frombuffer(bytearray(m), dtype=torch.float32)
                elif json.loads(m)["type"] == "turn":
                    turns.append(json.loads(m))
            return errors, turns

    errors, turns = asyncio.run(scenario())
    expected = [("16000 Hz", 1007), ("not a whole number of 2-byte s16le samples", 1007),
                ("is not audio: sample 1 of 2 is nan", 1007), ("unexpected text message 'hello'", 1008),
                ("first message must be JSON text", 1008), ("start.format='mp3'", 1008),
                ("serve.max_backlog_s=30 s of audio queued", 1008)]
    assert len(errors) == len(expected)
    for (msg, code), (needle, want_code) in zip(errors, expected):
        assert msg["type"] == "error" and needle in msg["message"], msg
        assert code == want_code, (msg, code)
    assert_matches({"turns": turns, "done": {"turns": len(turns)}}, local_reference(run, a))


def test_more_connections_than_max_sessions_are_refused_with_a_message(server):
    url, _ = server
    start = json.dumps({"type": "start", "format": "s16le", "sample_rate": SR})

    async def scenario():
        held = [await connect(url) for _ in range(MAX_SESSIONS)]
        for ws in held:
            await ws.send(start)
            assert json.loads(await ws.recv())["type"] == "ready"
        async with connect(url) as extra:
            msg = json.loads(await asyncio.wait_for(extra.recv(), 10))
            await extra.wait_closed()
            refused = (msg, extra.close_code)
        await held[0].close()
        await asyncio.to_thread(wait_for_sessions, url, MAX_SESSIONS - 1)
        async with connect(url) as again:  # the freed slot takes a new session
            await again.send(start)
            accepted = json.loads(await again.recv())["type"]
        for ws in held[1:]:
            await ws.close()
        return refused, accepted

    (msg, code), accepted = asyncio.run(scenario())
    assert msg["type"] == "error" and f"serve.max_sessions={MAX_SESSIONS}" in msg["message"] and code == 1013
    assert accepted == "ready"


def test_the_command_line_client_writes_the_stereo_dialogue(server, run, tmp_path):
    url, out = server
    wav = tmp_path / "user.wav"
    write_wav(wav, user_a(), SR)
    user, _ = read_wav(wav)
    proc = subprocess.run([sys.executable, "-m", "tml.tools.client", "--wav", str(wav), "--url", url, "--fast",
                           "--out", str(tmp_path / "client")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "10 micro-turns" in proc.stdout
    turns = [json.loads(line) for line in (tmp_path / "client" / "turns.jsonl").read_text().splitlines()]
    reference = local_reference(run, s16(user[0]))
    assert [t["text_ids"] for t in turns] == [ids for ids, _ in reference]
    assert all(t["round_trip_ms"] > 0 for t in turns)
    stereo, sr = read_wav(tmp_path / "client" / "dialogue.wav")
    assert sr == SR and stereo.shape == (2, 2 * SR)
    assert torch.allclose(stereo[0], user[0], atol=2 / 32768)  # the user's side as sent
    # the model's side: micro-turn t's audio from where it plays (its input end plus compute), 16-bit rounded
    t0 = turns[0]
    a = round(t0["plays_at_s"] * SR)
    assert torch.allclose(stereo[1, a : a + 3200], reference[0][1].clamp(-1, 1)[: 2 * SR - a], atol=2 / 32768)
    assert stereo[1, :a].abs().max() == 0  # nothing before the first output could be heard


# -- the page, in a real browser ---------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium")


class DevTools:
    """The Chrome DevTools protocol over a WebSocket (the websockets package; no playwright, no download)."""

    def __init__(self, ws):
        self.ws, self.id = ws, 0

    def call(self, method: str, **params) -> dict:
        self.id += 1
        self.ws.send(json.dumps({"id": self.id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")


def best_alignment(segment: torch.Tensor, reference: torch.Tensor) -> float:
    """Highest normalised cross-correlation of ``segment`` with any same-length stretch of ``reference``."""
    n, m = segment.numel(), reference.numel()
    size = 1 << (n + m).bit_length()
    num = torch.fft.irfft(torch.fft.rfft(reference, size) * torch.fft.rfft(segment.flip(0), size), size)[n - 1 : m]
    energy = torch.nn.functional.pad(reference.double().square().cumsum(0), (1, 0))
    den = (energy[n:] - energy[:-n]).clamp_min(1e-12).sqrt() * segment.double().norm()
    return float((num.double() / den).max())


def heard_micro_turns(heard: torch.Tensor, reference: torch.Tensor, n: int = 3200) -> tuple[int, int]:
    """Of the loud ``n``-sample stretches of ``heard`` [T], how many match some stretch of ``reference`` (> 0.9)."""
    chunks = [c for c in heard[: heard.numel() // n * n].view(-1, n) if c.square().mean().sqrt() > 0.01]
    return sum(best_alignment(c, reference) > 0.9 for c in chunks), len(chunks)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium); "
                                             "the browser test drives it headless")
def test_the_page_talks_to_the_server_in_a_real_browser(server, tmp_path):
    from tml.data.espeak import speak

    url, out = server
    speech, _ = speak("hello there, can you hear me? this is a test of the live page.")
    mic = tmp_path / "mic.wav"  # the fake microphone plays this file in a loop
    write_wav(mic, 0.8 * speech, SR)
    profile = tmp_path / "profile"
    page = url.replace("ws://", "http://").replace("/ws", "/?autostart=1")
    browser = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
         f"--use-file-for-fake-audio-capture={mic}", "--autoplay-policy=no-user-gesture-required",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "--window-size=1280,900", page],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert time.monotonic() < deadline and browser.poll() is None, "chromium did not open DevTools"
            time.sleep(0.2)
        import urllib.request

        port = port_file.read_text().split()[0]
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        cdp = sync_connect(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"], max_size=None)
        tools = DevTools(cdp.__enter__())
        deadline = time.monotonic() + 120
        while (tools.js("window.tml ? tml.turns : 0") or 0) < 15:  # 3 s of conversation
            errors = tools.js("window.tml ? tml.errors : []")
            assert not errors and time.monotonic() < deadline, f"page: {errors}; {tools.js('tml.log')}"
            time.sleep(0.25)
        shot = tools.call("Page.captureScreenshot", format="png")["data"]
        (tmp_path / "page.png").write_bytes(__import__("base64").b64decode(shot))
        status = tools.js("document.getElementById('status').dataset.turns")
        tools.js("document.getElementById('stop').click()")
        page_state = tools.js("JSON.stringify({session: tml.session, turns: tml.turns, audio: tml.audioSamples, "
                              "text: tml.modelTurns.map(m => m.text), levels: tml.modelTurns.map(m => m.level), "
                              "rtt: tml.roundTripMs, sent: tml.sentSamples})")
        state = json.loads(page_state)
        cdp.__exit__(None, None, None)
    finally:
        os.killpg(browser.pid, signal.SIGTERM)
        browser.wait(timeout=30)
    print(f"screenshot: {tmp_path / 'page.png'}")
    assert (tmp_path / "page.png").stat().st_size > 10_000
    assert int(status) >= 15  # the page's own status element counts what it received

    record = out / "sessions" / f"session_{state['session']:04d}"
    deadline = time.monotonic() + 30
    while not (record / "turns.jsonl").exists():  # written when the server sees the page leave
        assert time.monotonic() < deadline, f"server wrote no record of the page's session in {record}"
        time.sleep(0.1)
    time.sleep(0.5)
    served = [json.loads(line) for line in (record / "turns.jsonl").read_text().splitlines()]

    # The server heard the microphone: its recording of the user lines up with the wav the fake device played.
    heard, _ = read_wav(record / "user.wav")
    assert heard.shape[1] >= 15 * 3200
    aligned, loud = heard_micro_turns(heard[0, 3200:], torch.cat([speech] * 4))  # past the start-up
    print(f"micro-turns of the mic heard sample for sample: {aligned}/{loud}")
    # A loaded CI machine made Chromium's audio thread drop a buffer once (1 s aligned at 0.67): a glitch spoils the
    # micro-turns it falls in, not the others; a wrong rate, garbled or missing audio spoils every one.
    assert loud >= 10 and aligned >= 0.75 * loud

    # The page received the model's audio and text, micro-turn by micro-turn, as the server sent them.
    k = state["turns"]
    assert k <= len(served) and state["audio"] == k * 3200
    assert state["text"] == [t["text"] for t in served[:k]] and any(s.strip() for s in state["text"])
    dialogue, _ = read_wav(record / "dialogue.wav")
    for t, level in zip(served[:k], state["levels"]):  # the page's level of each micro-turn, from what it got
        a = round(t["plays_at_s"] * SR)
        if a + 3200 <= dialogue.shape[1]:
            chunk = dialogue[1, a : a + 3200]
            recorded = 10 * math.log10(chunk.square().mean() + 1e-12)
            if level > -80:
                assert level == pytest.approx(recorded, abs=0.05)
            else:  # a silent micro-turn: near the 16-bit wav's quantisation floor both are just "silent"
                assert recorded < -80
    assert len(state["rtt"]) == k and all(r > 0 for r in state["rtt"])
