"""The ttsd client library: asyncio, one WebSocket per `Client`, many requests at once.

    async with Client("ws://127.0.0.1:8765") as c:
        voice = await c.register_voice(Path("ref.wav").read_bytes())
        async for event in c.synthesize("Hello there. How are you?", voice=voice, seed=1):
            if isinstance(event, Audio):
                play(event.pcm)                  # s16le mono at c.sample_rate_hz

Frames are encoded and decoded only with `ttsd.api.protocol` (no torch needed). One reader task
routes each server frame to its request by id. A request's events are `SegmentStart`, `Audio`,
`SegmentEnd` and finally `Done`; a server `Error` for it is raised from the iterator as the
`ServerError` subclass for its code (`Cancelled` after `cancel()`). `SyncClient` wraps it all for
code without an event loop.

A client keeps the reference audio of the voices it registered. When the daemon answers a request
with `unknown_voice` for one of them (evicted from its memory, deleted from the voice library, or
a replica behind a load balancer that never saw it), the client registers the audio again and
resends the request, once: the voice id is the audio's content hash, so registering again gives
the same id and the caller sees nothing but a slower first audio.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import Future as ConcurrentFuture
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Final, Literal, Self, TypeAlias, TypeVar
from urllib.parse import urlsplit

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from ttsd.api import protocol as p
from ttsd.api.protocol import Audio, Done, ErrorCode, SegmentEnd, SegmentStart

log = logging.getLogger(__name__)

DEFAULT_URL: Final = "ws://127.0.0.1:8765"
CLIENT_NAME: Final = "ttsd-client/0.1"
OPEN_TIMEOUT_S: Final = 10.0            # TCP connect + WebSocket handshake + ServerHello
CLOSE_TIMEOUT_S: Final = 5.0
MAX_SERVER_FRAME_BYTES: Final = 16 * 2**20   # Audio frames are small; this only bounds a broken server

Event: TypeAlias = SegmentStart | Audio | SegmentEnd | Done
AudioSource: TypeAlias = bytes | str | os.PathLike[str]
_T = TypeVar("_T")
_R = TypeVar("_R", bound=p.ServerMessage)

# What a caller may pass to synthesize() as options: the synthesis options, the emotion voice and
# the output format (everything but the fields the client sets itself).
OPTION_NAMES: Final = p.OPTION_NAMES | {"emo_voice", "format"}


# --------------------------------------------------------------------------------------------
# Exceptions


class ClientError(Exception):
    """Base of everything this library raises."""


class ConnectError(ClientError):
    """The daemon could not be reached (not running, wrong URL, or the handshake failed)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot connect to ttsd at {url}: {reason}")
        self.url = url
        self.reason = reason


class ConnectionLost(ClientError):
    """The connection closed while a request or reply was outstanding."""


class ServerError(ClientError):
    """An `error` message from the server. Subclasses exist for every stable code; `code` is the
    code as received, so an unknown code from a newer server still arrives here."""

    CODE: ClassVar[str | None] = None

    def __init__(self, code: str, message: str, request_id: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


class BadFrame(ServerError):
    CODE = ErrorCode.BAD_FRAME


class BadMessage(ServerError):
    CODE = ErrorCode.BAD_MESSAGE


class UnknownType(ServerError):
    CODE = ErrorCode.UNKNOWN_TYPE


class TooLarge(ServerError):
    CODE = ErrorCode.TOO_LARGE


class BadText(ServerError):
    CODE = ErrorCode.BAD_TEXT


class TextTooLong(ServerError):
    CODE = ErrorCode.TEXT_TOO_LONG


class BadAudio(ServerError):
    CODE = ErrorCode.BAD_AUDIO


class AudioTooLong(ServerError):
    CODE = ErrorCode.AUDIO_TOO_LONG


class UnknownVoice(ServerError):
    CODE = ErrorCode.UNKNOWN_VOICE


class Busy(ServerError):
    CODE = ErrorCode.BUSY


class Cancelled(ServerError):
    CODE = ErrorCode.CANCELLED


class SlowConsumer(ServerError):
    CODE = ErrorCode.SLOW_CONSUMER


class Unauthorized(ServerError):
    CODE = ErrorCode.UNAUTHORIZED


class Internal(ServerError):
    CODE = ErrorCode.INTERNAL


class ShuttingDown(ServerError):
    CODE = ErrorCode.SHUTTING_DOWN


ERRORS: Final[dict[str, type[ServerError]]] = {
    cls.CODE: cls for cls in ServerError.__subclasses__() if cls.CODE is not None
}


def error_from(msg: p.Error) -> ServerError:
    """The exception for a server `Error` message (ServerError itself for an unknown code)."""
    return ERRORS.get(msg.code, ServerError)(msg.code, msg.message, msg.id)


def _proxy_for(url: str) -> Literal[True] | None:
    # websockets follows $https_proxy/$http_proxy by default; a daemon on this machine must never
    # be reached through a proxy someone set for the internet.
    host = urlsplit(url).hostname or ""
    return None if host == "localhost" or host.startswith("127.") or host == "::1" else True


def _read_audio(source: AudioSource) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()


# --------------------------------------------------------------------------------------------
# Requests


class Synthesis:
    """One synthesis request: an async iterator of events, plus append_text/flush/cancel.

    The request is sent on the first `__anext__`, `start()` or `append_text()`. Iteration yields
    `SegmentStart`, `Audio`, `SegmentEnd`, then `Done` (also kept in `.done`) and stops; a server
    error for this request is raised as its `ServerError` subclass. Leaving `async with` before
    `Done` cancels the request on the server."""

    def __init__(self, client: Client, msg: p.Synthesize) -> None:
        self._client = client
        self._msg = msg
        self.id = msg.id
        self.done: Done | None = None
        self._events: asyncio.Queue[p.ServerMessage | BaseException] = asyncio.Queue()
        self._started = False
        self._finished = False
        self._appended: list[str] = []   # every append_text, to replay after registering a voice again
        self._flushed = False
        self._retried = False            # a request is resent at most once
        self._retrying = False           # append_text and flush are recorded, sent by the retry
        self._seen_events = False

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if not self._finished:
            await self.cancel()
            self._client._forget(self.id)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        if self._finished:
            raise StopAsyncIteration
        await self.start()
        item = await self._events.get()
        if isinstance(item, BaseException):
            self._finish()
            raise item
        match item:
            case p.Done():
                self.done = item
                self._finish()
                return item
            case p.Error():
                try:
                    retried = item.code == ErrorCode.UNKNOWN_VOICE and await self._retry()
                except BaseException:  # registering again failed: that error ends the request
                    self._finish()
                    raise
                if retried:
                    return await self.__anext__()
                self._finish()
                raise error_from(item)
            case p.SegmentStart() | p.Audio() | p.SegmentEnd():
                self._seen_events = True
                return item
        self._finish()
        raise ClientError(f"unexpected {type(item).__name__} for request {self.id}")

    def _finish(self) -> None:
        self._finished = True
        self._client._forget(self.id)

    def _deliver(self, item: p.ServerMessage | BaseException) -> None:
        self._events.put_nowait(item)

    async def start(self) -> None:
        """Send the request (once)."""
        if not self._started:
            self._started = True
            await self._client._send(self._msg)

    async def append_text(self, text: str) -> None:
        """More text for an incremental request; complete sentences are spoken right away."""
        if not self._msg.incremental:
            raise ClientError("append_text needs synthesize(..., incremental=True)")
        await self.start()
        self._appended.append(text)
        if not self._retrying:
            await self._client._send(p.AppendText(id=self.id, text=text))

    async def flush(self) -> None:
        """End of text for an incremental request: speak the rest, then `Done`."""
        if not self._msg.incremental:
            raise ClientError("flush needs synthesize(..., incremental=True)")
        await self.start()
        self._flushed = True
        if not self._retrying:
            await self._client._send(p.Flush(id=self.id))

    async def _retry(self) -> bool:
        """After `unknown_voice`: register this client's voices again and resend the request with
        what was appended so far (the daemon refused those frames along with the request). False
        when there is nothing to retry: already retried, audio seen, or voices it did not register."""
        if self._retried or self._seen_events:
            return False
        self._retried = self._retrying = True
        try:
            if not await self._client._register_again(self._msg):
                return False
            send = self._client._send
            await send(self._msg)
            sent = 0
            while sent < len(self._appended):  # append_text may add more while these are sent
                await send(p.AppendText(id=self.id, text=self._appended[sent]))
                sent += 1
            if self._flushed:
                await send(p.Flush(id=self.id))
            return True
        finally:
            self._retrying = False

    async def cancel(self) -> None:
        """Ask the server to stop. Iteration then ends with `Cancelled` (or `Done` if it won the race)."""
        if self._started and not self._finished:
            try:
                await self._client._send(p.Cancel(id=self.id))
            except ConnectionLost:
                pass  # nothing left to cancel

    async def read_pcm(self) -> bytes:
        """Iterate to the end and return all audio joined: s16le mono at the server's rate."""
        return b"".join([e.pcm async for e in self if isinstance(e, Audio)])


# --------------------------------------------------------------------------------------------
# Client


class Client:
    """One connection to a ttsd daemon. Use as `async with Client(url, token=...) as c:`."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, *,
                 open_timeout_s: float = OPEN_TIMEOUT_S, name: str = CLIENT_NAME) -> None:
        self.url = url
        self.token = token
        self.open_timeout_s = open_timeout_s
        self.name = name
        self.hello: p.ServerHello | None = None
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._requests: dict[int, Synthesis] = {}
        self._replies: dict[int, asyncio.Future[p.ServerMessage]] = {}    # register/list/delete voice by id
        self._voice_audio: dict[str, tuple[bytes, bytes | None]] = {}   # voice id → the audio registered
        self._hello_reply: asyncio.Future[p.ServerHello] | None = None
        self._pongs: dict[int, asyncio.Future[None]] = {}
        self._lost: ClientError | None = None

    @property
    def sample_rate_hz(self) -> int:
        return self.hello.sample_rate_hz if self.hello is not None else p.SAMPLE_RATE_HZ

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the WebSocket, exchange Hello, start routing replies. Raises ConnectError."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            async with asyncio.timeout(self.open_timeout_s):
                # compression=None: PCM does not deflate, and the server turns it off too.
                self._ws = await websockets.connect(self.url, additional_headers=headers, compression=None,
                                                    max_size=MAX_SERVER_FRAME_BYTES, open_timeout=None,
                                                    close_timeout=CLOSE_TIMEOUT_S, proxy=_proxy_for(self.url))
        except InvalidStatus as e:
            status = e.response.status_code
            if status == 401:
                raise Unauthorized(ErrorCode.UNAUTHORIZED, "the daemon rejected the token"
                                   if self.token else "the daemon requires a token (--token)") from None
            raise ConnectError(self.url, f"HTTP {status} at the WebSocket handshake") from None
        except (OSError, InvalidHandshake, TimeoutError) as e:
            reason = "is the daemon running?" if isinstance(e, ConnectionRefusedError | TimeoutError) else str(e)
            raise ConnectError(self.url, reason or type(e).__name__) from None
        except InvalidURI as e:
            raise ConnectError(self.url, f"bad URL: {e}") from None
        self._lost = None
        self._hello_reply = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(), name=f"ttsd-client-reader {self.url}")
        await self._send(p.Hello(client=self.name, version=p.PROTOCOL_VERSION))
        try:
            async with asyncio.timeout(self.open_timeout_s):
                self.hello = await self._hello_reply
        except TimeoutError:
            await self.close()
            raise ConnectError(self.url, "no hello from the server") from None
        log.debug("connected url=%s server=%s model=%s rate_hz=%d", self.url, self.hello.server, self.hello.model,
                  self.hello.sample_rate_hz)

    async def close(self) -> None:
        """Close the connection; outstanding requests end with ConnectionLost."""
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        self._fail_all(ConnectionLost("connection closed by the client"))

    # -- sending -------------------------------------------------------------------------------

    async def _send(self, msg: p.ClientMessage) -> None:
        if self._lost is not None:
            raise self._lost
        if self._ws is None:
            raise ClientError("not connected (use `async with Client(...)`)")
        try:
            await self._ws.send(p.encode(msg))
        except ConnectionClosed as e:
            raise ConnectionLost(f"connection closed: {e}") from None

    def _next_id(self) -> int:
        # Ids only need to be unique among this connection's live requests.
        while True:
            i = next(self._ids) % (p.MAX_REQUEST_ID + 1)
            if i not in self._requests and i not in self._replies:
                return i

    # -- requests ------------------------------------------------------------------------------

    async def register_voice(self, audio: AudioSource, emo_audio: AudioSource | None = None) -> str:
        """Upload reference audio (file bytes or a path: wav/flac/ogg/mp3) → a voice id. The audio is
        kept, to register it again should the daemon answer `unknown_voice` for this id."""
        speaker = _read_audio(audio)
        emotion = None if emo_audio is None else _read_audio(emo_audio)
        msg = await self._ask(lambda i: p.RegisterVoice(id=i, audio=speaker, emo_audio=emotion), p.VoiceRegistered)
        self._voice_audio[msg.voice] = (speaker, emotion)
        return msg.voice

    async def list_voices(self) -> tuple[str, ...]:
        """The voice ids registered on the daemon (its voice library, if it has one), most recently
        used first; at most protocol.MAX_LISTED_VOICES."""
        return (await self._ask(lambda i: p.ListVoices(id=i), p.VoiceList)).voices

    async def delete_voice(self, voice: str) -> None:
        """Remove a voice from the daemon and its voice library; UnknownVoice when it is not there."""
        self._voice_audio.pop(voice, None)  # deleted on purpose: never registered again behind the caller
        await self._ask(lambda i: p.DeleteVoice(id=i, voice=voice), p.VoiceDeleted)

    async def _ask(self, make: Callable[[int], p.ClientMessage], answer: type[_R]) -> _R:
        """Send the request `make(id)` and wait for its one reply, of type `answer` (an Error is raised)."""
        request_id = self._next_id()
        reply: asyncio.Future[p.ServerMessage] = asyncio.get_running_loop().create_future()
        self._replies[request_id] = reply
        try:
            request = make(request_id)
            await self._send(request)
            msg = await reply
        finally:
            self._replies.pop(request_id, None)
        if isinstance(msg, p.Error):
            raise error_from(msg)
        if not isinstance(msg, answer):
            raise ClientError(f"unexpected {type(msg).__name__} in reply to {request.TYPE}")
        return msg

    async def _register_again(self, msg: p.Synthesize) -> bool:
        """After `unknown_voice` for `msg`: register again the voices it names that this client
        registered (False when it registered none of them, so there is nothing to retry)."""
        known = [v for v in (msg.voice, msg.emo_voice) if v is not None and v in self._voice_audio]
        for voice in known:
            log.info("voice unknown to the daemon, registering it again voice=%s", voice)
            again = await self.register_voice(*self._voice_audio[voice])
            if again != voice:  # a daemon hashing differently: retrying would loop
                raise ClientError(f"registering voice {voice} again gave the id {again}")
        return bool(known)

    def synthesize(self, text: str, *, voice: str, incremental: bool = False, **options: Any) -> Synthesis:
        """A synthesis request (sent when first iterated, started or appended to).

        `options` are the synthesis options of `ttsd.api.options.OPTIONS` by name (emo_alpha,
        emo_vector as 8 floats, temperature, seed, ...), plus `emo_voice` (a voice id). None keeps
        the server's default, which is upstream's.
        With incremental=True, `text` is the first chunk; send more with `append_text`, end with `flush`."""
        unknown = sorted(options.keys() - OPTION_NAMES)
        if unknown:
            raise TypeError(f"unknown synthesis option(s): {', '.join(unknown)}")
        msg = p.Synthesize(id=self._next_id(), text=text, voice=voice, incremental=incremental, **options)
        synthesis = Synthesis(self, msg)
        self._requests[msg.id] = synthesis
        if self._lost is not None:
            synthesis._deliver(self._lost)
        return synthesis

    async def ping(self) -> None:
        """Round trip through the server's reply queue."""
        nonce = self._next_id()
        pong: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pongs[nonce] = pong
        try:
            await self._send(p.Ping(nonce=nonce))
            await pong
        finally:
            self._pongs.pop(nonce, None)

    def _forget(self, request_id: int) -> None:
        self._requests.pop(request_id, None)

    # -- receiving -----------------------------------------------------------------------------

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for frame in self._ws:
                try:
                    msg = p.decode_server(frame)
                except p.ProtocolError as e:
                    # A server we cannot understand: nothing after this frame can be trusted.
                    log.error("bad frame from server url=%s code=%s detail=%s", self.url, e.code, e.detail)
                    self._fail_all(ConnectionLost(f"bad frame from the server: {e}"))
                    await self._ws.close(1002, "bad frame")
                    return
                self._route(msg)
            reason = f"closed by the server ({self._ws.close_code} {self._ws.close_reason})".rstrip()
        except ConnectionClosed as e:
            reason = f"connection lost: {e}"
        self._fail_all(ConnectionLost(reason))

    def _route(self, msg: p.ServerMessage) -> None:
        match msg:
            case p.ServerHello():
                if self._hello_reply is not None and not self._hello_reply.done():
                    self._hello_reply.set_result(msg)
            case p.Pong():
                pong = self._pongs.get(msg.nonce)
                if pong is not None and not pong.done():
                    pong.set_result(None)
            case p.VoiceRegistered() | p.VoiceList() | p.VoiceDeleted():
                self._resolve(msg.id, msg)
            case p.Error(id=None):
                # Not attributable to a request: a frame this client sent was malformed.
                log.warning("server error code=%s message=%s", msg.code, msg.message)
                if self._hello_reply is not None and not self._hello_reply.done():
                    self._hello_reply.set_exception(error_from(msg))
            case p.Error() if msg.id in self._replies:
                self._resolve(msg.id, msg)
            case p.SegmentStart() | p.Audio() | p.SegmentEnd() | p.Done() | p.Error():
                synthesis = self._requests.get(msg.id)
                if synthesis is None:
                    # Frames already in flight for a request this client gave up on.
                    log.debug("frame for forgotten request type=%s id=%d", msg.TYPE, msg.id)
                else:
                    synthesis._deliver(msg)

    def _resolve(self, request_id: int, msg: p.ServerMessage) -> None:
        reply = self._replies.get(request_id)
        if reply is not None and not reply.done():
            reply.set_result(msg)

    def _fail_all(self, error: ClientError) -> None:
        if self._lost is None:
            self._lost = error
        for synthesis in list(self._requests.values()):
            synthesis._deliver(error)
        for fut in [*self._replies.values(), *self._pongs.values(), self._hello_reply]:
            if fut is not None and not fut.done():
                fut.set_exception(error)


async def synthesize(url: str, text: str, *, voice: str | None = None, voice_audio: AudioSource | None = None,
                     token: str | None = None, **options: Any) -> bytes:
    """One-shot helper: connect, (register `voice_audio`), synthesize `text`, return all PCM (s16le)."""
    async with Client(url, token) as c:
        if voice is None:
            if voice_audio is None:
                raise ClientError("synthesize needs voice= or voice_audio=")
            voice = await c.register_voice(voice_audio)
        return await c.synthesize(text, voice=voice, **options).read_pcm()


# --------------------------------------------------------------------------------------------
# Synchronous wrapper


class SyncSynthesis:
    """`Synthesis` for synchronous code: iterate for events; append_text/flush/cancel block briefly."""

    def __init__(self, owner: SyncClient, inner: Synthesis) -> None:
        self._owner = owner
        self._inner = inner
        self.id = inner.id

    @property
    def done(self) -> Done | None:
        return self._inner.done

    def __iter__(self) -> Iterator[Event]:
        # StopAsyncIteration must not cross the thread boundary as an exception: map it to None.
        async def step() -> Event | None:
            try:
                return await self._inner.__anext__()
            except StopAsyncIteration:
                return None

        while (event := self._owner._call(step())) is not None:
            yield event

    def __enter__(self) -> Self:
        self._owner._call(self._inner.start())
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._owner._call(self._inner.__aexit__(et, e, tb))

    def append_text(self, text: str) -> None:
        self._owner._call(self._inner.append_text(text))

    def flush(self) -> None:
        self._owner._call(self._inner.flush())

    def cancel(self) -> None:
        self._owner._call(self._inner.cancel())

    def read_pcm(self) -> bytes:
        return self._owner._call(self._inner.read_pcm())


class SyncClient:
    """`Client` for code without an event loop: the loop runs in a private daemon thread.

        with SyncClient(url) as c:
            voice = c.register_voice(Path("ref.wav"))
            pcm = c.synthesize("Hello.", voice=voice).read_pcm()
    """

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ttsd-client-loop", daemon=True)
        self._client = Client(url, token, **kwargs)

    @property
    def hello(self) -> p.ServerHello | None:
        return self._client.hello

    @property
    def sample_rate_hz(self) -> int:
        return self._client.sample_rate_hz

    def _call(self, coro: Coroutine[Any, Any, _T] | Awaitable[_T]) -> _T:
        async def run() -> _T:
            return await coro

        fut: ConcurrentFuture[_T] = asyncio.run_coroutine_threadsafe(run(), self._loop)
        return fut.result()

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def connect(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()
        try:
            self._call(self._client.connect())
        except BaseException:
            self._stop_loop()
            raise

    def close(self) -> None:
        if self._thread.is_alive():
            try:
                self._call(self._client.close())
            finally:
                self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def register_voice(self, audio: AudioSource, emo_audio: AudioSource | None = None) -> str:
        return self._call(self._client.register_voice(audio, emo_audio))

    def list_voices(self) -> tuple[str, ...]:
        return self._call(self._client.list_voices())

    def delete_voice(self, voice: str) -> None:
        self._call(self._client.delete_voice(voice))

    def synthesize(self, text: str, *, voice: str, incremental: bool = False, **options: Any) -> SyncSynthesis:
        # Built on the loop thread: Synthesis owns an asyncio.Queue bound to that loop.
        async def make() -> Synthesis:
            return self._client.synthesize(text, voice=voice, incremental=incremental, **options)

        return SyncSynthesis(self, self._call(make()))

    def ping(self) -> None:
        self._call(self._client.ping())


__all__ = [
    "Client", "SyncClient", "Synthesis", "SyncSynthesis", "synthesize", "Event", "DEFAULT_URL",
    "ClientError", "ConnectError", "ConnectionLost", "ServerError", "ERRORS", "error_from",
    "BadFrame", "BadMessage", "UnknownType", "TooLarge", "BadText", "TextTooLong", "BadAudio",
    "AudioTooLong", "UnknownVoice", "Busy", "Cancelled", "SlowConsumer", "Unauthorized", "Internal",
    "ShuttingDown",
]
