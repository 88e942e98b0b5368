"""The request path every interface shares: one `RequestRun` per synthesis request, whichever door
it came in by. The WebSocket session, the OpenAI-compatible HTTP API and the Wyoming server are
adapters: they turn their wire format into text, a voice and checked options, and segments back
into their wire format. Everything else about a request happens here, once:

    adapter                                 RequestRun (this file)                   Worker
    wire → text, voice, options   ──►  check_text: limits (ttsd.api.rules)
                                       submit: seed, Job, admission      ──►  Busy / ShuttingDown, or a slot
    sink ◄── segments, end        ◄──────────────────────────────────────────  events (on the loop)
    segment written to the peer   ──►  audio_sent / segment_sent:
                                       first-audio time, metrics, credit ──►  Credit
    request over, or peer gone    ──►  end(code): metrics, one log line,
                                       cancel what is left               ──►  Stop (silent)

Flow control is the worker's: a job starts with SEGMENT_CREDITS credits and its adapter returns one
(`segment_sent`) after writing each segment to its client, so a QueueSink holds at most
SEGMENT_CREDITS segments and the end. A client that stops reading parks its job, and after
stall_timeout_s the worker ends it with slow_consumer; `QueueSink.on_stop` lets an adapter drop the
connection at once, since its writer is then blocked on a socket that nobody reads.

Options given as plain key/value maps (an HTTP body, a preset's TOML file) are named by the
WebSocket `synthesize` field names (docs/protocol.md) and checked against the options table
(`Option.problem`, the validator the protocol decoder uses), so every interface accepts the same
names, types and ranges, and an option added to the table is accepted everywhere with no change.

Also here, so that each is written once: the connections' socket send buffer, the peer name in
log lines, the bound on a request body, and the `Listener` shape the server hosts."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from ttsd.api import protocol as p
from ttsd.api.errors import BadText, TextTooLong
from ttsd.api.options import OPTIONS, SynthesisOptions
from ttsd.api.rules import check_text
from ttsd.pipeline.text.segment import SentenceBuffer

from .metrics import DISCONNECTED, OK
from .worker import Job

if TYPE_CHECKING:
    from ttsd.pipeline import Voice

    from .config import DaemonConfig
    from .metrics import Metrics
    from .worker import JobSink, Worker

log = logging.getLogger(__name__)

# Kernel send buffer per connection, every interface. Linux autotunes it up to tcp_wmem's max (4 MiB,
# ~95 s of audio, already at the start on loopback), which would let a client that stops reading
# absorb minutes of audio before credits park its requests. 256 KiB is ~6 s of audio and still
# ~2.5 MB/s at 100 ms RTT, far above the 44 kB/s real-time rate.
SOCKET_SEND_BUFFER_BYTES: Final = 256 * 1024
# A request body (HTTP) or event data (Wyoming) holds the text, each character at most 6 bytes as a
# JSON \uXXXX escape, and small fields: max_text_chars × 6 + this many bytes.
BODY_OVERHEAD_BYTES: Final = 64 * 1024
_OPTIONS: Final = {o.name: o for o in OPTIONS}
# Client frames and uploads of up to max_frame_bytes pass through the C heap. glibc raises its mmap
# threshold to the largest block freed (up to 32 MiB), so after one large frame the next ones come from
# the heap, and freed heap pages below its top stay resident: a client sending large frames would leave
# the daemon several frames larger for good. After input this large, malloc_trim hands those pages back,
# at most once per TRIM_DELAY_S (it walks every arena, under their locks).
TRIM_AFTER_BYTES: Final = 2**20
TRIM_DELAY_S: Final = 0.05


class Listener(Protocol):
    """One interface's listening socket and its connections, as the server hosts it."""

    @property
    def interface(self) -> str:
        """Its metrics label (metrics.INTERFACES)."""

    async def start(self) -> None:
        """Listen on its configured address; return once connections are accepted."""

    async def close(self) -> None:
        """Stop listening and close every connection, within about CLOSE_TIMEOUT_S (FLUSH_ON_CLOSE_S more
        for the WebSocket, which first sends what is queued)."""

    @property
    def url(self) -> str: ...

    @property
    def connections(self) -> int: ...


def limit_send_buffer(sock: socket.socket | None) -> None:
    """Cap a connection's kernel send buffer at SOCKET_SEND_BUFFER_BYTES (see there)."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_SEND_BUFFER_BYTES)
    except OSError as e:
        log.debug("cannot set SO_SNDBUF error=%s", e)


def peer_name(address: object) -> str:
    """A socket's peer address ((host, port, ...) from getpeername) as "host:port" for log lines; else "?"."""
    if isinstance(address, tuple | list) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return "?"


# ------------------------------------------------------------------------------------------------
# Options from plain key/value maps


class OptionError(ValueError):
    """An option that is unknown, ill-typed or out of range; `param` names it."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class Options:
    opts: SynthesisOptions
    emo_voice: str | None       # a preset name or voice id, resolved by the caller


def options_from(values: Mapping[str, object]) -> Options:
    """{option name: value} (JSON or TOML values; None: not set) → checked options, or OptionError.
    `emo_voice` is accepted beside the options table, as in a `synthesize` frame."""
    checked: dict[str, Any] = {}
    emo_voice: str | None = None
    for name, value in values.items():
        if value is None:
            continue
        if name == "emo_voice":
            if not isinstance(value, str):
                raise OptionError("'emo_voice' must be a string", name)
            if len(value) > p.MAX_VOICE_ID_CHARS:
                raise OptionError(f"'emo_voice' is longer than {p.MAX_VOICE_ID_CHARS} characters", name)
            emo_voice = value
            continue
        o = _OPTIONS.get(name)
        if o is None:
            raise OptionError(f"unknown field {p.quote(name)}", name)
        problem = o.problem(value)
        if problem is not None:
            raise OptionError(problem, name)
        if isinstance(value, list | tuple):
            value = tuple(float(v) for v in value)
        elif o.kind is float and isinstance(value, int):
            value = float(value)  # JSON and TOML write 1.0 as 1 as often as not
        checked[name] = value
    return Options(SynthesisOptions(**checked), emo_voice)


# ------------------------------------------------------------------------------------------------
# A sink for adapters that write from one task per request


@dataclass(frozen=True, slots=True)
class SegmentAudio:
    index: int
    text: str
    pcm: bytes                  # s16le mono at protocol.SAMPLE_RATE_HZ
    first: bool = True          # the segment's first piece (chunk_codes > 0 splits a segment into pieces)
    last: bool = True           # its last piece: the segment is complete and its credit goes back


@dataclass(frozen=True, slots=True)
class Ended:
    code: str | None            # None: every segment was delivered; else an ErrorCode
    message: str = ""


class QueueSink:
    """A JobSink (called on the loop) whose results one consumer task reads from `queue`."""

    def __init__(self, on_stop: Callable[[str], None] | None = None) -> None:
        self.queue: asyncio.Queue[SegmentAudio | Ended] = asyncio.Queue()
        self.on_stop = on_stop  # called at once with the code when the worker ends the job early

    def on_segment(self, index: int, text: str, pcm: bytes, first: bool = True, last: bool = True) -> None:
        self.queue.put_nowait(SegmentAudio(index, text, pcm, first, last))

    def on_done(self) -> None:
        self.queue.put_nowait(Ended(None))

    def on_error(self, code: str, message: str) -> None:
        self.queue.put_nowait(Ended(code, message))
        if self.on_stop is not None:
            self.on_stop(code)

    def stop_code(self) -> str:
        """Why writing to the client failed: the worker's end if one is queued (it may have dropped
        the connection itself, as on_stop does), else DISCONNECTED: the client left."""
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if isinstance(item, Ended):
                return item.code or OK
        return DISCONNECTED


# ------------------------------------------------------------------------------------------------
# The request


@dataclass(frozen=True, slots=True)
class Interface:
    """What a request's log lines and metrics call its door."""

    name: str                   # metrics label (metrics.INTERFACES)
    log_prefix: str             # before "request ..." in its log lines: "" or "http "
    done_word: str = "end"      # "request <done_word>" for a request that delivered everything ...
    ended_word: str = "end"     # ... and "request <ended_word>" for one that ended otherwise


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return cast("Callable[[int], int]", trim)


class Core:
    """What every request of the daemon shares: the worker, the limits and the metrics."""

    def __init__(self, worker: Worker, config: DaemonConfig, metrics: Metrics) -> None:
        self.worker, self.config, self.metrics = worker, config, metrics
        self._trim = _malloc_trim()
        self._trim_pending = False
        self._trimmed_at = -TRIM_DELAY_S  # loop time of the last trim

    def took_input(self, nbytes: int) -> None:
        """An adapter has dropped a client input of `nbytes` (a frame, a body): give the heap's free pages
        back to the system if it was large (TRIM_AFTER_BYTES), as soon as the loop is free and at least
        TRIM_DELAY_S after the last trim. Call on the event loop."""
        if nbytes < TRIM_AFTER_BYTES or self._trim is None or self._trim_pending:
            return
        self._trim_pending = True
        loop = asyncio.get_running_loop()
        wait = self._trimmed_at + TRIM_DELAY_S - loop.time()
        if wait > 0:
            loop.call_later(wait, self._release_heap)
        else:
            loop.call_soon(self._release_heap)

    def _release_heap(self) -> None:
        self._trim_pending = False
        self._trimmed_at = asyncio.get_running_loop().time()
        if self._trim is not None:
            self._trim(0)

    def run(self, interface: Interface, peer: str, label: str = "") -> RequestRun:
        """A new request arriving now from `peer`; `label` ("id=7 ") names it in log lines beside its key."""
        return RequestRun(self, interface, peer, label)


class RequestRun:
    """One synthesis request from its arrival to its end. The adapter calls, in order: `check_text`,
    `submit` (or `refuse` when anything before it fails), `add_text` / `close_input` for incremental
    text, `audio_sent` and `segment_sent` as it writes, and `end` exactly when the request is over for
    its client, in every case (a `finally`: a request whose client left ends with DISCONNECTED, and its
    job is cancelled). `refuse` and `end` count and log the request once; later calls do nothing."""

    def __init__(self, core: Core, interface: Interface, peer: str, label: str = "") -> None:
        self.core, self.interface, self.peer, self.label = core, interface, peer, label
        self.t0 = time.perf_counter()
        self.job: Job | None = None
        self.text_chars = 0
        self.sentences: SentenceBuffer | None = None  # incremental: text not yet a complete sentence
        self.segments = 0                             # segments written to the client
        self.samples = 0                              # samples written to the client
        self.piece_samples = 0                        # of the segment being written, its pieces so far
        self.first_audio_s: float | None = None       # from arrival to the first audio written
        self.total_s: float | None = None             # from arrival to `end`
        self.code: str | None = None                  # set once the request is over

    @property
    def ended(self) -> bool:
        return self.code is not None

    @property
    def input_closed(self) -> bool:
        """False while an incremental request may get more text."""
        return self.sentences is None

    @property
    def audio_s(self) -> float:
        return self.samples / p.SAMPLE_RATE_HZ

    # Admission

    def check_text(self, text: str, *, allow_empty: bool = False) -> None:
        """The request's (first) text against the limits: TextTooLong over max_text_chars, and BadText
        when it holds nothing to say unless `allow_empty` (incremental text, an adapter's own answer)."""
        check_text(text, self.core.config.max_text_chars)
        if not allow_empty and not text.strip():
            raise BadText("text is empty")

    def submit(
        self, sink: JobSink, voice: Voice, opts: SynthesisOptions, text: str, *, emo_voice: Voice | None = None,
        incremental: bool = False, detail: str = "",
    ) -> Job:
        """Admit the request with `text` (incremental: its first piece; more through add_text). Raises
        Busy or ShuttingDown before the job exists. `detail` (" voice=alice") ends the start line."""
        worker = self.core.worker
        if opts.seed is None:
            # One seed per request, not per Pipeline.stream() call: an incremental request makes one
            # call per batch of sentences, and they must share the emotion mix and RNG lineage.
            opts = opts.with_seed(secrets.randbits(62))
        job = Job(key=worker.new_key(), voice=voice, emo_voice=emo_voice, opts=opts, sink=sink, incremental=incremental)
        sentences = None
        if incremental:
            sentences = SentenceBuffer()
            job.texts.extend(sentences.feed(text))
            job.input_closed = False
        else:
            job.texts.append(text)
        worker.submit(job)  # Busy / ShuttingDown propagate before the request exists
        self.job, self.sentences, self.text_chars = job, sentences, len(text)
        log.info("%srequest start peer=%s %skey=%d chars=%d%s", self.interface.log_prefix, self.peer, self.label,
                 job.key, len(text), detail)
        return job

    def refuse(self, code: str, message: str, detail: str = "") -> None:
        """The request is refused before it began (no job): counted and logged once with `code`.
        `detail` ("status=400 ") goes before the code in the log line."""
        if self.code is not None:
            return
        self.code = code
        self.core.metrics.request_end(self.interface.name, code)
        log.info("%srequest rejected peer=%s %s%scode=%s error=%r", self.interface.log_prefix, self.peer, detail,
                 self.label, code, p.clip(message))

    # Incremental text

    def add_text(self, text: str) -> None:
        """More text of an incremental request; its complete sentences go to the worker. Over
        max_text_chars in all, the request ends with text_too_long and TextTooLong is raised."""
        assert self.sentences is not None and self.job is not None  # the adapter checks input_closed
        self.text_chars += len(text)
        limit = self.core.config.max_text_chars
        if self.text_chars > limit:
            e = TextTooLong(f"text exceeds {limit} characters")
            self.end(e.code)
            raise e
        sentences = self.sentences.feed(text)
        if sentences:
            self.core.worker.add_text(self.job, sentences, close=False)

    def close_input(self) -> None:
        """The incremental text is complete: what is left in the sentence buffer is the last piece."""
        assert self.sentences is not None and self.job is not None  # the adapter checks input_closed
        rest = self.sentences.flush()
        self.sentences = None
        self.core.worker.add_text(self.job, [rest] if rest else [], close=True)

    # Delivery

    def audio_sent(self, samples: int) -> None:
        """`samples` of the request's audio were handed to the client's connection; the first are timed."""
        if self.first_audio_s is None:
            self.first_audio_s = time.perf_counter() - self.t0
        self.samples += samples

    def segment_sent(self, audio_s: float) -> None:
        """A segment of `audio_s` seconds is written whole: counted, and its credit goes back to the worker."""
        self.segments += 1
        self.core.metrics.segment(self.interface.name, audio_s)
        if self.job is not None:
            self.core.worker.return_credit(self.job)

    def piece_sent(self, samples: int, *, first: bool, last: bool) -> None:
        """A piece of a segment (the whole of it unless chunked) was written: timed and counted as audio;
        the segment itself counts, and returns its credit, with its last piece."""
        self.audio_sent(samples)
        self.piece_samples = (0 if first else self.piece_samples) + samples
        if last:
            self.segment_sent(self.piece_samples / p.SAMPLE_RATE_HZ)

    def end(self, code: str) -> None:
        """The request is over for its client with `code`: OK, an ErrorCode, or DISCONNECTED. Counted
        and logged once; a job still running is cancelled without a word (nobody reads what it makes)."""
        if self.code is not None:
            return
        self.code = code
        self.total_s = total_s = time.perf_counter() - self.t0
        if code != OK and self.job is not None:
            self.core.worker.cancel(self.job, p.ErrorCode.CANCELLED if code == DISCONNECTED else code, notify=False)
        audio_s = self.audio_s
        self.core.metrics.request_end(self.interface.name, code, first_audio_s=self.first_audio_s, total_s=total_s,
                                      audio_s=audio_s)
        i = self.interface
        rtf = f"{total_s / audio_s:.3f}" if audio_s > 0 else "-"
        first = "-" if self.first_audio_s is None else f"{self.first_audio_s * 1000:.0f}"
        log.info(
            "%srequest %s peer=%s %skey=%s code=%s chars=%d segments=%d audio_s=%.2f first_audio_ms=%s total_ms=%.0f "
            "rtf=%s", i.log_prefix, i.done_word if code == OK else i.ended_word, self.peer, self.label,
            "-" if self.job is None else self.job.key, code, self.text_chars, self.segments, audio_s, first,
            total_s * 1000, rtf,
        )
