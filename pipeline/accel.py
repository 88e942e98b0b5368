"""Acceleration that wraps the eager code and is never a fork of it: CUDA streams and graphed decode steps.

`Streams` names the two CUDA streams of the engine (the GPT decode batch and the acoustic jobs) and
every hand-off between them; on CPU each method is a no-op, so the same engine code runs in order.
`step_function` is the pure decode step (decode.py), optionally compiled with inductor; a compile
failure falls back to the eager step with one log line. The decode batch replays it from CUDA graphs
(pipeline/graphs.py). Nothing here runs on CPU except the no-op paths."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

from .decode import StepFn, decode_step
from .gpt import LayerKV, UnifiedVoice

log = logging.getLogger(__name__)

ROW_BUCKETS = (4, 8, 16, 32, 64, 128)  # batch rows a graphed decode step is captured for


class Streams:
    """The GPT, acoustic and voice streams, created once (CUDA), or None on CPU. Voices are prepared on
    their own stream (and thread, in the daemon) so a registration never waits behind decode steps."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        cuda = device.type == "cuda"
        self.gpt: torch.cuda.Stream | None = torch.cuda.Stream(device) if cuda else None
        self.acoustic: torch.cuda.Stream | None = torch.cuda.Stream(device) if cuda else None
        self.voice: torch.cuda.Stream | None = torch.cuda.Stream(device) if cuda else None

    def on(self, stream: torch.cuda.Stream | None) -> AbstractContextManager[object]:
        return torch.cuda.stream(stream) if stream is not None else nullcontext()

    def start(self, stream: torch.cuda.Stream | None) -> None:
        """Before `stream` reads tensors made on the default stream (voices, prefixes): wait for it."""
        if stream is not None:
            stream.wait_stream(torch.cuda.default_stream(self.device))

    def hand_over(self, src: torch.cuda.Stream | None, dst: torch.cuda.Stream | None, *tensors: Tensor) -> None:
        """Tensors made on `src` are read on `dst`: dst waits for src's work so far, and the allocator
        keeps their memory until dst is done with them (record_stream)."""
        if src is None or dst is None:
            return
        dst.wait_stream(src)
        for t in tensors:
            t.record_stream(dst)

    def publish(self, src: torch.cuda.Stream | None, tensors: Sequence[Tensor]) -> None:
        """Long-lived tensors made on `src` (a voice), to be read on the GPT and acoustic streams at any
        later time: their memory is recorded on both (so it is not reused while either may still read
        it), and the calling thread waits for `src`, so all work issued afterwards runs after them."""
        if src is None or self.gpt is None or self.acoustic is None:
            return
        for t in tensors:
            t.record_stream(self.gpt)
            t.record_stream(self.acoustic)
        src.synchronize()  # blocks only the preparing thread

    def mark(self, stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
        """An event after the work issued so far on `stream` (None on CPU: the work is already done)."""
        if stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def to_host(self, t: Tensor) -> Tensor:
        """Copy to host memory without blocking the host: pinned memory, non_blocking. The caller waits on
        an event recorded after this copy (`mark`) before reading the result. On CPU: `t` itself."""
        if t.device.type != "cuda":
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host


class CompiledOrEager:
    """A compiled step that falls back to the eager one, for good, the first time it fails where the eager
    step does not (no C compiler for Triton's launcher, an inductor bug): one log line, dynamo reset, and
    serving goes on eagerly. A failure the eager step shares is not the compiler's: it is raised."""

    def __init__(self, compiled: StepFn, eager: StepFn) -> None:
        self.fn = compiled
        self.eager = eager
        self.failed = False

    def __call__(
        self, gpt: UnifiedVoice, tokens: Tensor, input_pos: Tensor, mel_pos: Tensor, kv: Sequence[LayerKV], kv_len: int
    ) -> Tensor:
        if not self.failed:
            try:
                return self.fn(gpt, tokens, input_pos, mel_pos, kv, kv_len)
            except Exception as e:
                out = self.eager(gpt, tokens, input_pos, mel_pos, kv, kv_len)  # raises what is not compile's
                log.warning("compiled decode step failed, continuing eagerly error=%s", _first_line(e))
                torch._dynamo.reset()
                self.failed = True
                return out
        return self.eager(gpt, tokens, input_pos, mel_pos, kv, kv_len)


def step_function(device: torch.device, *, compile: bool) -> StepFn:
    """The decode step as run on `device`: eager, or inductor-compiled (`compile`, falling back to eager
    on failure). On CUDA the batch replays it inside its graphs (DecodeBatch, pipeline/graphs.py)."""
    if not compile:
        return decode_step
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(ROW_BUCKETS))
    return CompiledOrEager(torch.compile(decode_step, fullgraph=True, dynamic=False), decode_step)


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]
