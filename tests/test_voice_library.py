"""The voice library (daemon/voice_store.py): registered voices on disk, shared by daemons that point
`voices_store` at one directory, kept across restarts, listed and deleted over the WebSocket and
HTTP with the same token; and the client library registering a voice again on `unknown_voice`."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch

from ttsd.api import protocol as p
from ttsd.clients.client import Client, Unauthorized, UnknownVoice
from ttsd.daemon import voice_store
from ttsd.daemon.config import DaemonConfig
from ttsd.daemon.server import Server
from ttsd.daemon.voice_store import VoiceStore, model_key
from ttsd.daemon.worker import VoiceCache
from ttsd.pipeline.errors import VoiceFileError
from ttsd.pipeline.pipeline import Pipeline
from ttsd.pipeline.voice import Voice
from ttsd.tools.tiny import synthetic_voice

from .conftest import FixtureSet

FAST: dict[str, Any] = dict(
    do_sample=False, num_beams=1, max_mel_tokens=12, diffusion_steps=2, max_text_tokens_per_segment=30, seed=3
)
TOKEN = "library-token-0123456789"


@pytest.fixture(scope="module")
def speaker_wav(fx: FixtureSet) -> bytes:
    return (fx.root / "inputs" / "speaker.wav").read_bytes()


@pytest.fixture(scope="module")
def prepared(pipeline: Pipeline, speaker_wav: bytes) -> Voice:
    """One voice prepared from the fixture's speaker clip, with an emotion clip of its own."""
    return pipeline.prepare_voice(speaker_wav, synthetic_voice(2.0, seed=1))


@asynccontextmanager
async def library_daemon(pipeline: Pipeline, converted: Path, store: Path, **overrides: Any) -> AsyncIterator[Server]:
    """A real server on port 0 with a voice cache of its own (a separate process, as far as voices go)."""
    config = DaemonConfig(port=0, checkpoints=converted, voices_store=store, **overrides).validated()
    server = Server(config, pipeline, voices=VoiceCache(config.max_voices))
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown()


def store_of(server: Server) -> VoiceStore:
    assert server.worker is not None and server.worker.store is not None
    return server.worker.store


async def speak(server: Server, voice: str, token: str | None = None) -> bytes:
    async with Client(server.url, token) as c:
        return await c.synthesize("Hello there.", voice=voice, **FAST).read_pcm()


# --- the stored file ---------------------------------------------------------------------------


@pytest.mark.parametrize("emotion_clip", [False, True])
def test_stored_voice_reads_back_exactly(pipeline: Pipeline, speaker_wav: bytes, prepared: Voice,
                                         emotion_clip: bool) -> None:
    """Every tensor, the clip length and whether an emotion clip was given survive bytes and back."""
    voice = prepared if emotion_clip else pipeline.prepare_voice(speaker_wav)
    back, meta = pipeline.voice_from_bytes(pipeline.voice_to_bytes(voice, {"voice_id": "x"}))
    assert meta == {"voice_id": "x"}
    assert back.has_emotion_clip == voice.has_emotion_clip == emotion_clip
    assert back.audio_s == voice.audio_s
    for a, b in zip(back.tensors(), voice.tensors(), strict=True):
        assert torch.equal(a, b)


def test_altered_or_truncated_voice_bytes_are_refused(pipeline: Pipeline, prepared: Voice) -> None:
    """A flipped bit in a tensor, a cut file and a foreign safetensors file each raise VoiceFileError."""
    data = pipeline.voice_to_bytes(prepared, {})
    flipped = bytearray(data)
    flipped[-5] ^= 0x10
    import safetensors.torch

    foreign = safetensors.torch.save({"x": torch.zeros(2)}, metadata={"format": "other"})
    for bad in (bytes(flipped), data[: len(data) // 2], data[:6], foreign):
        with pytest.raises(VoiceFileError):
            pipeline.voice_from_bytes(bad)


def test_model_key_follows_the_weights(converted: Path, tmp_path: Path) -> None:
    """The key is the manifest's checksums (not the path), random weights name preset and seed, and a
    checkpoint without a manifest is refused rather than shared blindly."""
    from ttsd.api.errors import ConfigError

    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "manifest.json").write_bytes((converted / "manifest.json").read_bytes())
    assert model_key(DaemonConfig(checkpoints=converted)) == model_key(DaemonConfig(checkpoints=copy))
    assert model_key(DaemonConfig(random_weights="tiny", random_seed=1)) != model_key(
        DaemonConfig(random_weights="tiny", random_seed=2))
    with pytest.raises(ConfigError, match="manifest.json"):
        model_key(DaemonConfig(checkpoints=tmp_path))


# --- the store ----------------------------------------------------------------------------------


def ids(n: int) -> list[str]:
    return [f"{i:032x}" for i in range(1, n + 1)]


def test_store_keeps_the_most_recently_used_within_its_count(pipeline: Pipeline, prepared: Voice,
                                                             tmp_path: Path) -> None:
    """Beyond max_voices the least recently used entries go, a load counting as a use."""
    store = VoiceStore(tmp_path, pipeline, max_voices=2, max_bytes=2**40)
    a, b, c = ids(3)
    assert store.save(a, prepared, 1.0) and store.save(b, prepared, 2.0)
    os.utime(store.path(a), (1_000, 1_000))   # a then b, by age
    os.utime(store.path(b), (2_000, 2_000))
    loaded = store.load(a)                     # ... now a is the newer
    assert loaded is not None and loaded[1] == 1.0
    store.save(c, prepared, 3.0)
    assert [e.voice_id for e in store.list()] == [c, a]
    assert not store.path(b).exists()


def test_store_keeps_within_its_bytes(pipeline: Pipeline, prepared: Voice, tmp_path: Path) -> None:
    """Beyond max_bytes the oldest entries go; a voice larger than the limit alone is not stored."""
    size = len(pipeline.voice_to_bytes(prepared, {"voice_id": ids(1)[0], "audio_s": repr(1.0)}))
    store = VoiceStore(tmp_path, pipeline, max_voices=100, max_bytes=size * 2 + size // 2)
    for i, voice_id in enumerate(ids(3)):
        assert store.save(voice_id, prepared, 1.0)
        os.utime(store.path(voice_id), (1_000 + i, 1_000 + i))
    assert [e.voice_id for e in store.list()] == ids(3)[::-1][:2]
    assert sum(e.size_bytes for e in store.list()) <= store.max_bytes
    small = VoiceStore(tmp_path / "small", pipeline, max_voices=100, max_bytes=size - 1)
    assert not small.save(ids(1)[0], prepared, 1.0)
    assert small.list() == []


def test_store_writes_through_a_temporary_file(pipeline: Pipeline, prepared: Voice, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails before its rename leaves no entry and no temporary file behind."""
    store = VoiceStore(tmp_path, pipeline, max_voices=10, max_bytes=2**40)

    def refuse(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(voice_store.os, "replace", refuse)
    assert not store.save(ids(1)[0], prepared, 1.0)
    assert list(tmp_path.iterdir()) == []


# --- daemons sharing a library ------------------------------------------------------------------


async def test_voice_registered_on_one_daemon_is_used_on_another(
    pipeline: Pipeline, converted: Path, speaker_wav: bytes, tmp_path: Path
) -> None:
    """Daemon B, sharing A's voices_store, speaks with a voice only A registered: the same audio as A."""
    async with (library_daemon(pipeline, converted, tmp_path) as a,
                library_daemon(pipeline, converted, tmp_path) as b):
        async with Client(a.url) as c:
            voice = await c.register_voice(speaker_wav)
        assert b.worker is not None and b.worker.voices.lookup(voice) is None  # B never prepared it
        from_b = await speak(b, voice)
        assert store_of(b).loads == 1
        assert from_b == await speak(a, voice)
        assert from_b


async def test_a_restart_keeps_registered_voices(
    pipeline: Pipeline, converted: Path, speaker_wav: bytes, tmp_path: Path
) -> None:
    """A voice registered before a restart is usable after it, read from the store, not prepared again."""
    async with library_daemon(pipeline, converted, tmp_path) as first:
        async with Client(first.url) as c:
            voice = await c.register_voice(speaker_wav)
        before = await speak(first, voice)
    async with library_daemon(pipeline, converted, tmp_path) as again:
        async with Client(again.url) as c:
            assert voice in await c.list_voices()
            # Registering the same audio again is answered from the library, without preparing it.
            assert await c.register_voice(speaker_wav) == voice
        assert store_of(again).loads == 1
        assert await speak(again, voice) == before


@pytest.mark.parametrize("damage", ["truncate", "flip"])
async def test_a_corrupt_entry_is_refused_logged_and_removed(
    pipeline: Pipeline, converted: Path, speaker_wav: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    damage: str
) -> None:
    """A damaged library file is never used: the request gets unknown_voice, one log line names the
    voice, and the file is gone, so registering again stores it afresh."""
    async with library_daemon(pipeline, converted, tmp_path) as a:
        async with Client(a.url) as c:
            voice = await c.register_voice(speaker_wav)
        path = store_of(a).path(voice)
    assert path is not None
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        del data[len(data) - 100:]
    else:
        data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    async with library_daemon(pipeline, converted, tmp_path) as b:
        with caplog.at_level(logging.ERROR, logger="ttsd.daemon.voice_store"):
            with pytest.raises(UnknownVoice):
                await speak(b, voice)
        assert [r.getMessage() for r in caplog.records if voice in r.getMessage()]
        assert "corrupt" in caplog.records[-1].getMessage()
        assert not path.exists()
        assert store_of(b).refused == 1
        assert 'ttsd_voice_store_reads_total{result="corrupt"} 1.0' in b.metrics.render().decode()
        async with Client(b.url) as c:
            assert await c.register_voice(speaker_wav) == voice
        assert path.exists()
        assert await speak(b, voice)


async def test_a_voice_deleted_on_one_daemon_is_gone_on_the_other(
    pipeline: Pipeline, converted: Path, speaker_wav: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a delete on A, B (which holds the voice in memory) answers unknown_voice once it looks again."""
    monkeypatch.setattr(voice_store, "TOUCH_EVERY_S", 0.0)
    async with (library_daemon(pipeline, converted, tmp_path) as a,
                library_daemon(pipeline, converted, tmp_path) as b):
        async with Client(a.url) as c:
            voice = await c.register_voice(speaker_wav)
        assert await speak(b, voice)
        async with Client(a.url) as c:
            await c.delete_voice(voice)
            assert voice not in await c.list_voices()
            with pytest.raises(UnknownVoice):
                await c.delete_voice(voice)
        with pytest.raises(UnknownVoice):
            await speak(b, voice)


# --- list and delete, with the token ------------------------------------------------------------


async def test_list_and_delete_over_the_websocket_need_the_token(
    pipeline: Pipeline, converted: Path, speaker_wav: bytes, tmp_path: Path
) -> None:
    """With a token, list_voices and delete_voice work for a client that has it; one without is refused."""
    async with library_daemon(pipeline, converted, tmp_path, token=TOKEN) as server:
        with pytest.raises(Unauthorized):
            async with Client(server.url) as c:
                await c.list_voices()
        async with Client(server.url, TOKEN) as c:
            voice = await c.register_voice(speaker_wav)
            assert await c.list_voices() == (voice,)
            await c.delete_voice(voice)
            assert await c.list_voices() == ()
            with pytest.raises(UnknownVoice):  # deleted on purpose: not registered again behind the caller
                await c.synthesize("Hi.", voice=voice, **FAST).read_pcm()
        assert store_of(server).list() == []


async def test_voice_endpoints_over_http_need_the_token(
    pipeline: Pipeline, converted: Path, speaker_wav: bytes, tmp_path: Path
) -> None:
    """POST registers (raw body or multipart), GET lists, DELETE removes; each is 401 without the token."""
    async with library_daemon(pipeline, converted, tmp_path, token=TOKEN, http_port=0) as server:
        assert server.http is not None
        async with aiohttp.ClientSession(base_url=server.http.url) as anon:
            for method, path in (("GET", "/v1/audio/voices"), ("POST", "/v1/audio/voices"),
                                 ("DELETE", f"/v1/audio/voices/{'0' * 32}")):
                async with anon.request(method, path, data=b"x") as r:
                    assert r.status == 401, (method, r.status)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession(base_url=server.http.url, headers=auth) as http:
            async with http.post("/v1/audio/voices", data=speaker_wav) as r:
                assert r.status == 200, await r.text()
                voice = (await r.json())["voice_id"]
            form = aiohttp.FormData()
            form.add_field("audio", speaker_wav, filename="ref.wav", content_type="audio/wav")
            form.add_field("emo_audio", synthetic_voice(1.5, seed=2), filename="emo.wav", content_type="audio/wav")
            async with http.post("/v1/audio/voices", data=form) as r:
                assert r.status == 200, await r.text()
                with_emotion = (await r.json())["voice_id"]
            assert with_emotion != voice
            async with http.get("/v1/audio/voices") as r:
                listed = {v["voice_id"]: v for v in (await r.json())["registered"]}
            assert listed.keys() == {voice, with_emotion}
            assert all(v["stored"] and v["size_bytes"] > 0 for v in listed.values())
            async with http.post("/v1/audio/voices", data=b"") as r:
                assert r.status == 400 and (await r.json())["error"]["code"] == p.ErrorCode.BAD_AUDIO
            async with http.delete(f"/v1/audio/voices/{voice}") as r:
                assert r.status == 200 and (await r.json()) == {"voice_id": voice, "deleted": True}
            async with http.delete(f"/v1/audio/voices/{voice}") as r:
                assert r.status == 404 and (await r.json())["error"]["code"] == p.ErrorCode.UNKNOWN_VOICE
        assert [e.voice_id for e in store_of(server).list()] == [with_emotion]


# --- the client registers again -----------------------------------------------------------------


async def test_client_registers_an_evicted_voice_again(
    pipeline: Pipeline, speaker_wav: bytes
) -> None:
    """A daemon with room for one voice evicts the first; the client's next request with it still
    gets audio (registered again behind the caller), as does an incremental request."""
    config = DaemonConfig(port=0, max_voices=1).validated()
    async with Server(config, pipeline, voices=VoiceCache(1)) as server:
        async with Client(server.url) as c:
            first = await c.register_voice(speaker_wav)
            second = await c.register_voice(synthetic_voice(1.5, seed=4))
            assert server.worker is not None and server.worker.voices.lookup(first) is None
            assert await c.synthesize("Hello there.", voice=first, **FAST).read_pcm()
            await c.register_voice(synthetic_voice(1.5, seed=4))  # evicts `first` again
            assert server.worker.voices.lookup(first) is None
            s = c.synthesize("", voice=first, incremental=True, **FAST)
            await s.append_text("Hello ")
            await s.append_text("there.")
            await s.flush()
            assert await s.read_pcm()
            assert s.done is not None and s.done.segments == 1
            assert second


async def test_client_does_not_retry_voices_it_did_not_register(pipeline: Pipeline) -> None:
    """unknown_voice for an id this client never registered is raised as it is."""
    config = DaemonConfig(port=0).validated()
    async with Server(config, pipeline, voices=VoiceCache(2)) as server, Client(server.url) as c:
        with pytest.raises(UnknownVoice):
            await c.synthesize("Hi.", voice="f" * 32, **FAST).read_pcm()


async def test_ttsd_say_registers_again_when_the_daemon_forgot_its_voice(tmp_path: Path) -> None:
    """ttsd-say (torch unimportable) against a daemon that answers its first synthesize with
    unknown_voice: it registers the same audio again, resends, and writes the audio that follows."""
    import asyncio
    import subprocess

    import numpy as np
    import soundfile
    import websockets
    from websockets.asyncio.server import ServerConnection

    from .test_api import say_blocked

    pcm = np.arange(-300, 300, dtype="<i2").tobytes()
    registrations: list[bytes] = []
    synthesizes: list[str] = []

    async def forgetful(ws: ServerConnection) -> None:
        async for frame in ws:
            msg = p.decode_client(frame)
            reply: list[p.ServerMessage] = []
            if isinstance(msg, p.Hello):
                reply = [p.ServerHello(
                    version=p.PROTOCOL_VERSION, server="forgetful", sample_rate_hz=p.SAMPLE_RATE_HZ,
                    max_frame_bytes=1 << 20, max_text_chars=100, max_reference_audio_s=30.0, max_voices=1,
                    max_concurrent_requests=1, max_queued_requests=0, model="IndexTTS-2", languages=("en",))]
            elif isinstance(msg, p.RegisterVoice):
                registrations.append(msg.audio)
                reply = [p.VoiceRegistered(id=msg.id, voice="ab" * 16, audio_s=1.5)]
            elif isinstance(msg, p.Synthesize):
                synthesizes.append(msg.voice)
                if len(synthesizes) == 1:
                    reply = [p.Error(id=msg.id, code=p.ErrorCode.UNKNOWN_VOICE, message="evicted")]
                else:
                    reply = [p.SegmentStart(id=msg.id, index=0, text="HELLO."), p.Audio(id=msg.id, seq=0, pcm=pcm),
                             p.SegmentEnd(id=msg.id, index=0, audio_s=0.03),
                             p.Done(id=msg.id, segments=1, first_audio_ms=1.0, total_ms=2.0, audio_s=0.03, rtf=0.1)]
            for m in reply:
                await ws.send(p.encode(m))

    wav = tmp_path / "ref.wav"
    wav.write_bytes(synthetic_voice(1.5, seed=5))
    out = tmp_path / "out.wav"
    async with websockets.serve(forgetful, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        argv = say_blocked("--url", f"ws://127.0.0.1:{port}", "--voice", str(wav), "--out", str(out), "Hello.")
        proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    assert registrations == [wav.read_bytes()] * 2
    assert synthesizes == ["ab" * 16] * 2
    data, rate = soundfile.read(out, dtype="int16")
    assert rate == p.SAMPLE_RATE_HZ and data.tobytes() == pcm
