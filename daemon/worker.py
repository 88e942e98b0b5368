"""The worker thread: the only caller of the Pipeline, shared fairly by every request.

The event loop never runs model code. It hands the worker jobs through the thread-safe methods
below (`submit`, `add_text`, `cancel`, `return_credit`, `register_voice`); the worker runs one
segment of one request at a time, rotating round-robin over the active requests, and sends each
result back to the loop with `loop.call_soon_threadsafe`.

Backpressure is by credits. A request starts with SEGMENT_CREDITS; the worker takes one before
producing a segment and the connection's writer gives it back once that segment's last frame has
been handed to the socket. A request without credit is parked: skipped by the rotation, so a client
that stops reading holds at most SEGMENT_CREDITS segments of audio in server memory and never
delays anyone else. A request parked for stall_timeout_s is cancelled with `slow_consumer`.

Cancellation (client cancel, disconnect, slow consumer, shutdown) sets `Job.stop_code`. The
Pipeline polls `Job.cancelled` at its host syncs: every few GPT decode steps, and before each CFM
step is issued. On CPU that stops a running segment within a step; on CUDA the DiT + BigVGAN work
already queued for the segment still runs (at most one segment's acoustic stage). The worker then
closes the request's segment stream, which frees its state.

Audio is produced through `Pipeline.stream()`: on CUDA it overlaps segment k+1's GPT with segment
k's DiT + BigVGAN on two streams; on CPU the same call runs the stages one after the other."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

import numpy as np

from ttsd.pipeline.errors import (
    AudioTooLong,
    BadAudio,
    BadText,
    Busy,
    Cancelled,
    ShuttingDown,
    TtsdError,
    UnknownVoice,
)
from ttsd.pipeline.pcm import to_s16le

from .protocol import SAMPLE_RATE_HZ, ErrorCode

if TYPE_CHECKING:
    from ttsd.pipeline.options import SynthesisOptions
    from ttsd.pipeline.pipeline import Pipeline, Segment
    from ttsd.pipeline.voice import Voice

    from .config import DaemonConfig

log = logging.getLogger(__name__)

SEGMENT_CREDITS: Final = 2   # segments produced but not yet sent, per request: one on the wire, one ready
VOICE_ID_BYTES: Final = 16   # blake2b digest size; the id is its hex (32 characters)


class JobSink(Protocol):
    """Where a request's results go; every method is called on the event loop thread."""

    def on_segment(self, index: int, text: str, pcm: bytes) -> None:
        """One segment's audio: s16le mono at SAMPLE_RATE_HZ, leading interval silence included."""

    def on_done(self) -> None:
        """The request produced all its segments."""

    def on_error(self, code: str, message: str) -> None:
        """The request ended early (worker-side cancellation or failure)."""


@dataclass(eq=False)
class Job:
    """One synthesis request as the worker sees it. Fields below `sink` are guarded by the worker lock,
    except `stream`, `voice` and `produced`, which only the worker thread touches."""

    key: int                                    # daemon-wide sequence number, for logs and events
    voice: Voice
    opts: SynthesisOptions
    sink: JobSink
    emo_voice: Voice | None = None              # its speaker clip is the emotion reference
    incremental: bool = False                   # text arrives in pieces; unspeakable pieces are skipped
    texts: deque[str] = field(default_factory=deque)  # text not yet split into segments
    input_closed: bool = True                   # False while an incremental request may get more text
    credits: int = SEGMENT_CREDITS
    parked_since: float | None = None           # time.monotonic() when it last ran out of credit
    stop_code: str | None = None                # ErrorCode once stopped for any reason
    stop_message: str = ""
    notify_stop: bool = False                   # whether the sink hears about the stop
    running: bool = False
    # Worker thread only:
    segments: deque[Segment] = field(default_factory=deque)
    stream: Iterator[tuple[Segment, np.ndarray]] | None = None
    stream_left: int = 0                        # segments the current stream has still to yield
    produced: int = 0                           # segments produced so far = index of the next one

    def stop(self, code: str, message: str, notify: bool) -> None:
        """Under the worker lock. The first stop wins; later ones (e.g. disconnect after cancel) are moot."""
        if self.stop_code is None:
            self.stop_code, self.stop_message, self.notify_stop = code, message, notify

    def cancelled(self) -> bool:
        """Polled by the Pipeline between decode steps (a plain attribute read, safe across threads)."""
        return self.stop_code is not None

    @property
    def has_input(self) -> bool:
        return self.stream is not None or bool(self.segments) or bool(self.texts)


@dataclass(frozen=True, slots=True)
class VoiceResult:
    voice_id: str
    audio_s: float      # duration of the speaker reference file


@dataclass(eq=False, slots=True)
class _VoiceJob:
    audio: bytes
    emo_audio: bytes | None
    done: Callable[[VoiceResult | TtsdError], None]   # called on the loop thread


WorkerObserver = Callable[[str, int, int], None]
"""(event, job key, segment index) on the worker thread, for tests and tracing: "segment_begin" and
"segment_end" around each segment, "parked" when a job runs out of credit (index = segments
produced), "request_end" (index = segments produced) when a job leaves the worker. The worker
lock is held only for "parked"; an observer may block on the others to stage a race."""


def _voice_key(audio: bytes, emo_audio: bytes | None) -> str:
    h = hashlib.blake2b(digest_size=VOICE_ID_BYTES)
    h.update(audio)
    if emo_audio is not None:
        h.update(b"\0emo\0")
        h.update(emo_audio)
    return h.hexdigest()


def _audio_seconds(audio: bytes, what: str) -> float:
    """Duration from the file header alone (no decode), so an over-long file costs nothing."""
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(audio))
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError, OSError) as e:
        # libsndfile's message embeds the BytesIO repr; keep only its reason ("Format not recognised.").
        raise BadAudio(f"cannot decode {what}: {str(e).rsplit(': ', 1)[-1]}") from None
    if info.samplerate <= 0 or info.frames <= 0:
        raise BadAudio(f"{what} holds no samples")
    return float(info.frames) / float(info.samplerate)


class VoiceCache:
    """Registered voices by id, the least recently used evicted beyond `max_voices`. Thread-safe.

    Separate from the Worker so that a cache can outlive one (tests share one across servers)."""

    def __init__(self, max_voices: int) -> None:
        self.max_voices = max_voices
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[Voice, float]] = OrderedDict()  # id → (voice, audio_s)

    def get(self, voice_id: str) -> Voice:
        """The voice (refreshing its LRU position), or UnknownVoice."""
        entry = self.lookup(voice_id)
        if entry is None:
            raise UnknownVoice(f"voice {voice_id!r} is not registered (or was evicted)")
        return entry[0]

    def lookup(self, voice_id: str) -> tuple[Voice, float] | None:
        with self._lock:
            entry = self._entries.get(voice_id)
            if entry is not None:
                self._entries.move_to_end(voice_id)
            return entry

    def put(self, voice_id: str, voice: Voice, audio_s: float) -> list[str]:
        """Insert or refresh a voice; returns the ids evicted to make room."""
        with self._lock:
            self._entries[voice_id] = (voice, audio_s)
            self._entries.move_to_end(voice_id)
            evicted = []
            while len(self._entries) > self.max_voices:
                evicted.append(self._entries.popitem(last=False)[0])
            return evicted


class Worker:
    """Owns the Pipeline on one thread. All public methods are thread-safe and never block on the model."""

    def __init__(
        self,
        pipeline: Pipeline,
        config: DaemonConfig,
        loop: asyncio.AbstractEventLoop,
        observer: WorkerObserver | None = None,
        voices: VoiceCache | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.voices = voices if voices is not None else VoiceCache(config.max_voices)
        self.config = config
        self.loop = loop
        self.observer = observer
        self._cond = threading.Condition()
        self._active: deque[Job] = deque()      # round-robin order; the head runs next
        self._waiting: deque[Job] = deque()     # admitted, waiting for an active slot
        self._voice_jobs: deque[_VoiceJob] = deque()
        self._next_key = 0
        self._accepting = True
        self._stopping = False
        self._voice_turn = False                # alternate voice jobs with segments (see _pick)
        self._thread = threading.Thread(target=self._run, name="ttsd-worker", daemon=True)
        self._idle = asyncio.Event()            # loop side: set whenever no job is live
        self._idle.set()
        # Set (loop side) when the device reports a fault that poisons its context, such as a CUDA
        # illegal address: every later request would fail, so the daemon must restart instead.
        self.device_fault = asyncio.Event()
        self.device_fault_message = ""

    # ---------------------------------------------------------------------------------------
    # Loop-side API

    def start(self) -> None:
        self._thread.start()

    def new_key(self) -> int:
        with self._cond:
            self._next_key += 1
            return self._next_key

    def voice(self, voice_id: str) -> Voice:
        """A registered voice, or UnknownVoice. A job holds the returned object, so a later eviction
        from the cache cannot pull it from under a running request."""
        return self.voices.get(voice_id)

    def submit(self, job: Job) -> None:
        """Admit a job: an active slot if one is free, else the queue, else Busy."""
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the daemon is shutting down")
            if self._live(self._active) < self.config.max_concurrent_requests:
                self._active.append(job)
            elif self._live(self._waiting) < self.config.max_queued_requests:
                self._waiting.append(job)
            else:
                raise Busy(
                    f"{self.config.max_concurrent_requests} requests running and "
                    f"{self.config.max_queued_requests} queued; retry later"
                )
            self._idle.clear()
            self._cond.notify()

    def add_text(self, job: Job, texts: list[str], close: bool) -> None:
        """More text for an incremental job; `close` ends its input."""
        with self._cond:
            job.texts.extend(texts)
            job.input_closed = job.input_closed or close
            self._cond.notify()

    def cancel(self, job: Job, code: str, notify: bool) -> None:
        """Stop a job at its next decode step. With `notify`, its sink gets on_error(code)."""
        with self._cond:
            job.stop(code, _STOP_MESSAGES.get(code, code), notify)
            self._cond.notify()

    def return_credit(self, job: Job) -> None:
        with self._cond:
            job.credits += 1
            job.parked_since = None
            self._cond.notify()

    def register_voice(
        self, audio: bytes, emo_audio: bytes | None, done: Callable[[VoiceResult | TtsdError], None]
    ) -> None:
        """Queue a voice registration; `done` runs on the loop with the result or the error."""
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the daemon is shutting down")
            if len(self._voice_jobs) >= max(1, self.config.max_queued_requests):
                raise Busy("too many voice registrations queued; retry later")
            self._voice_jobs.append(_VoiceJob(audio, emo_audio, done))
            self._cond.notify()

    @property
    def live_jobs(self) -> int:
        """Admitted jobs not yet cancelled (what admission counts)."""
        with self._cond:
            return self._live(self._active) + self._live(self._waiting)

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False

    async def wait_idle(self) -> None:
        """Until no job is left on the worker (cancelled ones included)."""
        await self._idle.wait()

    def cancel_all(self, code: str) -> None:
        with self._cond:
            for job in (*self._active, *self._waiting):
                job.stop(code, _STOP_MESSAGES.get(code, code), True)
            self._cond.notify()

    async def stop(self) -> None:
        """Cancel everything left and join the thread (without blocking the loop)."""
        self.cancel_all(ErrorCode.SHUTTING_DOWN)
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)

    # ---------------------------------------------------------------------------------------
    # Worker thread

    @staticmethod
    def _live(jobs: deque[Job]) -> int:
        return sum(1 for j in jobs if j.stop_code is None)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        # The loop may already be closed at interpreter shutdown; nothing is listening then.
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            log.debug("event loop closed; dropped a worker result")

    def _event(self, name: str, job: Job, index: int) -> None:
        if self.observer is not None:
            self.observer(name, job.key, index)

    def _run(self) -> None:
        log.debug("worker started")
        while True:
            with self._cond:
                work = self._pick()
                while work is None:
                    if self._stopping and not self._active and not self._waiting:
                        # Voice registrations still queued get an answer instead of silence.
                        for vj in self._voice_jobs:
                            self._post(vj.done, ShuttingDown("the daemon is shutting down"))
                        self._voice_jobs.clear()
                        log.debug("worker stopped")
                        return
                    self._cond.wait(self._park_timeout())
                    work = self._pick()
            kind, item = work
            try:
                if isinstance(item, _VoiceJob):
                    self._run_voice(item)
                elif kind == "finish":
                    self._finish(item)
                else:
                    self._run_segment(item)
            except Exception as e:
                # A bug in one job must not take down the thread that serves everyone, nor leave
                # that job marked running forever (it would hold its slot).
                log.exception("worker failure kind=%s", kind)
                if isinstance(item, Job):
                    self._fail(item, ErrorCode.INTERNAL, f"internal error: {type(e).__name__}")

    def _pick(self) -> tuple[str, Any] | None:
        """Under the lock: the next thing to do, or None to wait. Order: finish stopped or completed
        jobs (frees slots), then alternate one voice registration with one segment, round-robin."""
        now = time.monotonic()
        for job in self._active:
            if not job.running and job.parked_since is not None and job.stop_code is None:
                if now - job.parked_since >= self.config.stall_timeout_s:
                    job.stop(ErrorCode.SLOW_CONSUMER, _STOP_MESSAGES[ErrorCode.SLOW_CONSUMER], True)
                    log.info("request stalled key=%d parked_s=%.1f", job.key, now - job.parked_since)
        for queue in (self._active, self._waiting):
            for job in queue:
                if not job.running and (
                    job.stop_code is not None or (job.input_closed and not job.has_input)
                ):
                    queue.remove(job)
                    return "finish", job
        if self._voice_jobs and (self._voice_turn or not self._runnable_exists()):
            self._voice_turn = False
            return "voice", self._voice_jobs.popleft()
        for _ in range(len(self._active)):
            job = self._active[0]
            self._active.rotate(-1)
            if not job.has_input:
                continue                                    # incremental: waiting for text
            if job.credits <= 0:
                if job.parked_since is None:
                    job.parked_since = now
                    log.debug("request parked key=%d", job.key)
                    self._event("parked", job, job.produced)
                continue
            job.credits -= 1
            job.running = True
            self._voice_turn = True
            return "segment", job
        return None

    def _runnable_exists(self) -> bool:
        return any(j.has_input and j.credits > 0 and j.stop_code is None for j in self._active)

    def _park_timeout(self) -> float | None:
        """Seconds until the earliest parked job stalls out (None: wait for a notify)."""
        deadlines = [
            j.parked_since + self.config.stall_timeout_s
            for j in self._active
            if j.parked_since is not None and j.stop_code is None
        ]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _promote(self) -> None:
        """Under the lock: fill free active slots from the queue, oldest first."""
        while self._waiting and self._live(self._active) < self.config.max_concurrent_requests:
            self._active.append(self._waiting.popleft())

    def _finish(self, job: Job) -> None:
        """A job leaves the worker: close its stream (frees its state), tell its sink, free the slot."""
        self._close_stream(job)
        job.segments.clear()
        self._event("request_end", job, job.produced)
        with self._cond:
            job.texts.clear()
            if job.stop_code is None:
                self._post(job.sink.on_done)
            elif job.notify_stop:
                self._post(job.sink.on_error, job.stop_code, job.stop_message)
            self._promote()
            self._post(self._set_idle_if_idle)
        log.debug("request left worker key=%d segments=%d stop=%s", job.key, job.produced, job.stop_code)

    def _set_idle_if_idle(self) -> None:
        # Runs on the loop: re-checks under the lock, since a submit may have come in meanwhile.
        with self._cond:
            if not self._active and not self._waiting:
                self._idle.set()

    @staticmethod
    def _close_stream(job: Job) -> None:
        """Closing the Pipeline's generator runs its cleanup now, releasing the request's state."""
        if job.stream is not None:
            close = getattr(job.stream, "close", None)
            if close is not None:
                close()
            job.stream = None
            job.stream_left = 0

    def _fail(self, job: Job, code: str, message: str) -> None:
        with self._cond:
            job.running = False
            job.stop(code, message, True)

    def _next_segments(self, job: Job) -> Iterator[tuple[Segment, np.ndarray]] | None:
        """Turn pending text into segments and segments into a Pipeline stream (worker thread)."""
        while not job.segments:
            with self._cond:
                if not job.texts:
                    return None
                text = job.texts.popleft()
            try:
                pieces = self.pipeline.split_text(text, job.opts)
            except BadText:
                if not job.incremental:
                    raise
                # A streamed chunk with nothing speakable ("**", "...") is skipped, not fatal.
                log.debug("skipped unspeakable text key=%d chars=%d", job.key, len(text))
                continue
            for seg in pieces:
                # Segment indices run across the whole request; the seed derives noise from them.
                job.segments.append(dataclasses.replace(seg, index=job.produced + len(job.segments)))
        segments = list(job.segments)
        job.segments.clear()
        job.stream_left = len(segments)
        return iter(
            self.pipeline.stream(job.voice, segments, job.opts, emo_voice=job.emo_voice, cancel=job.cancelled)
        )

    def _run_segment(self, job: Job) -> None:
        index = job.produced
        self._event("segment_begin", job, index)
        try:
            while True:
                if job.stream is None:
                    job.stream = self._next_segments(job)
                    if job.stream is None:
                        # Nothing left to say for now (incremental input): hand the credit back.
                        with self._cond:
                            job.credits += 1
                            job.running = False
                        return
                try:
                    segment, pcm = next(job.stream)
                except StopIteration:
                    job.stream = None
                    continue
                job.stream_left -= 1
                if job.stream_left <= 0:
                    # Close now rather than on a later turn: a finished job then leaves at once
                    # instead of waiting for a credit just to discover the end of its stream.
                    self._close_stream(job)
                break
        except Cancelled:
            with self._cond:
                job.running = False
                job.stop(ErrorCode.CANCELLED, _STOP_MESSAGES[ErrorCode.CANCELLED], False)
            return
        except TtsdError as e:
            log.info("request failed key=%d code=%s error=%r", job.key, e.code, str(e))
            self._fail(job, e.code, str(e))
            return
        except Exception as e:
            log.exception("request failed key=%d segment=%d", job.key, index)
            self._check_device_fault(e)
            self._fail(job, ErrorCode.INTERNAL, f"internal error: {type(e).__name__}")
            return
        silence = 0
        if index > 0:
            # Upstream joins segments with int(sr * ms / 1000) zeros; streaming sends them up front.
            silence = int(SAMPLE_RATE_HZ * job.opts.interval_silence_ms / 1000)
        data = to_s16le(pcm, silence)
        job.produced += 1
        self._event("segment_end", job, index)
        with self._cond:
            job.running = False
            if job.stop_code is None:
                self._post(job.sink.on_segment, index, segment.text, data)

    def _check_device_fault(self, e: Exception) -> None:
        """Worker thread: a device error that leaves the CUDA context unusable ends the daemon."""
        import torch

        # AcceleratorError is what torch raises for asynchronous CUDA faults (device-side assert,
        # illegal memory access); out-of-memory is a different type and is not fatal.
        if isinstance(e, torch.AcceleratorError):
            log.critical("device fault, the daemon must restart error=%r", str(e))
            message = f"device fault: {type(e).__name__}"

            def mark() -> None:
                self.device_fault_message = message
                self.device_fault.set()

            self._post(mark)

    def _run_voice(self, vj: _VoiceJob) -> None:
        result: VoiceResult | TtsdError
        try:
            result = self._prepare_voice(vj.audio, vj.emo_audio)
        except TtsdError as e:
            result = e
        except Exception as e:
            log.exception("voice registration failed")
            self._check_device_fault(e)
            result = TtsdError(f"internal error: {type(e).__name__}")
        self._post(vj.done, result)

    def _prepare_voice(self, audio: bytes, emo_audio: bytes | None) -> VoiceResult:
        limit_s = self.config.max_reference_audio_s
        audio_s = _audio_seconds(audio, "speaker reference audio")
        if audio_s > limit_s:
            raise AudioTooLong(f"speaker reference audio is {audio_s:.1f} s; the limit is {limit_s:g} s")
        if emo_audio is not None:
            emo_s = _audio_seconds(emo_audio, "emotion reference audio")
            if emo_s > limit_s:
                raise AudioTooLong(f"emotion reference audio is {emo_s:.1f} s; the limit is {limit_s:g} s")
        voice_id = _voice_key(audio, emo_audio)
        if self.voices.lookup(voice_id) is not None:
            return VoiceResult(voice_id, audio_s)
        t0 = time.perf_counter()
        voice = self.pipeline.prepare_voice(audio, emo_audio, max_input_s=limit_s)
        for evicted in self.voices.put(voice_id, voice, audio_s):
            log.info("voice evicted voice=%s", evicted)
        log.info(
            "voice registered voice=%s audio_s=%.2f emo=%s prepare_ms=%.0f",
            voice_id, audio_s, emo_audio is not None, (time.perf_counter() - t0) * 1000,
        )
        return VoiceResult(voice_id, audio_s)


_STOP_MESSAGES: Final = {
    ErrorCode.CANCELLED: "cancelled by the client",
    ErrorCode.SLOW_CONSUMER: "the client did not read its audio in time (stall_timeout_s); request cancelled",
    ErrorCode.SHUTTING_DOWN: "the daemon is shutting down; request cancelled",
}
