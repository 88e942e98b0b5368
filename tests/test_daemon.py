"""The daemon end to end: a real server on port 0 with the tiny model, real WebSocket clients.

Races are staged with the worker's observer hook (a test blocks the worker thread at a named
event until the client has seen what it must see), so every assertion is about the order of
events, never about time."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from ttsd.api import protocol as p
from ttsd.api.options import SynthesisOptions
from ttsd.api.pcm import to_s16le
from ttsd.daemon.config import DaemonConfig
from ttsd.daemon.server import Server
from ttsd.daemon.worker import VoiceCache
from ttsd.pipeline.pipeline import Pipeline
from ttsd.pipeline.voice import Voice

from .conftest import FixtureSet, assert_close

GATE_TIMEOUT_S = 120.0     # a gate that is never opened fails the test instead of hanging it
RECV_TIMEOUT_S = 120.0
TWO_SENTENCES = "Hello world, this is a test of 3 apples at 8:00 AM. The quick brown fox jumps over the lazy dog!"
# Fast settings for tests that are not about audio quality: greedy, short, few CFM steps.
FAST: dict[str, Any] = dict(
    do_sample=False, num_beams=1, max_mel_tokens=12, diffusion_steps=2, max_text_tokens_per_segment=30, seed=3
)


# ------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="session")
def speaker_wav(fx: FixtureSet) -> bytes:
    return (fx.root / "inputs" / "speaker.wav").read_bytes()


@pytest.fixture(scope="session")
def voices(pipeline: Pipeline) -> VoiceCache:
    """One voice cache for every test server: the reference clip is prepared once per session."""
    return VoiceCache(max_voices=8)


Daemon = Callable[..., AbstractAsyncContextManager[Server]]


@pytest.fixture
def daemon(pipeline: Pipeline, voices: VoiceCache) -> Daemon:
    """`async with daemon(recorder, **config_overrides) as server`: a real server on port 0."""

    def start(recorder: Recorder | None = None, **overrides: Any) -> AbstractAsyncContextManager[Server]:
        return running(pipeline, voices, recorder, **overrides)

    return start


class Recorder:
    """The worker observer: records (event, job key, index) and can hold the worker at an event."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int]] = []
        self.gates: dict[tuple[str, int], threading.Event] = {}
        self.timed_out: list[tuple[str, int]] = []
        self.changed = threading.Condition()

    def __call__(self, event: str, key: int, index: int) -> None:
        with self.changed:
            self.events.append((event, key, index))
            self.changed.notify_all()
        gate = self.gates.get((event, index))
        if gate is not None and not gate.wait(GATE_TIMEOUT_S):
            self.timed_out.append((event, index))

    def hold(self, event: str, index: int) -> threading.Event:
        """Block the worker at (event, index) until the returned Event is set."""
        gate = self.gates[(event, index)] = threading.Event()
        return gate

    def release_all(self) -> None:
        for gate in self.gates.values():
            gate.set()

    async def wait_for(self, pred: Callable[[list[tuple[str, int, int]]], bool]) -> None:
        def wait() -> bool:
            with self.changed:
                return self.changed.wait_for(lambda: pred(self.events), GATE_TIMEOUT_S)

        assert await asyncio.to_thread(wait), f"worker events never matched; got {self.events}"


@asynccontextmanager
async def running(
    pipeline: Pipeline, voices: VoiceCache, recorder: Recorder | None, **overrides: Any
) -> AsyncIterator[Server]:
    config = DaemonConfig(port=0, **overrides).validated()
    server = Server(config, pipeline, observer=recorder, voices=voices)
    await server.start()
    try:
        yield server
    finally:
        if recorder is not None:
            recorder.release_all()  # never leave the worker blocked behind a failed assertion
        await server.shutdown()


class Client:
    """A thin typed wrapper over a websockets client connection."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def send(self, msg: p.ClientMessage) -> None:
        await self.ws.send(p.encode(msg))

    async def recv(self) -> p.ServerMessage:
        async with asyncio.timeout(RECV_TIMEOUT_S):
            return p.decode_server(await self.ws.recv())

    async def until(
        self, request_id: int | None, *, final: tuple[type, ...] = (p.Done, p.Error)
    ) -> list[p.ServerMessage]:
        """Messages up to and including the first `final` message for `request_id`."""
        out: list[p.ServerMessage] = []
        while True:
            msg = await self.recv()
            out.append(msg)
            if isinstance(msg, final) and getattr(msg, "id", None) == request_id:
                return out

    async def register(self, audio: bytes, request_id: int = 1_000_000) -> str:
        await self.send(p.RegisterVoice(id=request_id, audio=audio))
        reply = (await self.until(request_id, final=(p.VoiceRegistered, p.Error)))[-1]
        assert isinstance(reply, p.VoiceRegistered), reply
        return reply.voice


@asynccontextmanager
async def client(server: Server, **kwargs: Any) -> AsyncIterator[Client]:
    async with connect(server.url, compression=None, max_size=None, **kwargs) as ws:
        yield Client(ws)


def pcm_of(messages: list[p.ServerMessage], request_id: int) -> bytes:
    audio = [m for m in messages if isinstance(m, p.Audio) and m.id == request_id]
    assert [m.seq for m in audio] == list(range(len(audio))), "audio seq must run 0, 1, 2, ..."
    return b"".join(m.pcm for m in audio)


def offline_pcm(pipeline: Pipeline, voice: Voice, text: str, **opts: Any) -> bytes:
    """What `ttsd synth` writes for the same inputs: Pipeline.synthesize → int16 (truncation)."""
    pcm = pipeline.synthesize(voice, text, SynthesisOptions(**opts))
    return to_s16le(pcm)


def assert_pcm_close(streamed: bytes, offline: bytes, name: str) -> None:
    """Audio that shared its GPU steps with other requests: equal length, and equal samples under the
    parity rule (batched kernels round differently from solo ones in the last bits)."""
    a, b = (torch.from_numpy(np.frombuffer(x, dtype="<i2").astype(np.float32))[None] for x in (streamed, offline))
    assert_close(a, b, name)


async def until_true(pred: Callable[[], bool]) -> None:
    """Poll a server-side condition from the loop (order of events, bounded so a bug cannot hang)."""
    async with asyncio.timeout(GATE_TIMEOUT_S):
        while not pred():
            await asyncio.sleep(0.01)


def last(messages: list[p.ServerMessage]) -> p.ServerMessage:
    return messages[-1]


# ------------------------------------------------------------------------------------------------
# Streaming and parity


async def test_first_sentence_audio_arrives_before_second_is_synthesised(
    daemon: Daemon, speaker_wav: bytes
) -> None:
    """The client receives segment 0's audio while the worker is held before segment 1 begins."""
    rec = Recorder()
    gate = rec.hold("segment_begin", 1)
    async with daemon(rec) as server, client(server) as c:
        voice = await c.register(speaker_wav)
        await c.send(p.Synthesize(id=1, text=TWO_SENTENCES, voice=voice, **FAST))
        first = await c.until(1, final=(p.Audio, p.Error))
        assert isinstance(last(first), p.Audio)
        assert ("segment_end", 1) not in [(e, i) for e, _, i in rec.events]
        gate.set()
        rest = await c.until(1)
    assert rec.timed_out == []
    done = last(rest)
    assert isinstance(done, p.Done) and done.segments == 2
    starts = [m for m in first + rest if isinstance(m, p.SegmentStart)]
    assert [m.index for m in starts] == [0, 1]
    assert starts[0].text.endswith(".") and starts[1].text.endswith("!")


@pytest.mark.model_versions("2", "2.5")
async def test_stream_equals_offline_synthesis(
    pipeline: Pipeline, voices: VoiceCache, daemon: Daemon, speaker_wav: bytes, fx: FixtureSet
) -> None:
    """The concatenated PCM of a request equals Pipeline.synthesize output for the same inputs and seed."""
    settings = fx.settings
    opts: dict[str, Any] = dict(
        do_sample=False, num_beams=1, max_mel_tokens=int(settings["max_mel_tokens"]),
        max_text_tokens_per_segment=int(settings["max_text_tokens_per_segment"]), diffusion_steps=10, seed=11,
    )
    async with daemon() as server, client(server) as c:
        voice = await c.register(speaker_wav)
        await c.send(p.Synthesize(id=7, text=fx.text, voice=voice, **opts))
        messages = await c.until(7)
    done = last(messages)
    assert isinstance(done, p.Done) and done.segments == 2
    streamed = pcm_of(messages, 7)
    assert done.audio_s == pytest.approx(len(streamed) / 2 / p.SAMPLE_RATE_HZ)
    assert streamed == offline_pcm(pipeline, voices.get(voice), fx.text, **opts)


async def test_sampled_stream_equals_offline_synthesis(
    pipeline: Pipeline, voices: VoiceCache, daemon: Daemon, speaker_wav: bytes
) -> None:
    """With sampling on, the same seed still gives the daemon and offline synthesis identical audio."""
    opts: dict[str, Any] = dict(
        do_sample=True, num_beams=1, max_mel_tokens=16, diffusion_steps=3, max_text_tokens_per_segment=30, seed=5
    )
    async with daemon() as server, client(server) as c:
        voice = await c.register(speaker_wav)
        await c.send(p.Synthesize(id=1, text=TWO_SENTENCES, voice=voice, **opts))
        messages = await c.until(1)
    assert isinstance(last(messages), p.Done)
    assert pcm_of(messages, 1) == offline_pcm(pipeline, voices.get(voice), TWO_SENTENCES, **opts)


@pytest.mark.model_versions("2", "2.5")
async def test_incremental_text_speaks_each_sentence(daemon: Daemon, speaker_wav: bytes) -> None:
    """append_text releases each complete sentence as a segment; flush speaks the rest and ends the request."""
    rec = Recorder()
    async with daemon(rec) as server, client(server) as c:
        voice = await c.register(speaker_wav)
        await c.send(p.Synthesize(id=2, text="Hello wor", voice=voice, incremental=True, **FAST))
        await c.send(p.AppendText(id=2, text="ld. The quick"))
        first = await c.until(2, final=(p.SegmentEnd,))       # sentence 1 spoken before the text is complete
        await c.send(p.AppendText(id=2, text=" brown fox"))
        await c.send(p.Flush(id=2))
        rest = await c.until(2)
    done = last(rest)
    assert isinstance(done, p.Done) and done.segments == 2
    texts = [m.text for m in first + rest if isinstance(m, p.SegmentStart)]
    # The segment as the model reads it: IndexTTS-2 upper-cases English, IndexTTS-2.5 lower-cases it.
    assert texts[0].replace(" ", "").upper() == "HELLOWORLD." and "FOX" in texts[1].upper()


@pytest.mark.model_versions("2", "2.5")
async def test_chunked_segments_keep_one_start_and_one_end(
    pipeline: Pipeline, voices: VoiceCache, daemon: Daemon, speaker_wav: bytes
) -> None:
    """With chunk_codes, each segment's chunks arrive between its one segment_start and one segment_end,
    whose audio_s counts them all, and the audio is what offline synthesis with the same options gives."""
    opts: dict[str, Any] = {**FAST, "max_mel_tokens": 24, "chunk_codes": 6, "chunk_overlap": 2, "first_chunk_codes": 4}
    async with daemon() as server, client(server) as c:
        voice = await c.register(speaker_wav)
        await c.send(p.Synthesize(id=4, text=TWO_SENTENCES, voice=voice, **opts))
        messages = await c.until(4)
    done = last(messages)
    segments = len(pipeline.split_text(TWO_SENTENCES, SynthesisOptions(**opts)))
    assert isinstance(done, p.Done) and done.segments == segments >= 2
    kinds = [type(m) for m in messages if isinstance(m, p.SegmentStart | p.SegmentEnd)]
    assert kinds == [p.SegmentStart, p.SegmentEnd] * segments
    per_segment: list[int] = []
    for m in messages:
        if isinstance(m, p.SegmentStart):
            per_segment.append(0)
        elif isinstance(m, p.Audio):
            per_segment[-1] += len(m.pcm)
        elif isinstance(m, p.SegmentEnd):
            assert m.audio_s == pytest.approx(per_segment[-1] / 2 / p.SAMPLE_RATE_HZ)
    assert_pcm_close(pcm_of(messages, 4), offline_pcm(pipeline, voices.get(voice), TWO_SENTENCES, **opts), "chunked")


# ------------------------------------------------------------------------------------------------
# Concurrency, cancellation, backpressure


async def own_connection(server: Server, rid: int, text: str, voice: str) -> list[p.ServerMessage]:
    """One request (seeded with its id) on a connection of its own; every reply up to its end."""
    async with client(server) as c:
        await c.send(p.Synthesize(id=rid, text=text, voice=voice, **{**FAST, "seed": rid}))
        return await c.until(rid)


@pytest.mark.model_versions("2", "2.5")
async def test_two_concurrent_clients_both_get_correct_audio(
    pipeline: Pipeline, voices: VoiceCache, daemon: Daemon, speaker_wav: bytes
) -> None:
    """Two clients synthesising at once each receive exactly their own offline audio."""
    texts = {1: TWO_SENTENCES, 2: "The quick brown fox jumps over the lazy dog! Hello world, this is a test."}
    rec = Recorder()
    gate = rec.hold("segment_begin", 0)
    async with daemon(rec) as server, client(server) as c:
        voice = await c.register(speaker_wav)
        # A one-segment request holds the worker at the gate, so both clients' jobs are admitted
        # before the worker picks either of them (otherwise the first could run alone first).
        await c.send(p.Synthesize(id=9, text="Hold on.", voice=voice, **FAST))
        await rec.wait_for(lambda ev: any(e == "segment_begin" for e, _, _ in ev))
        holder = rec.events[0][1]
        tasks = [asyncio.create_task(own_connection(server, rid, texts[rid], voice)) for rid in (1, 2)]
        await until_true(lambda: server.worker is not None and server.worker.live_jobs == 3)
        gate.set()
        results = await asyncio.gather(*tasks)
        assert isinstance(last(await c.until(9)), p.Done)
    for rid, messages in zip((1, 2), results, strict=True):
        assert isinstance(last(messages), p.Done), last(messages)
        expected = offline_pcm(pipeline, voices.get(voice), texts[rid], **{**FAST, "seed": rid})
        assert_pcm_close(pcm_of(messages, rid), expected, f"request {rid}")
    # Fair round-robin at segment granularity: while both have segments left, their segments alternate.
    ends = [key for e, key, _ in rec.events if e == "segment_end" and key != holder]
    counts = [len(pipeline.split_text(texts[rid], SynthesisOptions(**FAST))) for rid in (1, 2)]
    assert len(ends) == sum(counts), rec.events
    both = 2 * min(counts)
    assert all(ends[i] != ends[i + 1] for i in range(0, both - 1)), rec.events


async def test_a_slow_text_split_does_not_hold_up_other_requests(
    pipeline: Pipeline, daemon: Daemon, speaker_wav: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one request's text is still being normalised, another request is synthesised and delivered."""
    slow_text, released, entered = "Slowly normalised text.", threading.Event(), threading.Event()
    split = pipeline.split_text

    def gated_split(text: str, opts: SynthesisOptions) -> Any:
        if text == slow_text:  # stands in for a long text the normaliser needs seconds for
            entered.set()
            assert released.wait(GATE_TIMEOUT_S)
        return split(text, opts)

    monkeypatch.setattr(pipeline, "split_text", gated_split)
    async with daemon() as server, client(server) as c:
        voice = await c.register(speaker_wav)
        await c.send(p.Synthesize(id=1, text=slow_text, voice=voice, **FAST))
        assert await asyncio.to_thread(entered.wait, GATE_TIMEOUT_S)
        other = await own_connection(server, 2, "Hello world.", voice)
        assert isinstance(last(other), p.Done) and pcm_of(other, 2), last(other)
        assert not released.is_set()  # request 1 was still being split all along
        released.set()
        slow = await c.until(1)
        assert isinstance(last(slow), p.Done) and pcm_of(slow, 1), last(slow)


async def test_stopping_a_wedged_worker_is_bounded(daemon: Daemon, speaker_wav: bytes) -> None:
    """A worker stuck inside a step does not hang shutdown: stop() gives up after its timeout."""
    rec = Recorder()
    gate = rec.hold("segment_begin", 0)
    async with daemon(rec) as server, client(server) as c:
        voice = await c.register(speaker_wav)
        await c.send(p.Synthesize(id=1, text="Hello world.", voice=voice, **FAST))
        await rec.wait_for(lambda ev: any(e == "segment_begin" for e, _, _ in ev))
        assert server.worker is not None
        t0 = time.monotonic()
        stopped = await server.worker.stop(0.5)
        assert not stopped and time.monotonic() - t0 < 5.0
        gate.set()  # the step ends, the thread sees the stop and exits
        assert await server.worker.stop(GATE_TIMEOUT_S)


@pytest.mark.model_versions("2", "2.5")
async def test_cancel_mid_stream_then_next_request_works(daemon: Daemon, speaker_wav: bytes) -> None:
    """Cancel after the first audio gets `cancelled`, no more audio for that id, and the connection serves on."""
    rec = Recorder()
    gate = rec.hold("segment_begin", 1)
    async with daemon(rec) as server, client(server) as c:
        voice = await c.register(speaker_wav)
        await c.send(p.Synthesize(id=1, text=TWO_SENTENCES, voice=voice, **FAST))
        await c.until(1, final=(p.Audio,))
        await c.send(p.Cancel(id=1))
        messages = await c.until(1, final=(p.Error, p.Done))
        error = last(messages)
        assert isinstance(error, p.Error) and error.code == p.ErrorCode.CANCELLED
        gate.set()
        await rec.wait_for(lambda ev: any(e == "request_end" for e, _, _ in ev))
        await c.send(p.Synthesize(id=1, text="Again, please.", voice=voice, **FAST))
        again = await c.until(1)
    assert isinstance(last(again), p.Done)
    assert all(not (isinstance(m, p.Audio) and m.id == 1) for m in messages[messages.index(error) + 1 :])
    # The cancelled job stopped inside segment 1: one segment produced, not two.
    assert [i for e, _, i in rec.events if e == "request_end"][0] == 1


async def test_disconnect_mid_stream_frees_the_slot(daemon: Daemon, speaker_wav: bytes) -> None:
    """A client that disconnects mid-request has its job stopped and its only slot given to the next client."""
    rec = Recorder()
    gate = rec.hold("segment_begin", 1)
    async with daemon(rec, max_concurrent_requests=1, max_queued_requests=0) as server:
        async with client(server) as a:
            voice = await a.register(speaker_wav)
            await a.send(p.Synthesize(id=1, text=TWO_SENTENCES, voice=voice, **FAST))
            await a.until(1, final=(p.Audio,))
        # The server notices the close and cancels the job; admission stops counting it at once.
        await until_true(lambda: server.worker is not None and server.worker.live_jobs == 0)
        gate.set()
        await rec.wait_for(lambda ev: any(e == "request_end" for e, _, _ in ev))
        async with client(server) as b:
            await b.send(p.Synthesize(id=1, text="Next client.", voice=voice, **FAST))
            messages = await b.until(1)
    assert isinstance(last(messages), p.Done), last(messages)
    assert [i for e, _, i in rec.events if e == "request_end"][0] == 1  # stopped before segment 2 was made


async def test_busy_when_the_queue_is_full(daemon: Daemon, speaker_wav: bytes) -> None:
    """With one slot and one queue place taken, a third request gets `busy`; the first two complete."""
    rec = Recorder()
    gate = rec.hold("segment_begin", 0)
    async with daemon(rec, max_concurrent_requests=1, max_queued_requests=1) as server:
        async with client(server) as c:
            voice = await c.register(speaker_wav)
            for rid in (1, 2, 3):
                await c.send(p.Synthesize(id=rid, text="One sentence.", voice=voice, **FAST))
            busy = last(await c.until(3, final=(p.Error,)))
            assert isinstance(busy, p.Error) and busy.code == p.ErrorCode.BUSY
            gate.set()
            finals: dict[int, p.ServerMessage] = {}
            while len(finals) < 2:
                msg = await c.recv()
                if isinstance(msg, p.Done | p.Error) and msg.id in (1, 2):
                    finals[msg.id] = msg
    assert all(isinstance(m, p.Done) for m in finals.values()), finals


async def test_one_connection_cannot_hold_more_than_its_share(daemon: Daemon, speaker_wav: bytes) -> None:
    """Past max_requests_per_connection a connection gets `busy` while another connection is still served."""
    async with daemon(max_requests_per_connection=1) as server:
        async with client(server) as hog, client(server) as other:
            voice = await hog.register(speaker_wav)
            await hog.send(p.Synthesize(id=1, text="", voice=voice, incremental=True, **FAST))  # held open
            await hog.send(p.Synthesize(id=2, text="Second.", voice=voice, **FAST))
            busy = last(await hog.until(2, final=(p.Error,)))
            assert isinstance(busy, p.Error) and busy.code == p.ErrorCode.BUSY
            await other.send(p.Synthesize(id=1, text="Served anyway.", voice=voice, **FAST))
            assert isinstance(last(await other.until(1)), p.Done)
            await hog.send(p.Flush(id=1))
            assert isinstance(last(await hog.until(1, final=(p.Done, p.Error))), p.Done | p.Error)


async def test_slow_consumer_is_parked_without_stalling_others(daemon: Daemon, speaker_wav: bytes) -> None:
    """A client that stops reading is parked (others finish meanwhile), then cancelled with slow_consumer."""
    rec = Recorder()
    many = " ".join(f"Sentence number {n} is here." for n in range(1, 13))
    async with daemon(rec, stall_timeout_s=1.0) as server:
        async with client(server) as fast:
            voice = await fast.register(speaker_wav)
        # The slow client reads nothing: small socket buffer, one-frame client queue, and 10 s of
        # silence per segment so a few segments fill every buffer on the way.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        async with client(server, sock=sock, max_queue=1) as slow:
            await slow.send(p.Synthesize(id=1, text=many, voice=voice, **{**FAST, "interval_silence_ms": 10_000}))
            await rec.wait_for(lambda ev: any(e == "parked" for e, _, _ in ev))
            slow_key = next(k for e, k, _ in rec.events if e == "parked")
            async with client(server) as fast:
                await fast.send(p.Synthesize(id=5, text="I am not stalled.", voice=voice, **FAST))
                messages = await fast.until(5)
            assert isinstance(last(messages), p.Done)
            await rec.wait_for(lambda ev: ("request_end", slow_key) in [(e, k) for e, k, _ in ev])
            codes = []
            while True:
                msg = await slow.recv()
                if isinstance(msg, p.Error | p.Done):
                    codes.append(getattr(msg, "code", "done"))
                    break
    assert codes == [p.ErrorCode.SLOW_CONSUMER]


# ------------------------------------------------------------------------------------------------
# Bad input: typed errors, and the daemon keeps serving


async def test_bad_input_gets_typed_errors_and_the_connection_keeps_serving(
    daemon: Daemon, speaker_wav: bytes
) -> None:
    """Garbage of every kind gets its own error code on one connection, which then still synthesises."""
    valid_utf8 = msgpack.packb({"type": "synthesize", "id": 9, "text": "ab", "voice": "v"})
    cases: list[tuple[bytes | str, str]] = [
        (b"\xc1\x00garbage", p.ErrorCode.BAD_FRAME),                                   # malformed msgpack
        (msgpack.packb({"type": "sing", "id": 1}), p.ErrorCode.UNKNOWN_TYPE),           # unknown type
        (msgpack.packb({"type": "cancel", "id": "1"}), p.ErrorCode.BAD_MESSAGE),       # wrong field type
        (msgpack.packb({"type": "synthesize", "id": 1, "text": "x", "voice": "v", "top_k": 1.5}),
         p.ErrorCode.BAD_MESSAGE),
        (valid_utf8.replace(b"\xa2ab", b"\xa2\xc3\x28"), p.ErrorCode.BAD_FRAME),         # invalid UTF-8
        ('{"type": "ping"}', p.ErrorCode.BAD_FRAME),                                    # a text frame
        (p.encode(p.Synthesize(id=2, text="   ", voice="v")), p.ErrorCode.BAD_TEXT),    # empty text
        (p.encode(p.Synthesize(id=3, text="Hi.", voice="nope")), p.ErrorCode.UNKNOWN_VOICE),
        (p.encode(p.Synthesize(id=4, text="x" * 101, voice="nope")), p.ErrorCode.TEXT_TOO_LONG),
        (p.encode(p.RegisterVoice(id=5, audio=b"RIFF\x00\x00garbage" * 50)), p.ErrorCode.BAD_AUDIO),
        (p.encode(p.RegisterVoice(id=6, audio=b"")), p.ErrorCode.BAD_AUDIO),
        (p.encode(p.AppendText(id=77, text="x")), p.ErrorCode.BAD_MESSAGE),             # no such request
    ]
    async with daemon(max_text_chars=100) as server, client(server) as c:
        voice = await c.register(speaker_wav)
        cases += [
            (p.encode(p.Synthesize(id=10, text="Hi.", voice=voice, num_beams=5)),        # over max_num_beams
             p.ErrorCode.BAD_MESSAGE),
            (p.encode(p.Synthesize(id=11, text="Hi.", voice=voice, max_text_tokens_per_segment=600)),
             p.ErrorCode.BAD_MESSAGE),                                                  # over the text table
        ]
        for data, code in cases:
            await c.ws.send(data)
            reply = await c.recv()
            assert isinstance(reply, p.Error) and reply.code == code, (data[:40], reply)
        await c.send(p.Synthesize(id=8, text="Still here.", voice=voice, **FAST))
        assert isinstance(last(await c.until(8)), p.Done)


async def test_unspeakable_text_is_bad_text(daemon: Daemon, speaker_wav: bytes) -> None:
    """Text that is empty only after normalisation (a zero-width space) ends the request with bad_text."""
    async with daemon() as server, client(server) as c:
        voice = await c.register(speaker_wav)
        await c.send(p.Synthesize(id=1, text="\u200b", voice=voice, **FAST))
        reply = last(await c.until(1))
    assert isinstance(reply, p.Error) and reply.code == p.ErrorCode.BAD_TEXT


async def test_oversized_frame_closes_with_1009_and_the_server_keeps_serving(daemon: Daemon) -> None:
    """A frame over max_frame_bytes closes that connection with 1009; new connections are served."""
    async with daemon(max_frame_bytes=4096) as server:
        async with client(server) as c:
            await c.send(p.RegisterVoice(id=1, audio=b"\x00" * 10_000))
            with pytest.raises(ConnectionClosed) as info:
                await c.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009
        async with client(server) as c:
            await c.send(p.Ping(nonce=3))
            assert await c.recv() == p.Pong(nonce=3)


async def test_reference_audio_too_long(daemon: Daemon, speaker_wav: bytes) -> None:
    """Reference audio longer than max_reference_audio_s gets audio_too_long before any model work."""
    async with daemon(max_reference_audio_s=0.5) as server, client(server) as c:
        await c.send(p.RegisterVoice(id=1, audio=speaker_wav))
        reply = await c.recv()
    assert isinstance(reply, p.Error) and reply.code == p.ErrorCode.AUDIO_TOO_LONG and reply.id == 1


# ------------------------------------------------------------------------------------------------
# Handshake, health, lifecycle


async def test_healthz_answers_200(daemon: Daemon) -> None:
    """GET /healthz on the WebSocket port is a plain HTTP 200."""
    async with daemon() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        await writer.drain()
        response = await reader.read()
        writer.close()
        await writer.wait_closed()
    assert response.startswith(b"HTTP/1.1 200")
    assert response.endswith(b"ok\n")


async def test_device_fault_ends_the_request_and_fails_healthz(
    daemon: Daemon, pipeline: Pipeline, speaker_wav: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CUDA-style AcceleratorError ends its request as `internal`, flags the worker and turns /healthz 503."""
    import torch

    async with daemon() as server, client(server) as c:
        voice = await c.register(speaker_wav)

        def poisoned(*args: Any, **kwargs: Any) -> Any:
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

        monkeypatch.setattr(pipeline, "decode_request", poisoned)
        await c.send(p.Synthesize(id=1, text="Hello.", voice=voice, **FAST))
        reply = last(await c.until(1, final=(p.Error,)))
        assert isinstance(reply, p.Error) and reply.code == p.ErrorCode.INTERNAL
        assert server.worker is not None
        await asyncio.wait_for(server.worker.device_fault.wait(), timeout=10)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        await writer.drain()
        response = await reader.read()
        writer.close()
        await writer.wait_closed()
    assert response.startswith(b"HTTP/1.1 503")
    assert b"device fault" in response


@pytest.mark.model_versions("2", "2.5")
async def test_hello_reports_version_and_limits(daemon: Daemon, pipeline: Pipeline) -> None:
    """The server hello carries the protocol version, the sample rate and the configured limits."""
    async with daemon(max_text_chars=123) as server, client(server) as c:
        await c.send(p.Hello(client="pytest", version=p.PROTOCOL_VERSION))
        hello = await c.recv()
        await c.send(p.Hello(client="pytest", version=99))
        mismatch = await c.recv()
    assert isinstance(hello, p.ServerHello)
    assert (hello.version, hello.sample_rate_hz, hello.max_text_chars) == (p.PROTOCOL_VERSION, 22050, 123)
    assert (hello.model, hello.languages) == (f"IndexTTS-{pipeline.version}", pipeline.languages)
    assert isinstance(mismatch, p.Error) and mismatch.code == p.ErrorCode.BAD_MESSAGE


@pytest.mark.model_versions("2", "2.5")
async def test_model_version_options_are_refused_where_they_do_not_apply(
    daemon: Daemon, pipeline: Pipeline, speaker_wav: bytes
) -> None:
    """IndexTTS-2 answers `lang` and `duration_factor` with bad_message instead of ignoring them; IndexTTS-2.5
    speaks with them (and refuses the IndexTTS-2-only quick_streaming_tokens)."""
    v25 = pipeline.version == "2.5"
    async with daemon() as server, client(server) as c:
        voice = await c.register(speaker_wav)
        cases = [dict(lang="en"), dict(duration_factor=1.25), dict(quick_streaming_tokens=4)]
        for rid, extra in enumerate(cases, start=1):
            await c.send(p.Synthesize(id=rid, text="Hello world.", voice=voice, **{**FAST, **extra}))
            reply = last(await c.until(rid))
            accepted = v25 != ("quick_streaming_tokens" in extra)
            if accepted:
                assert isinstance(reply, p.Done), (extra, reply)
            else:
                assert isinstance(reply, p.Error) and reply.code == p.ErrorCode.BAD_MESSAGE, (extra, reply)
                assert next(iter(extra)) in reply.message


async def test_bearer_token_is_required_when_configured(daemon: Daemon) -> None:
    """Without the configured bearer token the handshake is refused with HTTP 401; with it, it succeeds."""
    token = "s3cret-token-0123456789"
    async with daemon(token=token) as server:
        with pytest.raises(InvalidStatus) as info:
            async with client(server):
                pass
        assert info.value.response.status_code == 401
        with pytest.raises(InvalidStatus):
            async with client(server, additional_headers={"Authorization": "Bearer wrong-token-000000"}):
                pass
        async with client(server, additional_headers={"Authorization": f"Bearer {token}"}) as c:
            await c.send(p.Ping(nonce=1))
            assert await c.recv() == p.Pong(nonce=1)


async def test_same_audio_gives_the_same_voice_id(daemon: Daemon, speaker_wav: bytes) -> None:
    """Registering identical audio twice returns the cached voice id."""
    async with daemon() as server, client(server) as c:
        first = await c.register(speaker_wav, request_id=1)
        second = await c.register(speaker_wav, request_id=2)
    assert first == second


async def test_shutdown_drains_in_flight_requests_then_closes_with_1001(
    daemon: Daemon, speaker_wav: bytes
) -> None:
    """On shutdown an in-flight request finishes within the drain timeout, then the connection closes 1001."""
    rec = Recorder()
    gate = rec.hold("segment_begin", 0)
    async with daemon(rec, drain_timeout_s=120.0) as server, client(server) as c:
        voice = await c.register(speaker_wav)
        await c.send(p.Synthesize(id=1, text="Finish me.", voice=voice, **FAST))
        await rec.wait_for(lambda ev: any(e == "segment_begin" for e, _, _ in ev))
        stopping = asyncio.create_task(server.shutdown())
        await asyncio.sleep(0)  # the shutdown task's first step (stop accepting) runs now
        await c.send(p.Synthesize(id=2, text="Too late.", voice=voice, **FAST))
        refused = last(await c.until(2, final=(p.Error,)))
        gate.set()
        messages = await c.until(1)
        with pytest.raises(ConnectionClosed) as info:
            await c.recv()
        await stopping
    assert isinstance(refused, p.Error) and refused.code == p.ErrorCode.SHUTTING_DOWN
    assert isinstance(last(messages), p.Done)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1001


async def test_shutdown_cancels_what_misses_the_drain_timeout(daemon: Daemon, speaker_wav: bytes) -> None:
    """A request still running when drain_timeout_s ends gets shutting_down, then the close is 1001."""
    rec = Recorder()
    gate = rec.hold("segment_begin", 1)
    async with daemon(rec, drain_timeout_s=0.0) as server, client(server) as c:
        voice = await c.register(speaker_wav)
        await c.send(p.Synthesize(id=1, text=TWO_SENTENCES, voice=voice, **FAST))
        await c.until(1, final=(p.SegmentEnd,))
        stopping = asyncio.create_task(server.shutdown())
        await until_true(lambda: server.worker is not None and server.worker.live_jobs == 0)
        gate.set()  # cancel_all has flagged the job, so it stops at its first decode step
        messages = await c.until(1)
        with pytest.raises(ConnectionClosed) as info:
            await c.recv()
        await stopping
    error = last(messages)
    assert isinstance(error, p.Error) and error.code == p.ErrorCode.SHUTTING_DOWN
    assert info.value.rcvd is not None and info.value.rcvd.code == 1001


@pytest.mark.cuda
async def test_cuda_overlapped_stream_equals_offline_synthesis(converted: Path, speaker_wav: bytes) -> None:
    """On CUDA (GPT and acoustic stages on two streams) two interleaved requests still match offline output."""
    pipeline = Pipeline.load(converted, device="cuda", dtype="float32")
    voices = VoiceCache(max_voices=2)
    texts = {1: TWO_SENTENCES, 2: "The quick brown fox jumps over the lazy dog! Hello world, this is a test."}
    async with running(pipeline, voices, None) as server:
        async with client(server) as c:
            voice = await c.register(speaker_wav)

        results = await asyncio.gather(*(own_connection(server, rid, texts[rid], voice) for rid in (1, 2)))
    for rid, messages in zip((1, 2), results, strict=True):
        assert isinstance(last(messages), p.Done), last(messages)
        expected = offline_pcm(pipeline, voices.get(voice), texts[rid], **{**FAST, "seed": rid})
        assert_pcm_close(pcm_of(messages, rid), expected, f"request {rid}")


# ------------------------------------------------------------------------------------------------
# Configuration and systemd notification (no model needed)


def test_config_file_and_flags(tmp_path: Path) -> None:
    """TOML keys set fields, flags override the file, and unknown keys or wrong types name themselves."""
    from ttsd.api.errors import ConfigError
    from ttsd.daemon.cli import build_parser
    from ttsd.daemon.config import from_args

    path = tmp_path / "ttsd.toml"
    path.write_text('port = 9000\nmax_text_chars = 50\nstall_timeout_s = 2\ncheckpoints = "/srv/ckpt"\n')
    args = build_parser().parse_args(["serve", "--config", str(path), "--max-text-chars", "70"])
    config = from_args(args)
    assert (config.port, config.max_text_chars, config.stall_timeout_s) == (9000, 70, 2.0)
    assert config.checkpoints == Path("/srv/ckpt")
    path.write_text("max_text_char = 5\n")
    with pytest.raises(ConfigError, match="max_text_char"):
        from_args(build_parser().parse_args(["serve", "--config", str(path)]))
    path.write_text("port = true\n")
    with pytest.raises(ConfigError, match="port"):
        from_args(build_parser().parse_args(["serve", "--config", str(path)]))


def test_random_weights_config(tmp_path: Path) -> None:
    """random_weights takes a known preset and replaces checkpoints; an unknown preset or both at once is an error."""
    from ttsd.api.errors import ConfigError
    from ttsd.daemon.cli import build_parser
    from ttsd.daemon.config import RANDOM_WEIGHT_PRESETS, from_args
    from ttsd.tools.tiny import PRESETS

    assert set(RANDOM_WEIGHT_PRESETS) == set(PRESETS)
    config = from_args(build_parser().parse_args(["serve", "--random-weights", "full", "--random-seed", "7"]))
    assert (config.random_weights, config.random_seed, config.checkpoints) == ("full", 7, None)
    assert DaemonConfig().random_weights is None
    with pytest.raises(ConfigError, match="random_weights must be one of tiny, full, got 'huge'"):
        DaemonConfig(random_weights="huge").validated()
    with pytest.raises(ConfigError, match="either checkpoints or random_weights"):
        DaemonConfig(random_weights="tiny", checkpoints=Path("/srv/ckpt")).validated()
    path = tmp_path / "ttsd.toml"
    path.write_text('random_weights = "tiny"\nrandom_seed = 3\n')
    assert from_args(build_parser().parse_args(["serve", "--config", str(path)])).random_seed == 3
    with pytest.raises(ConfigError, match="not both"):
        from_args(build_parser().parse_args(["serve", "--config", str(path), "--checkpoints", "/srv/ckpt"]))


def test_bool_config_field_from_toml_and_flags(tmp_path: Path) -> None:
    """cuda_graphs reads a TOML boolean, a flag overrides it either way, and a non-boolean is an error."""
    from ttsd.api.errors import ConfigError
    from ttsd.daemon.cli import build_parser
    from ttsd.daemon.config import from_args

    parse = build_parser().parse_args
    assert from_args(parse(["serve", "--random-weights", "tiny"])).cuda_graphs is True
    path = tmp_path / "ttsd.toml"
    path.write_text('random_weights = "tiny"\ncuda_graphs = false\n')
    assert from_args(parse(["serve", "--config", str(path)])).cuda_graphs is False
    assert from_args(parse(["serve", "--config", str(path), "--cuda-graphs"])).cuda_graphs is True
    assert from_args(parse(["serve", "--random-weights", "tiny", "--no-cuda-graphs"])).cuda_graphs is False
    path.write_text('random_weights = "tiny"\ncuda_graphs = 1\n')
    with pytest.raises(ConfigError, match="cuda_graphs"):
        from_args(parse(["serve", "--config", str(path)]))


def test_non_loopback_bind_requires_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """Binding beyond loopback without a bearer token is a config error; with one (flag or env) it is allowed."""
    from ttsd.api.errors import ConfigError
    from ttsd.daemon.cli import build_parser
    from ttsd.daemon.config import TOKEN_ENV, from_args

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ConfigError, match="token"):
        from_args(build_parser().parse_args(["serve", "--host", "0.0.0.0"]))
    assert from_args(build_parser().parse_args(["serve", "--host", "::1"])).token is None
    monkeypatch.setenv(TOKEN_ENV, "x" * 32)
    assert from_args(build_parser().parse_args(["serve", "--host", "0.0.0.0"])).token == "x" * 32


def test_sd_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """sd_notify sends to an '@' abstract-namespace NOTIFY_SOCKET, and is a no-op without one."""
    from ttsd.daemon import systemd

    name = f"ttsd-test-{os.getpid()}-{threading.get_ident()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(GATE_TIMEOUT_S)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify_ready("serving")
        lines = sock.recv(4096).decode().splitlines()
    assert lines[0] == "READY=1" and "STATUS=serving" in lines
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert systemd.notify_stopping() is False


# ------------------------------------------------------------------------------------------------
# Decoding options that once broke the daemon, warm-up, and the watchdog (issue 15)


async def healthz(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    await writer.drain()
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    return response


async def test_beams_with_a_tiny_repetition_penalty_finish_normally(daemon: Daemon, speaker_wav: bytes) -> None:
    """num_beams 2–4 with repetition_penalty ≤ 0.1 (which boosts every seen id, the start code included) and
    unfiltered sampling finish with `done`: no start code reaches the codec, nothing ends `internal`."""
    cases = [dict(num_beams=nb, repetition_penalty=0.05, do_sample=ds) for nb in (2, 3, 4) for ds in (True, False)]
    cases.append(dict(num_beams=1, top_k=0, top_p=1.0, repetition_penalty=1.0, do_sample=True))
    async with daemon() as server, client(server) as c:
        voice = await c.register(speaker_wav)
        for rid, case in enumerate(cases, start=1):
            await c.send(p.Synthesize(id=rid, text="Hello there.", voice=voice, **{**FAST, **case}))
            assert isinstance(last(await c.until(rid)), p.Done), case


async def test_warm_up_runs_on_the_worker_thread_and_a_failure_is_not_fatal(
    pipeline: Pipeline, voices: VoiceCache, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Warm-up is the worker thread's first job, done before the server listens; when it fails (a compiler
    missing, say) the daemon logs one line and serves eagerly."""
    threads: list[str] = []

    def failing_warm_up(engine: Any) -> float:
        threads.append(threading.current_thread().name)
        raise RuntimeError("no C compiler for Triton's launcher")

    monkeypatch.setattr(pipeline, "warm_up", failing_warm_up)
    config = DaemonConfig(port=0).validated()
    server = Server(config, pipeline, voices=voices)
    await server.start(warm_up=True)
    try:
        assert threads == ["ttsd-worker"]
        assert any("warm-up failed" in r.getMessage() for r in caplog.records)
        async with client(server) as c:
            voice = await c.register(speaker_wav_bytes(pipeline))
            await c.send(p.Synthesize(id=1, text="Still serving.", voice=voice, **FAST))
            assert isinstance(last(await c.until(1)), p.Done)
    finally:
        await server.shutdown()


def speaker_wav_bytes(pipeline: Pipeline) -> bytes:
    from ttsd.pipeline.pipeline import reference_tone

    return reference_tone(1.0)


async def test_watchdog_reports_a_wedged_worker_as_a_device_fault(daemon: Daemon, speaker_wav: bytes) -> None:
    """A worker step that never returns (a hung kernel) turns /healthz into 503 within watchdog_s, so the
    service manager restarts the daemon."""
    rec = Recorder()
    gate = rec.hold("segment_begin", 0)
    async with daemon(rec, watchdog_s=1.0) as server, client(server) as c:
        voice = await c.register(speaker_wav)
        await c.send(p.Synthesize(id=1, text="Hello.", voice=voice, **FAST))
        assert server.worker is not None
        await asyncio.wait_for(server.worker.device_fault.wait(), timeout=30)
        response = await healthz(server.port)
        gate.set()
    assert response.startswith(b"HTTP/1.1 503") and b"watchdog" in response


def hold_voice_preparation(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> tuple[threading.Event, threading.Event]:
    """Make `pipeline.prepare_voice` wait until the test sets the returned gate: (gate, entered), `entered`
    set once a registration is inside it. The caller sets the gate in a `finally`."""
    gate, entered = threading.Event(), threading.Event()
    real = pipeline.prepare_voice

    def held(*args: Any, **kwargs: Any) -> Voice:
        entered.set()
        assert gate.wait(GATE_TIMEOUT_S), "the test never released the registration"
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "prepare_voice", held)
    return gate, entered


async def test_voice_registration_never_stalls_synthesis(
    pipeline: Pipeline, daemon: Daemon, speaker_wav: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a voice is being prepared (held here until the test lets it go), another client's request is
    synthesised from start to end: registrations run on their own thread (defect: they ran on the
    worker thread, between engine steps, and every stream's decoding waited for them)."""
    async with daemon() as server:
        async with client(server) as c:
            ready = await c.register(speaker_wav)
        gate, entered = hold_voice_preparation(pipeline, monkeypatch)
        try:
            async with client(server) as slow, client(server) as fast:
                await slow.send(p.RegisterVoice(id=7, audio=speaker_wav + b"\0" * 64))  # a new voice id
                assert await asyncio.to_thread(entered.wait, GATE_TIMEOUT_S)
                await fast.send(p.Synthesize(id=1, text="Hello world.", voice=ready, **FAST))
                messages = await fast.until(1)
                assert isinstance(last(messages), p.Done) and pcm_of(messages, 1)
                assert not gate.is_set()  # the request finished while the registration was still held
                gate.set()
                reply = (await slow.until(7, final=(p.VoiceRegistered, p.Error)))[-1]
                assert isinstance(reply, p.VoiceRegistered), reply
        finally:
            gate.set()
