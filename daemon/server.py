"""The daemon: a websockets server in front of one worker thread, with a staged shutdown.

`Server` is the embeddable part (tests run it on port 0 with an already loaded Pipeline); `serve`
is `ttsd serve`: load the weights, listen, tell systemd READY=1, and on SIGTERM or SIGINT

  1. stop accepting work, STOPPING=1: the listener stays open so that /healthz answers 503 (and
     new handshakes are refused with 503) until the process exits;
  2. give in-flight requests drain_timeout_s to finish, then cancel the rest (`shutting_down`),
     each stopping at its next decode step (at most CANCEL_GRACE_S);
  3. send what is queued (at most FLUSH_ON_CLOSE_S), close every connection with 1001 (going
     away; a client that does not take the close within CLOSE_TIMEOUT_S has its transport
     aborted), close the listener, join the worker (at most CANCEL_GRACE_S: a step wedged in the
     device is left behind), exit 0.

So a SIGTERM ends within drain_timeout_s + 2 × CANCEL_GRACE_S + FLUSH_ON_CLOSE_S + 2 × CLOSE_TIMEOUT_S
whatever clients do and whatever the device does (systemd's TimeoutStopSec must be larger).

A GET of /healthz on the same port is answered in `process_request`, before any WebSocket
handshake, so load balancers and systemd checks need no WebSocket client; so is /metrics
(Prometheus, daemon/metrics.py), behind the token like the WebSocket itself.

With `http_port` and `wyoming_port` the same process also serves the OpenAI-compatible HTTP API
(daemon/http.py) and Wyoming (daemon/wyoming.py), on the same worker, voices and limits; the
voice presets of `voices_dir` (daemon/presets.py) are registered before any port listens, and with
`voices_store` registered voices persist in a library shared with other daemons (daemon/voice_store.py). The
drain covers their requests too; their listeners close after the WebSocket connections."""

from __future__ import annotations

import asyncio
import hmac
import importlib.util
import logging
import signal
import socket
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.http11 import Request, Response

from ttsd.api.errors import ConfigError
from ttsd.api.protocol import ErrorCode

from . import systemd
from .config import is_loopback
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import GpuMemory, Metrics
from .presets import Presets, load_presets
from .session import CLOSE_TIMEOUT_S, SERVER_NAME, Session
from .voice_store import VoiceStore, model_key
from .worker import VoiceCache, Worker, WorkerObserver

if TYPE_CHECKING:
    import torch

    from ttsd.pipeline.pipeline import Pipeline

    from .config import DaemonConfig
    from .http import HttpApi
    from .wyoming import WyomingServer

log = logging.getLogger(__name__)

# Client frames buffered per connection before reading pauses (TCP then pushes back). websockets
# counts frames, not bytes, and one frame may be max_frame_bytes, so reading pauses as soon as one
# complete frame waits: with the one the reader handles, a connection holds about
# 2 × max_frame_bytes of input at most.
MAX_QUEUE_FRAMES: Final = 0
WRITE_LIMIT_BYTES: Final = 64 * 1024  # per-connection write buffer high-water mark; send() waits above it
# Kernel send buffer per connection. Linux autotunes it up to tcp_wmem's max (4 MiB, ~95 s of audio,
# already at the start on loopback), which would let a client that stops reading absorb minutes of
# audio before credits park its requests. 256 KiB is ~6 s of audio and still ~2.5 MB/s at 100 ms
# RTT, far above the 44 kB/s real-time rate.
SOCKET_SEND_BUFFER_BYTES: Final = 256 * 1024
PING_INTERVAL_S: Final = 20.0         # keepalive: a peer that stops answering is dropped ...
PING_TIMEOUT_S: Final = 20.0          # ... this long after an unanswered ping
CANCEL_GRACE_S: Final = 10.0          # shutdown: cancelled requests stop at their next decode step
CLOSE_GOING_AWAY: Final = 1001


class StartFailed(Exception):
    """The worker could not start (its engine could not be made): the daemon cannot serve."""


class Server:
    """One listening socket, one worker, many sessions. Use `async with Server(...)` or start/shutdown."""

    def __init__(
        self,
        config: DaemonConfig,
        pipeline: Pipeline,
        observer: WorkerObserver | None = None,
        voices: VoiceCache | None = None,
    ) -> None:
        self.config = config
        self.pipeline = pipeline
        self.observer = observer
        self.voices = voices
        self.worker: Worker | None = None
        self.sessions: set[Session] = set()
        self.metrics = Metrics()
        self.presets = Presets()
        self.http: HttpApi | None = None
        self.wyoming: WyomingServer | None = None
        self._ws: WsServer | None = None
        self._draining = False
        self._shutdown: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None

    async def start(self, *, warm_up: bool = False) -> None:
        """Start the worker (with `warm_up`, its first job is Pipeline.warm_up on its own engine and
        thread), register the voice presets, and listen on every configured port. Returns once all are ready."""
        c = self.config
        store = VoiceStore.open(c, self.pipeline)  # ConfigError before anything starts
        self.worker = Worker(self.pipeline, c, asyncio.get_running_loop(), self.observer, self.voices, store)
        self.worker.start(warm_up=self.pipeline.warm_up if warm_up else None)
        self.metrics.watch(
            self.worker, c.max_batch_rows, presets=lambda: len(self.presets),
            connections={"websocket": lambda: len(self.sessions), "http": lambda: self.http.connections if self.http
                         else 0, "wyoming": lambda: len(self.wyoming.connections) if self.wyoming else 0},
            gpu_memory=_gpu_memory(self.pipeline),
        )
        try:
            await asyncio.to_thread(self.worker.warmed.wait)
            if self.worker.start_error is not None:
                raise StartFailed(self.worker.start_error)
            if c.voices_dir is not None:
                self.presets = await load_presets(c.voices_dir, self.worker, c.max_frame_bytes)
            self._ws = await self._listen()
            await self._listen_more()
        except BaseException:
            # e.g. a port is taken: do not leave the thread or another listener behind
            await self._close_more()
            if self._ws is not None:
                self._ws.close()
            await self.worker.stop()
            raise
        if c.watchdog_s > 0:
            self._watchdog = asyncio.create_task(self._watch(c.watchdog_s))

    async def _watch(self, limit_s: float) -> None:
        """A step or registration running far past any expected time means a wedged device (a kernel
        that never returns): report it like a device fault, so /healthz says 503 and serve() exits 1."""
        assert self.worker is not None
        while not self.worker.device_fault.is_set():
            await asyncio.sleep(min(1.0, limit_s / 4))
            since = self.worker.busy_since
            if since is not None and time.monotonic() - since > limit_s:
                self.worker.report_fault(f"watchdog: one worker step has run for over {limit_s:g} s")
                return

    async def _listen_more(self) -> None:
        """The HTTP API and the Wyoming server, where configured (their packages are optional extras)."""
        c = self.config
        if c.http_port is not None:
            from .http import HttpApi

            self.http = HttpApi(self)
            await self.http.start(c.host, c.http_port)
        if c.wyoming_port is not None:
            from .wyoming import WyomingServer

            self.wyoming = WyomingServer(self)
            await self.wyoming.start(c.wyoming_host, c.wyoming_port)

    async def _close_more(self) -> None:
        """Close the HTTP and Wyoming listeners and their connections (each within about CLOSE_TIMEOUT_S)."""
        await asyncio.gather(*(api.close() for api in (self.http, self.wyoming) if api is not None))

    async def _listen(self) -> WsServer:
        c = self.config
        return await ws_serve(
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

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    @property
    def draining(self) -> bool:
        """True from the start of shutdown: no new work, /healthz answers 503."""
        return self._draining

    @property
    def port(self) -> int:
        return int(self._listener_address()[1])

    @property
    def url(self) -> str:
        host, port = self._listener_address()[:2]
        host = f"[{host}]" if ":" in host else host
        return f"ws://{host}:{port}"

    def _listener_address(self) -> tuple[str, int]:
        if self._ws is None:
            raise RuntimeError("server not started")
        name = next(iter(self._ws.sockets)).getsockname()
        return str(name[0]), int(name[1])

    async def _handle(self, ws: ServerConnection) -> None:
        assert self.worker is not None  # set in start() before the listener exists
        sock = ws.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_SEND_BUFFER_BYTES)
            except OSError as e:
                log.debug("cannot set SO_SNDBUF error=%s", e)
        session = Session(ws, self.worker, self.config, self.metrics)
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)

    def health(self) -> tuple[HTTPStatus, str]:
        """What GET /healthz answers: 503 after a device fault or while draining, else 200 ok."""
        if self.worker is not None and self.worker.device_fault.is_set():
            return HTTPStatus.SERVICE_UNAVAILABLE, f"{self.worker.device_fault_message}\n"
        if self._draining:
            return HTTPStatus.SERVICE_UNAVAILABLE, "draining\n"
        return HTTPStatus.OK, "ok\n"

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == "/healthz":
            return connection.respond(*self.health())
        token = self.config.token
        if token is not None:
            scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
            # compare_digest: the time taken must not reveal how much of the token matched.
            if scheme.lower() != "bearer" or not hmac.compare_digest(credential.strip().encode(), token.encode()):
                # No path or headers in the log: a client may have put its token in the URL.
                log.info("unauthorized peer=%s", _peer(connection))
                response = connection.respond(
                    HTTPStatus.UNAUTHORIZED, f"{ErrorCode.UNAUTHORIZED}: missing or wrong bearer token\n"
                )
                response.headers["WWW-Authenticate"] = 'Bearer realm="ttsd"'
                return response
        if path == "/metrics":
            response = connection.respond(HTTPStatus.OK, self.metrics.render().decode())
            del response.headers["Content-Type"]  # websockets' Headers append on assignment
            response.headers["Content-Type"] = METRICS_CONTENT_TYPE
            return response
        if self._draining:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, f"{ErrorCode.SHUTTING_DOWN}\n")
        return None

    async def shutdown(self) -> None:
        """The staged shutdown (module docstring). Idempotent; concurrent callers wait for the first."""
        if self._shutdown is None:
            self._shutdown = asyncio.create_task(self._do_shutdown())
        await asyncio.shield(self._shutdown)

    async def _do_shutdown(self) -> None:
        self._draining = True
        systemd.notify_stopping()
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._ws is None or self.worker is None:
            return
        worker, ws = self.worker, self._ws
        worker.stop_accepting()
        live = worker.live_jobs
        log.info("shutdown draining requests=%d drain_timeout_s=%g", live, self.config.drain_timeout_s)
        try:
            async with asyncio.timeout(self.config.drain_timeout_s):
                await worker.wait_idle()
        except TimeoutError:
            log.warning("shutdown drain timed out; cancelling requests=%d", worker.live_jobs)
            worker.cancel_all(ErrorCode.SHUTTING_DOWN)
            try:
                async with asyncio.timeout(CANCEL_GRACE_S):
                    await worker.wait_idle()
            except TimeoutError:
                log.error("shutdown: requests did not stop within %g s", CANCEL_GRACE_S)
        # Each close is bounded (Session.close). A handshake that began before the drain may turn
        # into a session while the first ones close: the loop closes those too.
        async def close_sessions() -> None:
            closed: set[Session] = set()
            while pending := self.sessions - closed:
                closed |= pending
                await asyncio.gather(*(s.close(CLOSE_GOING_AWAY, "server shutting down") for s in pending))

        # The HTTP and Wyoming listeners close meanwhile, within CLOSE_TIMEOUT_S: the bound above holds.
        await asyncio.gather(close_sessions(), self._close_more())
        ws.close(close_connections=False)
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await ws.wait_closed()
        except TimeoutError:
            left = list(ws.connections)
            log.warning("shutdown: aborting connections=%d that did not close", len(left))
            for connection in left:
                connection.transport.abort()
        await worker.stop(CANCEL_GRACE_S)
        log.info("shutdown complete")


def _gpu_memory(pipeline: Pipeline) -> GpuMemory | None:
    """The torch allocator's (allocated, reserved) bytes on the pipeline's CUDA device; None on CPU."""
    device = pipeline.device
    if device.type != "cuda":
        return None
    import torch

    return lambda: (torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device))


def _peer(connection: ServerConnection) -> str:
    try:
        host, port = connection.remote_address[:2]
        return f"{host}:{port}"
    except (TypeError, ValueError):
        return "?"


def load_pipeline(config: DaemonConfig, device: torch.device) -> Pipeline:
    """`config.checkpoints` loaded on `device`, or with `random_weights` a seeded random model
    written as a converted checkpoint directory and loaded from it (ttsd.tools.tiny)."""
    # Half precision is opt-in (--dtype bfloat16/float16) until it is checked against float32 on a
    # GPU with the real weights; float32 is the configuration the parity tests vouch for.
    dtype = "float32" if config.dtype == "auto" else config.dtype
    load: dict[str, Any] = dict(
        acoustic_dtype=config.acoustic_dtype,
        cuda_graphs=config.cuda_graphs,
        compile=None if config.torch_compile else False,
        max_num_beams=config.max_num_beams,
        max_batch_rows=config.max_batch_rows,
    )
    if config.random_weights is not None:
        from ttsd.tools.tiny import random_pipeline

        return random_pipeline(config.random_weights, config.random_seed, device, dtype, **load)
    from ttsd.pipeline import Pipeline

    assert config.checkpoints is not None  # serve() returned early otherwise
    return Pipeline.load(config.checkpoints, device=device, dtype=dtype, **load)


def check_port_free(host: str, port: int) -> None:
    """OSError if (host, port) cannot be bound now; checked before loading so a taken port costs nothing.

    SO_REUSEADDR as asyncio's create_server sets it, so a port in TIME_WAIT is not called taken."""
    if port == 0:
        return
    for family, kind, proto, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)


async def serve(config: DaemonConfig) -> int:
    """`ttsd serve`: load, listen, READY=1, wait for SIGTERM/SIGINT, drain, exit code 0."""
    if config.checkpoints is None and config.random_weights is None:
        log.error("no checkpoint directory: pass --checkpoints DIR or set checkpoints in the config file")
        return 2
    for field, module, extra in (("http_port", "aiohttp", "http"), ("wyoming_port", "wyoming", "wyoming")):
        if getattr(config, field) is not None and importlib.util.find_spec(module) is None:
            log.error("%s needs the %s package: pip install 'ttsd[%s]'", field, module, extra)
            return 2
    if config.voices_dir is not None and not config.voices_dir.is_dir():
        log.error("voices_dir=%s is not a directory", config.voices_dir)
        return 2
    if config.voices_store is not None:
        try:
            model_key(config)  # before minutes of loading: a checkpoint without manifest.json cannot share voices
        except ConfigError as e:
            log.error("%s", e)
            return 2
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    from ttsd.api.errors import TtsdError, missing_extra
    from ttsd.pipeline.device import resolve_device

    try:
        device = resolve_device(config.device)
        check_port_free(config.host, config.port)
    except TtsdError as e:
        log.error("%s", e)
        return 2
    except OSError as e:
        log.error("cannot listen on %s port %d: %s", config.host, config.port, e.strerror or e)
        return 1
    if config.random_weights is not None:
        source = f"random {config.random_weights} model (seed {config.random_seed})"
        log.warning(
            "random_weights=%s random_seed=%d: serving RANDOM weights, not a trained model; "
            "the audio is noise (benchmarks and demos only)", config.random_weights, config.random_seed,
        )
    else:
        source = str(config.checkpoints)
    systemd.notify_status(f"loading weights from {source} on {device}")
    t0 = time.perf_counter()
    try:
        # In a thread so a SIGTERM during a long load is noticed as soon as it finishes.
        pipeline = await asyncio.to_thread(load_pipeline, config, device)
    except TtsdError as e:
        log.error("cannot load weights=%r error=%r", source, str(e))
        return 1
    except ModuleNotFoundError as e:
        if (missing := missing_extra(e)) is None:
            raise
        log.error("cannot load weights=%r: %s", source, missing)
        return 2
    load_s = time.perf_counter() - t0
    if stop.is_set():
        log.info("stopped during load")
        return 0
    server = Server(config, pipeline)
    # CUDA: the decode graphs are recorded (and the step compiled) before READY=1, not in a request,
    # by the worker thread that will serve (cuBLAS/cuDNN state is per thread).
    warm = pipeline.device.type == "cuda"
    if warm:
        systemd.notify_status("warming up (recording the GPT decode graphs)")
    try:
        await server.start(warm_up=warm)
    except OSError as e:
        log.error(
            "cannot listen host=%s port=%d http_port=%s wyoming_host=%s wyoming_port=%s error=%r", config.host,
            config.port, config.http_port, config.wyoming_host, config.wyoming_port, e.strerror,
        )
        return 1
    except StartFailed as e:
        log.error("cannot start: %s", e)
        return 1
    except TtsdError as e:
        log.error("cannot start error=%r", str(e))
        return 2
    log.info(
        "ttsd ready url=%s device=%s dtype=%s load_s=%.2f checkpoints=%s random_weights=%s auth=%s http=%s "
        "wyoming=%s presets=%d",
        server.url, pipeline.device, str(pipeline.gpt_dtype).removeprefix("torch."), load_s, config.checkpoints,
        config.random_weights, "bearer" if config.token else "none", server.http.url if server.http else "-",
        server.wyoming.url if server.wyoming else "-", len(server.presets),
    )
    if server.wyoming is not None and not is_loopback(config.wyoming_host):
        log.warning("wyoming_host=%s: Wyoming has no authentication; anyone who can reach it can use it",
                    config.wyoming_host)
    systemd.notify_ready(f"serving on {server.url}")
    assert server.worker is not None  # started above
    fault = asyncio.create_task(server.worker.device_fault.wait())
    signalled = asyncio.create_task(stop.wait())
    await asyncio.wait({fault, signalled}, return_when=asyncio.FIRST_COMPLETED)
    fault.cancel()
    signalled.cancel()
    if server.worker.device_fault.is_set():
        # Exit non-zero so systemd's Restart=on-failure brings up a fresh process and context.
        log.error("shutting down after a device fault: %s", server.worker.device_fault_message)
        await server.shutdown()
        return 1
    log.info("shutdown signal received")
    await server.shutdown()
    return 0
