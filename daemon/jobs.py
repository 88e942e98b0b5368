"""What the HTTP and Wyoming interfaces share: synthesis options from plain key/value maps, a
queue-backed JobSink, and submitting a job to the worker the way a WebSocket session does.

Options: an HTTP body or a preset's TOML file names synthesis options by the WebSocket
`synthesize` field names (docs/protocol.md). They are checked by the protocol's own decoder (the
values are packed into a `synthesize` frame and decoded), so every interface accepts the same
names, types and ranges, and a field added to the protocol is accepted here with no change.

Flow control is the worker's: a job starts with SEGMENT_CREDITS credits, its consumer returns one
after writing each segment to its client, so a QueueSink holds at most SEGMENT_CREDITS segments
and the end. A client that stops reading parks its job, and after stall_timeout_s the worker ends
it with slow_consumer; `on_stop` lets the consumer drop the connection at once, since its writer
is then blocked on a socket that nobody reads."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import msgpack

from ttsd.api import protocol as p

from .session import synthesis_options
from .worker import Job

if TYPE_CHECKING:
    from ttsd.api.options import SynthesisOptions
    from ttsd.pipeline import Voice

    from .worker import Worker

# A request body (HTTP) or event data (Wyoming) holds the text, each character at most 6 bytes as a
# JSON \uXXXX escape, and small fields: max_text_chars × 6 + this many bytes.
BODY_OVERHEAD_BYTES: Final = 64 * 1024
# Kernel send buffer per connection, as on the WebSocket port (server.py): a client that stops
# reading parks its request after ~6 s of audio rather than after minutes of autotuned buffer.
SOCKET_SEND_BUFFER_BYTES: Final = 256 * 1024

# The synthesize fields a preset or an HTTP body may set: the options table, and the emotion voice.
# The others (id, text, voice, incremental, format) the interface itself supplies.
OPTION_FIELDS: Final = ("emo_voice", *(o.name for o in p.OPTIONS))


class OptionError(ValueError):
    """An option that is unknown, ill-typed or out of range; `param` names it when one is to blame."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class Options:
    opts: SynthesisOptions
    emo_voice: str | None       # a preset name or voice id, resolved by the caller


def decode_options(values: Mapping[str, object]) -> Options:
    """{option name: value} (JSON or TOML values) → checked options, or OptionError."""
    for name, value in values.items():
        if name not in OPTION_FIELDS:
            raise OptionError(f"unknown field {p.quote(name)}", name)
        if isinstance(value, dict):
            raise OptionError(f"{name!r} must not be an object", name)
    try:
        # Placeholders for the fields that are not options; only the options are read back.
        frame = msgpack.packb({"type": p.Synthesize.TYPE, "id": 0, "text": "", "voice": "", **values})
    except (TypeError, ValueError, OverflowError):
        # A TOML date, an integer beyond 64 bits: no option takes one.
        raise OptionError("an option value is neither a number, a string, a boolean nor a list", None) from None
    try:
        msg = p.decode_client(frame)
        assert isinstance(msg, p.Synthesize)  # the frame says so
    except p.ProtocolError as e:
        detail = e.detail.removeprefix(f"{p.Synthesize.TYPE}: ")
        raise OptionError(detail, _blamed(detail, values)) from None
    return Options(synthesis_options(msg), msg.emo_voice)


def _blamed(detail: str, values: Mapping[str, object]) -> str | None:
    """The option an error message names, when it names exactly one of `values`."""
    named = [name for name in values if f"'{name}'" in detail or detail.startswith(f"{name} ")]
    return named[0] if len(named) == 1 else None


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


def submit(
    worker: Worker, sink: QueueSink, voice: Voice, opts: SynthesisOptions, texts: list[str], *,
    emo_voice: Voice | None = None, incremental: bool = False,
) -> Job:
    """A new job for `texts` (incremental: more follows through worker.add_text) → the worker.
    Raises Busy or ShuttingDown before the job exists, as Session._synthesize does."""
    if opts.seed is None:
        # One seed per request, as on the WebSocket: an incremental request's batches share it.
        opts = opts.with_seed(secrets.randbits(62))
    job = Job(key=worker.new_key(), voice=voice, emo_voice=emo_voice, opts=opts, sink=sink, incremental=incremental)
    job.texts.extend(texts)
    job.input_closed = not incremental
    worker.submit(job)
    return job
