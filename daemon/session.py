"""The WebSocket adapter: the listener, and per connection its live requests, its outbound queue,
and the reader and writer tasks.

The reader decodes client frames and turns each `synthesize` into a RequestRun (core.py: limits,
admission, seed, metrics, logging); it never waits on the model. The writer sends the outbound
queue in order and tells each request's run what reached the socket: its audio (first-audio time)
and, after each segment's last frame, the segment (its credit goes back to the worker).

Memory per connection is bounded in bytes. The queue holds at most SEGMENT_CREDITS segments per
live request plus a backlog of other replies: once those hold more than MAX_CONTROL_BACKLOG_BYTES
unsent, the reader stops reading, so a client that sends without reading is throttled by TCP
instead of growing server memory. Error text is capped (protocol.MAX_ERROR_CHARS) and client
strings are quoted short, in replies and in log lines alike.

Any `TtsdError` or `ProtocolError` becomes an `Error` message and the connection stays open; an
unexpected exception ends only the request it came from, with code `internal`. An error names a
request id only when it ends that request (protocol.error_id). A request cancelled as a slow
consumer ends every request of its connection with `slow_consumer` and closes the connection with
1008, since a client that left its audio unread for stall_timeout_s has stopped reading altogether.

Closing never waits on the client without a bound: a peer that does not take its close frame within
CLOSE_TIMEOUT_S has its transport aborted."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ttsd.api import protocol as p
from ttsd.api.errors import BadAudio, Busy, TextTooLong, TtsdError, UnknownVoice
from ttsd.api.options import SynthesisOptions

from .core import Core, Interface, RequestRun, limit_send_buffer, peer_name
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import DISCONNECTED, OK
from .worker import VoiceResult, Worker

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger(__name__)

AUDIO_FRAME_SAMPLES: Final = 5_512   # ≈ 0.25 s (11 KiB) per Audio frame: a jitter buffer can start early
# Unsent bytes of replies outside the credit-bounded segments (pong, error, voice_registered,
# hello) before the reader pauses: ~100 capped errors or ~4000 pongs.
MAX_CONTROL_BACKLOG_BYTES: Final = 64 * 1024
FLUSH_ON_CLOSE_S: Final = 5.0        # before a close: time to send what is queued
CLOSE_TIMEOUT_S: Final = 5.0         # then the peer must take the close frame, else the transport is aborted
CLOSE_SLOW_CONSUMER: Final = 1008    # policy violation: the client stopped reading its audio
REGISTRATION_SHARE: Final = 4        # one connection may hold 1/4 of the voice-registration queue
LOGGED_BAD_FRAMES: Final = 10        # bad frames per connection logged at INFO; later ones at DEBUG
SERVER_NAME: Final = "ttsd/0.1"
CLOSE_GOING_AWAY: Final = 1001
# Client frames buffered per connection before reading pauses (TCP then pushes back). websockets
# counts frames, not bytes, and one frame may be max_frame_bytes, so reading pauses as soon as one
# complete frame waits: with the one the reader handles, a connection holds about
# 2 × max_frame_bytes of input at most.
MAX_QUEUE_FRAMES: Final = 0
WRITE_LIMIT_BYTES: Final = 64 * 1024  # per-connection write buffer high-water mark; send() waits above it
PING_INTERVAL_S: Final = 20.0         # keepalive: a peer that stops answering is dropped ...
PING_TIMEOUT_S: Final = 20.0          # ... this long after an unanswered ping
# "request done" when every segment was sent, "request ended" otherwise, as the WebSocket always logged.
WEBSOCKET: Final = Interface("websocket", "", done_word="done", ended_word="ended")



@dataclass(eq=False, slots=True)
class _Outgoing:
    frame: bytes | None                     # None: built by `build` when it is sent (Done timings)
    request: LiveRequest | None = None
    build: Callable[[], bytes] | None = None
    audio_samples: int = 0                  # > 0 for Audio frames
    segment_s: float | None = None          # the last frame of a segment (its seconds of audio): credit back

    @property
    def backlog_bytes(self) -> int:
        """Bytes this reply adds to the control backlog: frames of no live request's segments."""
        return len(self.frame) if self.request is None and self.frame is not None else 0


class LiveRequest:
    """A synthesis request between its Synthesize and its Done/Error: the worker's JobSink, turning its
    segments into frames in the connection's outbox. Its RequestRun (core.py) keeps the books."""

    def __init__(self, session: Session, request_id: int, run: RequestRun) -> None:
        self.session = session
        self.id = request_id
        self.run = run
        self.seq = 0
        self.segment_bytes = 0  # PCM bytes of the segment being sent (all its pieces)
        self.finished = False

    @property
    def awaiting_text(self) -> bool:
        return not self.run.input_closed

    # JobSink: called on the loop thread by the worker's call_soon_threadsafe.

    def on_segment(self, index: int, text: str, pcm: bytes, first: bool = True, last: bool = True) -> None:
        if self.finished:
            return  # cancelled after the worker produced it
        s = self.session
        if first:
            self.segment_bytes = 0
            s.enqueue(_Outgoing(p.encode(p.SegmentStart(id=self.id, index=index, text=text)), self))
        step = 2 * AUDIO_FRAME_SAMPLES
        for start in range(0, len(pcm), step):
            chunk = pcm[start : start + step]
            frame = p.encode(p.Audio(id=self.id, seq=self.seq, pcm=chunk))
            s.enqueue(_Outgoing(frame, self, audio_samples=len(chunk) // 2))
            self.seq += 1
        self.segment_bytes += len(pcm)
        if not last:
            return  # a chunked segment: more pieces of it follow, then its segment_end
        audio_s = self.segment_bytes / 2 / p.SAMPLE_RATE_HZ
        end = p.SegmentEnd(id=self.id, index=index, audio_s=audio_s)
        s.enqueue(_Outgoing(p.encode(end), self, segment_s=audio_s))

    def on_done(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.session.forget(self)
        self.session.enqueue(_Outgoing(None, self, build=self._done_frame))

    def on_error(self, code: str, message: str) -> None:
        if self.finished:
            return  # ended here first (e.g. the client's cancel crossed the worker's stop)
        if code == p.ErrorCode.SLOW_CONSUMER:
            self.session.slow_consumer(self, message)
        else:
            self.fail(code, message)

    def fail(self, code: str, message: str) -> None:
        """End the request now with an Error; its unsent audio is dropped and its job cancelled silently
        (the Error below is the one reply, whatever the worker is doing)."""
        if self.finished:
            return
        self.finished = True
        s = self.session
        s.forget(self)
        s.purge(self)
        self.run.end(code)
        s.enqueue(_Outgoing(p.encode(p.Error(id=self.id, code=code, message=p.clip(message)))))

    def _done_frame(self) -> bytes:
        # Built when it is sent, so first_audio_ms and total_ms are what the client experienced.
        run = self.run
        run.end(OK)
        assert run.total_s is not None  # set by end()
        audio_s = run.audio_s
        first_ms = None if run.first_audio_s is None else run.first_audio_s * 1000
        done = p.Done(
            id=self.id, segments=run.segments, first_audio_ms=first_ms, total_ms=run.total_s * 1000,
            audio_s=audio_s, rtf=run.total_s / audio_s if audio_s > 0 else None,
        )
        return p.encode(done)


def synthesis_options(msg: p.Synthesize) -> SynthesisOptions:
    """Protocol fields → SynthesisOptions; an option left unset keeps the upstream default."""
    # Checked by the decoder with the validator SynthesisOptions applies; against the model and the
    # server's limits by the worker.
    values: dict[str, Any] = dict(msg.options)
    return SynthesisOptions(**values)


class Session:
    def __init__(self, ws: ServerConnection, core: Core) -> None:
        self.ws = ws
        self.core = core
        self.worker = core.worker
        self.config = core.config
        self.peer = peer_name(ws.remote_address)
        self.requests: dict[int, LiveRequest] = {}
        self.registrations: set[int] = set()  # ids of this connection's voice registrations in flight
        self._outbox: deque[_Outgoing] = deque()
        self.backlog_bytes = 0               # unsent bytes of replies counted by _Outgoing.backlog_bytes
        self._wakeup = asyncio.Event()       # the writer has something to send (or must stop)
        self._room = asyncio.Event()         # the reader may read (control backlog below the limit)
        self._room.set()
        self._flushed = asyncio.Event()      # the outbox is empty
        self._flushed.set()
        self._closing = False
        self._tasks: asyncio.TaskGroup | None = None   # reader, writer and a close begun by the session
        self._close_begun = False
        self._bad_frames = 0

    @property
    def reading(self) -> bool:
        """False while the reader is paused on a full control backlog."""
        return self._room.is_set()

    @property
    def unsent_bytes(self) -> int:
        """Bytes of the frames queued and not yet handed to the socket (a Done is built when sent)."""
        return sum(len(item.frame) for item in self._outbox if item.frame is not None)

    @property
    def max_registrations(self) -> int:
        """Voice registrations one connection may have in flight (the rest get `busy`)."""
        return max(1, self.config.max_queued_requests // REGISTRATION_SHARE)

    async def run(self) -> None:
        log.info("connection open peer=%s", self.peer)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tasks = tg
                tg.create_task(self.read_requests())
                tg.create_task(self.write_replies())
        finally:
            self._tasks = None
            self._closing = True
            # Disconnect: stop every request at its next decode step, silently (nobody to tell).
            for req in list(self.requests.values()):
                req.finished = True
                req.run.end(DISCONNECTED)
            self.requests.clear()
            self._outbox.clear()
            self.backlog_bytes = 0
            # Normally closed by now. If a bug ended the tasks with the socket open, close it here,
            # bounded: websockets' own close after the handler returns would wait on an unread peer.
            await self._close_ws(1011, "internal error")
            log.info(
                "connection closed peer=%s code=%s bad_frames=%d", self.peer, self.ws.close_code, self._bad_frames
            )

    async def close(self, code: int, reason: str) -> None:
        """Send what is queued (at most FLUSH_ON_CLOSE_S), then close the WebSocket (at most
        CLOSE_TIMEOUT_S more, then the transport is aborted). Returns within about their sum."""
        try:
            async with asyncio.timeout(FLUSH_ON_CLOSE_S):
                await self._flushed.wait()
        except TimeoutError:
            log.info("close without flushing peer=%s unsent_frames=%d", self.peer, len(self._outbox))
        await self._close_ws(code, reason)

    async def _close_ws(self, code: int, reason: str) -> None:
        # ws.close() waits, without a timeout, for the close frame to leave the write buffer: a
        # client that stopped reading would hold it (and a SIGTERM) forever.
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self.ws.close(code, reason)
        except TimeoutError:
            log.info("close not taken, aborting peer=%s close_timeout_s=%g", self.peer, CLOSE_TIMEOUT_S)
            self.ws.transport.abort()

    def _close_soon(self, code: int, reason: str) -> None:
        """Begin `close` in the background (once), while the reader and writer carry on."""
        if self._close_begun or self._tasks is None or self._closing:
            return
        self._close_begun = True
        log.info("connection closing peer=%s code=%d reason=%r", self.peer, code, reason)
        self._tasks.create_task(self.close(code, reason))

    def slow_consumer(self, req: LiveRequest, message: str) -> None:
        """The worker cancelled `req` for audio left unread: the client has stopped reading this
        connection, so every request on it ends with slow_consumer and the connection is closed."""
        req.fail(p.ErrorCode.SLOW_CONSUMER, message)
        for other in list(self.requests.values()):
            other.fail(p.ErrorCode.SLOW_CONSUMER, message)
        self._close_soon(CLOSE_SLOW_CONSUMER, "slow consumer: audio left unread for stall_timeout_s")

    # ---------------------------------------------------------------------------------------
    # Outbound

    def enqueue(self, item: _Outgoing) -> None:
        if self._closing:
            return
        self._outbox.append(item)
        self.backlog_bytes += item.backlog_bytes
        if self.backlog_bytes > MAX_CONTROL_BACKLOG_BYTES:
            self._room.clear()
        self._flushed.clear()
        self._wakeup.set()

    def send(self, msg: p.ServerMessage) -> None:
        self.enqueue(_Outgoing(p.encode(msg)))

    def purge(self, req: LiveRequest) -> None:
        """Drop a finished request's unsent frames (its credits no longer matter)."""
        self._outbox = deque(item for item in self._outbox if item.request is not req)
        if not self._outbox:
            self._flushed.set()

    def forget(self, req: LiveRequest) -> None:
        if self.requests.get(req.id) is req:
            del self.requests[req.id]

    async def write_replies(self) -> None:
        try:
            while True:
                while not self._outbox:
                    self._flushed.set()
                    if self._closing:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                item = self._outbox.popleft()
                if item.backlog_bytes:
                    self.backlog_bytes -= item.backlog_bytes
                    if self.backlog_bytes <= MAX_CONTROL_BACKLOG_BYTES // 2:
                        self._room.set()
                frame = item.frame if item.frame is not None else item.build() if item.build else b""
                await self.ws.send(frame)
                req = item.request
                if req is not None:
                    if item.audio_samples:
                        req.run.audio_sent(item.audio_samples)
                    if item.segment_s is not None:
                        req.run.segment_sent(item.segment_s)
        except ConnectionClosed:
            pass
        finally:
            self._closing = True
            self._room.set()
            self._flushed.set()

    # ---------------------------------------------------------------------------------------
    # Inbound

    async def read_requests(self) -> None:
        try:
            while not self._closing:
                await self._room.wait()
                try:
                    async with asyncio.timeout(self.config.idle_timeout_s):
                        # A text frame arrives as str (refused with bad_frame); one that is not valid
                        # UTF-8 breaks WebSocket itself and websockets closes with 1007 (RFC 6455 8.1).
                        frame = await self.ws.recv()
                except TimeoutError:
                    if any(not r.awaiting_text for r in self.requests.values()):
                        continue  # audio is still being produced for this client
                    log.info("idle timeout peer=%s idle_timeout_s=%g", self.peer, self.config.idle_timeout_s)
                    await self._close_ws(1000, "idle timeout")
                    return
                self.handle(frame)
                size = len(frame)
                del frame  # unbound while the next recv waits, so the heap trim can return its pages
                self.core.took_input(size)
        except ConnectionClosed:
            pass
        finally:
            self._closing = True
            self._wakeup.set()

    def handle(self, frame: bytes | str) -> None:
        """One client frame → replies and worker calls. Never raises for bad input."""
        try:
            msg = p.decode_client(frame)
        except p.ProtocolError as e:
            self._bad_frames += 1
            # One line per bad frame for the first few; a client sending garbage in a loop must
            # not flood the journal (the close line gives the total).
            level = logging.INFO if self._bad_frames <= LOGGED_BAD_FRAMES else logging.DEBUG
            log.log(level, "bad frame peer=%s code=%s detail=%r", self.peer, e.code, e.detail)
            self.send(p.error_of(e, self._live_ids()))
            return
        request_id: int | None = getattr(msg, "id", None)
        try:
            self._dispatch(msg)
        except (p.ProtocolError, TtsdError) as e:
            detail = e.detail if isinstance(e, p.ProtocolError) else p.clip(str(e))
            if isinstance(msg, p.Synthesize) and request_id not in self.requests:
                # A synthesis request that never began: the core counts and logs it.
                run = self.core.run(WEBSOCKET, self.peer, f"id={request_id} ")
                run.refuse(e.code, detail, f"type={msg.TYPE} ")
            else:
                log.info(
                    "request rejected peer=%s type=%s id=%s code=%s error=%r", self.peer, msg.TYPE, request_id,
                    e.code, detail,
                )
            self._refuse(msg.TYPE, request_id, e.code, detail)
        except Exception as e:
            log.exception("request failed peer=%s type=%s id=%s", self.peer, msg.TYPE, request_id)
            detail = f"internal error: {type(e).__name__}"
            req = self.requests.get(request_id) if request_id is not None else None
            if req is not None:
                req.fail(p.ErrorCode.INTERNAL, detail)
            else:
                self._refuse(msg.TYPE, request_id, p.ErrorCode.INTERNAL, detail)

    def _live_ids(self) -> set[int]:
        return self.requests.keys() | self.registrations

    def _refuse(self, kind: str, request_id: int | None, code: str, detail: str) -> None:
        """The Error for a refused frame, naming its id only when that ends the request (error_id)."""
        wire_id = p.error_id(kind, request_id, self._live_ids())
        self.send(p.Error(id=wire_id, code=code, message=p.clip(detail)))

    def _dispatch(self, msg: p.ClientMessage) -> None:
        match msg:
            case p.Hello():
                self._hello(msg)
            case p.RegisterVoice():
                self._register_voice(msg)
            case p.Synthesize():
                self._synthesize(msg)
            case p.AppendText():
                self._append_text(msg)
            case p.Flush():
                self._flush(msg)
            case p.Cancel():
                req = self.requests.get(msg.id)
                # Cancelling a finished or unknown id is a no-op: it races with Done by nature.
                if req is not None:
                    req.fail(p.ErrorCode.CANCELLED, "cancelled by the client")
            case p.Ping():
                self.send(p.Pong(nonce=msg.nonce))
            case p.ListVoices() | p.DeleteVoice():
                self._check_new_id(msg.id)
                self.send(voice_library_reply(self.worker, msg))

    def _hello(self, msg: p.Hello) -> None:
        if msg.version != p.PROTOCOL_VERSION:
            raise p.ProtocolError(
                p.ErrorCode.BAD_MESSAGE,
                f"protocol version {msg.version} is not supported; this server speaks {p.PROTOCOL_VERSION}",
            )
        log.info("hello peer=%s client=%s", self.peer, p.quote(msg.client))
        c = self.config
        self.send(
            p.ServerHello(
                version=p.PROTOCOL_VERSION, server=SERVER_NAME, sample_rate_hz=p.SAMPLE_RATE_HZ,
                max_frame_bytes=c.max_frame_bytes, max_text_chars=c.max_text_chars,
                max_reference_audio_s=c.max_reference_audio_s, max_voices=c.max_voices,
                max_concurrent_requests=c.max_concurrent_requests, max_queued_requests=c.max_queued_requests,
                model=f"IndexTTS-{self.worker.pipeline.version}", languages=self.worker.pipeline.languages,
            )
        )

    def _check_new_id(self, request_id: int) -> None:
        if request_id in self.requests or request_id in self.registrations:
            # The Error carries nil (error_id): the live request with this id goes on.
            raise p.ProtocolError(p.ErrorCode.BAD_MESSAGE, f"request id {request_id} is already in use", request_id)

    def _register_voice(self, msg: p.RegisterVoice) -> None:
        self._check_new_id(msg.id)
        if len(self.registrations) >= self.max_registrations:
            # One connection must not fill the daemon-wide registration queue.
            raise Busy(f"this connection already has {self.max_registrations} voice registrations in flight")
        if not msg.audio:
            raise BadAudio("speaker reference audio is empty")
        if msg.emo_audio is not None and not msg.emo_audio:
            raise BadAudio("emotion reference audio is empty")

        def done(result: VoiceResult | TtsdError) -> None:
            self.registrations.discard(msg.id)
            if isinstance(result, VoiceResult):
                self.send(p.VoiceRegistered(id=msg.id, voice=result.voice_id, audio_s=result.audio_s))
            else:
                message = p.clip(str(result))
                log.info("voice rejected peer=%s id=%d code=%s error=%r", self.peer, msg.id, result.code, message)
                self.send(p.Error(id=msg.id, code=result.code, message=message))

        self.worker.register_voice(msg.audio, msg.emo_audio, done)  # Busy / ShuttingDown propagate
        self.registrations.add(msg.id)

    def _synthesize(self, msg: p.Synthesize) -> None:
        self._check_new_id(msg.id)
        if len(self.requests) >= self.config.max_requests_per_connection:
            # One connection must not take every slot and the whole queue from everyone else.
            limit = self.config.max_requests_per_connection
            raise Busy(f"this connection already has {limit} live requests (max_requests_per_connection)")
        run = self.core.run(WEBSOCKET, self.peer, f"id={msg.id} ")
        run.check_text(msg.text, allow_empty=msg.incremental)
        # The decoder checked the ranges; what depends on the model and server (beams, segment size)
        # is checked on the worker.
        opts = synthesis_options(msg)
        voice = self.worker.voice(msg.voice)
        emo_voice = None if msg.emo_voice is None else self.worker.voice(msg.emo_voice)
        req = LiveRequest(self, msg.id, run)
        run.submit(req, voice, opts, msg.text, emo_voice=emo_voice, incremental=msg.incremental,
                   detail=f" incremental={msg.incremental}")
        self.requests[msg.id] = req

    def _incremental(self, request_id: int, what: str) -> LiveRequest:
        req = self.requests.get(request_id)
        if req is None or req.run.input_closed:
            # The Error carries nil (error_id): a request with this id, if live, goes on.
            detail = f"{what}: no incremental request with id {request_id} awaits text"
            raise p.ProtocolError(p.ErrorCode.BAD_MESSAGE, detail, request_id)
        return req

    def _append_text(self, msg: p.AppendText) -> None:
        req = self._incremental(msg.id, "append_text")
        try:
            req.run.add_text(msg.text)
        except TextTooLong as e:
            req.fail(e.code, str(e))

    def _flush(self, msg: p.Flush) -> None:
        self._incremental(msg.id, "flush").run.close_input()


def voice_library_reply(worker: Worker, msg: p.ListVoices | p.DeleteVoice) -> p.VoiceList | p.VoiceDeleted:
    """The answer to a voice listing or deletion (UnknownVoice when there is nothing to delete)."""
    if isinstance(msg, p.ListVoices):
        ids = [v.voice_id for v in worker.list_voices()]
        return p.VoiceList(id=msg.id, voices=tuple(ids[: p.MAX_LISTED_VOICES]), total=len(ids))
    if not worker.delete_voice(msg.voice):
        raise UnknownVoice(f"voice {p.quote(msg.voice)} is not registered")
    return p.VoiceDeleted(id=msg.id, voice=msg.voice)


class WebSocketListener:
    """The WebSocket port: the handshake (with /healthz and /metrics answered before it), then one
    Session per connection."""

    interface: Final = WEBSOCKET.name

    def __init__(self, server: Server) -> None:
        self.server = server
        self.sessions: set[Session] = set()
        self._ws: WsServer | None = None

    async def start(self) -> None:
        c = self.server.config
        self._ws = await ws_serve(
            self._handle,
            c.host,
            c.port,
            process_request=self._process_request,
            compression=None,                 # PCM does not deflate; deflate costs CPU per frame
            max_size=c.max_frame_bytes,       # larger frames close the connection with 1009
            max_queue=MAX_QUEUE_FRAMES,
            write_limit=WRITE_LIMIT_BYTES,
            ping_interval=PING_INTERVAL_S,
            ping_timeout=PING_TIMEOUT_S,
            close_timeout=CLOSE_TIMEOUT_S,
            server_header=SERVER_NAME,
        )

    @property
    def address(self) -> tuple[str, int]:
        if self._ws is None:
            raise RuntimeError("server not started")
        name = next(iter(self._ws.sockets)).getsockname()
        return str(name[0]), int(name[1])

    @property
    def url(self) -> str:
        host, port = self.address
        host = f"[{host}]" if ":" in host else host
        return f"ws://{host}:{port}"

    @property
    def connections(self) -> int:
        return len(self.sessions)

    async def _handle(self, ws: ServerConnection) -> None:
        limit_send_buffer(ws.transport.get_extra_info("socket"))
        session = Session(ws, self.server.core)
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        server = self.server
        path = urlsplit(request.path).path
        if path == "/healthz":
            return connection.respond(*server.health())
        token = server.config.token
        if token is not None:
            scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
            # compare_digest: the time taken must not reveal how much of the token matched.
            if scheme.lower() != "bearer" or not hmac.compare_digest(credential.strip().encode(), token.encode()):
                # No path or headers in the log: a client may have put its token in the URL.
                log.info("unauthorized peer=%s", peer_name(connection.remote_address))
                response = connection.respond(
                    HTTPStatus.UNAUTHORIZED, f"{p.ErrorCode.UNAUTHORIZED}: missing or wrong bearer token\n"
                )
                response.headers["WWW-Authenticate"] = 'Bearer realm="ttsd"'
                return response
        if path == "/metrics":
            response = connection.respond(HTTPStatus.OK, server.metrics.render().decode())
            del response.headers["Content-Type"]  # websockets' Headers append on assignment
            response.headers["Content-Type"] = METRICS_CONTENT_TYPE
            return response
        if server.draining:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, f"{p.ErrorCode.SHUTTING_DOWN}\n")
        return None

    async def close(self) -> None:
        """Close every session with 1001 (each bounded: Session.close), then the listener; connections
        that still have not closed CLOSE_TIMEOUT_S later are aborted."""
        ws = self._ws
        if ws is None:
            return
        # A handshake that began before the drain may turn into a session while the first ones
        # close: the loop closes those too.
        closed: set[Session] = set()
        while pending := self.sessions - closed:
            closed |= pending
            await asyncio.gather(*(s.close(CLOSE_GOING_AWAY, "server shutting down") for s in pending))
        ws.close(close_connections=False)
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await ws.wait_closed()
        except TimeoutError:
            left = list(ws.connections)
            log.warning("shutdown: aborting connections=%d that did not close", len(left))
            for connection in left:
                connection.transport.abort()
