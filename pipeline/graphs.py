"""CUDA graphs of in-place work: a closure captured once per key, then replayed as one launch.

The work a closure graphs (the decode batch's selection and forward, the DiT's solver step) reads and
writes tensors at fixed addresses, so a replay needs no arguments: the key names everything a host
value fixed at capture (row bucket, attention length, sampling mode). Before capture the closure runs
eagerly on a side stream (cuBLAS workspaces, lazy initialisation, a compiled function's first call);
those runs change state the real step has not yet changed (positions advanced, codes marked), so the
tensors passed as `state` are saved before them and restored after each: every run then writes what
the real step writes (the same cache slots, the same values), and only that. Nothing here runs on CPU."""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

log = logging.getLogger(__name__)

GRAPH_WARMUP_RUNS = 2  # eager runs on a side stream before capture (cuBLAS workspaces, lazy init)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def recent(shapes: dict[K, V], key: K, make: Callable[[], V], keep: int) -> V:
    """The entry of `key` in `shapes` (kept in order of use, oldest first), made by `make` if there is
    none; beyond `keep` entries the least recently used ones are dropped (graphs and buffers with them)."""
    entry = shapes.pop(key, None)
    if entry is None:
        entry = make()
        while len(shapes) >= keep:
            del shapes[next(iter(shapes))]
    shapes[key] = entry
    return entry


class Graphs:
    """Graphs by key. `run(key, fn, state)` replays the graph of `key`, capturing `fn` first if there is
    none, and returns what `fn` returned at capture (graph-owned tensors, rewritten by every replay)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, Any]] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self.graphs

    def run(self, key: Hashable, fn: Callable[[], Any], state: Sequence[Tensor] = ()) -> Any:
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(key, fn, state)
        graph, out = entry
        graph.replay()
        return out

    def _capture(self, key: Hashable, fn: Callable[[], Any], state: Sequence[Tensor]
                 ) -> tuple[torch.cuda.CUDAGraph, Any]:
        current = torch.cuda.current_stream()
        saved = [t.clone() for t in state]
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP_RUNS):
                fn()
                for t, s in zip(state, saved, strict=True):
                    t.copy_(s)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        log.debug("captured %s graph key=%s", self.name, key)
        return graph, out
