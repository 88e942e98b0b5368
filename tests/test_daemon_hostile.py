"""Hostile and broken clients against a real daemon: every limit holds and other clients carry on.

Each test stages one way a client can misbehave (never reading, huge field names, frames built to
explode in the decoder, ids of live requests, absurd reference audio, a token in the URL, a flood
of voice registrations) against a real server on port 0, as in test_daemon.py, whose helpers these
tests share. The tests about SIGTERM and RSS run `ttsd serve` as a subprocess."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import soundfile
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from ttsd.api import protocol as p
from ttsd.daemon import core as core_module
from ttsd.daemon import server as server_module
from ttsd.daemon import session as session_module
from ttsd.daemon.server import Server
from ttsd.daemon.worker import VoiceCache
from ttsd.pipeline.pipeline import Pipeline

from .conftest import FixtureSet, reap
from .test_daemon import (
    FAST,
    GATE_TIMEOUT_S,
    Client,
    Daemon,
    Recorder,
    client,
    hold_voice_preparation,
    last,
    running,
    until_true,
)

MANY_SENTENCES = " ".join(f"Sentence number {n} is here." for n in range(1, 13))
# 10 s of silence before every segment after the first: a few segments fill every buffer on the way.
STALLING: dict[str, Any] = {**FAST, "interval_silence_ms": 10_000}
EIGHT_MIB = 8 * 2**20
RSS_SETTLE_S = 2.0  # after its last frame, for the daemon to hand freed memory back (core.took_input)


# ------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def voices(pipeline: Pipeline) -> VoiceCache:
    return VoiceCache(max_voices=8)


@pytest.fixture(scope="module")
def speaker_wav(fx: FixtureSet) -> bytes:
    return (fx.root / "inputs" / "speaker.wav").read_bytes()


@pytest.fixture
def daemon(pipeline: Pipeline, voices: VoiceCache) -> Daemon:
    """`async with daemon(recorder, **config_overrides) as server`: a real server on port 0."""

    def start(recorder: Recorder | None = None, **overrides: Any) -> AbstractAsyncContextManager[Server]:
        return running(pipeline, voices, recorder, **overrides)

    return start


@asynccontextmanager
async def stalled_client(port: int) -> AsyncIterator[Client]:
    """A client that reads nothing (a 4 KiB receive buffer, a one-frame client queue) and leaves
    by dropping its TCP connection, as a stalled client would: a close handshake needs reading."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    ws = await connect(f"ws://127.0.0.1:{port}", sock=sock, compression=None, max_size=None, max_queue=1)
    try:
        yield Client(ws)
    finally:
        ws.transport.abort()
        await ws.wait_closed()


async def http_get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    return response


async def session_of(server: Server) -> session_module.Session:
    """The server side of the only connection (once its handler has started)."""
    await until_true(lambda: len(server.sessions) == 1)
    return next(iter(server.sessions))


def float_wav(samples: np.ndarray) -> bytes:
    """A 32-bit float WAV at 22.05 kHz holding `samples` exactly (no clipping, NaN and inf kept)."""
    out = io.BytesIO()
    soundfile.write(out, samples.astype(np.float32), 22_050, format="WAV", subtype="FLOAT")
    return out.getvalue()


def proc_status_bytes(pid: int, key: str) -> int:
    """VmRSS / VmHWM of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0]) * 1024
    raise KeyError(key)


@contextmanager
def ttsd_serve(log_path: Path, *flags: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`ttsd serve --random-weights tiny` on a free port, logging to `log_path`: (process, url)."""
    env = {**os.environ}
    env.pop("JOURNAL_STREAM", None)
    env.pop("NOTIFY_SOCKET", None)
    cmd = [sys.executable, "-m", "ttsd.daemon", "serve", "--random-weights", "tiny", "--random-seed", "1",
           "--port", "0", "--device", "cpu", *flags]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stderr=log)
    try:
        deadline = time.monotonic() + GATE_TIMEOUT_S
        while (m := re.search(r"ttsd ready url=(\S+)", log_path.read_text())) is None:
            assert proc.poll() is None, "daemon exited before its ready line: " + log_path.read_text()
            assert time.monotonic() < deadline, "daemon not ready in time"
            time.sleep(0.05)
        yield proc, m.group(1)
    finally:
        reap(proc)


async def wait_for_log(log_path: Path, pattern: str, count: int = 1) -> None:
    async with asyncio.timeout(GATE_TIMEOUT_S):
        while len(re.findall(pattern, log_path.read_text())) < count:
            await asyncio.sleep(0.05)


# ------------------------------------------------------------------------------------------------
# 1. Shutdown is bounded whatever clients do


async def test_shutdown_is_bounded_when_a_client_never_reads(
    daemon: Daemon, speaker_wav: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown aborts a client that never takes its close instead of waiting on it; a reading client gets 1001."""
    # The real bounds (5 s each) shortened; test_sigterm_... below runs with the real ones.
    flush_s, close_s, cancel_grace_s = 0.5, 0.5, 1.0
    monkeypatch.setattr(session_module, "FLUSH_ON_CLOSE_S", flush_s)
    monkeypatch.setattr(session_module, "CLOSE_TIMEOUT_S", close_s)
    monkeypatch.setattr(server_module, "CANCEL_GRACE_S", cancel_grace_s)
    rec = Recorder()
    drain_timeout_s = 0.5
    async with daemon(rec, drain_timeout_s=drain_timeout_s, stall_timeout_s=600.0) as server:
        async with client(server) as c:
            voice = await c.register(speaker_wav)
        async with stalled_client(server.port) as stalled, client(server) as reader:
            await stalled.send(p.Synthesize(id=1, text=MANY_SENTENCES, voice=voice, **STALLING))
            await rec.wait_for(lambda ev: any(e == "parked" for e, _, _ in ev))   # its socket is full
            t0 = time.monotonic()
            async with asyncio.timeout(GATE_TIMEOUT_S):
                await server.shutdown()
            elapsed_s = time.monotonic() - t0
            with pytest.raises(ConnectionClosed) as info:
                await reader.recv()
    # drain, cancel grace, flush, close, listener close: each bounded; 5 s of slack for a loaded machine.
    assert elapsed_s < drain_timeout_s + cancel_grace_s + flush_s + 2 * close_s + 5.0
    assert info.value.rcvd is not None and info.value.rcvd.code == 1001


@pytest.mark.slow
async def test_sigterm_exits_in_bounded_time_with_a_stalled_client(speaker_wav: bytes, tmp_path: Path) -> None:
    """`ttsd serve` exits 0 on SIGTERM within drain_timeout_s plus the fixed bounds while a client never reads."""
    log_path = tmp_path / "ttsd.log"
    drain_timeout_s = 1.0
    flags = ("--drain-timeout-s", str(drain_timeout_s), "--stall-timeout-s", "600", "--log-level", "debug")
    with ttsd_serve(log_path, *flags) as (proc, url):
        async with connect(url, compression=None, max_size=None) as ws:
            voice = await Client(ws).register(speaker_wav)
        async with stalled_client(int(url.rsplit(":", 1)[1])) as stalled:
            await stalled.send(p.Synthesize(id=1, text=MANY_SENTENCES, voice=voice, **STALLING))
            await wait_for_log(log_path, r"request parked")      # the worker found its socket full
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            returncode = await asyncio.to_thread(proc.wait, GATE_TIMEOUT_S)
            elapsed_s = time.monotonic() - t0
    log = log_path.read_text()
    assert returncode == 0, log
    bound_s = (
        drain_timeout_s + server_module.CANCEL_GRACE_S + session_module.FLUSH_ON_CLOSE_S
        + 2 * session_module.CLOSE_TIMEOUT_S
    )
    assert elapsed_s < bound_s + 5.0, log    # 5 s of slack for interpreter exit on a loaded machine
    assert "close not taken, aborting" in log and "shutdown complete" in log


# ------------------------------------------------------------------------------------------------
# 2. Memory per connection is bounded in bytes


async def test_error_text_is_capped_whatever_the_client_sends(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    """Huge client strings come back quoted short in a capped error, and every log line stays short."""
    caplog.set_level(logging.INFO, logger="ttsd")
    huge = "n" * EIGHT_MIB
    frames = [
        msgpack.packb({"type": "ping", "nonce": 1, huge: 0}),                       # unknown field name
        msgpack.packb({"type": huge, "id": 4}),                                     # unknown type
        msgpack.packb({"type": "synthesize", "id": 5, "text": "x", "voice": "v", "format": huge}),
    ]
    async with daemon() as server, client(server) as c:
        replies = []
        for frame in frames:
            await c.ws.send(frame)
            replies.append(await c.recv())
        await c.send(p.Ping(nonce=2))
        assert await c.recv() == p.Pong(nonce=2)
    for reply in replies:
        assert isinstance(reply, p.Error), reply
        assert len(reply.message) <= p.MAX_ERROR_CHARS and "nnnn" in reply.message
    assert [r.id for r in replies if isinstance(r, p.Error)] == [None, None, 5]
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("ttsd")]
    assert lines and max(len(line) for line in lines) < 2 * p.MAX_ERROR_CHARS


async def test_unread_replies_pause_reading_at_a_byte_cap(daemon: Daemon) -> None:
    """A client that sends without reading stops being read once 64 KiB of replies wait; others are served."""
    # Each frame names an unknown field, so each reply is a ~150-byte error: the kernel buffers on
    # the way fill after a few thousand, then the session's own queue.
    frame = msgpack.packb({"type": "ping", "nonce": 1, "x" * 100: 0})
    async with daemon() as server, stalled_client(server.port) as hog:
        session = await session_of(server)

        async def flood() -> None:
            while True:
                await hog.ws.send(frame)

        sender = asyncio.create_task(flood())
        try:
            await until_true(lambda: not session.reading)
            queued = session.unsent_bytes
            async with client(server) as other:
                await other.send(p.Ping(nonce=9))
                assert await other.recv() == p.Pong(nonce=9)
        finally:
            sender.cancel()
    reply_bytes = len(p.encode(p.Error(id=None, code=p.ErrorCode.BAD_MESSAGE, message="x" * p.MAX_ERROR_CHARS)))
    assert session_module.MAX_CONTROL_BACKLOG_BYTES < queued <= session_module.MAX_CONTROL_BACKLOG_BYTES + reply_bytes


@pytest.mark.slow
async def test_daemon_rss_stays_bounded_against_huge_field_names(tmp_path: Path) -> None:
    """A never-reading client sending pings with 8 MiB field names grows the daemon's RSS by < 2 frames."""
    log_path = tmp_path / "ttsd.log"
    max_frame_bytes = 9 * 2**20
    hostile = msgpack.packb({"type": "ping", "nonce": 1, "x" * EIGHT_MIB: 0})
    n_frames = 24      # 192 MiB sent; before the fix each came back whole and was logged whole
    flags = ("--max-frame-bytes", str(max_frame_bytes), "--log-level", "debug")
    with ttsd_serve(log_path, *flags) as (proc, url):
        async with connect(url, compression=None, max_size=None) as ws:
            await ws.send(hostile)   # warm the decode path so the baseline includes its buffers
            assert len(await ws.recv()) <= 2 * p.MAX_ERROR_CHARS
        baseline = proc_status_bytes(proc.pid, "VmRSS")
        async with stalled_client(int(url.rsplit(":", 1)[1])) as hog:
            for _ in range(n_frames):
                await hog.ws.send(hostile)
            await wait_for_log(log_path, r"bad frame peer=", 1 + n_frames)
            # The daemon hands freed frames back to the system just after logging them: its RSS must
            # settle under the bound soon after the last frame, and stay there while the client hangs.
            deadline = time.monotonic() + RSS_SETTLE_S
            while (grown := proc_status_bytes(proc.pid, "VmRSS") - baseline) >= 2 * max_frame_bytes \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
    assert grown < 2 * max_frame_bytes, f"RSS grew {grown / 2**20:.0f} MiB"
    assert max(len(line) for line in log_path.read_text().splitlines()) < 2 * p.MAX_ERROR_CHARS


async def test_large_inputs_trim_the_heap_once_per_delay(daemon: Daemon) -> None:
    """A large client input has the heap trimmed as soon as the loop is free; more within TRIM_DELAY_S
    of a trim share one later trim; small inputs none."""
    async with daemon() as server:
        core = server.core
        assert core._trim is not None, "glibc's malloc_trim was not found"
        loop = asyncio.get_running_loop()
        calls: list[float] = []

        def trim(pad: int) -> int:
            assert pad == 0
            calls.append(loop.time())
            return 1

        core._trim = trim
        core.took_input(core_module.TRIM_AFTER_BYTES - 1)
        await asyncio.sleep(2 * core_module.TRIM_DELAY_S)
        assert calls == []
        core.took_input(core_module.TRIM_AFTER_BYTES)
        await asyncio.sleep(0)
        assert len(calls) == 1  # at once: the last trim is long past
        for _ in range(5):
            core.took_input(8 * core_module.TRIM_AFTER_BYTES)
        await asyncio.sleep(2 * core_module.TRIM_DELAY_S)
        assert len(calls) == 2 and calls[1] - calls[0] >= core_module.TRIM_DELAY_S * 0.99


# ------------------------------------------------------------------------------------------------
# 3. One frame cannot freeze every connection


async def test_container_bomb_is_bad_frame_and_other_connections_keep_answering(daemon: Daemon) -> None:
    """Frames of 16.7 M empty maps or nested arrays get bad_frame while another connection keeps getting pongs."""
    n = 2**24 - 5                                             # a 16 MiB frame: array32 header + n fixmaps
    flat = b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n
    nested: object = None
    for _ in range(7):
        nested = [nested] * 8                                  # 8**7 = 2 M arrays in 2.4 MB
    bombs = [flat, msgpack.packb(nested)]
    async with daemon() as server, client(server) as hostile, client(server) as other:
        pongs: list[int] = []
        done = asyncio.Event()

        async def ping() -> None:
            nonce = 0
            while not done.is_set():
                await other.send(p.Ping(nonce=nonce))
                reply = await other.recv()
                assert reply == p.Pong(nonce=nonce)
                pongs.append(nonce)
                nonce += 1
                await asyncio.sleep(0.01)

        pinger = asyncio.create_task(ping())
        replies = []
        for bomb in bombs:
            await hostile.ws.send(bomb)
            replies.append(await hostile.recv())
        done.set()
        await pinger
    assert all(isinstance(r, p.Error) and r.code == p.ErrorCode.BAD_FRAME and r.id is None for r in replies)
    assert pongs == list(range(len(pongs))) and pongs


# ------------------------------------------------------------------------------------------------
# 4. An error names a request only when it ends it


async def test_errors_about_a_live_request_carry_no_id(daemon: Daemon, speaker_wav: bytes) -> None:
    """Refusals that do not end a live request carry id nil, and both live requests still end with done."""
    rec = Recorder()
    gate = rec.hold("segment_begin", 0)
    async with daemon(rec) as server, client(server) as c:
        voice = await c.register(speaker_wav)
        await c.send(p.Synthesize(id=1, text="", voice=voice, incremental=True, **FAST))  # awaits text
        await c.send(p.Synthesize(id=2, text="Hello there.", voice=voice, **FAST))        # held at the gate
        await rec.wait_for(lambda ev: any(e == "segment_begin" for e, _, _ in ev))
        await c.send(p.Flush(id=1))
        refused: list[bytes] = [
            p.encode(p.Synthesize(id=2, text="Again.", voice=voice)),                    # duplicate id
            p.encode(p.RegisterVoice(id=1, audio=speaker_wav)),                           # duplicate id
            msgpack.packb({"type": "synthesize", "id": 2, "text": 3, "voice": voice}),    # malformed, live id
            msgpack.packb({"type": "cancel", "id": 2, "extra": 0}),                       # malformed cancel
            p.encode(p.AppendText(id=2, text="more")),                                    # not incremental
            msgpack.packb({"type": "ping", "nonce": 1, "id": 2}),                         # ping with an id
            p.encode(p.Flush(id=1)),                                                      # a second flush
            msgpack.packb({"type": "sing", "id": 2}),                                     # unknown type
        ]
        errors = []
        for frame in refused:
            await c.ws.send(frame)
            errors.append(await c.recv())
        await c.send(p.Synthesize(id=3, text="Hi.", voice="nope"))   # a refusal that ends request 3
        unknown = await c.recv()
        gate.set()
        finals: dict[int, p.ServerMessage] = {}
        while len(finals) < 2:
            msg = await c.recv()
            assert not (isinstance(msg, p.Error) and msg.id in (1, 2)), msg
            if isinstance(msg, p.Done):
                finals[msg.id] = msg
    assert all(isinstance(e, p.Error) and e.id is None for e in errors), errors
    assert isinstance(unknown, p.Error) and (unknown.id, unknown.code) == (3, p.ErrorCode.UNKNOWN_VOICE)
    assert sorted(finals) == [1, 2]


# ------------------------------------------------------------------------------------------------
# 6. Reference audio with absurd samples


async def test_reference_audio_with_absurd_samples_is_bad_audio(daemon: Daemon, speaker_wav: bytes) -> None:
    """Float WAVs at 1e30 amplitude or holding NaN or inf get bad_audio; one merely over full scale speaks."""
    clean, _ = soundfile.read(io.BytesIO(speaker_wav), dtype="float32")
    unit = clean / np.abs(clean).max()
    with_nan, with_inf = unit.copy(), unit.copy()
    with_nan[100] = np.nan
    with_inf[100] = np.inf
    absurd = [float_wav(unit * 1e30), float_wav(with_nan), float_wav(with_inf)]
    async with daemon() as server, client(server) as c:
        replies = []
        for rid, wav in enumerate(absurd, start=1):
            await c.send(p.RegisterVoice(id=rid, audio=wav))
            replies.append(await c.recv())
        voice = await c.register(float_wav(unit * 2.0), request_id=9)
        await c.send(p.Synthesize(id=10, text="Hello.", voice=voice, **FAST))
        messages = await c.until(10)
    for rid, reply in enumerate(replies, start=1):
        assert isinstance(reply, p.Error) and (reply.id, reply.code) == (rid, p.ErrorCode.BAD_AUDIO), reply
        assert "non-finite or absurd" in reply.message
    assert isinstance(last(messages), p.Done)
    pcm = np.frombuffer(b"".join(m.pcm for m in messages if isinstance(m, p.Audio)), dtype="<i2")
    assert pcm.size > 0 and np.any(pcm != 0)


# ------------------------------------------------------------------------------------------------
# 7. A slow consumer hears why it is closed


async def test_slow_consumer_ends_every_request_and_closes_with_1008(daemon: Daemon, speaker_wav: bytes) -> None:
    """After a stall every live request of the connection gets slow_consumer, then a 1008 "slow consumer" close."""
    rec = Recorder()
    async with daemon(rec, stall_timeout_s=1.0) as server:
        async with client(server) as c:
            voice = await c.register(speaker_wav)
        async with stalled_client(server.port) as slow:
            await slow.send(p.Synthesize(id=1, text=MANY_SENTENCES, voice=voice, **STALLING))
            await slow.send(p.Synthesize(id=2, text="", voice=voice, incremental=True, **FAST))  # idle
            await rec.wait_for(lambda ev: any(e == "parked" for e, _, _ in ev))
            slow_key = next(k for e, k, _ in rec.events if e == "parked")
            await rec.wait_for(lambda ev: ("request_end", slow_key) in [(e, k) for e, k, _ in ev])
            errors: dict[int, str] = {}
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    msg = await slow.recv()
                    assert not isinstance(msg, p.Done), msg
                    if isinstance(msg, p.Error) and msg.id is not None:
                        errors[msg.id] = msg.code
        async with client(server) as other:       # the daemon serves on
            await other.send(p.Ping(nonce=1))
            assert await other.recv() == p.Pong(nonce=1)
    assert errors == {1: p.ErrorCode.SLOW_CONSUMER, 2: p.ErrorCode.SLOW_CONSUMER}
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    assert "slow consumer" in info.value.rcvd.reason


# ------------------------------------------------------------------------------------------------
# 8. Health checks during the drain; text frames


async def test_healthz_answers_503_while_draining(daemon: Daemon, speaker_wav: bytes) -> None:
    """During the drain /healthz answers 503 and new handshakes get 503, while the in-flight request finishes."""
    rec = Recorder()
    gate = rec.hold("segment_begin", 0)
    async with daemon(rec, drain_timeout_s=120.0) as server, client(server) as c:
        voice = await c.register(speaker_wav)
        await c.send(p.Synthesize(id=1, text="Finish me.", voice=voice, **FAST))
        await rec.wait_for(lambda ev: any(e == "segment_begin" for e, _, _ in ev))
        before = await http_get(server.port, "/healthz")
        stopping = asyncio.create_task(server.shutdown())
        await until_true(lambda: server.draining)
        during = await http_get(server.port, "/healthz")
        with pytest.raises(InvalidStatus) as refused:
            async with client(server):
                pass
        gate.set()
        messages = await c.until(1)
        await stopping
    assert before.startswith(b"HTTP/1.1 200")
    assert during.startswith(b"HTTP/1.1 503") and during.endswith(b"draining\n")
    assert refused.value.response.status_code == 503
    assert isinstance(last(messages), p.Done)


async def test_text_frames_bad_frame_or_1007_as_documented(daemon: Daemon) -> None:
    """A text frame gets bad_frame; one of invalid UTF-8 closes that connection with 1007; others carry on."""
    async with daemon() as server, client(server) as c, client(server) as other:
        await c.ws.send('{"type": "ping"}')
        reply = await c.recv()
        await c.ws.send(b"\x81\xa4type\xa4ping\xff", text=True)    # msgpack bytes, invalid UTF-8, as text
        with pytest.raises(ConnectionClosed) as info:
            await c.recv()
        await other.send(p.Ping(nonce=4))
        assert await other.recv() == p.Pong(nonce=4)
    assert isinstance(reply, p.Error) and (reply.id, reply.code) == (None, p.ErrorCode.BAD_FRAME)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1007


# ------------------------------------------------------------------------------------------------
# 9. Log hygiene


async def test_logs_hold_no_url_and_one_short_line_per_event(daemon: Daemon, caplog: pytest.LogCaptureFixture) -> None:
    """A refused handshake logs no path or query, and client strings are logged escaped and short, one line each."""
    caplog.set_level(logging.DEBUG, logger="ttsd")
    secret = "SECRET-IN-THE-URL-0123456789"
    async with daemon(token="t" * 32) as server:
        with pytest.raises(InvalidStatus) as info:
            async with connect(f"{server.url}/stream?token={secret}", compression=None):
                pass
        headers = {"Authorization": "Bearer " + "t" * 32}
        async with client(server, additional_headers=headers) as c:
            await c.send(p.Hello(client="evil\nINFO forged line " + "x" * 200, version=p.PROTOCOL_VERSION))
            assert isinstance(await c.recv(), p.ServerHello)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("ttsd")]
    assert info.value.response.status_code == 401
    assert not any(secret in line or "/stream" in line for line in lines), lines
    assert sum("unauthorized" in line for line in lines) == 1
    hello = [line for line in lines if line.startswith("hello ")]
    assert len(hello) == 1 and "\n" not in hello[0] and len(hello[0]) < 200


# ------------------------------------------------------------------------------------------------
# 10. A connection's share of the voice-registration queue


async def test_one_connection_cannot_fill_the_registration_queue(
    pipeline: Pipeline, daemon: Daemon, speaker_wav: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past max(1, max_queued_requests // 4) registrations in flight a connection gets busy; others still register."""
    max_queued = 8
    share = max(1, max_queued // session_module.REGISTRATION_SHARE)
    # Registrations run on the voice thread: hold it inside prepare_voice so they stay in flight (holding
    # the synthesis worker does not, and a quick voice thread would finish them before the test counts).
    gate, entered = hold_voice_preparation(pipeline, monkeypatch)
    audio = speaker_wav + b"\0" * 96  # a voice id no other test registered: the cache cannot answer it
    try:
        async with daemon(max_queued_requests=max_queued) as server:
            async with client(server) as hog, client(server) as other:
                for rid in range(10, 10 + share + 1):
                    await hog.send(p.RegisterVoice(id=rid, audio=audio))
                busy = await hog.recv()
                assert await asyncio.to_thread(entered.wait, GATE_TIMEOUT_S)
                await other.send(p.RegisterVoice(id=10, audio=audio))
                gate.set()
                other_reply = await other.recv()
                finals: dict[int, p.ServerMessage] = {}
                while len(finals) < share:
                    msg = await hog.recv()
                    if isinstance(msg, p.VoiceRegistered | p.Error):
                        finals[msg.id] = msg
    finally:
        gate.set()
    assert isinstance(busy, p.Error) and (busy.id, busy.code) == (10 + share, p.ErrorCode.BUSY), busy
    assert isinstance(other_reply, p.VoiceRegistered) and other_reply.id == 10
    assert sorted(finals) == list(range(10, 10 + share))
    assert all(isinstance(m, p.VoiceRegistered) for m in finals.values())
