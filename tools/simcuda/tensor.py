"""SimTensor: a CPU tensor that says it lives on `cuda:0`, and the rules a real device would enforce on it.

A SimTensor is a wrapper subclass (`_make_wrapper_subclass`, device cuda:0) around a plain CPU tensor
`elem`. Its `__torch_dispatch__` sees every aten operation after autograd and autocast (autocast's
CUDA rules apply: the wrapper carries the CUDA dispatch keys), unwraps, checks, runs the operation on
the CPU tensors and re-wraps the results. Per operation it

* raises CUDA's "Expected all tensors to be on the same device" when a non-scalar CPU tensor meets a
  device tensor (0-dim CPU tensors are allowed, as CUDA reads them as scalars; CPU index tensors are
  allowed and cost a blocking host→device copy, as on CUDA);
* counts host syncs: `item()` / `bool()` / `int()` / `float()` (`_local_scalar_dense`), `torch.equal`,
  `nonzero` and the other data-dependent shapes, device→host copies that are not non-blocking into
  pinned memory, and blocking host→device copies;
* books reads and writes per storage on the current simulated stream (state.py), so a cross-stream
  use without an event is a stream race;
* records the operation instead of running it while the current stream is capturing a CUDA graph
  (graphs.py).

The torch-function mode `SimMode` handles what never reaches dispatch: factories and `.to()` /
`.cuda()` / `.cpu()` / `pin_memory` moving data in and out, indexing (the C++ indexing entry point
takes a device guard, which a CPU-only build cannot give for `cuda`, so indexing is re-expressed
with aten view/index ops here), `tolist`, `repr`, `numpy` (refused, as for any CUDA tensor),
`data_ptr` and `record_stream`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Number
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from .cost import nbytes
from .graphs import capturing as graph_capturing
from .graphs import record as graph_record
from .graphs import record_factory as graph_record_factory
from .state import STATE, CaptureError, SimStream, SimulationError, call_site, meter_op

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
aten = torch.ops.aten

# Operations whose result the host must wait for (a value, or an output shape that depends on data).
_SYNC_OPS: dict[Any, str] = {
    aten._local_scalar_dense: "item() / bool() / int() / float()",
    aten.equal: "torch.equal",
    aten.nonzero: "nonzero",
    aten.masked_select: "masked_select",
    aten._unique2: "unique",
    aten.unique_dim: "unique",
    aten.unique_consecutive: "unique_consecutive",
}
_INDEX_OPS = {aten.index, aten.index_put_, aten.index_put, aten._index_put_impl_}
_RANDOM_FACTORIES = {torch.randn, torch.rand, torch.randint, torch.randperm, torch.normal, torch.randn_like,
                     torch.rand_like, torch.randint_like, torch.bernoulli, torch.multinomial}
_H2D_FACTORIES = {torch.tensor, torch.as_tensor, torch.asarray}


class DeviceMismatch(SimulationError):
    """A device tensor met a non-scalar CPU tensor: CUDA refuses this."""

    kind = "device mix"


class SimTensor(Tensor):
    """A CPU tensor `elem` presented as a tensor on cuda:0 (module docstring)."""

    elem: Tensor

    @staticmethod
    def __new__(cls, elem: Tensor) -> SimTensor:
        r = Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(),
            dtype=elem.dtype, layout=elem.layout, device=CUDA, requires_grad=False,
        )
        r.elem = elem
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple[Any, ...] = (),  # type: ignore[override]
                           kwargs: dict[str, Any] | None = None) -> Any:
        return _dispatch(func, args, kwargs or {})


# ------------------------------------------------------------------------------------------------
# Wrapping


def wrap(inner: Tensor, stream: SimStream, *, graph_owned: bool = False, inference: bool | None = None
         ) -> tuple[SimTensor, bool]:
    """A SimTensor over `inner`; True when its storage is a new allocation (booked on `stream`).

    `inference`: whether the wrapper is an inference tensor (default: as inference mode is now). A view
    must be what its base is, or autograd's view bookkeeping refuses it."""
    before = len(STATE.storages)
    STATE.register(inner, stream, graph_owned=graph_owned)
    if inference is None or inference == torch.is_inference_mode_enabled():
        return SimTensor(inner), len(STATE.storages) > before
    with torch.inference_mode(inference):
        return SimTensor(inner), len(STATE.storages) > before


def to_device(t: Tensor, *, dtype: torch.dtype | None = None, non_blocking: bool = False,
              what: str = "host→device copy") -> SimTensor:
    """A device copy of host tensor `t` (a `.to("cuda")`): blocking unless `non_blocking`."""
    stream = STATE.current_stream()
    pinned = STATE.is_pinned(t)
    if graph_capturing(stream) and not (non_blocking and pinned):
        raise CaptureError(f"{what} from pageable memory while the stream captures a graph", call_site())
    if not non_blocking:
        STATE.host_sync(f"blocking {what}", stream)
    STATE.check_alloc(t.numel() * (dtype or t.dtype).itemsize)
    with torch._C.DisableTorchFunction():
        inner = t.to(dtype) if dtype is not None and dtype != t.dtype else t
        inner = inner.clone() if inner is t else inner
    out, _ = wrap(inner, stream)
    STATE.access(stream, [], [inner], what)
    for m in STATE.meters:
        m.h2d_bytes += nbytes(inner)
        m.add("memcpy h2d", 0, nbytes(inner), 0, False, eager=not STATE.as_replay)
    return out


# ------------------------------------------------------------------------------------------------
# Dispatch


@dataclass(frozen=True)
class _OpInfo:
    names: tuple[str, ...]  # argument names in schema order
    mutated: tuple[int, ...]  # positions of the arguments written in place (Tensor(a!))
    is_view: bool  # returns alias an input without writing it
    generator: int  # position of the `generator` argument, -1 if none
    sync: str | None  # why the host must wait for this operation's result, if it must
    index: bool  # aten.index / index_put_: CPU index tensors are allowed (a blocking copy)


@functools.cache
def _op_info(func: Any) -> _OpInfo:
    schema = func._schema
    names = tuple(a.name for a in schema.arguments)
    mutated = tuple(i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write)
    is_view = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
    packet = func.overloadpacket
    sync = _SYNC_OPS.get(packet)
    if packet is aten.repeat_interleave and func is aten.repeat_interleave.Tensor:
        sync = "repeat_interleave"
    return _OpInfo(names, mutated, is_view and not mutated, names.index("generator") if "generator" in names else -1,
                   sync, packet in _INDEX_OPS)


def _arg(info: _OpInfo, args: tuple[Any, ...], kwargs: dict[str, Any], i: int) -> Any:
    return args[i] if i < len(args) else kwargs.get(info.names[i])


class _Unwrapped:
    """One pass over an operation's arguments: SimTensors replaced by their CPU tensors, and what was found."""

    __slots__ = ("sims", "cpus", "capturing")

    def __init__(self, capturing: bool) -> None:
        self.sims: list[SimTensor] = []
        self.cpus: list[tuple[int | str, Tensor]] = []  # non-scalar CPU tensors and where they were given
        self.capturing = capturing

    def __call__(self, x: Any, where: int | str) -> Any:
        if type(x) is SimTensor:
            self.sims.append(x)
            return x.elem
        if isinstance(x, Tensor):
            if x.device.type == "cpu":
                if x.dim() > 0:
                    self.cpus.append((where, x))
                elif self.capturing:
                    return x.clone()  # CUDA reads a CPU scalar when the kernel is recorded: frozen from now on
            return x
        if type(x) is list or type(x) is tuple:
            return type(x)(self(v, where) for v in x)
        return x


def _dispatch(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if func is aten.copy_.default:
        return _copy(args, kwargs)
    info = _op_info(func)
    stream = STATE.current_stream()
    capturing = STATE.capture is not None and graph_capturing(stream)
    un = _Unwrapped(capturing)
    uargs = tuple(un(a, i) for i, a in enumerate(args))
    ukwargs = {k: un(v, k) for k, v in kwargs.items()}

    host_out = False  # the result lives on the host (a device→host copy, or device="cpu" asked for)
    dev = ukwargs.get("device")
    if dev is not None:
        dev = torch.device(dev)
        host_out = dev.type == "cpu"
        if dev.type == "cuda":
            ukwargs["device"] = CPU
        elif host_out and func.overloadpacket is aten._to_copy:
            if capturing:
                raise CaptureError("device→host copy while the stream captures a graph", call_site())
            if not ukwargs.get("non_blocking", False):
                STATE.host_sync("device→host copy", stream)
    index_h2d = False
    for where, _ in un.cpus:
        name = info.names[where] if isinstance(where, int) else where
        if info.index and name == "indices":
            index_h2d = True
        elif not host_out:
            error = DeviceMismatch(
                "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu! "
                f"({func}, argument {name!r} is on cpu)", call_site())
            STATE.violations.append(error)
            raise error
    if info.index:
        indices = _arg(info, args, kwargs, info.names.index("indices"))
        if any(isinstance(t, SimTensor) and t.dtype in (torch.bool, torch.uint8) for t in indices or ()):
            _sync_or_refuse("boolean mask index (nonzero)", stream, capturing)
    if index_h2d:
        _sync_or_refuse("blocking host→device copy of a CPU index tensor", stream, capturing)
    if info.sync is not None:
        _sync_or_refuse(info.sync, stream, capturing)
    if info.generator >= 0:
        gen = _arg(info, args, kwargs, info.generator)
        if gen is None:
            ukwargs["generator"] = cuda_generator()
        elif not getattr(gen, "sim_cuda", False):
            raise RuntimeError("Expected a 'cuda' device type for generator but found 'cpu'")

    mutated = [t.elem for i in info.mutated for t in _sims(_arg(info, args, kwargs, i))]
    # A view reads no data: only operations that touch memory are booked.
    reads = [] if info.is_view else [t.elem for t in un.sims]
    if capturing:
        out = graph_record(func, uargs, ukwargs, info.is_view, mutated, reads)
    else:
        out = func(*uargs, **ukwargs)

    writes = mutated
    originals = {id(t.elem): t for t in un.sims}
    inference = un.sims[0].is_inference() if info.is_view and un.sims else None

    def rewrap(x: Any) -> Any:
        if type(x) is list or type(x) is tuple:
            return type(x)(rewrap(v) for v in x)
        if not isinstance(x, Tensor) or type(x) is SimTensor:
            return x
        original = originals.get(id(x))
        if original is not None:
            return original
        if host_out or x.device.type != "cpu":
            return x
        sim, new = wrap(x, stream, graph_owned=capturing, inference=inference)
        if new:
            writes.append(x)
        return sim

    result = rewrap(out)
    if not capturing:
        STATE.access(stream, reads, writes, func)
        if STATE.meters and not info.is_view:
            meter_op(func, uargs, ukwargs, mutated, out, eager=True)
    return result


def _sims(value: Any) -> list[SimTensor]:
    if type(value) is SimTensor:
        return [value]
    if type(value) is list or type(value) is tuple:
        return [t for t in value if type(t) is SimTensor]
    return []


def _sync_or_refuse(what: str, stream: SimStream, capturing: bool) -> None:
    if capturing:
        raise CaptureError(f"{what}: a host sync while the stream captures a graph "
                           "(cudaErrorStreamCaptureUnsupported)", call_site())
    STATE.host_sync(what, stream)


def _copy(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """`dst.copy_(src, non_blocking)`: device↔device, host→device or device→host."""
    dst, src = args[0], args[1]
    non_blocking = bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
    stream = STATE.current_stream()
    capturing = graph_capturing(stream)
    d_sim, s_sim = isinstance(dst, SimTensor), isinstance(src, SimTensor)
    d_in = dst.elem if d_sim else dst
    s_in = src.elem if s_sim else src
    if d_sim and not s_sim:
        pinned = STATE.is_pinned(s_in)
        if capturing and not (non_blocking and pinned):
            raise CaptureError("host→device copy from pageable memory while the stream captures a graph",
                               call_site())
        if not non_blocking:
            STATE.host_sync("blocking host→device copy", stream)
    elif s_sim and not d_sim:
        pinned = STATE.is_pinned(d_in)
        if capturing and not (non_blocking and pinned):
            raise CaptureError("device→host copy into pageable memory while the stream captures a graph",
                               call_site())
        if not (non_blocking and pinned):
            STATE.host_sync("device→host copy", stream)
    reads = [s_in] if s_sim else []
    writes = [d_in] if d_sim else []
    if capturing:
        graph_record(aten.copy_.default, (d_in, s_in, non_blocking), {}, False, writes, reads)
    else:
        d_in.copy_(s_in, non_blocking=non_blocking)
        STATE.access(stream, reads, writes, "copy_")
        for m in STATE.meters:
            if d_sim and s_sim:
                m.add(aten.copy_.default, nbytes(s_in), nbytes(d_in), 0, False, eager=not STATE.as_replay)
            elif d_sim:
                m.h2d_bytes += nbytes(s_in)
                m.add("memcpy h2d", 0, nbytes(d_in), 0, False, eager=not STATE.as_replay)
            else:
                m.d2h_bytes += nbytes(s_in)
                m.add("memcpy d2h", nbytes(s_in), 0, 0, False, eager=True)
    return dst


# ------------------------------------------------------------------------------------------------
# The default generator of the simulated device


class SimGenerator(torch.Generator):
    """`torch.Generator(device="cuda")`: a CPU generator that reports cuda:0 (its numbers are the CPU's)."""

    sim_cuda: bool

    def __new__(cls, device: Any = "cpu") -> SimGenerator:
        self = super().__new__(cls, "cpu")  # type: ignore[call-arg]
        self.sim_cuda = torch.device(device).type == "cuda"
        return self

    def __init__(self, device: Any = "cpu") -> None:
        pass

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return CUDA if self.sim_cuda else CPU


@functools.cache
def cuda_generator() -> SimGenerator:
    return SimGenerator("cuda")


# ------------------------------------------------------------------------------------------------
# The torch-function mode


def _is_cuda(device: Any) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True  # a bare index names a CUDA device
    return torch.device(device).type == "cuda"


Handler = Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]
_HANDLERS: dict[Any, Handler] = {}


def _handles(*funcs: Any) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for f in funcs:
            _HANDLERS[f] = fn
        return fn
    return register


class SimMode(TorchFunctionMode):
    """Routes device moves, factories and the C++-only entry points of SimTensors (module docstring)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if kwargs.get("pin_memory"):  # host memory: made plain, and remembered as pinned
            out = func(*args, **{**kwargs, "pin_memory": False})
            STATE.mark_pinned(out)
            return out
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(func, args, kwargs)
        if _is_cuda(kwargs.get("device")) and not any(isinstance(a, SimTensor) for a in tree_flatten(args)[0]):
            return _factory(func, args, kwargs)
        return func(*args, **kwargs)


def _factory(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A torch function asked for device="cuda" with no device tensor given: made on the host, then held
    as device memory. Data given by the host (`torch.tensor(list, device=...)`) is a blocking copy."""
    stream = STATE.current_stream()
    kwargs = {**kwargs, "device": CPU}
    gen = kwargs.get("generator")
    if gen is not None and not getattr(gen, "sim_cuda", False):
        raise RuntimeError("Expected a 'cuda' device type for generator but found 'cpu'")
    if gen is None and func in _RANDOM_FACTORIES:
        kwargs["generator"] = cuda_generator()
    if func in _H2D_FACTORIES:
        data = args[0] if args else kwargs.get("data")
        if isinstance(data, SimTensor):
            return data.to(dtype=kwargs.get("dtype") or data.dtype) if func is not torch.tensor else data.clone()
        with torch._C.DisableTorchFunction():
            host = func(*args, **kwargs)
        return to_device(host, what=f"host→device copy ({func.__name__}(..., device='cuda'))")
    capturing = graph_capturing(stream)
    meta_kwargs = {k: v for k, v in kwargs.items() if k != "generator"} | {"device": "meta"}
    try:
        with torch._C.DisableTorchFunction():
            meta = func(*args, **meta_kwargs)
    except (RuntimeError, TypeError, NotImplementedError):
        meta = None  # no meta kernel: the size is checked when the storage is booked
    for t in tree_flatten(meta)[0]:
        if isinstance(t, Tensor):
            STATE.check_alloc(t.numel() * t.element_size())
    with torch._C.DisableTorchFunction():
        out = func(*args, **kwargs)
    if capturing:  # allocated from the graph's pool; its fill kernel is part of the graph
        graph_record_factory(func, args, kwargs, [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)])

    def wrap_new(x: Any) -> Any:
        if not isinstance(x, Tensor):
            return x
        sim, _ = wrap(x, stream, graph_owned=capturing)
        if not capturing:
            STATE.access(stream, [], [x], getattr(func, "__name__", str(func)))
            for m in STATE.meters:
                m.add(getattr(func, "__name__", str(func)), 0, nbytes(x), 0, False, eager=not STATE.as_replay)
        return sim

    return tree_map(wrap_new, out)


def _parse_to(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any, bool]:
    kwargs = dict(kwargs)
    kwargs.pop("copy", None)
    other = args[0] if args else kwargs.get("other")
    if isinstance(other, Tensor):
        return other.device, other.dtype, bool(kwargs.get("non_blocking", False))
    device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
    return device, dtype, bool(non_blocking)


@_handles(Tensor.to)
def _to(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    self = args[0]
    device, dtype, non_blocking = _parse_to(args[1:], kwargs)
    copy = bool(kwargs.get("copy", False))
    if isinstance(self, SimTensor):
        if device is not None and device.type == "cpu":
            return aten._to_copy.default(self, dtype=dtype or self.dtype, device=CPU, non_blocking=non_blocking)
        if dtype is None or dtype == self.dtype:
            return self.clone() if copy else self
        return aten._to_copy.default(self, dtype=dtype)
    if device is not None and device.type == "cuda":
        return to_device(self, dtype=dtype, non_blocking=non_blocking)
    return func(*args, **kwargs)


@_handles(Tensor.requires_grad_)
def _requires_grad(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # Autograd is not simulated: a graph node on a simulated tensor needs a CUDA device guard, which
    # aborts a CPU-only build. Simulated tensors (parameters included) never require grad.
    if isinstance(args[0], SimTensor):
        return args[0]
    return func(*args, **kwargs)


@_handles(Tensor.cuda)
def _cuda(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    self = args[0]
    if isinstance(self, SimTensor):
        return self
    return to_device(self, non_blocking=bool(kwargs.get("non_blocking", False)))


@_handles(Tensor.cpu)
def _cpu(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    self = args[0]
    if isinstance(self, SimTensor):
        return aten._to_copy.default(self, device=CPU)
    return func(*args, **kwargs)


@_handles(Tensor.pin_memory)
def _pin(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    self = args[0]
    if isinstance(self, SimTensor):
        raise RuntimeError("cannot pin 'torch.cuda.FloatTensor' only dense CPU tensors can be pinned")
    with torch._C.DisableTorchFunction():
        out = self.clone()
    STATE.mark_pinned(out)
    return out


@_handles(Tensor.is_pinned)
def _is_pinned(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return not isinstance(args[0], SimTensor) and STATE.is_pinned(args[0])


@_handles(Tensor.numpy, Tensor.__array__)
def _numpy(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if isinstance(args[0], SimTensor):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                        "to host memory first.")
    return func(*args, **kwargs)


@_handles(Tensor.tolist)
def _tolist(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    self = args[0]
    if isinstance(self, SimTensor):
        return aten._to_copy.default(self, device=CPU).tolist()
    return func(*args, **kwargs)


@_handles(Tensor.__invert__)
def _invert(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # The C++ binding takes a device guard; the aten op it calls does not.
    return aten.bitwise_not.default(args[0]) if isinstance(args[0], SimTensor) else func(*args, **kwargs)


@_handles(Tensor.nonzero, torch.nonzero)
def _nonzero(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    self = args[0]
    if not isinstance(self, SimTensor):
        return func(*args, **kwargs)
    out = aten.nonzero.default(self)  # [n, dims]; the host sync is counted in dispatch
    return tuple(aten.unbind.int(out, 1)) if kwargs.get("as_tuple") else out


@_handles(Tensor.copy_)
def _copy_method(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    self = args[0]
    if not isinstance(self, SimTensor):
        return func(*args, **kwargs)
    src = args[1] if len(args) > 1 else kwargs["src"]
    non_blocking = bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
    return aten.copy_.default(self, src, non_blocking)


@_handles(Tensor.contiguous)
def _contiguous(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    self = args[0]
    if not isinstance(self, SimTensor):
        return func(*args, **kwargs)
    fmt = args[1] if len(args) > 1 else kwargs.get("memory_format", torch.contiguous_format)
    return self if self.is_contiguous(memory_format=fmt) else aten.clone.default(self, memory_format=fmt)


@_handles(torch.where, Tensor.where)
def _where(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # where(cond, x, 0.0) makes a scalar tensor on x's device through the CUDA backend directly; give it
    # a CPU scalar tensor instead, which CUDA kernels read by value (the same result).
    if len(args) == 3 and any(isinstance(a, SimTensor) for a in args):
        args = tuple(torch.tensor(a) if isinstance(a, Number) else a for a in args)
    return func(*args, **kwargs)


@_handles(torch.nn.functional.scaled_dot_product_attention)
def _sdpa(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # On a GPU this is one fused kernel. Its composite entry point makes masks through the CUDA backend
    # directly, so run the fused CPU kernel CPU inference itself picks (the same numbers as on CPU): one
    # operation, booked and counted as the device would run it.
    if not any(isinstance(a, SimTensor) for a in args[:3]):
        return func(*args, **kwargs)
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, args, strict=False)) | kwargs
    q, k, v = bound["query"], bound["key"], bound["value"]
    if bound.get("dropout_p", 0.0) or bound.get("enable_gqa", False):
        return func(*args, **kwargs)
    mask = bound.get("attn_mask")
    if mask is not None and mask.dtype == torch.bool:
        # The conversion the CUDA kernels make (one more kernel): through the dispatcher, so it is counted.
        mask = torch.zeros_like(mask, dtype=q.dtype).masked_fill_(mask.logical_not(), float("-inf"))
    return aten._scaled_dot_product_flash_attention_for_cpu.default(
        q, k, v, 0.0, bool(bound.get("is_causal", False)), attn_mask=mask, scale=bound.get("scale"))[0]


@_handles(Tensor.__float__, Tensor.__int__, Tensor.__bool__, Tensor.__index__, Tensor.__complex__)
def _scalar(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    self = args[0]
    if not isinstance(self, SimTensor):
        return func(*args, **kwargs)
    if self.numel() != 1:
        raise RuntimeError(f"a Tensor with {self.numel()} elements cannot be converted to Scalar")
    value = aten._local_scalar_dense.default(self)  # the host sync, counted in dispatch
    convert: dict[Any, Any] = {Tensor.__float__: float, Tensor.__int__: int, Tensor.__bool__: bool,
                               Tensor.__index__: int, Tensor.__complex__: complex}
    return convert[func](value)


@_handles(Tensor.__repr__, Tensor.__format__, Tensor.__str__)
def _repr(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    self = args[0]
    if isinstance(self, SimTensor):
        host = aten._to_copy.default(self, device=CPU)
        text = func(host, *args[1:], **kwargs)
        return text[:-1] + ", device='cuda:0')" if text.endswith(")") else text
    return func(*args, **kwargs)


@_handles(Tensor.data_ptr)
def _data_ptr(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    self = args[0]
    return self.elem.data_ptr() if isinstance(self, SimTensor) else func(*args, **kwargs)


@_handles(Tensor.untyped_storage)
def _storage(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    self = args[0]
    return self.elem.untyped_storage() if isinstance(self, SimTensor) else func(*args, **kwargs)


@_handles(Tensor.record_stream)
def _record_stream(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    self, stream = args[0], args[1] if len(args) > 1 else kwargs["stream"]
    if not isinstance(self, SimTensor) or not isinstance(stream, SimStream):
        raise RuntimeError("record_stream needs a CUDA tensor and a CUDA stream")
    STATE.record_stream(self.elem, stream)


@_handles(Tensor.new_tensor)
def _new_tensor(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    self = args[0]
    if isinstance(self, SimTensor) or _is_cuda(kwargs.get("device")):
        dtype = kwargs.get("dtype") or self.dtype
        return _factory(torch.tensor, (args[1],), {"dtype": dtype, "device": kwargs.get("device") or CUDA})
    return func(*args, **kwargs)


@_handles(torch.tensor)
def _tensor(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    data = args[0] if args else kwargs.get("data")
    if isinstance(data, SimTensor):
        out = data.clone()
        dtype = kwargs.get("dtype")
        return out if dtype is None or dtype == out.dtype else out.to(dtype)
    if _is_cuda(kwargs.get("device")):
        return _factory(func, args, kwargs)
    return func(*args, **kwargs)


@_handles(torch.as_tensor, torch.asarray)
def _as_tensor(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    data = args[0] if args else kwargs.get("data") or kwargs.get("obj")
    device = kwargs.get("device")
    if isinstance(data, SimTensor) and (device is None or _is_cuda(device)):
        dtype = kwargs.get("dtype")
        return data if dtype is None or dtype == data.dtype else data.to(dtype)
    if isinstance(data, SimTensor):
        return data.to(device=device, dtype=kwargs.get("dtype"))
    if _is_cuda(device):
        return _factory(func, args, kwargs)
    return func(*args, **kwargs)


# ------------------------------------------------------------------------------------------------
# Indexing, re-expressed with aten ops (view ops for the basic part, index / index_put_ for the rest)


def _split_index(x: Tensor, index: Any) -> tuple[Tensor, list[Tensor | None]]:
    """Apply ints, slices, None and Ellipsis with view ops; return the view and aten.index's list of
    advanced indices (empty when there are none), following PyTorch's applySlicing."""
    items = list(index) if isinstance(index, tuple) else [index]
    for i, o in enumerate(items):
        if isinstance(o, list | range):
            items[i] = torch.tensor(list(o))
    specified = 0
    for o in items:
        if o is None or o is Ellipsis or isinstance(o, bool):
            continue
        specified += o.dim() if isinstance(o, Tensor) and o.dtype in (torch.bool, torch.uint8) else 1
    y, dim = x, 0
    adv: list[Tensor | None] = []
    for o in items:
        if o is Ellipsis:
            dim += x.dim() - specified
        elif o is None:
            y = aten.unsqueeze.default(y, dim)
            dim += 1
        elif isinstance(o, bool):
            raise IndexError("simcuda: indexing with a Python bool is not supported")
        elif isinstance(o, int) or (isinstance(o, Tensor) and o.dim() == 0 and not o.is_floating_point()
                                    and o.dtype not in (torch.bool, torch.uint8)):
            i = int(o)  # a device scalar index is read on the host (a sync, counted by item())
            size = y.size(dim)
            if not -size <= i < size:
                raise IndexError(f"index {i} is out of bounds for dimension {dim} with size {size}")
            y = aten.select.int(y, dim, i)
        elif isinstance(o, slice):
            step = 1 if o.step is None else int(o.step)
            if step <= 0:
                raise ValueError("step must be greater than zero")
            start = 0 if o.start is None else int(o.start)
            stop = (1 << 62) if o.stop is None else int(o.stop)
            y = aten.slice.Tensor(y, dim, start, stop, step)
            dim += 1
        elif isinstance(o, Tensor):
            adv.extend([None] * (dim + 1 - len(adv)))
            adv[dim] = o
            dim += 1
        else:
            raise IndexError(f"simcuda: unsupported index {type(o).__name__}")
    return y, adv


@_handles(Tensor.__getitem__)
def _getitem(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x, index = args
    if not isinstance(x, SimTensor):
        return func(*args, **kwargs)
    y, adv = _split_index(x, index)
    if any(t is not None for t in adv):
        y = aten.index.Tensor(y, adv)
    elif y is x:
        y = aten.alias.default(x)  # x[...] is a new view
    return y


@_handles(Tensor.__setitem__)
def _setitem(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    x, index, value = args
    if not isinstance(x, SimTensor):
        func(*args, **kwargs)
        return
    y, adv = _split_index(x, index)
    if any(t is not None for t in adv):
        if isinstance(value, Number):
            value = torch.tensor(value, dtype=y.dtype)
        aten.index_put_.default(y, adv, value)
    elif isinstance(value, Number):
        aten.fill_.Scalar(y, value)
    else:
        aten.copy_.default(y, value)
