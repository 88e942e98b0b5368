"""A Wyoming TTS server (Home Assistant's voice protocol, the `wyoming` package) on `wyoming_port`,
sharing the daemon's worker, voice presets and limits.

    describe                        → info: one TTS program, "ttsd", whose voices are the presets
    synthesize                      → audio-start, audio-chunk…, audio-stop
    synthesize-start, synthesize-chunk…, synthesize-stop
                                    → per segment audio-start, audio-chunk…, audio-stop; then synthesize-stopped
    ping                            → pong

As wyoming-piper does, a `synthesize` that arrives inside a streaming request is ignored (clients
send it for servers that cannot stream). The voice is a preset name (`voice.name`); without one,
the first preset by name. Language and speaker are ignored: IndexTTS-2 reads Chinese and English
from the text itself. Audio is s16le mono at 22.05 kHz.

Wyoming has no authentication, so the server listens on `wyoming_host` (loopback by default).
Events are read with limits (the package's own reader trusts a client's lengths): a header line
of at most MAX_HEADER_BYTES, data of at most the HTTP body limit, payloads of at most
MAX_PAYLOAD_BYTES (discarded: a TTS server takes none). A connection holds one request at a time;
a request that fails, or a malformed event, gets an `error` event (with a ttsd ErrorCode) and the
connection is closed, as wyoming-piper closes, so no client waits for audio that will not come.
Flow control is the worker's credits, returned after each segment's events are drained to the socket."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Final

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.info import Attribution, Describe, Info, TtsProgram, TtsVoice
from wyoming.ping import Ping, Pong
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)

from ttsd.api import protocol as p
from ttsd.api.errors import TextTooLong, TtsdError

from .core import (
    BODY_OVERHEAD_BYTES,
    Ended,
    Interface,
    OptionError,
    QueueSink,
    RequestRun,
    SegmentAudio,
    limit_send_buffer,
    options_from,
    peer_name,
)
from .metrics import DISCONNECTED, OK
from .session import CLOSE_TIMEOUT_S, SERVER_NAME

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger(__name__)

WYOMING: Final = Interface("wyoming", "wyoming ")
MAX_HEADER_BYTES: Final = 64 * 1024     # one event's JSON header line
MAX_PAYLOAD_BYTES: Final = 64 * 1024    # a payload sent to a TTS server is read and dropped
CHUNK_SAMPLES: Final = 2_048            # ≈ 93 ms per audio-chunk event
SAMPLE_WIDTH_BYTES: Final = 2
ATTRIBUTION: Final = Attribution(name="IndexTeam (IndexTTS), served by ttsd", url="https://github.com/index-tts/index-tts")


class BadEvent(Exception):
    """An event that cannot be read or makes no sense here; its connection is closed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(p.clip(message))
        self.code = code
        self.logged = False     # a refused request: its RequestRun logged it already


class WyomingServer:
    """The Wyoming listener (a core.Listener)."""

    interface: Final = WYOMING.name

    def __init__(self, server: Server) -> None:
        self.server = server
        self.open: set[_Connection] = set()
        self._listener: asyncio.Server | None = None

    async def start(self) -> None:
        c = self.server.config
        self._listener = await asyncio.start_server(self._connect, c.wyoming_host, c.wyoming_port,
                                                    limit=MAX_HEADER_BYTES)

    @property
    def connections(self) -> int:
        return len(self.open)

    @property
    def url(self) -> str:
        if self._listener is None or not self._listener.sockets:
            raise RuntimeError("Wyoming server not started")
        host, port = self._listener.sockets[0].getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        return f"tcp://{host}:{port}"

    def info(self) -> Info:
        presets, pipeline = self.server.presets, self.server.pipeline
        model, languages = f"IndexTTS-{pipeline.version}", list(pipeline.languages)
        voices = [
            TtsVoice(name=name, attribution=ATTRIBUTION, installed=True, version=None, languages=languages,
                     description=f"{name} ({model} voice preset, {presets.by_name[name].audio_s:.1f} s reference)")
            for name in presets.names
        ]
        program = TtsProgram(
            name="ttsd", attribution=ATTRIBUTION, installed=True, version=SERVER_NAME.partition("/")[2],
            description=f"{model} streaming speech synthesis (ttsd)", voices=voices,
            supports_synthesize_streaming=True,
        )
        return Info(tts=[program])

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = _Connection(self, reader, writer)
        self.open.add(connection)
        try:
            await connection.run()
        finally:
            self.open.discard(connection)

    async def close(self) -> None:
        """Stop listening, end every connection (their requests are cancelled), bounded by CLOSE_TIMEOUT_S."""
        if self._listener is None:
            return
        self._listener.close()
        for connection in list(self.open):
            connection.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._listener.wait_closed()
        except TimeoutError:
            for connection in list(self.open):
                connection.writer.transport.abort()


class _Request:
    """The connection's one live synthesis request: its run, and the task that writes its audio."""

    def __init__(self, run: RequestRun, sink: QueueSink, streaming: bool) -> None:
        self.run, self.sink, self.streaming = run, sink, streaming
        self.task: asyncio.Task[None] | None = None


class _Connection:
    def __init__(self, owner: WyomingServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.owner, self.reader, self.writer = owner, reader, writer
        self.server = owner.server
        self.peer = peer_name(writer.get_extra_info("peername"))
        self.request: _Request | None = None
        self.closing = False
        limit_send_buffer(writer.get_extra_info("socket"))

    async def run(self) -> None:
        log.info("wyoming connection open peer=%s", self.peer)
        try:
            while not self.closing:
                event = await self._read_idle()
                if event is None:
                    break
                await self._handle(event)
        except BadEvent as e:
            if not e.logged:
                log.info("wyoming bad event peer=%s code=%s error=%r", self.peer, e.code, str(e))
            await self._send_error(e.code, str(e))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closing = True
            req = self.request
            if req is not None:
                # The client left (or is being closed): its writer task ends the request, as
                # disconnected, and the core cancels its job silently; nobody is listening.
                self.request = None
                if req.task is not None:
                    req.task.cancel()
                    await asyncio.gather(req.task, return_exceptions=True)
                req.run.end(DISCONNECTED)
            self.writer.close()
            log.info("wyoming connection closed peer=%s", self.peer)

    def close(self) -> None:
        """End the connection from the server side (shutdown): run() cancels what is left."""
        self.closing = True
        self.writer.close()

    # -------------------------------------------------------------------------------------------
    # Reading

    async def _read_idle(self) -> Event | None:
        """The next event; None at EOF or after idle_timeout_s without one while no audio is due."""
        timeout_s = self.server.config.idle_timeout_s
        while True:
            try:
                async with asyncio.timeout(timeout_s):
                    return await self._read_event()
            except TimeoutError:
                req = self.request
                if req is not None and req.run.input_closed:
                    continue  # audio is still being produced for this client
                log.info("wyoming idle timeout peer=%s idle_timeout_s=%g", self.peer, timeout_s)
                return None

    async def _read_event(self) -> Event | None:
        try:
            line = await self.reader.readline()
        except ValueError:  # over the StreamReader limit (MAX_HEADER_BYTES)
            raise BadEvent(p.ErrorCode.TOO_LARGE, f"an event header is longer than {MAX_HEADER_BYTES} bytes") from None
        if not line:
            return None
        header = _json_object(line, "event header")
        kind = header.get("type")
        if not isinstance(kind, str):
            raise BadEvent(p.ErrorCode.BAD_MESSAGE, "an event needs a string 'type'")
        data = header.get("data") or {}
        if not isinstance(data, dict):
            raise BadEvent(p.ErrorCode.BAD_MESSAGE, "'data' must be an object")
        max_data = self.server.config.max_text_chars * 6 + BODY_OVERHEAD_BYTES
        data_length = _length(header, "data_length", max_data)
        if data_length:
            data.update(_json_object(await self.reader.readexactly(data_length), "event data"))
        payload_length = _length(header, "payload_length", MAX_PAYLOAD_BYTES)
        if payload_length:
            await self.reader.readexactly(payload_length)
        return Event(type=kind, data=data)

    # -------------------------------------------------------------------------------------------
    # Events

    async def _handle(self, event: Event) -> None:
        kind = event.type
        try:
            if Describe.is_type(kind):
                await self._write(self.owner.info().event())
            elif Ping.is_type(kind):
                text = Ping.from_event(event).text
                await self._write(Pong(text=text if isinstance(text, str) else None).event())
            elif Synthesize.is_type(kind):
                if self.request is not None and self.request.streaming:
                    return  # the compatibility copy of a streaming request's text
                synthesize = Synthesize.from_event(event)
                await self._start(_voice_name(synthesize.voice), _string(synthesize.text), streaming=False)
            elif SynthesizeStart.is_type(kind):
                start = SynthesizeStart.from_event(event)
                await self._start(_voice_name(start.voice), "", streaming=True)
            elif SynthesizeChunk.is_type(kind):
                self._append(_string(SynthesizeChunk.from_event(event).text))
            elif SynthesizeStop.is_type(kind):
                self._stop_input()
            else:
                log.debug("wyoming event ignored peer=%s type=%s", self.peer, p.quote(kind))
        except (KeyError, TypeError, AttributeError):
            # The package's from_event indexes the data as it expects it to be.
            raise BadEvent(p.ErrorCode.BAD_MESSAGE, f"malformed {p.quote(kind)} event") from None

    async def _start(self, voice_name: str | None, text: str, streaming: bool) -> None:
        worker, presets = self.server.worker, self.server.presets
        assert worker is not None
        run = self.server.core.run(WYOMING, self.peer)
        try:
            if self.request is not None:
                raise BadEvent(p.ErrorCode.BUSY, "this connection already has a synthesis request in progress")
            run.check_text(text, allow_empty=True)
            if voice_name is None:
                if not presets.names:
                    raise BadEvent(p.ErrorCode.UNKNOWN_VOICE, "no voice presets are loaded (voices_dir)")
                voice_name = presets.names[0]
            voice, preset_options = presets.resolve(worker, voice_name)
            options = options_from(preset_options)
            emo_voice = None if options.emo_voice is None else presets.resolve(worker, options.emo_voice)[0]
            if not streaming and not text.strip():
                # Nothing to say: an empty answer, as wyoming-piper gives.
                run.end(OK)
                await self._write(AudioStop().event())
                return
            sink = QueueSink(on_stop=self._on_stop)
            run.submit(sink, voice, options.opts, text, emo_voice=emo_voice, incremental=streaming,
                       detail=f" voice={p.quote(voice_name)} streaming={streaming}")
        except TtsdError as e:
            raise self._refused(run, BadEvent(e.code, str(e))) from None
        except OptionError as e:
            raise self._refused(run, BadEvent(p.ErrorCode.BAD_MESSAGE, f"preset options: {e}")) from None
        except BadEvent as e:
            raise self._refused(run, e) from None
        req = self.request = _Request(run, sink, streaming)
        req.task = asyncio.create_task(self._speak(req))

    def _refused(self, run: RequestRun, e: BadEvent) -> BadEvent:
        run.refuse(e.code, str(e))
        e.logged = True
        return e

    def _append(self, text: str) -> None:
        req = self.request
        if req is None or req.run.input_closed:
            raise BadEvent(p.ErrorCode.BAD_MESSAGE, "synthesize-chunk outside a streaming request")
        try:
            req.run.add_text(text)  # past max_text_chars it ends the request with text_too_long
        except TextTooLong as e:
            raise BadEvent(e.code, str(e)) from None

    def _stop_input(self) -> None:
        req = self.request
        if req is None or req.run.input_closed:
            raise BadEvent(p.ErrorCode.BAD_MESSAGE, "synthesize-stop outside a streaming request")
        req.run.close_input()

    def _on_stop(self, code: str) -> None:
        if code == p.ErrorCode.SLOW_CONSUMER:
            # The writer is blocked on a socket nobody reads: only dropping it wakes it up.
            log.info("wyoming connection aborted peer=%s code=%s", self.peer, code)
            self.writer.transport.abort()

    # -------------------------------------------------------------------------------------------
    # Writing

    async def _write(self, event: Event) -> None:
        # Each event is written whole before the drain, so two writers never interleave bytes.
        await async_write_event(event, self.writer)

    async def _send_error(self, code: str, message: str) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._write(Error(text=p.clip(message), code=code).event())
        except (TimeoutError, ConnectionError):
            pass

    async def _speak(self, req: _Request) -> None:
        """Write the request's audio; then end the request (and, if it failed, the connection)."""
        fmt = {"rate": p.SAMPLE_RATE_HZ, "width": SAMPLE_WIDTH_BYTES, "channels": 1}
        run = req.run
        code = DISCONNECTED
        try:
            while True:
                item = await req.sink.queue.get()
                if isinstance(item, Ended):
                    code = item.code or OK
                    if item.code is not None:
                        await self._send_error(item.code, item.message)
                        self.close()
                    elif req.streaming:
                        await self._write(SynthesizeStopped().event())
                    else:
                        if run.segments == 0:
                            await self._write(AudioStart(**fmt).event())
                        await self._write(AudioStop().event())
                    break
                assert isinstance(item, SegmentAudio)
                if item.first and (req.streaming or run.segments == 0):
                    await self._write(AudioStart(**fmt).event())
                step = CHUNK_SAMPLES * SAMPLE_WIDTH_BYTES
                for start in range(0, len(item.pcm), step):
                    await self._write(AudioChunk(audio=item.pcm[start : start + step], **fmt).event())
                if req.streaming and item.last:
                    await self._write(AudioStop().event())
                run.piece_sent(len(item.pcm) // 2, first=item.first, last=item.last)
        except ConnectionError:
            code = req.sink.stop_code()
            self.close()
        finally:
            if self.request is req:
                self.request = None
            run.end(code)


def _string(value: object) -> str:
    if value is not None and not isinstance(value, str):
        raise BadEvent(p.ErrorCode.BAD_MESSAGE, "a text field must be a string")
    return value or ""


def _voice_name(voice: SynthesizeVoice | None) -> str | None:
    name = None if voice is None else voice.name
    if name is not None and not isinstance(name, str):
        raise BadEvent(p.ErrorCode.BAD_MESSAGE, "'voice.name' must be a string")
    return name


def _json_object(raw: bytes, what: str) -> dict[str, object]:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadEvent(p.ErrorCode.BAD_FRAME, f"the {what} is not JSON") from None
    if not isinstance(value, dict):
        raise BadEvent(p.ErrorCode.BAD_FRAME, f"the {what} must be a JSON object")
    return value


def _length(header: dict[str, object], key: str, limit: int) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if type(value) is not int or value < 0:
        raise BadEvent(p.ErrorCode.BAD_MESSAGE, f"{key!r} must be a non-negative integer")
    if value > limit:
        raise BadEvent(p.ErrorCode.TOO_LARGE, f"{key!r} is {value}; the limit is {limit} bytes")
    return value
