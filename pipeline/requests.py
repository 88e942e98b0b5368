"""What a synthesis request is, and what comes out of it: the types the daemon and the engine share.

Torch-free (NumPy only), so the daemon can hold requests and read results without importing torch;
the engine (engine.py) fills in the fields marked as engine state."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ttsd.api.options import SynthesisOptions
from ttsd.api.pcm import to_s16le

if TYPE_CHECKING:
    from torch import Tensor

    from .voice import Voice


@dataclass(frozen=True, kw_only=True, slots=True)
class Segment:
    index: int  # 0, 1, 2, ... within one request
    text_ids: list[int]  # ids fed to the GPT
    text: str  # the pieces decoded back to readable text
    lang_index: int | None = None  # IndexTTS-2.5: the lang_embedding row of the segment's language

    def with_index(self, index: int) -> Segment:
        return replace(self, index=index)


@dataclass(frozen=True, slots=True)
class SegmentAudio:
    """A segment's audio, or with chunk_codes > 0 one piece of it: float samples at ±32767 scale, and
    the silence that precedes it. A whole segment is one piece (part 0, last)."""

    segment: Segment
    samples: np.ndarray  # float32 (N,), the exact model output (parity tests compare these)
    silence_samples: int  # interval_silence_ms of zeros before every segment but a request's first (part 0 only)
    part: int = 0  # 0, 1, 2, ... pieces of this segment, delivered in order
    last: bool = True  # the segment's final piece: its audio is complete

    @property
    def pcm(self) -> bytes:
        """s16le mono bytes at the pipeline's rate, the leading silence included (what clients get)."""
        return to_s16le(self.samples, self.silence_samples)


@dataclass(eq=False)
class Request:
    """One synthesis request inside the engine. The caller fills the first fields; the rest is engine state."""

    voice: Voice
    opts: SynthesisOptions  # checked with Pipeline.check_options; seed fixed (the engine draws one if None)
    emo_voice: Voice | None = None  # its speaker clip is the emotion reference
    # Text not yet split into segments, or segments its caller split ahead of time (the daemon splits
    # on its own thread, so normalising a long text never holds up a decode step).
    texts: deque[str | tuple[Segment, ...]] = field(default_factory=deque)
    input_closed: bool = True  # False while more text may come (incremental input)
    incremental: bool = False  # unspeakable text pieces are skipped instead of failing the request
    credits: int | None = None  # segments it may start before grant() returns them; None = unlimited
    noise: Mapping[int, Tensor] | None = None  # injected CFM start noise per segment index (parity tests)
    tag: Any = None  # the caller's handle
    # Engine state:
    seq: int = 0  # arrival order
    segments: deque[Segment] = field(default_factory=deque)  # split, not started
    next_index: int = 0  # index of the next segment to split off
    started: int = 0  # segments started (decode or later)
    delivered: int = 0  # segments handed out
    emovec: Tensor | None = None  # (1, D), computed once at the first segment
    finished: bool = False  # done, failed or cancelled: no more events
    # Audio pieces per segment index, queued in order, delivered once every earlier segment is complete.
    ready: dict[int, deque[SegmentAudio]] = field(default_factory=dict)

    @property
    def in_flight(self) -> int:
        """Segments started and not yet completely delivered."""
        return self.started - self.delivered

    @property
    def exhausted(self) -> bool:
        """Every segment this request will ever have has been delivered."""
        return self.input_closed and not self.texts and not self.segments and self.in_flight == 0


@dataclass(frozen=True, slots=True)
class SegmentDone:
    request: Request
    audio: SegmentAudio


@dataclass(frozen=True, slots=True)
class RequestDone:
    request: Request


@dataclass(frozen=True, slots=True)
class RequestFailed:
    request: Request
    error: BaseException


Event = SegmentDone | RequestDone | RequestFailed
Observer = Callable[[str, Request, int], None]
"""(what, request, segment index) on the driving thread, for tests and tracing: "decode" when a
segment enters the decode batch, "codes" when its codes are ready, "acoustic" when an acoustic job
takes it, "audio" when its audio is handed out."""


