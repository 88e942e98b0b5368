"""The simulated device's books: memory, host syncs, stream clocks, storage accesses and violations.

Everything the simulated CUDA device knows lives in one `SimState` (module global `STATE`), guarded
by one re-entrant lock: the daemon touches device tensors from its worker thread while finalizers
(freed storages) may run on any thread.

Stream ordering is tracked with vector clocks. Every simulated stream counts the operations issued
on it; its clock says, for every stream, up to which operation it is ordered after (its own count,
plus what it learned through `wait_event` / `wait_stream`). The host has a clock too: what it has
seen complete (`synchronize`, an event it waited for, a blocking copy). An operation on stream S may
read a storage only if the storage's last write is ordered before it (same stream, S waited for it,
or the host saw it complete before issuing the read); it may write only if the last write and every
read since are. That is the same happens-before rule PyTorch's CUDA sanitizer applies on a GPU.

When a storage is freed, the caching allocator returns its block to the pool of the stream it was
allocated on, and the next allocation on that stream may reuse it at once. A use on another stream
that the allocating stream is not ordered after, and that `record_stream` did not declare, is then a
use-after-free on a real device: reported here."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .cost import HALF, Cost, op_bytes, op_flops, tensors_of

log = logging.getLogger("ttsd.simcuda")

DEFAULT_BUDGET_BYTES = 16 << 30  # simulated device memory unless TTSD_SIMCUDA_MEMORY_GIB says otherwise
_HARNESS_DIR = str(Path(__file__).resolve().parent)
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_SKIP_DIRS = (_HARNESS_DIR, _TORCH_DIR, os.path.dirname(threading.__file__))


class SimulationError(RuntimeError):
    """Something that would fail or misbehave on a real CUDA device, found by the simulation."""

    kind = "simcuda"

    def __init__(self, message: str, site: str) -> None:
        super().__init__(f"{message} at {site}")
        self.site = site


class HostSync(SimulationError):
    """The host waited for the device inside a `no_syncs()` region."""

    kind = "host sync"


class StreamRace(SimulationError):
    """Two streams touched one storage without an ordering between them, or memory was freed while
    another stream could still use it."""

    kind = "stream race"


class CaptureError(SimulationError):
    """An operation CUDA refuses while a stream is capturing a graph (a sync, a pageable copy)."""

    kind = "graph capture"


def call_site() -> str:
    """The innermost frame outside torch, the harness and the stdlib threading code: `file:line in fn`."""
    f = sys._getframe(1)
    while f is not None:
        name = f.f_code.co_filename
        if not name.startswith(_SKIP_DIRS) and "contextlib" not in name:
            return f"{_short(name)}:{f.f_lineno} in {f.f_code.co_name}"
        f = f.f_back  # type: ignore[assignment]
    return "<unknown>"


def _short(path: str) -> str:
    for marker in ("/pipeline/", "/daemon/", "/tools/", "/tests/", "/bench/", "/clients/"):
        i = path.rfind(marker)
        if i >= 0:
            return path[i + 1 :]
    return path


# ------------------------------------------------------------------------------------------------
# Streams and events (the objects `torch.cuda.Stream` / `torch.cuda.Event` become)


class SimStream(torch.Stream):
    """A simulated CUDA stream: an id, an operation counter and a vector clock. A `torch.Stream` subclass
    so that torch's argument parser accepts it where a stream is expected (`Tensor.record_stream`)."""

    _ids = iter(range(1 << 62))

    def __new__(cls, device: object = None, priority: int = 0) -> SimStream:
        return super().__new__(cls, device="cpu")

    def __init__(self, device: object = None, priority: int = 0) -> None:
        self.id = next(SimStream._ids)
        self.seq = 0
        self.clock: dict[int, int] = {self.id: 0}
        self.priority = priority
        STATE.streams.add(self)

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", 0)

    @property
    def cuda_stream(self) -> int:
        return self.id

    def __enter__(self) -> SimStream:
        self._prev = getattr(STATE.local, "stream", None)
        STATE.set_current_stream(self)
        return self

    def __exit__(self, *exc: object) -> None:
        STATE.set_current_stream(self._prev)

    def issue(self) -> int:
        """Count one operation on this stream; returns its sequence number."""
        self.seq += 1
        self.clock[self.id] = self.seq
        return self.seq

    def ordered_after(self, sid: int, seq: int) -> bool:
        """Whether work issued on this stream now runs after operation `seq` of stream `sid`."""
        return sid == self.id or self.clock.get(sid, 0) >= seq or STATE.host_clock.get(sid, 0) >= seq

    def wait_event(self, event: SimEvent) -> None:  # type: ignore[override]
        with STATE.lock:
            _join(self.clock, event.snapshot)
            self.clock[self.id] = self.seq

    def wait_stream(self, stream: SimStream) -> None:  # type: ignore[override]
        with STATE.lock:
            _join(self.clock, stream.clock)
            self.clock[self.id] = self.seq

    def record_event(self, event: SimEvent | None = None) -> SimEvent:  # type: ignore[override]
        event = event or SimEvent()
        event.record(self)
        return event

    def query(self) -> bool:
        self.synchronize()  # everything ran already; answering True tells the host it completed
        return True

    def synchronize(self) -> None:
        with STATE.lock:
            _join(STATE.host_clock, self.clock)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SimStream) and other.id == self.id

    def __hash__(self) -> int:
        return self.id

    def __repr__(self) -> str:
        return f"<simulated cuda stream {self.id}>"


class SimEvent:
    """A simulated CUDA event: the recording stream's clock at the time of `record`."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        self.snapshot: dict[int, int] = {}
        self.time_s = 0.0

    def record(self, stream: SimStream | None = None) -> None:
        import time

        s = stream or STATE.current_stream()
        with STATE.lock:
            self.snapshot = dict(s.clock)
        self.time_s = time.perf_counter()

    def wait(self, stream: SimStream | None = None) -> None:
        (stream or STATE.current_stream()).wait_event(self)

    def query(self) -> bool:
        self.synchronize()
        return True

    def synchronize(self) -> None:
        with STATE.lock:
            _join(STATE.host_clock, self.snapshot)

    def elapsed_time(self, end: SimEvent) -> float:
        return (end.time_s - self.time_s) * 1000.0


def _size(nbytes: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):.2f} {unit}"
    return f"{nbytes} bytes"


def _join(into: dict[int, int], other: dict[int, int]) -> None:
    for k, v in other.items():
        if into.get(k, 0) < v:
            into[k] = v


# ------------------------------------------------------------------------------------------------
# Storages


@dataclass(eq=False)
class StorageInfo:
    """The device-side books of one simulated allocation (one CPU storage behind SimTensors)."""

    nbytes: int
    alloc_stream: SimStream
    site: str
    last_write: tuple[int, int] | None = None  # (stream id, seq)
    reads: dict[int, int] = field(default_factory=dict)  # stream id → seq of its last read since the write
    uses: dict[int, int] = field(default_factory=dict)  # stream id → seq of its last use of any kind
    recorded: set[int] = field(default_factory=set)  # streams named by record_stream
    graph_owned: bool = False


@dataclass
class SyncRegion:
    """Host syncs seen while the region was open: (what, call site) each."""

    forbid: bool
    events: list[tuple[str, str]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.events)


class SimState:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.local = threading.local()
        self.budget_bytes = DEFAULT_BUDGET_BYTES
        self.allocated = 0
        self.peak = 0
        self.storages: dict[int, StorageInfo] = {}
        self.pinned: set[int] = set()
        self.streams: weakref.WeakSet[SimStream] = weakref.WeakSet()
        self.host_clock: dict[int, int] = {}
        self.violations: list[SimulationError] = []
        self.raise_races = True
        # A read that happens to synchronise (item(), a device→host copy) orders later work after it on
        # a real device too; in strict mode it does not count, so every hand-over between streams must
        # be explicit (an event, a stream wait, or an explicit synchronize) and cannot silently depend on
        # a sync that a later change might remove.
        self.strict_handoffs = True
        self.syncs_total = 0
        self.meters: list[Cost] = []  # open cost meters (cost.py): every device operation is added to each
        self.as_replay = 0  # > 0 inside `as_replay()`: eager operations are booked as graph nodes
        self.capture: object | None = None  # the graphs module's active capture
        self.alloc_sites = os.environ.get("TTSD_SIMCUDA_SITES", "") == "1"
        self.exiting = False  # interpreter shutdown: every storage is freed, no stream runs any more
        atexit.register(self._exit)

    def _exit(self) -> None:
        self.exiting = True

    # --- per thread -----------------------------------------------------------------------------

    default_stream: SimStream

    def current_stream(self) -> SimStream:
        return getattr(self.local, "stream", None) or self.default_stream

    def set_current_stream(self, stream: SimStream | None) -> None:
        self.local.stream = stream

    def regions(self) -> list[SyncRegion]:
        regions = getattr(self.local, "regions", None)
        if regions is None:
            regions = self.local.regions = []
        return regions

    # --- memory ---------------------------------------------------------------------------------

    def register(self, t: Tensor, stream: SimStream, *, graph_owned: bool = False) -> StorageInfo:
        """The books of `t`'s storage, created (an allocation on `stream`) the first time it is seen."""
        storage = t.untyped_storage()
        key = storage._cdata
        with self.lock:
            info = self.storages.get(key)
            if info is not None:
                return info
            nbytes = storage.nbytes()
            if self.allocated + nbytes > self.budget_bytes:
                raise torch.cuda.OutOfMemoryError(self.oom_message(nbytes) + f" (at {call_site()})")
            # Where each storage was allocated is worth a frame walk only when asked (TTSD_SIMCUDA_SITES=1).
            info = StorageInfo(nbytes, stream, call_site() if self.alloc_sites else "?", graph_owned=graph_owned)
            self.storages[key] = info
            self.allocated += nbytes
            self.peak = max(self.peak, self.allocated)
        weakref.finalize(storage, self._freed, key)
        return info

    def check_alloc(self, nbytes: int) -> None:
        """Raise CUDA's out-of-memory error before a host allocation of `nbytes` is attempted."""
        if self.allocated + nbytes > self.budget_bytes:
            raise torch.cuda.OutOfMemoryError(self.oom_message(nbytes) + f" (at {call_site()})")

    def oom_message(self, nbytes: int) -> str:
        free = max(0, self.budget_bytes - self.allocated)
        return (f"CUDA out of memory. Tried to allocate {_size(nbytes)}. GPU 0 has a total capacity of "
                f"{_size(self.budget_bytes)} of which {_size(free)} is free (simulated device)")

    def _freed(self, key: int) -> None:
        with self.lock:
            info = self.storages.pop(key, None)
            if info is None:
                return
            self.allocated -= info.nbytes
            if info.graph_owned or self.exiting:
                return
            alloc = info.alloc_stream
            for sid, seq in info.uses.items():
                if sid in info.recorded or alloc.ordered_after(sid, seq):
                    continue
                where = "" if info.site == "?" else f" (at {info.site})"
                self.violation(StreamRace(
                    f"memory allocated on stream {alloc.id}{where} was freed while stream {sid} may "
                    f"still use it (no record_stream, no wait): the allocator can hand it to new work on "
                    f"stream {alloc.id} at once", call_site()), now=False)
                return

    def mark_pinned(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        with self.lock:
            self.pinned.add(key)
        weakref.finalize(storage, self.pinned.discard, key)

    def is_pinned(self, t: Tensor) -> bool:
        return t.untyped_storage()._cdata in self.pinned

    # --- accesses -------------------------------------------------------------------------------

    def access(self, stream: SimStream, reads: list[Tensor], writes: list[Tensor], what: object) -> None:
        """One operation on `stream` reading and writing these (inner, CPU) tensors' storages."""
        with self.lock:
            seq = stream.issue()
            for t in reads:
                info = self.storages.get(t.untyped_storage()._cdata)
                if info is None:
                    continue
                w = info.last_write
                if w is not None and not stream.ordered_after(*w):
                    self.violation(StreamRace(
                        f"{what} on stream {stream.id} reads memory written on stream {w[0]} with no event or "
                        "stream wait in between", call_site()))
                info.reads[stream.id] = seq
                info.uses[stream.id] = seq
            for t in writes:
                info = self.storages.get(t.untyped_storage()._cdata)
                if info is None:
                    continue
                w = info.last_write
                if w is not None and not stream.ordered_after(*w):
                    self.violation(StreamRace(
                        f"{what} on stream {stream.id} overwrites memory written on stream {w[0]} with no event "
                        "or stream wait in between", call_site()))
                for sid, rseq in info.reads.items():
                    if not stream.ordered_after(sid, rseq):
                        self.violation(StreamRace(
                            f"{what} on stream {stream.id} overwrites memory that stream {sid} may still be "
                            "reading (no event or stream wait in between)", call_site()))
                        break
                info.last_write = (stream.id, seq)
                info.reads = {}
                info.uses[stream.id] = seq

    def record_stream(self, t: Tensor, stream: SimStream) -> None:
        with self.lock:
            info = self.storages.get(t.untyped_storage()._cdata)
            if info is not None:
                info.recorded.add(stream.id)

    def synchronize_all(self) -> None:
        with self.lock:
            for s in list(self.streams):
                _join(self.host_clock, s.clock)

    # --- violations and syncs -------------------------------------------------------------------

    def violation(self, error: SimulationError, *, now: bool = True) -> None:
        """Record a violation; raise it at once unless told to collect (or it comes from a finalizer)."""
        self.violations.append(error)
        log.error("simcuda %s: %s", error.kind, error)
        if now and self.raise_races:
            raise error

    def host_sync(self, what: str, stream: SimStream | None = None) -> None:
        """The host waits for the device: counted in every open region; a no-sync region raises."""
        site = call_site()
        with self.lock:
            self.syncs_total += 1
            if stream is not None and not self.strict_handoffs:
                _join(self.host_clock, stream.clock)
        for m in self.meters:
            m.syncs += 1
        forbid = False
        for region in self.regions():
            region.events.append((what, site))
            forbid = forbid or region.forbid
        if forbid:
            raise HostSync(f"host sync ({what}) inside no_syncs()", site)


STATE = SimState()
STATE.default_stream = SimStream()


def meter_op(func: Any, args: Any, kwargs: Any, mutated: list[Tensor], out: Any, *, eager: bool) -> None:
    """Add one device operation (inner CPU tensors) to every open cost meter."""
    read, written = op_bytes(func, tuple(args), dict(kwargs), mutated, out)
    flops = op_flops(func, tuple(args), out)
    floats = [t for t in [*tensors_of(args), *tensors_of(out)] if t.is_floating_point()]
    half = any(t.dtype in HALF for t in floats)
    for m in STATE.meters:
        m.add(func, read, written, flops, half, eager=eager and not STATE.as_replay)


@contextmanager
def meter() -> Iterator[Cost]:
    """Count what the device is asked to do inside the block (cost.py)."""
    cost = Cost()
    STATE.meters.append(cost)
    try:
        yield cost
    finally:
        STATE.meters.remove(cost)


@contextmanager
def as_replay() -> Iterator[None]:
    """Book the block's operations as one replay of a graph that recorded exactly them: one launch, and
    each operation a graph node. For work a graph replays whose capture the simulator cannot hold
    (capture keeps every intermediate it records alive, where a device's graph pool reuses memory):
    the cost is the replay's, the work runs eagerly. A host sync inside the block raises, as in capture."""
    for m in STATE.meters:
        m.replay()
    STATE.as_replay += 1
    try:
        with sync_region(forbid=True):
            yield
    finally:
        STATE.as_replay -= 1


@contextmanager
def sync_region(forbid: bool) -> Iterator[SyncRegion]:
    region = SyncRegion(forbid)
    regions = STATE.regions()
    regions.append(region)
    try:
        yield region
    finally:
        regions.remove(region)
