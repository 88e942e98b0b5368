"""The daemon: one worker thread, the listeners of every interface in front of it, and a staged
shutdown.

`Server` is the embeddable part (tests run it on port 0 with an already loaded Pipeline); `serve`
is `ttsd serve`: load the weights, listen, tell systemd READY=1, and on SIGTERM or SIGINT

  1. stop accepting work, STOPPING=1: the listeners stay open so that /healthz answers 503 (and
     new handshakes are refused with 503) until the process exits;
  2. give in-flight requests drain_timeout_s to finish, then cancel the rest (`shutting_down`),
     each stopping at its next decode step (at most CANCEL_GRACE_S);
  3. close every listener (Listener.close): the WebSocket sends what is queued (at most
     FLUSH_ON_CLOSE_S) and closes each connection with 1001 (going away; a client that does not
     take the close within CLOSE_TIMEOUT_S has its transport aborted), the others close their
     connections within CLOSE_TIMEOUT_S; join the worker (at most CANCEL_GRACE_S: a step wedged in
     the device is left behind), exit 0.

So a SIGTERM ends within drain_timeout_s + 2 × CANCEL_GRACE_S + FLUSH_ON_CLOSE_S + 2 × CLOSE_TIMEOUT_S
whatever clients do and whatever the device does (systemd's TimeoutStopSec must be larger).

The listeners are the WebSocket port (daemon/session.py; it answers GET /healthz and, behind the
token, /metrics before any handshake, so load balancers and systemd checks need no WebSocket
client) and, with `http_port` and `wyoming_port`, the OpenAI-compatible HTTP API (daemon/http.py)
and Wyoming (daemon/wyoming.py). All of them hand their requests to the one request core
(daemon/core.py), so they share the worker, the voices, the limits and the metrics. The voice
presets of `voices_dir` (daemon/presets.py) are registered before any port listens; with
`voices_store`, registered voices persist in a library shared with other daemons (daemon/voice_store.py)."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import signal
import socket
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final, TypeVar

from ttsd.api.errors import ConfigError
from ttsd.api.protocol import ErrorCode

from . import systemd
from .config import is_loopback
from .core import Core, Listener
from .metrics import INTERFACES, GpuMemory, Metrics
from .presets import Presets, load_presets
from .session import Session, WebSocketListener
from .voice_store import VoiceStore, model_key
from .worker import VoiceCache, Worker, WorkerObserver

if TYPE_CHECKING:
    import torch

    from ttsd.pipeline.pipeline import Pipeline

    from .config import DaemonConfig
    from .http import HttpApi
    from .wyoming import WyomingServer

log = logging.getLogger(__name__)
_L = TypeVar("_L")

CANCEL_GRACE_S: Final = 10.0          # shutdown: cancelled requests stop at their next decode step


class StartFailed(Exception):
    """The worker could not start (its engine could not be made): the daemon cannot serve."""


class Server:
    """One worker and the listeners of every configured interface (the WebSocket first). Use
    `async with Server(...)` or start/shutdown."""

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
        self.metrics = Metrics()
        self.presets = Presets()
        self.websocket = WebSocketListener(self)
        self.listeners: list[Listener] = []          # listening now, in the order they started
        self._draining = False
        self._shutdown: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None

    async def start(self, *, warm_up: bool = False) -> None:
        """Start the worker (with `warm_up`, its first job is Pipeline.warm_up on its own engine and
        thread), register the voice presets, and listen on every configured port. Returns once all are ready."""
        c = self.config
        store = VoiceStore.open(c, self.pipeline)  # ConfigError before anything starts
        self.worker = Worker(self.pipeline, c, asyncio.get_running_loop(), self.observer, self.voices, store)
        self.core = Core(self.worker, c, self.metrics)
        self.worker.start(warm_up=self.pipeline.warm_up if warm_up else None)
        self.metrics.watch(
            self.worker, c.max_batch_rows, presets=lambda: len(self.presets),
            connections={name: self._connections_counter(name) for name in INTERFACES},
            gpu_memory=_gpu_memory(self.pipeline),
        )
        try:
            await asyncio.to_thread(self.worker.warmed.wait)
            if self.worker.start_error is not None:
                raise StartFailed(self.worker.start_error)
            if c.voices_dir is not None:
                self.presets = await load_presets(c.voices_dir, self.worker, c.max_frame_bytes)
            for listener in self._configured_listeners():
                await listener.start()
                self.listeners.append(listener)
        except BaseException:
            # e.g. a port is taken: do not leave the thread or another listener behind
            await asyncio.gather(*(listener.close() for listener in self.listeners))
            self.listeners.clear()
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

    def _configured_listeners(self) -> list[Listener]:
        """The WebSocket port, then the HTTP API and the Wyoming server where configured (their
        packages are optional extras, imported only then)."""
        c = self.config
        listeners: list[Listener] = [self.websocket]
        if c.http_port is not None:
            from .http import HttpApi

            listeners.append(HttpApi(self))
        if c.wyoming_port is not None:
            from .wyoming import WyomingServer

            listeners.append(WyomingServer(self))
        return listeners

    def _connections_counter(self, interface: str) -> Callable[[], int]:
        return lambda: sum(listener.connections for listener in self.listeners if listener.interface == interface)

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
        return self.websocket.address[1]

    @property
    def url(self) -> str:
        return self.websocket.url

    @property
    def sessions(self) -> set[Session]:
        return self.websocket.sessions

    def _listener(self, kind: type[_L]) -> _L | None:
        """The listener of this kind, if the config opened its port."""
        return next((listener for listener in self.listeners if isinstance(listener, kind)), None)

    @property
    def http(self) -> HttpApi | None:
        from .http import HttpApi

        return self._listener(HttpApi)

    @property
    def wyoming(self) -> WyomingServer | None:
        from .wyoming import WyomingServer

        return self._listener(WyomingServer)

    def health(self) -> tuple[HTTPStatus, str]:
        """What GET /healthz answers: 503 after a device fault or while draining, else 200 ok."""
        if self.worker is not None and self.worker.device_fault.is_set():
            return HTTPStatus.SERVICE_UNAVAILABLE, f"{self.worker.device_fault_message}\n"
        if self._draining:
            return HTTPStatus.SERVICE_UNAVAILABLE, "draining\n"
        return HTTPStatus.OK, "ok\n"

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
        if not self.listeners or self.worker is None:
            return
        worker = self.worker
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
        # Every listener closes its connections at once, each close bounded (the WebSocket's by
        # FLUSH_ON_CLOSE_S + 2 × CLOSE_TIMEOUT_S, the others' by CLOSE_TIMEOUT_S): the bound above holds.
        await asyncio.gather(*(listener.close() for listener in self.listeners))
        await worker.stop(CANCEL_GRACE_S)
        log.info("shutdown complete")


def _gpu_memory(pipeline: Pipeline) -> GpuMemory | None:
    """The torch allocator's (allocated, reserved) bytes on the pipeline's CUDA device; None on CPU."""
    device = pipeline.device
    if device.type != "cuda":
        return None
    import torch

    return lambda: (torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device))


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
        emo_text=config.emo_text,
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
