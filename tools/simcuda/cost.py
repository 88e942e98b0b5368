"""What the simulated device's work would cost a real one: kernel launches, bytes moved, FLOPs, host syncs.

A `CostMeter` open on the simulated device (`simcuda.meter()`) sees every operation that would run on a
GPU: an eager operation is one launch; an operation replayed from a captured graph is a graph node (no
launch of its own: the replay is one launch); copies between host and device count their bytes. View
operations move nothing and are not counted.

Bytes are the elements an operation touches, views resolved (a slice of the KV cache counts the slice,
not the cache): every tensor it reads, plus what it writes. Gathers (index, index_select, gather,
embedding) read as many source elements as they produce. FLOPs are counted for the operations that
dominate: matrix products (2·M·K·N), convolutions (2 × outputs × inputs per output) and fused
attention; elementwise work is counted as memory traffic only.

`DeviceModel.seconds` turns a meter into time with a roofline per operation — max(bytes / bandwidth,
FLOPs / peak rate) — plus a fixed cost per eager launch and per graph node. The numbers are modelled,
not measured: they say what the code asks of the device, not what a device does with it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

aten = torch.ops.aten

_GATHERS = {aten.index, aten.index_select, aten.gather, aten.embedding, aten._embedding_bag}
_MATMULS = {aten.mm, aten.bmm, aten.addmm, aten.baddbmm, aten.matmul, aten.linear}
_ATTENTION = {aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_efficient_attention,
              aten._scaled_dot_product_cudnn_attention, aten.scaled_dot_product_attention,
              aten._scaled_dot_product_flash_attention_for_cpu}
HALF = (torch.float16, torch.bfloat16)


def nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def tensors_of(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in tensors_of(v)]
    return []


def op_flops(func: Any, args: tuple[Any, ...], out: Any) -> int:
    """FLOPs of the operations that dominate (matrix products, convolutions, attention); 0 otherwise."""
    packet = getattr(func, "overloadpacket", None)
    outs = tensors_of(out)
    if not outs:
        return 0
    if packet in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.matmul, aten.linear):
        a = args[1] if packet in (aten.addmm, aten.baddbmm) else args[0]
        k = a.size(-1)
        return 2 * outs[0].numel() * k
    if packet in (aten.convolution, aten.conv1d, aten.conv2d, aten._convolution, aten.conv_transpose1d):
        weight = args[1]
        per_output = weight.numel() // weight.size(0) if packet is not aten.conv_transpose1d else (
            weight.numel() // weight.size(1))
        return 2 * outs[0].numel() * per_output
    if packet in _ATTENTION:
        q, k = args[0], args[1]
        return 4 * q.numel() * k.size(-2)  # q·kᵀ and p·v: 2·B·H·Sq·Sk·D each
    return 0


def op_bytes(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], mutated: list[Tensor], out: Any
             ) -> tuple[int, int]:
    """(bytes read, bytes written) of one operation on the tensors it was given."""
    packet = getattr(func, "overloadpacket", None)
    outs = [t for t in tensors_of(out) if not any(t is m for m in mutated)]
    written = sum(nbytes(t) for t in outs) + sum(nbytes(t) for t in mutated)
    if packet is None:  # a factory (torch.arange(..., device="cuda")): it only writes
        return 0, written
    inputs = tensors_of(list(args)) + tensors_of(list(kwargs.values()))
    if packet in _GATHERS:
        source = args[1] if packet is aten.embedding else args[0]
        rest = [t for t in inputs if t is not source]
        return sum(nbytes(t) for t in outs) + sum(nbytes(t) for t in rest), written
    if packet in (aten.index_put_, aten.index_put, aten._index_put_impl_):
        values = args[2] if len(args) > 2 else kwargs["values"]
        indices = tensors_of(args[1] if len(args) > 1 else kwargs["indices"])
        touched = values.numel() * args[0].element_size() if values.dim() else 0
        return nbytes(values) + sum(nbytes(t) for t in indices), touched or nbytes(values)
    if packet in (aten.copy_, aten.fill_, aten.zero_):
        src = args[1] if packet is aten.copy_ else None
        return (nbytes(src) if isinstance(src, Tensor) else 0), written
    return sum(nbytes(t) for t in inputs), written


@dataclass
class Cost:
    """The work of one region: launches, graph nodes, bytes, FLOPs (by precision), syncs and copies."""

    launches: int = 0  # eager kernels (and one per graph replay)
    graph_nodes: int = 0  # kernels replayed from captured graphs
    bytes_read: int = 0
    bytes_written: int = 0
    flops_half: int = 0  # FLOPs of matrix work in float16/bfloat16 (tensor cores)
    flops_fp32: int = 0
    syncs: int = 0
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    ops: list[tuple[str, int, int, bool, bool]] = field(default_factory=list)  # (op, bytes, flops, half, eager)

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    def add(self, func: Any, read: int, written: int, flops: int, half: bool, *, eager: bool) -> None:
        if eager:
            self.launches += 1
        else:
            self.graph_nodes += 1
        self.bytes_read += read
        self.bytes_written += written
        if half:
            self.flops_half += flops
        else:
            self.flops_fp32 += flops
        self.ops.append((str(func), read + written, flops, half, eager))

    def replay(self) -> None:
        """One graph replay: a single launch."""
        self.launches += 1


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceModel:
    """A device for the roofline (modelled, not measured). Defaults: NVIDIA H100 SXM datasheet values."""

    name: str = "H100 SXM (datasheet values; modelled)"
    bandwidth_bps: float = 3.35e12  # HBM3
    half_flops: float = 989e12  # dense bf16/fp16 tensor cores
    fp32_flops: float = 67e12  # fp32 without tensor cores
    launch_s: float = 5e-6  # one eager kernel launch (host side, the floor of a tiny kernel)
    graph_node_s: float = 2e-6  # one kernel inside a replayed graph

    def seconds(self, cost: Cost) -> float:
        """Σ over operations of max(bytes / bandwidth, FLOPs / peak), plus launch and graph-node costs."""
        t = 0.0
        for _, moved, flops, half, _ in cost.ops:
            t += max(moved / self.bandwidth_bps, flops / (self.half_flops if half else self.fp32_flops))
        return t + cost.launches * self.launch_s + cost.graph_nodes * self.graph_node_s
