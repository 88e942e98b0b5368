"""The client library and ttsd-say against a real daemon (tiny model, CPU, ephemeral port), plus
error mapping against a stub server and playback against a null audio device."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import pytest
import soundfile
import websockets
from websockets.asyncio.server import ServerConnection

from ttsd.api import protocol as p
from ttsd.clients.client import (
    ERRORS,
    BadAudio,
    BadText,
    Cancelled,
    Client,
    ConnectError,
    ServerError,
    SyncClient,
    UnknownVoice,
)
from ttsd.tools.ports import free_port

from .conftest import FixtureSet
from .test_api import say_blocked

GUARD_S = 300.0  # upper bound on waiting for a subprocess line: a hang guard, not a timing assertion
# Small enough for 2 shared CPU cores: random tiny weights rarely emit the stop token on their own.
FAST = {"max_mel_tokens": 12, "diffusion_steps": 2}
FAST_FLAGS = ["--max-mel-tokens", "12", "--diffusion-steps", "2"]
TEXT = "Hello world, this is a test. The quick brown fox jumps over the lazy dog!"


# --------------------------------------------------------------------------------------------
# Subprocess plumbing


class Lines:
    """A subprocess stream read on a thread: every line kept, and waitable by pattern."""

    def __init__(self, stream: IO[bytes] | IO[str] | None) -> None:
        assert stream is not None, "start the subprocess with stderr=subprocess.PIPE"
        self.all: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[bytes] | IO[str]) -> None:
        with stream:  # closed at EOF, so no pipe outlives its test
            for raw in stream:
                line = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
                self.all.append(line.rstrip("\n"))
                self._new.put(line.rstrip("\n"))
        self._new.put(None)

    def wait_for(self, pattern: str) -> re.Match[str]:
        """Block until a line matching `pattern` arrives (lines seen earlier count too, once)."""
        rx = re.compile(pattern)
        while True:
            try:
                line = self._new.get(timeout=GUARD_S)
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} after {GUARD_S} s: {self.all[-20:]}") from None
            if line is None:
                raise AssertionError(f"stream ended before a line matching {pattern!r}: {self.all[-20:]}")
            m = rx.search(line)
            if m:
                return m

    def join(self) -> None:
        """Wait for EOF (the process has exited or closed the stream)."""
        self._thread.join(GUARD_S)

    def since(self, n: int) -> list[str]:
        return self.all[n:]


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    url: str
    log: Lines
    ckpt: Path
    seen: set[str] = field(default_factory=set)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "TTSD_TOKEN")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def daemon(converted: Path) -> Iterator[Daemon]:
    """`ttsd serve` on port 0 with the converted tiny checkpoint, as a real subprocess."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ttsd.daemon", "serve", "--checkpoints", str(converted), "--port", "0",
         "--device", "cpu", "--log-level", "info"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_clean_env(),
    )
    log = Lines(proc.stderr)
    try:
        url = log.wait_for(r"ttsd ready url=(\S+)").group(1)
        yield Daemon(proc, url, log, converted)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=GUARD_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.join()


def _say(*args: str) -> list[str]:
    exe = Path(sys.executable).parent / "ttsd-say"
    return [str(exe), *args] if exe.is_file() else [sys.executable, "-m", "ttsd.clients.say", *args]


def _run_say(*args: str, stdin: str | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_say(*args), input=stdin, capture_output=True, text=True, timeout=GUARD_S,
                          env=env or _clean_env())


def _short_wav(path: Path) -> None:
    soundfile.write(str(path), np.zeros(22050, dtype=np.int16), 22050, subtype="PCM_16")


# --------------------------------------------------------------------------------------------
# ttsd-say against the daemon


def test_say_writes_wav_equal_to_the_stream(daemon: Daemon, fx: FixtureSet, tmp_path: Path) -> None:
    """ttsd-say --out, run with torch and the server packages unimportable, writes a 22050 Hz WAV whose samples
    equal the stream the library receives for the same seed."""
    speaker = fx.input_path("speaker.wav")

    async def stream() -> bytes:
        async with Client(daemon.url) as c:
            voice = await c.register_voice(speaker)
            return await c.synthesize(TEXT, voice=voice, seed=1234, **FAST).read_pcm()

    pcm = np.frombuffer(asyncio.run(stream()), dtype="<i2")
    out = tmp_path / "say.wav"
    argv = say_blocked("--url", daemon.url, "--voice", str(speaker), "--seed", "1234", *FAST_FLAGS, "--out", str(out),
                       TEXT)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=GUARD_S, env=_clean_env())
    assert proc.returncode == 0, proc.stderr
    data, rate = soundfile.read(out, dtype="int16")
    assert rate == p.SAMPLE_RATE_HZ
    assert len(pcm) > 0
    np.testing.assert_array_equal(data, pcm)


@pytest.mark.parametrize("ext", [".flac", ".ogg"])
def test_say_writes_other_formats_by_extension(daemon: Daemon, fx: FixtureSet, tmp_path: Path, ext: str) -> None:
    """--out picks FLAC or Ogg Vorbis from the file extension."""
    out = tmp_path / f"say{ext}"
    proc = _run_say("--url", daemon.url, "--voice", str(fx.input_path("speaker.wav")), *FAST_FLAGS,
                    "--out", str(out), "Short text.")
    assert proc.returncode == 0, proc.stderr
    info = soundfile.info(str(out))
    assert (info.format, info.samplerate, info.channels) == ({".flac": "FLAC", ".ogg": "OGG"}[ext], 22050, 1)
    assert info.frames > 0


def test_say_streams_stdin_one_segment_per_sentence(daemon: Daemon, fx: FixtureSet, tmp_path: Path) -> None:
    """Each stdin line is spoken as its own segment before the next line is even written."""
    sentences = ["First sentence here.", "Then a second one!", "And the third?"]
    proc = subprocess.Popen(
        _say("--url", daemon.url, "--voice", str(fx.input_path("speaker.wav")), *FAST_FLAGS, "-v",
             "--out", str(tmp_path / "stdin.wav")),
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_clean_env(),
    )
    assert proc.stdin is not None
    err = Lines(proc.stderr)
    try:
        for i, sentence in enumerate(sentences):
            proc.stdin.write(sentence + "\n")
            proc.stdin.flush()
            # Segment i starts while stdin is still open: the line was spoken as it arrived.
            seg = err.wait_for(r"^ttsd-say: segment (\d+): (.*)$")
            assert int(seg.group(1)) == i
            assert seg.group(2).split()[0].lower() == sentence.split()[0].lower()
        proc.stdin.close()
        done = err.wait_for(r"^ttsd-say: done segments=(\d+)")
        assert int(done.group(1)) == len(sentences)
        assert proc.wait(timeout=GUARD_S) == 0, err.all
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.join()
    assert soundfile.info(str(tmp_path / "stdin.wav")).frames > 0


def _interrupt_say(daemon: Daemon, args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Stream one stdin line to ttsd-say, SIGINT it once its audio flows; return (exit code, stderr).

    stdin stays open, so the request is certainly still live on the daemon when the signal lands."""
    mark = len(daemon.log.all)
    proc = subprocess.Popen(_say("--url", daemon.url, *FAST_FLAGS, "-v", *args),
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdin is not None
    err = Lines(proc.stderr)
    try:
        proc.stdin.write("The first sentence is spoken. And then the user presses Ctrl-C\n")
        proc.stdin.flush()
        err.wait_for(r"^ttsd-say: segment 0: ")
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
        err.join()
    # The daemon itself logged the cancel (not merely a dropped connection).
    while not any(re.search(r"request ended .* code=cancelled", line) for line in daemon.log.since(mark)):
        daemon.log.wait_for(r"request ended .* code=cancelled")
    return code, "\n".join(err.all)


def test_say_sigint_cancels_on_the_daemon(daemon: Daemon, fx: FixtureSet, tmp_path: Path) -> None:
    """Ctrl-C while streaming stdin to a file sends cancel, the daemon ends the request, ttsd-say exits 130."""
    code, err = _interrupt_say(daemon, ["--voice", str(fx.input_path("speaker.wav")),
                                        "--out", str(tmp_path / "x.wav")], _clean_env())
    assert code == 130, err
    assert "ttsd-say: interrupted, request cancelled by the daemon" in err
    assert "Traceback" not in err


def test_say_reports_daemon_not_running(tmp_path: Path) -> None:
    """With nothing listening, ttsd-say prints one line naming the URL and exits 1."""
    url = f"ws://127.0.0.1:{free_port()}"
    voice = tmp_path / "v.wav"
    _short_wav(voice)  # ttsd-say checks that the voice decodes before it connects
    proc = _run_say("--url", url, "--voice", str(voice), "--out", str(tmp_path / "o.wav"), "Hello.")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"ttsd-say: cannot connect to ttsd at {url}: is the daemon running?"]


def test_say_reports_server_errors_in_one_line(daemon: Daemon, tmp_path: Path) -> None:
    """A voice id the daemon does not know gives a one-line unknown_voice message and exit 1."""
    proc = _run_say("--url", daemon.url, "--voice-id", "nope", "--out", str(tmp_path / "o.wav"), "Hello.")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ttsd-say: unknown_voice: "), proc.stderr


# --------------------------------------------------------------------------------------------
# The client library against the daemon


async def test_client_errors_become_typed_exceptions(daemon: Daemon, fx: FixtureSet) -> None:
    """unknown_voice, bad_audio and bad_text arrive as their exception classes; the connection carries on."""
    async with Client(daemon.url) as c:
        voice = await c.register_voice(fx.input_path("speaker.wav"))
        with pytest.raises(UnknownVoice) as unknown:
            await c.synthesize("Hello.", voice="nope").read_pcm()
        assert unknown.value.code == "unknown_voice" and unknown.value.request_id is not None
        with pytest.raises(BadAudio):
            await c.register_voice(b"definitely not audio")
        with pytest.raises(BadText):
            await c.synthesize("", voice=voice).read_pcm()
        await c.ping()


async def test_client_cancel_then_next_request_works(daemon: Daemon, fx: FixtureSet) -> None:
    """cancel() mid-stream ends the iteration with Cancelled, and the same connection serves the next request."""
    async with Client(daemon.url) as c:
        voice = await c.register_voice(fx.input_path("speaker.wav"))
        # Incremental and never flushed: the request is certainly live when the cancel arrives.
        synthesis = c.synthesize("The first sentence is spoken. ", voice=voice, incremental=True, **FAST)
        with pytest.raises(Cancelled):
            async for event in synthesis:
                if isinstance(event, p.Audio):
                    await synthesis.cancel()
        pcm = await c.synthesize("Short text.", voice=voice, **FAST).read_pcm()
        assert len(pcm) > 0


async def test_client_incremental_events_in_order(daemon: Daemon, fx: FixtureSet) -> None:
    """append_text/flush yield segment_start, audio, segment_end per sentence, then done."""
    async with Client(daemon.url) as c:
        voice = await c.register_voice(fx.input_path("speaker.wav"))
        async with c.synthesize("", voice=voice, incremental=True, **FAST) as s:
            await s.append_text("One sentence. ")
            await s.append_text("Another")
            await s.append_text(" sentence.")
            await s.flush()
            kinds = [type(e).__name__ for e in [e async for e in s]]
    collapsed = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
    assert collapsed == ["SegmentStart", "Audio", "SegmentEnd"] * 2 + ["Done"]
    assert s.done is not None and s.done.segments == 2


def test_sync_client_matches_async(daemon: Daemon, fx: FixtureSet) -> None:
    """SyncClient returns the same samples as the asyncio client for the same seed."""
    speaker = fx.input_path("speaker.wav")

    async def run() -> bytes:
        async with Client(daemon.url) as c:
            return await c.synthesize("Short text.", voice=await c.register_voice(speaker), seed=7,
                                      **FAST).read_pcm()

    with SyncClient(daemon.url) as sc:
        voice = sc.register_voice(speaker)
        events = list(sc.synthesize("Short text.", voice=voice, seed=7, **FAST))
    assert isinstance(events[-1], p.Done)
    assert b"".join(e.pcm for e in events if isinstance(e, p.Audio)) == asyncio.run(run())


# --------------------------------------------------------------------------------------------
# Error mapping against a stub server (every code, independent of what the daemon can trigger)


@pytest.fixture
async def stub_url() -> AsyncIterator[str]:
    """A WebSocket server that answers Hello and replies to every request with Error(code=its text)."""

    async def handler(ws: ServerConnection) -> None:
        async for frame in ws:
            msg = p.decode_client(frame)
            if isinstance(msg, p.Hello):
                await ws.send(p.encode(p.ServerHello(
                    version=p.PROTOCOL_VERSION, server="stub", sample_rate_hz=p.SAMPLE_RATE_HZ, max_frame_bytes=1 << 20,
                    max_text_chars=100, max_reference_audio_s=1.0, max_voices=1, max_concurrent_requests=1,
                    max_queued_requests=0, model="IndexTTS-2", languages=("zh", "en"))))
            elif isinstance(msg, p.Synthesize):
                await ws.send(p.encode(p.Error(id=msg.id, code=msg.text, message=f"stub {msg.text}")))
            elif isinstance(msg, p.RegisterVoice):
                await ws.send(p.encode(p.Error(id=msg.id, code=msg.audio.decode(), message="stub")))

    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}"


def test_every_error_code_has_an_exception_class() -> None:
    """ERRORS covers every stable ErrorCode with a distinct ServerError subclass."""
    assert set(ERRORS) == set(p.ErrorCode.ALL)
    assert len(set(ERRORS.values())) == len(ERRORS)
    assert all(issubclass(cls, ServerError) and cls is not ServerError for cls in ERRORS.values())


@pytest.mark.parametrize("code", sorted(p.ErrorCode.ALL))
async def test_error_messages_raise_their_class(stub_url: str, code: str) -> None:
    """An Error message for a request is raised from its iterator as the class for its code."""
    async with Client(stub_url) as c:
        with pytest.raises(ERRORS[code]) as raised:
            await c.synthesize(code, voice="v").read_pcm()
        assert (raised.value.code, raised.value.message) == (code, f"stub {code}")
        with pytest.raises(ERRORS[code]):
            await c.register_voice(code.encode())


async def test_unknown_error_code_is_a_plain_server_error(stub_url: str) -> None:
    """A code this client does not know still arrives, as ServerError carrying the code."""
    async with Client(stub_url) as c:
        with pytest.raises(ServerError) as raised:
            await c.synthesize("from_the_future", voice="v").read_pcm()
    assert type(raised.value) is ServerError and raised.value.code == "from_the_future"


async def test_client_connect_error_names_the_url() -> None:
    """Connecting to a port nobody listens on raises ConnectError with the daemon hint."""
    url = f"ws://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectError, match=re.escape(f"cannot connect to ttsd at {url}: is the daemon running?")):
        async with Client(url):
            pass


# --------------------------------------------------------------------------------------------
# Playback


def _null_audio_env(tmp_path: Path) -> dict[str, str]:
    """ALSA reads ~/.asoundrc: point HOME at one whose default PCM is the null plugin."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (home / ".asoundrc").write_text("pcm.!default { type null }\n")
    return _clean_env(HOME=str(home))


def _output_device(env: dict[str, str]) -> str:
    """Name of the default output device under `env`, or pytest.skip naming what is missing."""
    probe = ("from ttsd.clients.playback import output_device_name, NoAudioDevice\n"
             "try:\n    print('OK', output_device_name())\nexcept NoAudioDevice as e:\n    print('NO', e)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=GUARD_S)
    status, _, detail = out.stdout.strip().partition(" ")
    if status != "OK":
        pytest.skip(f"no audio output device: {detail or out.stderr.strip()} (install libportaudio2 with ALSA)")
    return detail


def test_player_plays_to_the_null_device(tmp_path: Path) -> None:
    """Player opens on the first chunk and drains everything queued through a null ALSA output."""
    env = _null_audio_env(tmp_path)
    _output_device(env)
    code = ("import numpy as np\nfrom ttsd.clients.playback import Player\n"
            "with Player() as pl:\n"
            "    assert pl._stream is None\n"
            "    for _ in range(4): pl.write(np.arange(2205, dtype='<i2').tobytes())\n"
            "    assert pl._stream is not None\n"
            "    assert pl.drain(60)\n"
            "    assert pl._queued_frames == 0\n"
            "print('played')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=GUARD_S)
    assert out.returncode == 0 and out.stdout.strip() == "played", out.stderr


def test_say_plays_live_to_the_null_device(daemon: Daemon, fx: FixtureSet, tmp_path: Path) -> None:
    """Without --out, ttsd-say plays through the default output (a null ALSA device here) and exits 0."""
    env = _null_audio_env(tmp_path)
    _output_device(env)
    proc = _run_say("--url", daemon.url, "--voice", str(fx.input_path("speaker.wav")), *FAST_FLAGS, "-v",
                    "Short text.", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "ttsd-say: done segments=1" in proc.stderr


def test_say_sigint_during_playback_cancels(daemon: Daemon, fx: FixtureSet, tmp_path: Path) -> None:
    """Ctrl-C during live playback silences the output, cancels on the daemon and exits 130."""
    env = _null_audio_env(tmp_path)
    _output_device(env)
    code, err = _interrupt_say(daemon, ["--voice", str(fx.input_path("speaker.wav"))], env)
    assert code == 130, err
    assert "request cancelled by the daemon" in err


def test_say_reports_missing_audio_device(tmp_path: Path) -> None:
    """With no output device, ttsd-say says so in one line (before contacting the daemon) and exits 1."""
    home = tmp_path / "empty-home"
    home.mkdir()
    env = _clean_env(HOME=str(home))  # no ~/.asoundrc: only the machine's real devices remain
    probe = ("from ttsd.clients.playback import output_device_name, NoAudioDevice\n"
             "try:\n    print('OK', output_device_name())\nexcept NoAudioDevice as e:\n    print('NO', e)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=GUARD_S)
    if out.stdout.startswith("OK"):
        pytest.skip(f"this machine has an audio output device ({out.stdout[3:].strip()}); "
                    "cannot check the no-device message")
    voice = tmp_path / "v.wav"
    _short_wav(voice)  # ttsd-say checks that the voice decodes before it connects
    proc = _run_say("--url", f"ws://127.0.0.1:{free_port()}", "--voice", str(voice), "Hello.", env=env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ttsd-say: no audio output device: "), proc.stderr
    assert "--out FILE" in lines[0]
