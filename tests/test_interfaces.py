"""The other interfaces of one daemon against real servers on port 0: the OpenAI-compatible HTTP API
(aiohttp's client and the official `openai` client), Wyoming (the `wyoming` package's client) and
Prometheus metrics, all on the same worker as the WebSocket port.

The voice preset `alice` (the fixture's speaker clip) carries test_daemon's FAST options in
alice.toml, so every request here is greedy, short and seeded, and its audio can be compared
with offline synthesis sample for sample. Races are staged with test_daemon's Recorder."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import soundfile
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error as WyError
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)

from ttsd.api import protocol as p
from ttsd.daemon import encoding
from ttsd.daemon.metrics import INTERFACES
from ttsd.daemon.server import Server
from ttsd.daemon.worker import VoiceCache
from ttsd.pipeline.pipeline import Pipeline

from .conftest import FixtureSet, reap
from .test_daemon import (
    FAST,
    GATE_TIMEOUT_S,
    TWO_SENTENCES,
    Client,
    Recorder,
    client,
    offline_pcm,
    pcm_of,
    running,
    until_true,
)

TOKEN = "interfaces-test-token-0123456789"
READ_TIMEOUT_S = 120.0


# ------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def speaker_wav(fx: FixtureSet) -> bytes:
    return (fx.root / "inputs" / "speaker.wav").read_bytes()


@pytest.fixture(scope="module")
def voices(pipeline: Pipeline) -> VoiceCache:
    return VoiceCache(max_voices=8)


@pytest.fixture
def voices_dir(tmp_path: Path, speaker_wav: bytes) -> Path:
    """alice.wav with FAST options, and a clip that is not audio (skipped at load)."""
    d = tmp_path / "voices"
    d.mkdir()
    (d / "alice.wav").write_bytes(speaker_wav)
    (d / "alice.toml").write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in FAST.items()))
    (d / "broken.wav").write_bytes(b"RIFF not really a wav file")
    (d / "notes.txt").write_text("not a voice")
    return d


@pytest.fixture
def daemon(pipeline: Pipeline, voices: VoiceCache, voices_dir: Path) -> Any:
    """`async with daemon(recorder, **config) as server`: WebSocket, HTTP and Wyoming on port 0, presets loaded."""

    def start(recorder: Recorder | None = None, **overrides: Any) -> AbstractAsyncContextManager[Server]:
        return running(pipeline, voices, recorder, **{"http_port": 0, "wyoming_port": 0, "voices_dir": voices_dir,
                                                     **overrides})

    return start


def alice_pcm(pipeline: Pipeline, server: Server, text: str) -> bytes:
    """What offline synthesis makes of `text` with the alice preset's voice and options."""
    return offline_pcm(pipeline, server.presets.by_name["alice"].voice, text, **FAST)


@asynccontextmanager
async def http(server: Server, token: str | None = None) -> AsyncIterator[aiohttp.ClientSession]:
    assert server.http is not None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = aiohttp.ClientTimeout(total=READ_TIMEOUT_S)
    async with aiohttp.ClientSession(base_url=server.http.url, headers=headers, timeout=timeout) as session:
        yield session


def speech(text: str, **fields: Any) -> dict[str, Any]:
    return {"model": "tts-1", "input": text, "voice": "alice", "response_format": "wav", **fields}


async def error_of(response: aiohttp.ClientResponse) -> dict[str, Any]:
    body = await response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return dict(body["error"])


async def scrape(port: int, token: str | None = None) -> dict[str, float]:
    """GET /metrics over a raw socket (any HTTP port of the daemon) → {series: value}."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    writer.write(f"GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n".encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"text/plain" in head
    if b"chunked" in head.lower():
        body = _unchunk(body)
    series = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            series[name] = float(value)
    return series


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, body = out + body[:size], body[size + 2 :]
    return out


def mp3_frames(data: bytes) -> int:
    """Whole MPEG audio frames from the start of `data` (each header checked and its length followed)."""
    bitrates_kbps = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)  # MPEG-2 layer III
    rates_hz = (22_050, 24_000, 16_000)
    pos = frames = 0
    while pos + 4 <= len(data):
        (header,) = struct.unpack(">I", data[pos : pos + 4])
        assert header >> 21 == 0x7FF, f"no frame sync at byte {pos}"
        assert (header >> 19) & 3 == 2 and (header >> 17) & 3 == 1, "not MPEG-2 layer III"
        bitrate = bitrates_kbps[(header >> 12) & 15] * 1000
        rate = rates_hz[(header >> 10) & 3]
        length = 72 * bitrate // rate + ((header >> 9) & 1)
        if pos + length > len(data):
            break
        pos += length
        frames += 1
    assert pos == len(data), "the stream ends inside a frame"
    return frames


def decode(fmt: str, data: bytes) -> tuple[np.ndarray, int]:
    """Samples and rate of a response body in `fmt` (formats libsndfile reads in full)."""
    if fmt == "pcm":
        return np.frombuffer(data, dtype="<i2"), encoding.OPENAI_PCM_RATE_HZ
    samples, rate = soundfile.read(io.BytesIO(data), dtype="int16")
    return samples, int(rate)


async def wyoming_client(server: Server) -> AsyncTcpClient:
    assert server.wyoming is not None
    c = AsyncTcpClient.from_uri(server.wyoming.url, read_timeout=READ_TIMEOUT_S)
    assert isinstance(c, AsyncTcpClient)
    await c.connect()
    return c


async def events_until(c: AsyncTcpClient, *final: str) -> list[Event]:
    out = []
    while True:
        event = await c.read_event()
        assert event is not None, f"connection closed; got {[e.type for e in out]}"
        out.append(event)
        if event.type in final:
            return out


def audio_of(events: list[Event]) -> bytes:
    return b"".join(AudioChunk.from_event(e).audio for e in events if AudioChunk.is_type(e.type))


# ------------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP


async def test_speech_streams_each_segment_and_equals_offline(pipeline: Pipeline, daemon: Any) -> None:
    """Speech streams segment 0 (chunked) while segment 1 is held, and the WAV equals offline synthesis."""
    rec = Recorder()
    gate = rec.hold("segment_begin", 1)
    async with daemon(rec) as server, http(server) as h:
        async with h.post("/v1/audio/speech", json=speech(TWO_SENTENCES)) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "audio/wav"
            assert r.headers["Transfer-Encoding"] == "chunked"
            first = await r.content.readany()
            assert first.startswith(b"RIFF") and len(first) > 44
            assert ("segment_end", 1) not in [(e, i) for e, _, i in rec.events]
            gate.set()
            body = first + await r.read()
        expected = alice_pcm(pipeline, server, TWO_SENTENCES)
    assert rec.timed_out == []
    samples, rate = soundfile.read(io.BytesIO(body), dtype="int16")
    assert rate == p.SAMPLE_RATE_HZ
    assert samples.tobytes() == expected


async def test_speech_with_chunked_segments_equals_offline(pipeline: Pipeline, daemon: Any) -> None:
    """chunk_codes in a speech request streams each segment's chunks and the WAV is the offline chunked audio."""
    chunked = dict(max_mel_tokens=24, chunk_codes=6, chunk_overlap=2, first_chunk_codes=4)
    async with daemon() as server, http(server) as h:
        async with h.post("/v1/audio/speech", json=speech(TWO_SENTENCES, **chunked)) as r:
            assert r.status == 200
            body = await r.read()
        expected = offline_pcm(pipeline, server.presets.by_name["alice"].voice, TWO_SENTENCES, **{**FAST, **chunked})
    samples, _ = soundfile.read(io.BytesIO(body), dtype="int16")
    assert samples.tobytes() == expected


async def test_every_response_format_decodes(pipeline: Pipeline, daemon: Any) -> None:
    """wav, pcm (24 kHz), flac, mp3 and opus bodies are well-formed streams of the request's length of audio."""
    text = "Hello world."
    async with daemon() as server, http(server) as h:
        seconds = len(alice_pcm(pipeline, server, text)) / 2 / p.SAMPLE_RATE_HZ
        assert set(encoding.FORMATS) == {"wav", "pcm", "flac", "mp3", "opus"}
        bodies = {}
        for fmt in encoding.FORMATS:
            async with h.post("/v1/audio/speech", json=speech(text, response_format=fmt)) as r:
                assert r.status == 200 and r.headers["Content-Type"] == encoding.CONTENT_TYPES[fmt], fmt
                bodies[fmt] = await r.read()
    for fmt in ("wav", "pcm", "opus"):
        samples, rate = decode(fmt, bodies[fmt])
        assert abs(len(samples) / rate - seconds) < 0.01, (fmt, len(samples) / rate, seconds)
    # A streamed FLAC has no length in its STREAMINFO; a streamed MP3 no LAME info: check their frames.
    assert bodies["flac"].startswith(b"fLaC")
    with soundfile.SoundFile(io.BytesIO(bodies["flac"])) as f:
        assert (f.samplerate, f.channels) == (p.SAMPLE_RATE_HZ, 1)
    frames = mp3_frames(bodies["mp3"])   # 576 samples per MPEG-2 layer III frame, plus the encoder's delay
    assert seconds * p.SAMPLE_RATE_HZ / 576 < frames < seconds * p.SAMPLE_RATE_HZ / 576 + 6


async def test_openai_client_streams_speech_and_maps_errors(pipeline: Pipeline, daemon: Any) -> None:
    """The official openai client streams pcm with with_streaming_response and gets typed errors."""
    import openai

    async with daemon(token=TOKEN) as server:
        assert server.http is not None
        api = openai.AsyncOpenAI(api_key=TOKEN, base_url=server.http.url + "/v1", max_retries=0)
        chunks = []
        async with api.audio.speech.with_streaming_response.create(
            model="gpt-4o-mini-tts", voice="alice", input=TWO_SENTENCES, response_format="pcm",
            extra_body={"seed": 3, "diffusion_steps": 2},   # ttsd options ride along in the body
        ) as r:
            async for chunk in r.iter_bytes():
                chunks.append(chunk)
        with pytest.raises(openai.BadRequestError) as bad:
            await api.audio.speech.create(model="tts-1", voice="nobody", input="Hi.")
        with pytest.raises(openai.BadRequestError) as speed:
            await api.audio.speech.create(model="tts-1", voice="alice", input="Hi.", speed=1.5)
        with pytest.raises(openai.NotFoundError):
            await api.audio.speech.create(model="tts-2-ultra", voice="alice", input="Hi.")
        wrong = openai.AsyncOpenAI(api_key="wrong-key-0123456789", base_url=server.http.url + "/v1", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await wrong.models.list()
        models = await api.models.list()
        await api.close()
        await wrong.close()
        expected_s = len(alice_pcm(pipeline, server, TWO_SENTENCES)) / 2 / p.SAMPLE_RATE_HZ
    pcm = b"".join(chunks)
    assert abs(len(pcm) / 2 / encoding.OPENAI_PCM_RATE_HZ - expected_s) < 0.01
    assert isinstance(bad.value.body, dict) and bad.value.body["code"] == p.ErrorCode.UNKNOWN_VOICE
    assert isinstance(speed.value.body, dict) and speed.value.body["param"] == "speed"
    assert {m.id for m in models.data} >= {"indextts-2", "tts-1"}


async def test_bad_requests_get_openai_errors_and_the_api_keeps_serving(daemon: Any) -> None:
    """Every kind of bad request gets its status and error code in OpenAI's shape; then a good one is served."""
    big = "x" * 200
    cases: list[tuple[str, str, Any, int, str, str | None]] = [
        ("POST", "/v1/audio/speech", b"{not json", 400, p.ErrorCode.BAD_MESSAGE, None),
        ("POST", "/v1/audio/speech", [1, 2], 400, p.ErrorCode.BAD_MESSAGE, None),
        ("POST", "/v1/audio/speech", {"input": "Hi.", "voice": "alice"}, 400, p.ErrorCode.BAD_MESSAGE, "model"),
        ("POST", "/v1/audio/speech", speech("Hi.", model="tts-9"), 404, "model_not_found", "model"),
        ("POST", "/v1/audio/speech", speech("Hi.", colour="blue"), 400, p.ErrorCode.BAD_MESSAGE, "colour"),
        ("POST", "/v1/audio/speech", speech("Hi.", top_p=5), 400, p.ErrorCode.BAD_MESSAGE, "top_p"),
        ("POST", "/v1/audio/speech", speech("Hi.", num_beams=9), 400, p.ErrorCode.BAD_MESSAGE, None),
        ("POST", "/v1/audio/speech", speech("Hi.", speed=0.5), 400, "unsupported", "speed"),
        ("POST", "/v1/audio/speech", speech("Hi.", response_format="aac"), 400, "unsupported", "response_format"),
        # instructions are emo_text, which this daemon's checkpoint (no QwenEmotion) cannot read
        ("POST", "/v1/audio/speech", speech("Hi.", instructions="whisper"), 400, p.ErrorCode.BAD_MESSAGE, None),
        ("POST", "/v1/audio/speech", speech("Hi.", voice="bob"), 400, p.ErrorCode.UNKNOWN_VOICE, "voice"),
        ("POST", "/v1/audio/speech", speech("Hi.", voice="broken"), 400, p.ErrorCode.UNKNOWN_VOICE, "voice"),
        ("POST", "/v1/audio/speech", speech(big), 400, p.ErrorCode.TEXT_TOO_LONG, "input"),
        ("POST", "/v1/audio/speech", speech("  "), 400, p.ErrorCode.BAD_TEXT, "input"),
        ("POST", "/v1/audio/speech", speech("\u200b"), 400, p.ErrorCode.BAD_TEXT, "input"),   # found by the worker
        ("POST", "/v1/audio/speech", {"input": "y" * 100_000}, 413, p.ErrorCode.TOO_LARGE, None),
        ("GET", "/v1/audio/speech", None, 405, "method_not_allowed", None),
        ("GET", "/v2/nothing", None, 404, "not_found", None),
    ]
    async with daemon(max_text_chars=100) as server, http(server) as h:
        for method, path, body, status, code, param in cases:
            data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
            async with h.request(method, path, data=data, headers={"Content-Type": "application/json"}) as r:
                error = await error_of(r)
                assert (r.status, error["code"], error["param"]) == (status, code, param), (body, error)
        async with h.post("/v1/audio/speech", json=speech("Still here.")) as r:
            assert r.status == 200 and len(await r.read()) > 44


async def test_busy_is_429_and_draining_is_503(daemon: Any) -> None:
    """With the only slot taken a request gets 429 with Retry-After; during the drain /healthz and speech answer 503."""
    rec = Recorder()
    gate = rec.hold("segment_begin", 0)
    async with daemon(rec, max_concurrent_requests=1, max_queued_requests=0, drain_timeout_s=120.0) as server:
        async with http(server) as h:
            first = asyncio.create_task(h.post("/v1/audio/speech", json=speech("Hold on.")))
            await rec.wait_for(lambda ev: any(e == "segment_begin" for e, _, _ in ev))
            async with h.post("/v1/audio/speech", json=speech("Me too.")) as r:
                assert r.status == 429 and r.headers["Retry-After"] == "1"
                assert (await error_of(r))["code"] == p.ErrorCode.BUSY
            stopping = asyncio.create_task(server.shutdown())
            await until_true(lambda: server.draining)
            async with h.get("/healthz") as r:
                assert r.status == 503 and await r.text() == "draining\n"
            async with h.post("/v1/audio/speech", json=speech("Too late.")) as r:
                assert r.status == 503 and (await error_of(r))["code"] == p.ErrorCode.SHUTTING_DOWN
            gate.set()
            async with await first as r:
                assert r.status == 200 and len(await r.read()) > 44   # the in-flight request finished
            await stopping


async def test_token_guards_everything_but_healthz(daemon: Any) -> None:
    """With a token, the API and /metrics answer 401 without it and serve with it; /healthz needs none."""
    async with daemon(token=TOKEN) as server:
        async with http(server) as h:
            for path in ("/v1/models", "/v1/audio/voices", "/metrics"):
                async with h.get(path) as r:
                    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
                    assert (await error_of(r))["code"] == p.ErrorCode.UNAUTHORIZED
            async with h.get("/healthz") as r:
                assert r.status == 200
        async with http(server, TOKEN) as h:
            async with h.get("/v1/audio/voices") as r:
                voices = (await r.json())["voices"]
            async with h.get("/v1/models/tts-1") as r:
                assert (await r.json())["id"] == "tts-1"
        assert server.http is not None
        with pytest.raises(AssertionError):
            await scrape(int(server.http.url.rsplit(":", 1)[1]))         # 401 without the token
        assert "ttsd_batch_rows" in await scrape(server.port, TOKEN)      # the WebSocket port, with it
    assert [v["id"] for v in voices] == ["alice"]                         # broken.wav was skipped
    assert voices[0]["voice_id"] == server.presets.by_name["alice"].voice_id


async def test_client_that_disconnects_cancels_its_job(daemon: Any) -> None:
    """Closing the HTTP connection mid-stream stops the job before its next segment and frees its slot."""
    rec = Recorder()
    gate = rec.hold("segment_begin", 1)
    async with daemon(rec) as server:
        async with http(server) as h, h.post("/v1/audio/speech", json=speech(TWO_SENTENCES)) as r:
            assert len(await r.content.readany()) > 0
        await until_true(lambda: server.worker is not None and server.worker.live_jobs == 0)
        gate.set()
        await rec.wait_for(lambda ev: any(e == "request_end" for e, _, _ in ev))
    assert [i for e, _, i in rec.events if e == "request_end"] == [1]   # one segment made, not two


async def test_a_client_that_stops_reading_is_parked_then_dropped(daemon: Any) -> None:
    """An HTTP client that reads nothing parks its job (others are served), then is dropped after stall_timeout_s."""
    rec = Recorder()
    many = " ".join(f"Sentence number {n} is here." for n in range(1, 13))
    async with daemon(rec, stall_timeout_s=1.0) as server:
        assert server.http is not None
        port = int(server.http.url.rsplit(":", 1)[1])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        body = json.dumps(speech(many, interval_silence_ms=10_000)).encode()
        sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        try:
            await rec.wait_for(lambda ev: any(e == "parked" for e, _, _ in ev))
            async with http(server) as h, h.post("/v1/audio/speech", json=speech("I am not stalled.")) as r:
                assert r.status == 200 and len(await r.read()) > 44
            slow_key = next(k for e, k, _ in rec.events if e == "parked")
            await rec.wait_for(lambda ev: ("request_end", slow_key) in [(e, k) for e, k, _ in ev])
            series = {}
            async with asyncio.timeout(GATE_TIMEOUT_S):
                while series.get('ttsd_requests_total{code="slow_consumer",interface="http"}') != 1.0:
                    series = await scrape(server.port)
            # The server dropped the connection: reading drains what was sent, then ends.
            sock.settimeout(GATE_TIMEOUT_S)
            with pytest.raises(ConnectionError):
                while sock.recv(1 << 20):
                    pass
                raise ConnectionResetError("closed")
        finally:
            sock.close()


# ------------------------------------------------------------------------------------------------
# Wyoming


async def test_wyoming_describe_lists_the_presets(daemon: Any) -> None:
    """describe → info: one streaming TTS program whose voices are the presets; shutdown closes the connection."""
    async with daemon() as server:
        c = await wyoming_client(server)
        await c.write_event(Describe().event())
        info = Info.from_event((await events_until(c, "info"))[-1])
    assert await c.read_event() is None   # the shutdown closed the idle connection
    await c.disconnect()
    (program,) = info.tts
    assert program.supports_synthesize_streaming and program.installed
    assert [v.name for v in program.voices] == ["alice"]
    assert set(program.voices[0].languages) == {"en", "zh"}


async def test_wyoming_synthesize_equals_offline(pipeline: Pipeline, daemon: Any) -> None:
    """synthesize → one audio-start, chunks at 22.05 kHz s16le mono, one audio-stop: the offline audio."""
    async with daemon() as server:
        c = await wyoming_client(server)
        await c.write_event(Synthesize(text=TWO_SENTENCES, voice=SynthesizeVoice(name="alice")).event())
        events = await events_until(c, "audio-stop")
        await c.write_event(Synthesize(text="   ").event())   # blank text (and the default voice)
        blank = await events_until(c, "audio-stop")
        await c.disconnect()
        expected = alice_pcm(pipeline, server, TWO_SENTENCES)
    starts = [AudioStart.from_event(e) for e in events if AudioStart.is_type(e.type)]
    assert [(s.rate, s.width, s.channels) for s in starts] == [(p.SAMPLE_RATE_HZ, 2, 1)]
    assert AudioStop.is_type(events[-1].type)
    assert audio_of(events) == expected
    assert [e.type for e in blank] == ["audio-stop"]


async def test_wyoming_streaming_speaks_each_sentence_as_it_completes(pipeline: Pipeline, daemon: Any) -> None:
    """Streaming synthesis speaks sentence 1 before the text is complete; synthesize-stopped ends it."""
    async with daemon() as server:
        c = await wyoming_client(server)
        await c.write_event(SynthesizeStart(voice=SynthesizeVoice(name="alice")).event())
        await c.write_event(SynthesizeChunk(text="Hello wor").event())
        await c.write_event(SynthesizeChunk(text="ld. The quick").event())
        first = await events_until(c, "audio-stop")            # sentence 1 spoken before the rest is sent
        await c.write_event(SynthesizeChunk(text=" brown fox.").event())
        await c.write_event(SynthesizeStop().event())
        await c.write_event(Synthesize(text="Hello world. The quick brown fox.").event())  # compatibility copy
        rest = await events_until(c, "synthesize-stopped")
        await c.disconnect()
        expected = [alice_pcm(pipeline, server, t) for t in ("Hello world.", "The quick brown fox.")]
    assert [e.type for e in first][0] == "audio-start" and SynthesizeStopped.is_type(rest[-1].type)
    assert [e.type for e in rest].count("audio-start") == 1   # the compatibility copy was not spoken
    assert len(audio_of(first)) == len(expected[0])
    assert len(audio_of(rest)) > 0


async def test_wyoming_bad_events_get_an_error_and_the_server_keeps_serving(daemon: Any) -> None:
    """Bad events and failed requests each get an error event and a closed connection; others go on."""
    async with daemon(max_text_chars=100) as server:
        assert server.wyoming is not None
        host, port = server.wyoming.url.removeprefix("tcp://").rsplit(":", 1)
        raw_cases = [
            (b"this is not json\n", p.ErrorCode.BAD_FRAME),
            (b'{"type": "synthesize", "data_length": 99999999}\n', p.ErrorCode.TOO_LARGE),
            (b'{"type": "synthesize", "data": {"text": 5}}\n', p.ErrorCode.BAD_MESSAGE),
            (b'{"type": "synthesize", "data": {"text": "Hi.", "voice": {"name": "bob"}}}\n', p.ErrorCode.UNKNOWN_VOICE),
            (b'{"type": "synthesize", "data": {"text": "' + b"x" * 101 + b'"}}\n', p.ErrorCode.TEXT_TOO_LONG),
            (b"x" * 70_000 + b"\n", p.ErrorCode.TOO_LARGE),
        ]
        for raw, code in raw_cases:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(raw)
            await writer.drain()
            async with asyncio.timeout(READ_TIMEOUT_S):
                header = json.loads(await reader.readline())
                data = json.loads(await reader.readexactly(header["data_length"]))
                assert header["type"] == "error" and data["code"] == code, (raw[:60], data)
                assert await reader.read() == b""                  # then the server closes
            writer.close()
        c = await wyoming_client(server)
        await c.write_event(Synthesize(text="Still here.").event())
        events = await events_until(c, "audio-stop")
        await c.disconnect()
    assert len(audio_of(events)) > 0 and not any(WyError.is_type(e.type) for e in events)


# ------------------------------------------------------------------------------------------------
# Metrics


async def test_metrics_scraped_during_and_after_requests(daemon: Any) -> None:
    """/metrics on both ports shows a running request and its batch row mid-request, then counts and histograms."""
    rec = Recorder()
    gate = rec.hold("segment_begin", 1)
    async with daemon(rec) as server:
        assert server.http is not None
        http_port = int(server.http.url.rsplit(":", 1)[1])
        async with http(server) as h, h.post("/v1/audio/speech", json=speech(TWO_SENTENCES)) as r:
            await r.content.readany()
            await rec.wait_for(lambda ev: ("segment_begin", 1) in [(e, i) for e, _, i in ev])
            during = await scrape(http_port)
            gate.set()
            await r.read()
        async with client(server) as ws:
            await ws.send(p.Synthesize(id=1, text="Hello.", voice="nobody"))
            await ws.until(1, final=(p.Error,))
        await until_true(lambda: server.worker is not None and server.worker.live_jobs == 0)
        after = await scrape(server.port)
    assert during["ttsd_requests_active"] == 1 and during["ttsd_requests_queued"] == 0
    assert during["ttsd_batch_rows_in_use"] == 1 and during["ttsd_batch_rows"] == 16
    assert during['ttsd_open_connections{interface="http"}'] >= 1
    assert during["ttsd_voice_presets"] == 1 and during["ttsd_voice_cache_voices"] >= 1
    assert after['ttsd_requests_total{code="ok",interface="http"}'] == 1
    assert after['ttsd_requests_total{code="unknown_voice",interface="websocket"}'] == 1
    assert after['ttsd_segments_total{interface="http"}'] == 2
    assert after['ttsd_audio_seconds_total{interface="http"}'] > 0
    assert after['ttsd_time_to_first_audio_seconds_count{interface="http"}'] == 1
    assert after['ttsd_rtf_count{interface="http"}'] == 1
    assert after['ttsd_voice_cache_lookups_total{result="miss"}'] >= 1
    assert "ttsd_gpu_memory_allocated_bytes" not in after   # CPU


# ------------------------------------------------------------------------------------------------
# One request core


async def test_every_interface_shares_the_request_core(daemon: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Text over max_text_chars gets the same code and message on the WebSocket, HTTP and Wyoming, and every
    request, refused or served, is counted once and logged once, whatever door it came in by."""
    caplog.set_level(logging.INFO, logger="ttsd")
    long = "x" * 101
    async with daemon(max_text_chars=100) as server:
        voice = server.presets.by_name["alice"].voice_id
        async with client(server) as ws:
            await ws.send(p.Synthesize(id=1, text=long, voice=voice))
            ws_error = (await ws.until(1))[-1]
            await ws.send(p.Synthesize(id=2, text="Hello.", voice=voice, **FAST))
            assert isinstance((await ws.until(2))[-1], p.Done)
        async with http(server) as h:
            async with h.post("/v1/audio/speech", json=speech(long)) as r:
                http_error = await error_of(r)
            async with h.post("/v1/audio/speech", json=speech("Hello.")) as r:
                assert r.status == 200 and len(await r.read()) > 44
        wy = await wyoming_client(server)
        await wy.write_event(Synthesize(text=long).event())
        wy_error = WyError.from_event((await events_until(wy, "error"))[-1])
        await wy.disconnect()
        wy = await wyoming_client(server)
        await wy.write_event(Synthesize(text="Hello.").event())
        assert len(audio_of(await events_until(wy, "audio-stop"))) > 0
        await wy.disconnect()
    # After the shutdown: every request has ended and been counted.
    assert isinstance(ws_error, p.Error)
    want = (p.ErrorCode.TEXT_TOO_LONG, "text has 101 characters; the limit is 100")
    assert (ws_error.code, ws_error.message) == want
    assert (http_error["code"], http_error["message"]) == want and http_error["param"] == "input"
    assert (wy_error.code, wy_error.text) == want
    counts: dict[tuple[str, str], float] = {}
    first_audio: dict[str, float] = {}
    for family in text_string_to_metric_families(server.metrics.render().decode()):
        for sample in family.samples:
            if sample.name == "ttsd_requests_total":
                counts[sample.labels["interface"], sample.labels["code"]] = sample.value
            elif sample.name == "ttsd_time_to_first_audio_seconds_count":
                first_audio[sample.labels["interface"]] = sample.value
    assert counts == {(i, code): 1.0 for i in INTERFACES for code in ("ok", p.ErrorCode.TEXT_TOO_LONG)}
    assert first_audio == dict.fromkeys(INTERFACES, 1.0)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("ttsd")]
    for prefix in ("", "http ", "wyoming "):
        rejected = [line for line in lines if line.startswith(f"{prefix}request rejected ")]
        ended = [line for line in lines if line.startswith((f"{prefix}request end ", f"{prefix}request done ",
                                                            f"{prefix}request ended "))]
        assert len(rejected) == 1 and " code=text_too_long " in rejected[0], (prefix, rejected)
        assert len(ended) == 1 and " code=ok " in ended[0] and " rtf=" in ended[0], (prefix, ended)


# ------------------------------------------------------------------------------------------------
# Configuration


def test_interface_config_from_toml_and_flags(tmp_path: Path) -> None:
    """http_port, wyoming_port, wyoming_host and voices_dir come from TOML and flags; a bad port names itself."""
    from ttsd.api.errors import ConfigError
    from ttsd.daemon.cli import build_parser
    from ttsd.daemon.config import DaemonConfig, from_args

    path = tmp_path / "ttsd.toml"
    path.write_text('http_port = 8000\nwyoming_port = 10200\nvoices_dir = "/srv/voices"\n')
    config = from_args(build_parser().parse_args(["serve", "--config", str(path), "--wyoming-host", "0.0.0.0"]))
    assert (config.http_port, config.wyoming_port, config.wyoming_host) == (8000, 10200, "0.0.0.0")
    assert config.voices_dir == Path("/srv/voices")
    assert DaemonConfig().http_port is None and DaemonConfig().wyoming_port is None
    assert from_args(build_parser().parse_args(["serve", "--http-port", "0"])).http_port == 0
    with pytest.raises(ConfigError, match="http_port"):
        DaemonConfig(http_port=70_000).validated()
    path.write_text("wyoming_port = true\n")
    with pytest.raises(ConfigError, match="wyoming_port"):
        from_args(build_parser().parse_args(["serve", "--config", str(path)]))


def test_serve_refuses_a_missing_voices_dir_before_loading(tmp_path: Path) -> None:
    """`ttsd serve --voices-dir` naming no directory exits with status 2 and says so, without loading weights."""
    cmd = [sys.executable, "-m", "ttsd.daemon", "serve", "--random-weights", "tiny", "--port", "0",
           "--voices-dir", str(tmp_path / "missing")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=GATE_TIMEOUT_S)
    assert proc.returncode == 2
    assert "voices_dir" in proc.stderr and "not a directory" in proc.stderr


async def test_ttsd_serve_speaks_on_every_port(voices_dir: Path, speaker_wav: bytes, tmp_path: Path) -> None:
    """`ttsd serve --random-weights tiny` (uvloop, no checkpoints) warns that its weights are random, sends
    READY=1 once listening, logs its URLs, answers /healthz, speaks on the WebSocket, HTTP and Wyoming ports,
    and on SIGTERM sends STOPPING=1 and exits 0. One daemon process for all of it: each start loads a model."""
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(GATE_TIMEOUT_S)
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"} | {"NOTIFY_SOCKET": str(notify_path)}
    cmd = [sys.executable, "-m", "ttsd.daemon", "serve", "--random-weights", "tiny", "--random-seed", "1",
           "--device", "cpu", "--port", "0", "--http-port", "0", "--wyoming-port", "0", "--voices-dir", str(voices_dir)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        states: list[str] = []
        while "READY=1" not in states:  # STATUS=loading ..., then READY=1
            states += (await asyncio.to_thread(notify.recv, 4096)).decode().splitlines()
        assert proc.stderr is not None
        lines: list[str] = []
        while not lines or "ttsd ready" not in lines[-1]:
            lines.append(await asyncio.to_thread(proc.stderr.readline))
            assert lines[-1], "daemon exited before logging its ready line: " + "".join(lines)
        assert any(" WARNING " in line and "RANDOM weights" in line for line in lines), lines
        fields = dict(kv.split("=", 1) for kv in lines[-1].split(": ", 1)[1].split() if "=" in kv)
        assert {"url", "device", "dtype", "load_s"} <= fields.keys(), lines[-1]
        assert fields["presets"] == "1"
        port = int(fields["url"].rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await reader.read(64)).startswith(b"HTTP/1.1 200")
        writer.close()
        async with connect(fields["url"], compression=None, max_size=None) as ws:
            c = Client(ws)
            voice = await c.register(speaker_wav)
            await c.send(p.Synthesize(id=1, text="Hello world.", voice=voice, **FAST))
            messages = await c.until(1)
        assert isinstance(messages[-1], p.Done) and pcm_of(messages, 1), messages[-1]
        async with aiohttp.ClientSession(base_url=fields["http"]) as h:
            async with h.post("/v1/audio/speech", json=speech("Hello.")) as r:
                assert r.status == 200 and (await r.read()).startswith(b"RIFF")
        host, wy_port = fields["wyoming"].removeprefix("tcp://").rsplit(":", 1)
        async with AsyncTcpClient(host, int(wy_port)) as wy:
            await wy.write_event(Synthesize(text="Hello.").event())
            assert len(audio_of(await events_until(wy, "audio-stop"))) > 0
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in states:
            states += (await asyncio.to_thread(notify.recv, 4096)).decode().splitlines()
        assert await asyncio.to_thread(proc.wait, GATE_TIMEOUT_S) == 0
    finally:
        reap(proc)
        notify.close()


def test_openai_speed_maps_to_the_duration_factor_on_indextts25() -> None:
    """`speed` becomes duration_factor = 1/speed on an IndexTTS-2.5 daemon (0.5–2.0, not with an explicit
    duration_factor) and stays 400 `unsupported` on IndexTTS-2."""
    from types import SimpleNamespace

    from ttsd.daemon.config import DaemonConfig
    from ttsd.daemon.http import ApiError, _parse_speech
    from ttsd.pipeline.family import family_for

    def server(version: str) -> Any:
        family = family_for({"version": float(version)})
        return SimpleNamespace(pipeline=SimpleNamespace(family=family), config=DaemonConfig())

    body = {"model": "tts-1", "input": "Hi.", "voice": "alice", "speed": 1.25}
    assert _parse_speech(dict(body), server("2.5")).options == {"duration_factor": 0.8}
    assert _parse_speech({**body, "speed": 1}, server("2.5")).options == {}
    for bad, version, code in ((dict(body), "2", "unsupported"), ({**body, "speed": 3.0}, "2.5", "bad_message"),
                               ({**body, "duration_factor": 1.5}, "2.5", "bad_message")):
        with pytest.raises(ApiError) as e:
            _parse_speech(bad, server(version))
        assert e.value.code == code and e.value.param == "speed", bad
