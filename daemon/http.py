"""The OpenAI-compatible HTTP API (aiohttp) on `http_port`, beside the WebSocket port: the same
worker, voices, limits and bearer token. docs/interfaces.md is the client's view.

    POST /v1/audio/speech   OpenAI's body → audio streamed back as each segment finishes
    GET  /v1/models         the model names accepted in `model`
    GET  /v1/audio/voices   the voice presets and the registered voices (the voice library)
    POST /v1/audio/voices   register a voice: the reference file as the body, or multipart
                            fields `audio` (and `emo_audio`) → {"voice_id", "audio_s"}
    DELETE /v1/audio/voices/{voice_id}   remove a registered voice (from the library too)
    GET  /metrics           Prometheus text format (daemon/metrics.py)
    GET  /healthz           200 ok, 503 while draining or after a device fault (no token needed)

A speech request is one RequestRun (daemon/core.py: limits, admission, seed, credits, first-audio
time, metrics, the log lines); this file only translates. The response headers wait for the first segment, so a
request that fails before any audio (text that normalises to nothing, say) still gets its JSON
error and status; afterwards it is chunked transfer of the encoded audio, one write per segment,
and the worker's credit for a segment is returned once its bytes are written. A client that stops
reading parks its job as on the WebSocket, and after stall_timeout_s the connection is dropped (an
HTTP body cannot carry an error once it has begun, so every failure after the headers aborts the
connection and the client sees a truncated chunked body). A client that disconnects cancels its
job (aiohttp cancels the handler).

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with `code` a ttsd
ErrorCode (or `model_not_found`, `unsupported`): 400 bad input, 401 no or wrong token, 404 unknown
path or model, 405 wrong method, 413 body too large, 429 busy (with Retry-After), 503 draining,
500 a server bug."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Final

from aiohttp import BodyPartReader, web

from ttsd.api import protocol as p
from ttsd.api.errors import Busy, ShuttingDown, TtsdError, UnknownVoice

from . import encoding
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
from .metrics import CONTENT_TYPE, DISCONNECTED, OK
from .session import CLOSE_TIMEOUT_S, SERVER_NAME
from .worker import VoiceResult

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger(__name__)

HTTP: Final = Interface("http", "http ")
# Model names accepted in `model`: ours, and OpenAI's speech models so that clients with those
# names built in work unchanged. All of them are the loaded IndexTTS-2 with the same defaults.
MODEL: Final = "indextts-2"
MODELS: Final = (MODEL, "tts-1", "tts-1-hd", "gpt-4o-mini-tts")
SPEED_RANGE: Final = (0.5, 2.0)  # OpenAI `speed` → IndexTTS-2.5 duration_factor = 1/speed, within its [0.5, 2]
SPEECH_FIELDS: Final = ("model", "input", "voice", "response_format", "speed", "instructions", "stream_format")
DEFAULT_FORMAT: Final = "mp3"           # OpenAI's default response_format
RETRY_AFTER_S: Final = 1                # Retry-After on 429
UPLOAD_FIELDS: Final = ("audio", "emo_audio")   # multipart fields of POST /v1/audio/voices
UPLOAD_CHUNK_BYTES: Final = 256 * 1024
_TYPES: Final = {
    400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
    405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
    503: "server_error",
}
_STATUS: Final = {  # ErrorCode → HTTP status of a request refused or failed before its audio began
    p.ErrorCode.BUSY: 429, p.ErrorCode.SHUTTING_DOWN: 503, p.ErrorCode.INTERNAL: 500,
}


class ApiError(Exception):
    """An error reply: status, ttsd or OpenAI-style code, message, and the field to blame."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, p.clip(message), param

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status == 429 else None
        if self.status == 401:
            headers = {"WWW-Authenticate": 'Bearer realm="ttsd"'}
        return web.json_response(body, status=self.status, headers=headers)


def _from_ttsd(e: TtsdError, param: str | None = None) -> ApiError:
    return ApiError(_STATUS.get(e.code, 400), e.code, str(e), param)


class HttpApi:
    """The aiohttp application and its listener (a core.Listener); `start` binds, `close` ends it (bounded)."""

    interface: Final = HTTP.name

    def __init__(self, server: Server) -> None:
        self.server = server
        c = server.config
        self.max_body_bytes = c.max_text_chars * 6 + BODY_OVERHEAD_BYTES
        self.app = web.Application(middlewares=[self._errors], client_max_size=self.max_body_bytes)  # larger: 413
        self.app.router.add_post("/v1/audio/speech", self.speech)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/v1/models/{model}", self.model)
        self.app.router.add_get("/v1/audio/voices", self.voices)
        self.app.router.add_post("/v1/audio/voices", self.register_voice)
        self.app.router.add_delete("/v1/audio/voices/{voice_id}", self.delete_voice)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_get("/healthz", self.healthz)
        # handler_cancellation: a client that disconnects cancels its handler, and so its job.
        self.runner = web.AppRunner(
            self.app, access_log=None, handler_cancellation=True, shutdown_timeout=CLOSE_TIMEOUT_S,
            keepalive_timeout=c.idle_timeout_s,
        )
        self._site: web.TCPSite | None = None

    async def start(self) -> None:
        await self.runner.setup()
        self._site = web.TCPSite(self.runner, self.server.config.host, self.server.config.http_port)
        try:
            await self._site.start()
        except BaseException:
            await self.runner.cleanup()
            raise

    @property
    def url(self) -> str:
        addresses = self.runner.addresses  # the listening sockets' names (port 0 resolved)
        if not addresses:
            raise RuntimeError("HTTP API not started")
        host, port = addresses[0][:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    @property
    def connections(self) -> int:
        server = self.runner.server
        return 0 if server is None else len(server.connections)

    async def close(self) -> None:
        """Stop listening and close every connection; in-flight handlers get CLOSE_TIMEOUT_S."""
        await self.runner.cleanup()

    # -------------------------------------------------------------------------------------------
    # Middleware: the token, and every error in OpenAI's shape

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            if request.path != "/healthz":
                self._check_token(request)
            return await handler(request)
        except ApiError as e:
            return e.response()
        except web.HTTPRequestEntityTooLarge:
            limit = self.max_body_bytes
            return ApiError(413, p.ErrorCode.TOO_LARGE, f"the request body is larger than {limit} bytes").response()
        except web.HTTPException as e:
            if e.status < 400:
                raise
            status = HTTPStatus(e.status)
            return ApiError(e.status, status.phrase.lower().replace(" ", "_"),
                            f"{request.method} {p.quote(request.path)}: {status.phrase}").response()
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as e:
            log.exception("http request failed method=%s path=%s", request.method, p.quote(request.path))
            return ApiError(500, p.ErrorCode.INTERNAL, f"internal error: {type(e).__name__}").response()

    def _check_token(self, request: web.Request) -> None:
        token = self.server.config.token
        if token is None:
            return
        scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
        # compare_digest: the time taken must not reveal how much of the token matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(credential.strip().encode(), token.encode()):
            log.info("unauthorized interface=http peer=%s", _peer(request))
            raise ApiError(401, p.ErrorCode.UNAUTHORIZED, "missing or wrong bearer token (Authorization: Bearer ...)")

    # -------------------------------------------------------------------------------------------
    # Small endpoints

    async def healthz(self, request: web.Request) -> web.Response:
        status, text = self.server.health()
        return web.Response(status=status, text=text)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.server.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [_model(name) for name in MODELS]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in MODELS:
            raise _model_not_found(name)
        return web.json_response(_model(name))

    async def voices(self, request: web.Request) -> web.Response:
        presets = self.server.presets
        return web.json_response({
            "voices": [
                {"id": pr.name, "name": pr.name, "voice_id": pr.voice_id, "audio_s": round(pr.audio_s, 3)}
                for pr in (presets.by_name[name] for name in presets.names)
            ],
            "registered": self._registered(),
        })

    # -------------------------------------------------------------------------------------------
    # The voice library: POST registers a voice, DELETE removes one (GET above lists them)

    def _registered(self) -> list[dict[str, object]]:
        worker = self.server.worker
        if worker is None:
            return []
        return [{"voice_id": v.voice_id, "stored": v.stored, "size_bytes": v.size_bytes, "last_used": v.last_used}
                for v in worker.list_voices()]

    async def register_voice(self, request: web.Request) -> web.Response:
        worker = self.server.worker
        if self.server.draining or worker is None:
            raise ApiError(503, p.ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
        audio, emo_audio = await _voice_upload(request, self.server.config.max_frame_bytes)
        done: asyncio.Future[VoiceResult | TtsdError] = asyncio.get_running_loop().create_future()

        def finish(result: VoiceResult | TtsdError) -> None:
            if not done.done():  # a client that went away cancelled the handler and this future
                done.set_result(result)

        size = len(audio) + len(emo_audio or b"")
        try:
            worker.register_voice(audio, emo_audio, finish)
        except TtsdError as e:
            raise _from_ttsd(e) from None
        finally:
            del audio, emo_audio  # the worker holds its own references while it needs them
        result = await done
        self.server.core.took_input(size)
        if isinstance(result, TtsdError):
            log.info("http voice rejected peer=%s code=%s error=%r", _peer(request), result.code, p.clip(str(result)))
            raise _from_ttsd(result, "audio")
        log.info("http voice registered peer=%s voice=%s", _peer(request), result.voice_id)
        return web.json_response({"voice_id": result.voice_id, "audio_s": round(result.audio_s, 3)})

    async def delete_voice(self, request: web.Request) -> web.Response:
        voice_id = request.match_info["voice_id"]
        worker = self.server.worker
        if worker is None or not worker.delete_voice(voice_id):
            raise ApiError(404, p.ErrorCode.UNKNOWN_VOICE, f"voice {p.quote(voice_id)} is not registered", "voice_id")
        return web.json_response({"voice_id": voice_id, "deleted": True})

    # -------------------------------------------------------------------------------------------
    # POST /v1/audio/speech

    async def speech(self, request: web.Request) -> web.StreamResponse:
        if self.server.draining:
            raise ApiError(503, p.ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
        run = self.server.core.run(HTTP, _peer(request))
        try:
            body = await self._start(request)
            try:
                run.check_text(body.text)
            except TtsdError as e:
                raise _from_ttsd(e, "input") from None
        except ApiError as e:
            run.refuse(e.code, e.message, f"status={e.status} ")
            raise
        return await _Speech(self, request, body, run).speak()

    async def _start(self, request: web.Request) -> _SpeechBody:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, an integer of 5000 digits
            raise ApiError(400, p.ErrorCode.BAD_MESSAGE, f"the body is not JSON: {p.clip(str(e), 120)}") from None
        if not isinstance(body, dict):
            raise ApiError(400, p.ErrorCode.BAD_MESSAGE, "the body must be a JSON object")
        return _parse_speech(body, self.server)


async def _read_limited(read: Callable[[int], Awaitable[bytes]], limit: int, what: str) -> bytes:
    """A body or multipart field of at most `limit` bytes (413 beyond; reference audio may be larger
    than the speech body limit, so the app-wide one does not apply here)."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await read(UPLOAD_CHUNK_BYTES):
        size += len(chunk)
        if size > limit:
            raise ApiError(413, p.ErrorCode.TOO_LARGE, f"{what} is larger than max_frame_bytes ({limit} bytes)", what)
        chunks.append(chunk)
    if not size:
        raise ApiError(400, p.ErrorCode.BAD_AUDIO, f"{what} is empty", what)
    return b"".join(chunks)


async def _voice_upload(request: web.Request, limit: int) -> tuple[bytes, bytes | None]:
    """POST /v1/audio/voices → (speaker audio, emotion audio or None)."""
    if request.content_type != "multipart/form-data":
        return await _read_limited(request.content.read, limit, "audio"), None
    fields: dict[str, bytes] = {}
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        name = getattr(part, "name", None)
        if not isinstance(part, BodyPartReader) or name not in UPLOAD_FIELDS or name in fields:
            raise ApiError(400, p.ErrorCode.BAD_MESSAGE, f"multipart fields are {' and '.join(UPLOAD_FIELDS)}, "
                           f"each once; got {p.quote(str(name))}")
        fields[name] = await _read_limited(part.read_chunk, limit, name)
    if "audio" not in fields:
        raise ApiError(400, p.ErrorCode.BAD_MESSAGE, "the multipart field 'audio' is required", "audio")
    return fields["audio"], fields.get("emo_audio")


def _model(name: str) -> dict[str, object]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "ttsd"}


def _model_not_found(name: str) -> ApiError:
    return ApiError(404, "model_not_found", f"the model {p.quote(name)} does not exist; try one of {', '.join(MODELS)}",
                    "model")


class _SpeechBody:
    def __init__(self, text: str, voice_name: str, response_format: str, options: dict[str, object]) -> None:
        self.text, self.voice_name, self.response_format, self.options = text, voice_name, response_format, options


def _parse_speech(body: dict[str, object], server: Server) -> _SpeechBody:
    """The translation of OpenAI's request: its fields checked one by one and mapped to ttsd's (speed
    to duration_factor); every other key must be a ttsd synthesis option (checked by options_from).
    The text's limits are the request core's (RequestRun.check_text)."""
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, p.ErrorCode.BAD_MESSAGE, "'model' is required and must be a string", "model")
    if model not in MODELS:
        raise _model_not_found(model)
    text = body.get("input")
    if not isinstance(text, str):
        raise ApiError(400, p.ErrorCode.BAD_MESSAGE, "'input' is required and must be a string", "input")
    voice = body.get("voice")
    if isinstance(voice, dict) and set(voice) == {"id"}:
        voice = voice["id"]  # OpenAI's custom-voice form {"id": "..."}
    if not isinstance(voice, str) or not voice:
        raise ApiError(400, p.ErrorCode.BAD_MESSAGE, "'voice' is required: a preset name or a voice id", "voice")
    fmt = body.get("response_format", DEFAULT_FORMAT)
    if fmt not in encoding.FORMATS:
        known = fmt in encoding.OPENAI_FORMATS
        raise ApiError(400, "unsupported" if known else p.ErrorCode.BAD_MESSAGE,
                       f"response_format {p.quote(str(fmt))} is not available here; use one of "
                       f"{', '.join(encoding.FORMATS)}", "response_format")
    raw_speed = body.get("speed", 1.0)
    if not isinstance(raw_speed, int | float) or isinstance(raw_speed, bool):
        raise ApiError(400, p.ErrorCode.BAD_MESSAGE, "'speed' must be a number", "speed")
    speed = float(raw_speed)
    options = {k: v for k, v in body.items() if k not in SPEECH_FIELDS}
    if speed != 1.0:
        if not server.pipeline.family.duration_control:
            raise ApiError(400, "unsupported", "speed other than 1.0 needs IndexTTS-2.5 (IndexTTS-2 has no duration "
                           "control)", "speed")
        if not SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]:
            raise ApiError(400, p.ErrorCode.BAD_MESSAGE, f"speed must be in [{SPEED_RANGE[0]:g}, {SPEED_RANGE[1]:g}]",
                           "speed")
        if "duration_factor" in options:
            raise ApiError(400, p.ErrorCode.BAD_MESSAGE, "give speed or duration_factor, not both", "speed")
        options["duration_factor"] = 1.0 / speed  # faster speech is a shorter duration
    if body.get("instructions", "") != "":  # OpenAI's "how to speak" is QwenEmotion's emotion text
        if "emo_text" in options:
            raise ApiError(400, p.ErrorCode.BAD_MESSAGE, "give instructions or emo_text, not both", "instructions")
        options["emo_text"] = body["instructions"]
    if body.get("stream_format", "audio") != "audio":
        raise ApiError(400, "unsupported", "only stream_format 'audio' is supported (no server-sent events)",
                       "stream_format")
    return _SpeechBody(text, voice, str(fmt), options)


class _Speech:
    """One POST /v1/audio/speech from admission to the end of its body."""

    def __init__(self, api: HttpApi, request: web.Request, body: _SpeechBody, run: RequestRun) -> None:
        self.api, self.request, self.body, self.run = api, request, body, run
        self.server = api.server
        self.response: web.StreamResponse | None = None
        self.stopped: str | None = None         # the worker's stop code, once it ended the job early

    async def speak(self) -> web.StreamResponse:
        server, worker = self.server, self.server.worker
        assert worker is not None  # the API starts after the worker
        try:
            voice, preset_options = server.presets.resolve(worker, self.body.voice_name)
        except UnknownVoice as e:
            raise self._rejected(_from_ttsd(e, "voice")) from None
        try:
            options = options_from({**preset_options, **self.body.options})
            emo_voice = None
            if options.emo_voice is not None:
                emo_voice = server.presets.resolve(worker, options.emo_voice)[0]
        except OptionError as e:
            raise self._rejected(ApiError(400, p.ErrorCode.BAD_MESSAGE, str(e), e.param)) from None
        except UnknownVoice as e:
            raise self._rejected(_from_ttsd(e, "emo_voice")) from None
        sink = QueueSink(on_stop=self._on_stop)
        try:
            self.run.submit(sink, voice, options.opts, self.body.text, emo_voice=emo_voice,
                            detail=f" voice={p.quote(self.body.voice_name)} format={self.body.response_format}")
        except (Busy, ShuttingDown) as e:
            raise self._rejected(_from_ttsd(e)) from None
        code = DISCONNECTED
        try:
            code = await self._stream(sink)
        finally:
            if code == DISCONNECTED and self.stopped is not None:
                code = self.stopped  # _on_stop dropped the connection, which cancelled this handler
            self.run.end(code)
        if self.response is None:
            raise AssertionError("_stream returns only once a response exists")
        return self.response

    def _rejected(self, e: ApiError) -> ApiError:
        self.run.refuse(e.code, e.message, f"status={e.status} ")
        return e

    def _on_stop(self, code: str) -> None:
        """The worker ended the job early. Once the body has begun nothing can say so but the
        connection itself; and a writer blocked on an unread socket (slow_consumer) only wakes up this way."""
        self.stopped = code
        if self.response is not None and self.response.prepared and self.request.transport is not None:
            log.info("http response aborted peer=%s code=%s", self.run.peer, code)
            self.request.transport.abort()

    async def _stream(self, sink: QueueSink) -> str:
        """Write the job's audio; returns the result code (OK, an ErrorCode, or DISCONNECTED)."""
        encoder = encoding.new_encoder(self.body.response_format)
        cheap = encoding.is_cheap(self.body.response_format)
        try:
            while True:
                item = await sink.queue.get()
                if isinstance(item, Ended):
                    if item.code is not None:
                        return self._failed(item)
                    tail = encoder.finish() if cheap else await asyncio.to_thread(encoder.finish)
                    response = await self._prepare()
                    if tail:
                        await response.write(tail)
                    await response.write_eof()
                    return OK
                assert isinstance(item, SegmentAudio)
                data = encoder.encode(item.pcm) if cheap else await asyncio.to_thread(encoder.encode, item.pcm)
                response = await self._prepare()
                if data:
                    await response.write(data)
                self.run.piece_sent(len(item.pcm) // 2, first=item.first, last=item.last)
        except ConnectionError:
            # Written to a connection the client closed, or that _on_stop aborted.
            return sink.stop_code()
        except asyncio.CancelledError:
            raise  # the client disconnected (handler_cancellation); speak() ends the request

    def _failed(self, item: Ended) -> str:
        code = item.code or p.ErrorCode.INTERNAL
        if self.response is None:
            # No byte sent yet: a proper error reply.
            status = _STATUS.get(code, 400)
            self.response = ApiError(status, code, item.message, "input" if code == p.ErrorCode.BAD_TEXT else None
                                     ).response()
        elif self.request.transport is not None:
            self.request.transport.abort()
        return code

    async def _prepare(self) -> web.StreamResponse:
        if self.response is not None:
            return self.response
        response = web.StreamResponse(
            status=200, headers={"Content-Type": encoding.CONTENT_TYPES[self.body.response_format],
                                 "Server": SERVER_NAME, "Cache-Control": "no-store"},
        )
        response.enable_chunked_encoding()
        self.response = response
        transport = self.request.transport
        limit_send_buffer(transport.get_extra_info("socket") if transport is not None else None)
        await response.prepare(self.request)
        return response


def _peer(request: web.Request) -> str:
    transport = request.transport
    return peer_name(transport.get_extra_info("peername") if transport is not None else None)
