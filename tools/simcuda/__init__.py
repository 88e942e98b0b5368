"""simcuda: run ttsd's CUDA branch on a CPU-only torch, with a real device's rules checked.

CI has no GPU, so without this the code that only a GPU runs is code nobody has run. `install()`
makes `torch.cuda` report one device and turns `device="cuda"` tensors into CPU tensors that report
`cuda:0` (tensor.py), with simulated streams, events and CUDA graphs (state.py, graphs.py) and a
simulated memory budget. What a real device would refuse or get wrong fails loudly here, naming the
call site:

* device mix: a device tensor meeting a non-scalar CPU tensor raises CUDA's own message;
* host syncs: counted per region (`count_syncs()`); `no_syncs()` raises at the first one;
* stream races: a read or write on one stream of memory written (or read) on another without an
  event or stream wait in between, and memory freed while another stream may still use it without
  `record_stream` (state.py);
* graph capture: operations are recorded, not run, and replayed on the same storages, so a host value
  read at capture time stays frozen; syncs and pageable copies during capture raise;
* memory: `mem_get_info`, `memory_allocated`, ... count live simulated storages against a budget
  (`TTSD_SIMCUDA_MEMORY_GIB`, default 16); going over raises `torch.cuda.OutOfMemoryError`.

Entry point: `TTSD_SIMCUDA=1` in the environment of a ttsd command installs it before any model code
runs (`install_from_env()`, called by the command line and the benchmarks), so `--device cuda` runs
the CUDA branch on CPU. Tests install it for a module with `installed()`.

Not simulated: kernel timing and asynchrony (everything runs when issued; `query()` answers True),
CUDA's random numbers (the CPU generator's are used), `torch.compile` (see graphs.py), autograd."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import torch

from . import graphs
from .cost import Cost, DeviceModel
from .graphs import SimGraph
from .state import (
    STATE,
    CaptureError,
    HostSync,
    SimEvent,
    SimStream,
    SimulationError,
    StreamRace,
    SyncRegion,
    as_replay,
    meter,
    sync_region,
)
from .tensor import DeviceMismatch, SimGenerator, SimMode, SimTensor, cuda_generator

__all__ = [
    "Cost", "DeviceModel", "as_replay", "meter",
    "CaptureError", "DeviceMismatch", "HostSync", "SimGraph", "SimStream", "SimTensor", "SimulationError",
    "StreamRace", "SyncRegion", "count_syncs", "install", "install_from_env", "installed", "no_syncs",
    "set_budget", "uninstall", "violations",
]

ENV = "TTSD_SIMCUDA"
ENV_MEMORY = "TTSD_SIMCUDA_MEMORY_GIB"
DEVICE_NAME = "simulated CUDA device (ttsd simcuda)"

_saved: list[tuple[Any, str, Any]] = []
_mode: SimMode | None = None


def is_installed() -> bool:
    return _mode is not None


def install(*, budget_gib: float | None = None, raise_races: bool = True) -> None:
    """Install the simulation in this process (idempotent). `budget_gib`: simulated device memory."""
    global _mode
    if _mode is not None:
        return
    env_budget = os.environ.get(ENV_MEMORY)
    if budget_gib is None and env_budget:
        budget_gib = float(env_budget)
    if budget_gib is not None:
        set_budget(int(budget_gib * (1 << 30)))
    STATE.raise_races = raise_races
    cuda = torch.cuda
    patches: dict[str, Any] = {
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "set_device": _set_device,
        "get_device_name": lambda device=None: DEVICE_NAME,
        "get_device_capability": lambda device=None: (9, 0),
        "get_device_properties": _properties,
        "is_bf16_supported": lambda including_emulation=True: True,
        "is_initialized": lambda: True,
        "init": lambda: None,
        "synchronize": lambda device=None: STATE.synchronize_all(),
        "Stream": SimStream,
        "Event": SimEvent,
        "current_stream": lambda device=None: STATE.current_stream(),
        "default_stream": lambda device=None: STATE.default_stream,
        "stream": _stream_context,
        "set_stream": STATE.set_current_stream,
        "CUDAGraph": SimGraph,
        "graph": graphs.graph,
        "graph_pool_handle": graphs.graph_pool_handle,
        "is_current_stream_capturing": graphs.is_current_stream_capturing,
        "mem_get_info": lambda device=None: (max(0, STATE.budget_bytes - STATE.allocated), STATE.budget_bytes),
        "memory_allocated": lambda device=None: STATE.allocated,
        "max_memory_allocated": lambda device=None: STATE.peak,
        "memory_reserved": lambda device=None: STATE.allocated,
        "max_memory_reserved": lambda device=None: STATE.peak,
        "reset_peak_memory_stats": _reset_peak,
        "reset_max_memory_allocated": _reset_peak,
        "empty_cache": lambda: None,
        "manual_seed": lambda seed: cuda_generator().manual_seed(int(seed)) and None,
        "manual_seed_all": lambda seed: cuda_generator().manual_seed(int(seed)) and None,
        "seed": lambda: cuda_generator().seed() and None,
        "initial_seed": lambda: cuda_generator().initial_seed(),
    }
    for name, value in patches.items():
        _patch(cuda, name, value)
    _patch(torch.version, "cuda", "12.8")
    _patch(torch, "Generator", SimGenerator)
    _patch(torch, "compile", _compile)
    run = threading.Thread.run
    _patch(threading.Thread, "run", _run_in_mode(run))
    _mode = SimMode()
    _mode.__enter__()


def uninstall() -> None:
    """Undo `install()` (tensors made meanwhile keep working as before; new calls see the CPU again)."""
    global _mode
    if _mode is None:
        return
    _mode.__exit__(None, None, None)
    _mode = None
    while _saved:
        obj, name, old = _saved.pop()
        setattr(obj, name, old)
    STATE.capture = None


def install_from_env() -> bool:
    """Install when `TTSD_SIMCUDA` is set to 1/true/yes; returns whether it is installed."""
    if os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        install()
    return is_installed()


@contextmanager
def installed(*, budget_gib: float | None = None, raise_races: bool = True) -> Iterator[None]:
    install(budget_gib=budget_gib, raise_races=raise_races)
    try:
        yield
    finally:
        uninstall()


def set_budget(nbytes: int) -> None:
    """The simulated device's memory, in bytes."""
    STATE.budget_bytes = int(nbytes)


def violations() -> list[SimulationError]:
    """Every violation found so far (raised or not), oldest first."""
    return list(STATE.violations)


def clear_violations() -> None:
    STATE.violations.clear()


def no_syncs() -> Any:
    """A region in which the first host sync raises HostSync naming its call site."""
    return sync_region(forbid=True)


def count_syncs() -> Any:
    """A region that records every host sync (`.count`, `.events` of (what, call site))."""
    return sync_region(forbid=False)


# ------------------------------------------------------------------------------------------------


def _patch(obj: Any, name: str, value: Any) -> None:
    _saved.append((obj, name, getattr(obj, name, None)))
    setattr(obj, name, value)


def _set_device(device: Any) -> None:
    index = device if isinstance(device, int) else torch.device(device).index
    if index not in (None, 0):
        raise RuntimeError(f"CUDA error: invalid device ordinal {index} (the simulation has one device)")


def _properties(device: Any = None) -> SimpleNamespace:
    return SimpleNamespace(name=DEVICE_NAME, total_memory=STATE.budget_bytes, major=9, minor=0,
                           multi_processor_count=132, is_integrated=False)


def _reset_peak(device: Any = None) -> None:
    STATE.peak = STATE.allocated


class _StreamContext:
    def __init__(self, stream: SimStream | None) -> None:
        self.stream = stream
        self.prev: SimStream | None = None

    def __enter__(self) -> None:
        if self.stream is not None:
            self.prev = getattr(STATE.local, "stream", None)
            STATE.set_current_stream(self.stream)

    def __exit__(self, *exc: object) -> None:
        if self.stream is not None:
            STATE.set_current_stream(self.prev)


def _stream_context(stream: SimStream | None) -> _StreamContext:
    if stream is not None and not isinstance(stream, SimStream):
        raise TypeError(f"expected a simulated CUDA stream, got {type(stream).__name__}")
    return _StreamContext(stream)


def _compile(model: Callable[..., Any] | None = None, **kwargs: Any) -> Any:
    # dynamo cannot trace the simulated device: the compiled function is the function itself.
    return model if model is not None else (lambda fn: fn)


def _run_in_mode(run: Callable[[threading.Thread], None]) -> Callable[[threading.Thread], None]:
    """Thread.run that enters the simulation's function mode first (modes are per thread)."""

    def wrapped(self: threading.Thread) -> None:
        if _mode is None:
            run(self)
            return
        with SimMode():
            run(self)

    return wrapped
