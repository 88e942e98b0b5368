"""Simulated CUDA graphs: capture records aten operations without running them; replay runs exactly those.

What a real capture does, kept here: no kernel runs while a stream captures, so nothing the captured
code writes changes until `replay()`; outputs are allocated once, from the graph's pool, and hold
garbage until the first replay (NaN here, so reading one early shows); every argument is fixed when
it is recorded — a Python number, a shape, a CPU scalar tensor read by value — so a host value read
at capture time stays frozen for every replay; a host sync, a pageable copy or a new device
allocation through a factory during capture raises, as `cudaErrorStreamCaptureUnsupported` does.
Replay re-runs the recorded operations on the same storages, on the stream current at replay, and
books their reads and writes there (so cross-stream hazards of replays are checked like any work).

The compile path: `torch.compile` is not simulated (dynamo cannot trace the simulated device); under
the harness it returns the function unchanged, so `mode="reduce-overhead"` becomes the eager step
inside these simulated graphs. The compiled step is compared with the eager one on CPU elsewhere."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

from .state import STATE, CaptureError, SimStream, call_site, meter_op


@dataclass(eq=False)
class _Op:
    func: Any
    args: Any
    kwargs: Any
    kind: str  # "view" (nothing to run), "inplace" (re-run), "functional" (re-run into `outs`)
    outs: list[Tensor]
    reads: list[Tensor]
    writes: list[Tensor]


@dataclass(eq=False)
class _Capture:
    graph: SimGraph
    stream: SimStream


def capturing(stream: SimStream) -> bool:
    """Whether operations issued on `stream` are being captured."""
    cap = STATE.capture
    return isinstance(cap, _Capture) and cap.stream is stream


def _garbage(m: Tensor) -> Tensor:
    out = torch.empty_strided(m.size(), m.stride(), dtype=m.dtype)
    if out.is_floating_point() or out.is_complex():
        return out.fill_(float("nan"))
    return out.fill_(True if out.dtype == torch.bool else -(1 << 30) if out.dtype.itemsize >= 4 else -1)


def _meta(x: Any) -> Any:
    if isinstance(x, Tensor) and x.device.type == "cpu" and x.dim() > 0:
        return torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device="meta")
    return x


def record(func: Any, args: Any, kwargs: Any, is_view: bool, mutated: list[Tensor], reads: list[Tensor]) -> Any:
    """Record one operation (CPU tensors in `args`/`kwargs`) into the capture on the current stream and
    return what it would return, without running it."""
    cap = STATE.capture
    assert isinstance(cap, _Capture)
    with torch._C.DisableTorchFunction():
        outs: list[Tensor] = []
        if is_view:
            out = func(*args, **kwargs)  # a view reads no data: made now, aliasing the real storage
            kind = "view"
        elif mutated:
            kind = "inplace"
            out = mutated[0] if len(mutated) == 1 else tuple(mutated)
        else:
            kind = "functional"
            try:
                meta = func(*tree_map(_meta, args), **tree_map(_meta, kwargs))
                out = tree_map(lambda m: _garbage(m) if isinstance(m, Tensor) else m, meta)
            except (NotImplementedError, RuntimeError, TypeError):
                out = tree_map(lambda t: _garbage(t) if isinstance(t, Tensor) else t, func(*args, **kwargs))
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
            if len(outs) != len([t for t in tree_flatten(out)[0] if t is not None]):
                raise CaptureError(f"{func} returns a host value: not capturable", call_site())
    cap.graph.ops.append(_Op(func, args, kwargs, kind, outs, reads, [*mutated, *outs]))
    return out


def record_factory(func: Any, args: Any, kwargs: Any, outs: list[Tensor]) -> None:
    """A device factory (`torch.arange(n, device="cuda")`) called while capturing: its output comes from
    the graph's pool (it is made now, then garbage until replay) and replay fills it again."""
    cap = STATE.capture
    assert isinstance(cap, _Capture)
    for t in outs:
        t.copy_(_garbage(t))
    cap.graph.ops.append(_Op(func, args, kwargs, "functional", outs, [], list(outs)))


class SimGraph:
    """`torch.cuda.CUDAGraph` on the simulated device."""

    def __init__(self, keep_graph: bool = False) -> None:
        self.ops: list[_Op] = []
        self.captured = False

    def capture_begin(self, pool: Any = None, capture_error_mode: str = "global") -> None:
        stream = STATE.current_stream()
        if stream is STATE.default_stream:
            raise CaptureError("CUDA graphs cannot be captured on the default stream", call_site())
        if STATE.capture is not None:
            raise CaptureError("another graph capture is already under way", call_site())
        self.ops.clear()
        STATE.capture = _Capture(self, stream)

    def capture_end(self) -> None:
        STATE.capture = None
        self.captured = True

    def replay(self) -> None:
        if not self.captured:
            raise RuntimeError("replay() of a graph that was never captured")
        stream = STATE.current_stream()
        for m in STATE.meters:
            m.replay()
        # A real replay ignores autograd state: run under inference mode, where writing any tensor is allowed.
        with torch._C.DisableTorchFunction(), torch.inference_mode():
            for op in self.ops:
                if op.kind == "view":
                    continue
                res = op.func(*op.args, **op.kwargs)
                if op.kind == "functional":
                    for dst, src in zip(op.outs, [t for t in tree_flatten(res)[0] if isinstance(t, Tensor)],
                                        strict=True):
                        dst.copy_(src)
                STATE.access(stream, op.reads, op.writes, f"{op.func} (graph replay)")
                if STATE.meters:
                    mutated = op.writes if op.kind == "inplace" else []
                    meter_op(op.func, op.args, op.kwargs, mutated, op.outs or res, eager=False)

    def reset(self) -> None:
        self.ops.clear()
        self.captured = False

    def pool(self) -> tuple[int, int]:
        return (id(self), 0)

    def enable_debug_mode(self) -> None:
        pass

    def debug_dump(self, path: str) -> None:
        pass

    @property
    def launches(self) -> int:
        """Operations a replay runs (views excluded)."""
        return sum(op.kind != "view" for op in self.ops)


class graph:  # noqa: N801 - the name torch.cuda.graph has
    """`torch.cuda.graph(g, pool=None, stream=None)`: capture on `stream` or a fresh side stream."""

    def __init__(self, cuda_graph: SimGraph, pool: Any = None, stream: SimStream | None = None,
                 capture_error_mode: str = "global") -> None:
        self.graph = cuda_graph
        self.stream = stream or SimStream()
        self.prev: SimStream | None = None

    def __enter__(self) -> None:
        STATE.synchronize_all()  # torch.cuda.graph synchronizes the device before it captures
        self.prev = getattr(STATE.local, "stream", None)
        STATE.set_current_stream(self.stream)
        self.graph.capture_begin()

    def __exit__(self, *exc: object) -> None:
        self.graph.capture_end()
        STATE.set_current_stream(self.prev)


def graph_pool_handle() -> tuple[int, int]:
    return (0, 0)


def is_current_stream_capturing() -> bool:
    return capturing(STATE.current_stream())
