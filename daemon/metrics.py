"""Prometheus metrics of one daemon, all interfaces together: `GET /metrics` on the WebSocket port
(next to /healthz) and on the HTTP port, in the Prometheus text format.

Counters and histograms are updated on the event loop by the interfaces (`request_end`,
`segment`); gauges are read at scrape time from the worker, its engine and the voice cache
(`watch`), so a scrape shows the state at that instant. Each Metrics has its own registry: two
servers in one process (the tests) never share a series. `interface` labels are
INTERFACES; `code` is "ok", an ErrorCode value, or "disconnected" (the client went away)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .voice_store import VoiceStore
    from .worker import VoiceCache, Worker

INTERFACES: Final = ("websocket", "http", "wyoming")
DISCONNECTED: Final = "disconnected"     # `code` of a request whose client went away before its end
OK: Final = "ok"
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
# Time to first audio: the issue-5 target is 150 ms on a GPU; CPU runs take seconds.
FIRST_AUDIO_BUCKETS_S: Final = (0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Real-time factor (wall time / audio time): the GPU target is 0.05; above 1 is slower than real time.
RTF_BUCKETS: Final = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 50.0)

GpuMemory = Callable[[], tuple[int, int]]
"""() → (allocated, reserved) bytes of the torch caching allocator on the daemon's CUDA device."""


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "ttsd_requests", "Synthesis requests ended, by interface and result code (ok, an error code, "
            "or disconnected).", ["interface", "code"], registry=self.registry,
        )
        self.first_audio = Histogram(
            "ttsd_time_to_first_audio_seconds", "From a request's arrival to its first audio written to the client.",
            ["interface"], buckets=FIRST_AUDIO_BUCKETS_S, registry=self.registry,
        )
        self.rtf = Histogram(
            "ttsd_rtf", "Real-time factor of completed requests: total time / seconds of audio.",
            ["interface"], buckets=RTF_BUCKETS, registry=self.registry,
        )
        self.segments = Counter(
            "ttsd_segments", "Segments synthesised (rate() gives segments per second).", ["interface"],
            registry=self.registry,
        )
        self.audio = Counter(
            "ttsd_audio_seconds", "Seconds of audio synthesised.", ["interface"], registry=self.registry,
        )
        self._state = _StateCollector()
        self.registry.register(self._state)

    def watch(
        self,
        worker: Worker,
        max_batch_rows: int,
        presets: Callable[[], int] = lambda: 0,
        connections: dict[str, Callable[[], int]] | None = None,
        gpu_memory: GpuMemory | None = None,
    ) -> None:
        """Report the state of `worker` (and its voice cache) at every scrape from now on."""
        s = self._state
        s.worker, s.max_batch_rows, s.presets, s.gpu_memory = worker, max_batch_rows, presets, gpu_memory
        s.connections = dict(connections or {})

    def request_end(
        self, interface: str, code: str, *, first_audio_s: float | None = None, total_s: float | None = None,
        audio_s: float = 0.0,
    ) -> None:
        """A request ended (or was refused) with `code`; with `total_s` and audio, its RTF is observed."""
        self.requests.labels(interface, code).inc()
        if first_audio_s is not None:
            self.first_audio.labels(interface).observe(first_audio_s)
        if code == OK and total_s is not None and audio_s > 0:
            self.rtf.labels(interface).observe(total_s / audio_s)

    def segment(self, interface: str, audio_s: float) -> None:
        """One segment of `audio_s` seconds reached the interface."""
        self.segments.labels(interface).inc()
        self.audio.labels(interface).inc(audio_s)

    def render(self) -> bytes:
        """The Prometheus text exposition (content type CONTENT_TYPE)."""
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Gauges read from the worker at scrape time (racy reads of ints: fine for monitoring)."""

    def __init__(self) -> None:
        self.worker: Worker | None = None
        self.max_batch_rows = 0
        self.presets: Callable[[], int] = lambda: 0
        self.connections: dict[str, Callable[[], int]] = {}
        self.gpu_memory: GpuMemory | None = None

    def describe(self) -> Iterator[Metric]:
        return iter(())  # unchecked collector: the families depend on what is watched

    def collect(self) -> Iterator[Metric]:
        w = self.worker
        if w is None:
            return
        live, running = w.live_jobs, w.running_jobs
        yield _gauge("ttsd_requests_active", "Requests in the engine now.", running)
        yield _gauge("ttsd_requests_queued", "Admitted requests waiting for an engine slot.", max(0, live - running))
        yield _gauge("ttsd_batch_rows_in_use", "Decode batch rows in use (beams of the segments decoding).",
                     w.batch_rows_in_use)
        yield _gauge("ttsd_batch_rows", "Decode batch rows available (max_batch_rows).", self.max_batch_rows)
        yield from _voice_cache(w.voices)
        if w.store is not None:
            yield from _voice_store(w.store)
        yield _gauge("ttsd_voice_presets", "Voice presets loaded from voices_dir.", self.presets())
        if self.connections:
            open_ = GaugeMetricFamily("ttsd_open_connections", "Client connections open now.", labels=["interface"])
            for interface, count in self.connections.items():
                open_.add_metric([interface], count())
            yield open_
        if self.gpu_memory is not None:
            allocated, reserved = self.gpu_memory()
            yield _gauge("ttsd_gpu_memory_allocated_bytes", "CUDA memory held by tensors (torch allocator).",
                         allocated)
            yield _gauge("ttsd_gpu_memory_reserved_bytes", "CUDA memory reserved by the torch caching allocator.",
                         reserved)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _voice_cache(cache: VoiceCache) -> Iterator[Metric]:
    yield _gauge("ttsd_voice_cache_voices", "Registered voices held in the cache.", len(cache))
    yield _gauge("ttsd_voice_cache_max_voices", "Voice cache size (max_voices; LRU beyond).", cache.max_voices)
    lookups = CounterMetricFamily(
        "ttsd_voice_cache_lookups", "Voice cache lookups by result (a request naming a voice, a registration "
        "of audio already registered).", labels=["result"],
    )
    lookups.add_metric(["hit"], cache.hits)
    lookups.add_metric(["miss"], cache.misses)
    yield lookups


def _voice_store(store: VoiceStore) -> Iterator[Metric]:
    reads = CounterMetricFamily(
        "ttsd_voice_store_reads", "Voices read from the voice library (voices_store) by result: loaded, or "
        "refused as corrupt (and removed).", labels=["result"],
    )
    reads.add_metric(["loaded"], store.loads)
    reads.add_metric(["corrupt"], store.refused)
    yield reads
