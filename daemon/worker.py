"""The worker thread: the only caller of the engine. It drives one engine that runs every admitted
request at once (continuous batching: their segments share each GPT decode step and acoustic job).

Text is normalised and split into segments on a few text threads, a request's pieces in order, so
that a long text (seconds in the normaliser) holds up neither the decode steps nor other requests.
Voices are prepared on a voice thread of their own (on CUDA, on the pipeline's voice stream), so a
registration never stalls anyone's decoding. The same thread reads emotion from text (QwenEmotion,
a 0.6B language model): a request asking for it waits in the queue until its emotion vector is
read, the texts of every such request waiting at that moment decoded as one batch, while the engine
goes on stepping everyone else.

The event loop never runs model code. It hands the worker work through the thread-safe methods
below (`submit`, `add_text`, `cancel`, `return_credit`, `register_voice`), which only queue an
operation and wake the thread; the worker applies queued operations between engine steps and sends
every result back to the loop with `loop.call_soon_threadsafe`. Nothing here imports torch: the
daemon sees the pipeline through its facade.

Admission: at most max_concurrent_requests requests are in the engine; up to max_queued_requests
more wait for a slot, oldest first; beyond that `busy`.

Backpressure is by credits. A request starts with SEGMENT_CREDITS; the engine takes one before it
starts a segment and the connection's writer gives it back once that segment's last frame has been
handed to the socket. A request without credit is parked: the engine skips it, so a client that stops
reading holds at most SEGMENT_CREDITS segments of server work and never delays anyone else. A
request parked for stall_timeout_s is cancelled with `slow_consumer`.

Cancellation (client cancel, disconnect, slow consumer, shutdown) takes effect at the next engine
step: the request's rows leave the decode batch and its pending work is dropped, so no frame
follows. On CUDA, acoustic work already issued for it still runs on the device (discarded)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

from ttsd.api.errors import BadOptions, Busy, ErrorCode, ShuttingDown, TtsdError, UnknownVoice
from ttsd.api.rules import check_reference_audio
from ttsd.pipeline.errors import DeviceFault
from ttsd.pipeline.requests import Request, RequestDone, RequestFailed, SegmentDone

if TYPE_CHECKING:
    from ttsd.api.options import SynthesisOptions
    from ttsd.pipeline import Engine, Pipeline, Segment, Voice

    from .config import DaemonConfig
    from .voice_store import VoiceStore

log = logging.getLogger(__name__)

SEGMENT_CREDITS: Final = 2   # segments started but not yet sent, per request: one on the wire, one in work
VOICE_ID_BYTES: Final = 16   # blake2b digest size; the id is its hex (32 characters)
TEXT_THREADS: Final = 4      # requests whose text is normalised at once (the normaliser releases the GIL)
# Emotion texts read in one QwenEmotion batch, as rows × the longest text in characters (about one
# token each for Chinese): bounds the batch's KV cache, ~230 KB a token for the released model in float32.
EMOTION_BATCH_CHARS: Final = 16_000


class JobSink(Protocol):
    """Where a request's results go; every method is called on the event loop thread."""

    def on_segment(self, index: int, text: str, pcm: bytes, first: bool = True, last: bool = True) -> None:
        """A segment's audio, or with chunk_codes > 0 one piece of it (`first`: its first piece, with the
        leading interval silence; `last`: its audio is complete): s16le mono at the pipeline's rate."""

    def on_done(self) -> None:
        """The request produced all its segments."""

    def on_error(self, code: str, message: str) -> None:
        """The request ended early (worker-side cancellation or failure)."""


@dataclass(eq=False)
class Job:
    """One synthesis request as the daemon sees it. The loop thread fills the fields up to
    `input_closed` before `submit`; afterwards the worker owns everything but `stop_*` (worker lock)."""

    key: int                                    # daemon-wide sequence number, for logs and events
    voice: Voice
    opts: SynthesisOptions
    sink: JobSink
    emo_voice: Voice | None = None              # its speaker clip is the emotion reference
    incremental: bool = False                   # text arrives in pieces; unspeakable pieces are skipped
    texts: deque[str] = field(default_factory=deque)  # the text received before submit (split after it)
    input_closed: bool = True                   # False while an incremental request may get more text
    stop_code: str | None = None                # ErrorCode once stopped for any reason
    stop_message: str = ""
    notify_stop: bool = False                   # whether the sink hears about the stop
    # Worker thread only:
    request: Request | None = None              # the engine's request, once admitted to the engine
    pending: list[tuple[Segment, ...]] = field(default_factory=list)  # split, not yet in the engine
    parked_since: float | None = None           # time.monotonic() when it ran out of credit with work left
    emotion_pending: bool = False               # its emotion text is being read: it waits, out of the engine
    delivered: int = 0                          # segments handed to the sink
    ended: bool = False                         # it has left the worker (its sink heard the end)
    # Text threads (under the worker lock):
    unsplit: deque[tuple[list[str], bool]] = field(default_factory=deque)  # (texts, input closed) to split
    splitting: bool = False                     # a text thread is working through `unsplit`

    def stop(self, code: str, message: str, notify: bool) -> None:
        """Under the worker lock. The first stop wins; later ones (e.g. disconnect after cancel) are moot."""
        if self.stop_code is None:
            self.stop_code, self.stop_message, self.notify_stop = code, message, notify


@dataclass(frozen=True, slots=True)
class VoiceResult:
    voice_id: str
    audio_s: float      # duration of the speaker reference file


@dataclass(frozen=True, slots=True)
class StoredVoiceInfo:
    """One entry of a voice listing."""

    voice_id: str
    stored: bool                     # in the voice library (else only in this daemon's memory)
    size_bytes: int | None = None    # of its library file
    last_used: float | None = None   # Unix time of its last use by any daemon on the library


@dataclass(eq=False, slots=True)
class _VoiceJob:
    audio: bytes
    emo_audio: bytes | None
    done: Callable[[VoiceResult | TtsdError], None]   # called on the loop thread


WorkerObserver = Callable[[str, int, int], None]
"""(event, job key, segment index) on the worker thread, for tests and tracing: "segment_begin" when
a segment starts decoding, "segment_end" when its audio goes to the sink, "parked" when a job runs
out of credit with work left (index = segments delivered), "request_end" (index = segments
delivered) when a job leaves the worker. The worker holds no lock while it calls the observer, so an
observer may block to stage a race."""


def _voice_key(audio: bytes, emo_audio: bytes | None) -> str:
    h = hashlib.blake2b(digest_size=VOICE_ID_BYTES)
    h.update(audio)
    if emo_audio is not None:
        h.update(b"\0emo\0")
        h.update(emo_audio)
    return h.hexdigest()


class VoiceCache:
    """Registered voices by id, the least recently used evicted beyond `max_voices`. Thread-safe.

    Separate from the Worker so that a cache can outlive one (tests share one across servers)."""

    def __init__(self, max_voices: int) -> None:
        self.max_voices = max_voices
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[Voice, float]] = OrderedDict()  # id → (voice, audio_s)
        self.hits = 0                            # lookups that found the voice (read by metrics)
        self.misses = 0                          # lookups that did not

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

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
                self.hits += 1
            else:
                self.misses += 1
            return entry

    def discard(self, voice_id: str) -> bool:
        """Forget a voice (a running request keeps the object it holds); False when it was not cached."""
        with self._lock:
            return self._entries.pop(voice_id, None) is not None

    def ids(self) -> list[str]:
        """The cached voice ids, most recently used first."""
        with self._lock:
            return list(reversed(self._entries))

    def put(self, voice_id: str, voice: Voice, audio_s: float) -> list[str]:
        """Insert or refresh a voice; returns the ids evicted to make room."""
        with self._lock:
            self._entries[voice_id] = (voice, audio_s)
            self._entries.move_to_end(voice_id)
            evicted = []
            while len(self._entries) > self.max_voices:
                evicted.append(self._entries.popitem(last=False)[0])
            return evicted


# The worker thread's inbox: commands queued by the loop and the text threads, applied by the worker
# between engine steps (never while one runs), in the order they were queued.


@dataclass(frozen=True, slots=True)
class Submit:
    """An admitted job enters the queue for an engine slot."""

    job: Job


@dataclass(frozen=True, slots=True)
class AddText:
    """Segments split ahead of time on a text thread; `close` ends the job's input."""

    job: Job
    pieces: list[tuple[Segment, ...]]
    close: bool


@dataclass(frozen=True, slots=True)
class Fail:
    """The job's text could not be split: it ends with this error."""

    job: Job
    error: TtsdError


@dataclass(frozen=True, slots=True)
class EmotionRead:
    """The job's emotion text was read: its options with the emotion vector, or the error it gave."""

    job: Job
    result: SynthesisOptions | TtsdError


@dataclass(frozen=True, slots=True)
class Credit:
    """The client took its audio: the job may be given its next segment."""

    job: Job


@dataclass(frozen=True, slots=True)
class Stop:
    """The job was stopped (cancel, disconnect, shutdown): it leaves the engine and the queue."""

    job: Job


Command = Submit | AddText | Fail | EmotionRead | Credit | Stop


class Worker:
    """Owns the Pipeline and its engine on one thread. Public methods are thread-safe and never block on the model."""

    def __init__(
        self,
        pipeline: Pipeline,
        config: DaemonConfig,
        loop: asyncio.AbstractEventLoop,
        observer: WorkerObserver | None = None,
        voices: VoiceCache | None = None,
        store: VoiceStore | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.voices = voices if voices is not None else VoiceCache(config.max_voices)
        self.store = store                      # the voice library on disk (voices_store), if any
        self.config = config
        self.loop = loop
        self.observer = observer
        lock = threading.RLock()
        self._cond = threading.Condition(lock)        # the worker thread waits on this one ...
        self._voice_cond = threading.Condition(lock)  # ... the voice thread on this one
        self._inbox: deque[Command] = deque()   # queued by the loop, applied by the worker between steps
        self._active: list[Job] = []            # in the engine (worker thread owns membership)
        self._waiting: deque[Job] = deque()     # admitted, waiting for an active slot
        self._live = 0                          # admitted jobs not yet stopped (what admission counts)
        self._unfinished = 0                    # admitted jobs that have not left the worker
        self._voice_jobs: deque[_VoiceJob] = deque()  # run by the voice thread, one at a time
        self._emotion_jobs: deque[tuple[Job, str]] = deque()  # (job, its text) to read, by the voice thread
        self._next_key = 0
        self._accepting = True
        self._stopping = False
        self._engine: Engine | None = None      # made on the worker thread
        self._thread = threading.Thread(target=self._run, name="ttsd-worker", daemon=True)
        # Voices are prepared on their own thread (and CUDA stream): a registration takes as long as
        # several decode steps, and no stream's decoding may wait for it.
        self._voice_thread = threading.Thread(target=self._voice_loop, name="ttsd-voice", daemon=True)
        # Text is normalised and split on these threads, never on the worker's: a long text takes
        # seconds in the normaliser, and no decode step (nor another request's split) may wait for it.
        self._texts = ThreadPoolExecutor(max_workers=TEXT_THREADS, thread_name_prefix="ttsd-text")
        self._idle = asyncio.Event()            # loop side: set whenever no job is live
        self._idle.set()
        # Set (loop side) when the device reports a fault that poisons its context, such as a CUDA
        # illegal address: every later request would fail, so the daemon must restart instead.
        self.device_fault = asyncio.Event()
        self.device_fault_message = ""
        self._warm_up: Callable[[], None] | None = None
        self.warmed = threading.Event()
        # Set (before `warmed`) when the worker could not start: its engine could not be made (the KV
        # cache did not fit, say). The daemon cannot serve; it exits 1 with this message.
        self.start_error: str | None = None
        self.busy_since: float | None = None    # time.monotonic() at the start of the running step (watchdog)

    # ---------------------------------------------------------------------------------------
    # Loop-side API

    def start(self, warm_up: Callable[[Engine], float] | None = None) -> None:
        """Start the thread. With `warm_up`, its first job (before any request) is warm_up(engine);
        `warmed` is set when it is done (failed or not: a failure is logged and serving goes on)."""
        if warm_up is not None:
            self._warm_up = lambda: self._do_warm_up(warm_up)
        else:
            self.warmed.set()
        self._thread.start()
        self._voice_thread.start()

    def new_key(self) -> int:
        with self._cond:
            self._next_key += 1
            return self._next_key

    def voice(self, voice_id: str) -> Voice:
        """A registered voice, or UnknownVoice. A job holds the returned object, so a later eviction
        from the cache cannot pull it from under a running request.

        With a voice library, a voice not in memory is read from it (on the calling thread: one file
        of a few MB, once per process until evicted), and one deleted from it by any daemon is
        forgotten here too (daemon/voice_store.py)."""
        entry = self.voices.lookup(voice_id)
        store = self.store
        if entry is not None:
            if store is None or store.touch(voice_id):
                return entry[0]
            self.voices.discard(voice_id)
            raise UnknownVoice(f"voice {voice_id!r} was deleted from the voice library; register it again")
        if store is not None:
            loaded = store.load(voice_id)
            if loaded is not None:
                self._cache(voice_id, *loaded)
                return loaded[0]
        return self.voices.get(voice_id)  # UnknownVoice (and counted as a miss)

    def delete_voice(self, voice_id: str) -> bool:
        """Forget a registered voice here and remove it from the voice library; False when neither
        had it. Requests already running with it finish."""
        in_store = self.store is not None and self.store.delete(voice_id)
        in_memory = self.voices.discard(voice_id)
        if in_store or in_memory:
            log.info("voice deleted voice=%s store=%s memory=%s", voice_id, in_store, in_memory)
        return in_store or in_memory

    def list_voices(self) -> list[StoredVoiceInfo]:
        """Registered voices: the library's (most recently used first), then those only in memory."""
        out = [] if self.store is None else [
            StoredVoiceInfo(e.voice_id, stored=True, size_bytes=e.size_bytes, last_used=e.last_used)
            for e in self.store.list()
        ]
        listed = {v.voice_id for v in out}
        out.extend(StoredVoiceInfo(voice_id, stored=False) for voice_id in self.voices.ids() if voice_id not in listed)
        return out

    def _cache(self, voice_id: str, voice: Voice, audio_s: float) -> None:
        for evicted in self.voices.put(voice_id, voice, audio_s):
            log.info("voice evicted voice=%s", evicted)

    def submit(self, job: Job) -> None:
        """Admit a job: an active slot if one is free, else the queue, else Busy. A job asking for
        emotion from text is read on the voice thread first (or ends with bad_message when it cannot be)."""
        refusal = self._emotion_refusal(job) if job.opts.wants_emotion_text else None
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the daemon is shutting down")
            limit = self.config.max_concurrent_requests + self.config.max_queued_requests
            if self._live >= limit:
                raise Busy(
                    f"{self.config.max_concurrent_requests} requests running and "
                    f"{self.config.max_queued_requests} queued; retry later"
                )
            self._live += 1
            self._unfinished += 1
            self._idle.clear()
            texts, close = list(job.texts), job.input_closed
            job.input_closed = False  # closed again by the AddText that brings its segments
            self._inbox.append(Submit(job))
            self._cond.notify()
            if refusal is not None:
                # Ends on the worker like any failure, so every interface reports it the same way.
                self._inbox.append(Fail(job, refusal))
                return
            if job.opts.wants_emotion_text:
                job.emotion_pending = True
                self._emotion_jobs.append((job, "".join(texts)))
                self._voice_cond.notify()
        self._split(job, texts, close)

    def _emotion_refusal(self, job: Job) -> TtsdError | None:
        """Why a job asking for emotion from text cannot have it (no QwenEmotion; use_emo_text without
        the whole text), or None."""
        if job.incremental and job.opts.emo_text is None:
            return BadOptions("use_emo_text reads the whole text before the first segment, and an incremental "
                              "request has only its first piece then; give the emotion text as emo_text")
        try:
            self.pipeline.check_options(job.opts)
        except TtsdError as e:
            return e
        return None

    def add_text(self, job: Job, texts: list[str], close: bool) -> None:
        """More text for an incremental job; `close` ends its input."""
        self._split(job, list(texts), close)

    def _split(self, job: Job, texts: list[str], close: bool) -> None:
        """Queue text for splitting. A job's pieces are split one after another, in order (one
        thread at a time per job); different jobs' pieces are split in parallel."""
        with self._cond:
            job.unsplit.append((texts, close))
            if job.splitting:
                return  # the thread splitting this job's earlier text takes this piece next
            job.splitting = True
        try:
            self._texts.submit(self._split_all, job)
        except RuntimeError:  # the pool is shut down: the worker has stopped, and so has the job
            pass

    def cancel(self, job: Job, code: str, notify: bool) -> None:
        """Stop a job at the next engine step. With `notify`, its sink gets on_error(code)."""
        with self._cond:
            self._stop(job, code, notify)
            self._cond.notify()

    def return_credit(self, job: Job) -> None:
        with self._cond:
            self._inbox.append(Credit(job))
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
            self._voice_cond.notify()

    @property
    def live_jobs(self) -> int:
        """Admitted jobs not yet stopped (what admission counts)."""
        with self._cond:
            return self._live

    @property
    def running_jobs(self) -> int:
        """Jobs in the engine now (the rest of live_jobs wait for a slot). A racy read, for metrics."""
        return len(self._active)

    @property
    def batch_rows_in_use(self) -> int:
        """Decode batch rows taken by the segments decoding now. A racy read, for metrics."""
        engine = self._engine
        return 0 if engine is None else engine.batch.n

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False

    async def wait_idle(self) -> None:
        """Until no job is left on the worker (stopped ones included)."""
        await self._idle.wait()

    def cancel_all(self, code: str) -> None:
        with self._cond:
            for command in self._inbox:
                if isinstance(command, Submit):
                    self._stop(command.job, code, True)
            for job in (*self._active, *self._waiting):
                self._stop(job, code, True)
            self._cond.notify()

    async def stop(self, timeout_s: float | None = None) -> bool:
        """Cancel everything left and join the worker thread (without blocking the loop), waiting at
        most `timeout_s`. False if it did not stop in time: a step wedged in the device. The thread is
        a daemon thread, so the process can still exit (systemd restarts it)."""
        self.cancel_all(ErrorCode.SHUTTING_DOWN)
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify()
            self._voice_cond.notify()
        self._texts.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self._thread.join, timeout_s)
        await asyncio.to_thread(self._voice_thread.join, timeout_s)
        if self._thread.is_alive():
            log.error("worker thread did not stop within %g s; leaving it behind", timeout_s)
            return False
        return True

    def _stop(self, job: Job, code: str, notify: bool, message: str | None = None) -> None:
        """Under the lock: mark the job stopped (first stop wins) and queue its removal. `message`
        defaults to the standard text of `code`."""
        if job.stop_code is None and not job.ended:
            job.stop(code, message if message is not None else _STOP_MESSAGES.get(code, code), notify)
            self._live -= 1
            self._inbox.append(Stop(job))

    # ---------------------------------------------------------------------------------------
    # Text thread

    def _split_all(self, job: Job) -> None:
        # Warm-up splits text on the worker thread; it is done before requests' text is touched here.
        self.warmed.wait()
        while True:
            with self._cond:
                if not job.unsplit:
                    job.splitting = False
                    return
                texts, close = job.unsplit.popleft()
            self._split_now(job, texts, close)

    def _split_now(self, job: Job, texts: list[str], close: bool) -> None:
        """Split `texts` into segments for `job` and queue them for the worker (or queue its failure)."""
        try:
            pieces, error = self.pipeline.split_pieces(texts, job.opts, incremental=job.incremental,
                                                       stopped=lambda: job.stop_code is not None)
        except Exception as e:  # a bug in the front end: this job fails, the daemon serves on
            log.exception("text split failed key=%d", job.key)
            pieces, error = [], TtsdError(f"internal error: {type(e).__name__}")
        if job.stop_code is not None:
            return  # its stop op takes it out; what was split is wasted work
        with self._cond:
            self._inbox.append(AddText(job, pieces, close) if error is None else Fail(job, error))
            self._cond.notify()

    # ---------------------------------------------------------------------------------------
    # Worker thread

    def _post(self, fn: Callable[..., None], *args: object) -> None:
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
        try:
            self._engine = self.pipeline.engine(max_batch_rows=self.config.max_batch_rows)
        except Exception as e:  # e.g. out of device memory for the KV cache: nothing can be served
            self._fail_start(f"cannot create the engine (max_batch_rows={self.config.max_batch_rows}): "
                             f"{type(e).__name__}: {_first_line(e)}")
            return
        try:
            self._engine.observer = self._on_engine_event
            if self._warm_up is not None:
                self._warm_up()
            while self._work():
                pass
        except DeviceFault as e:
            self._device_fault(str(e))
            self._drain_after_fault()
        log.debug("worker stopped")

    def _work(self) -> bool:
        """One turn: apply queued operations, then one engine step or one voice registration. False
        when the worker should exit."""
        engine = self._engine
        assert engine is not None  # made at the top of _run
        with self._cond:
            while not (self._inbox or engine.busy or self._stopping):
                self._cond.wait(self._park_timeout())
                self._check_stalls()
            commands = list(self._inbox)
            self._inbox.clear()
            if self._stopping and not commands and not self._active and not self._waiting:
                return False
        for command in commands:
            self._apply(command)
        self._promote()
        self.busy_since = time.monotonic()
        if engine.busy:
            self._engine_step(engine)
        self.busy_since = None
        self._mark_parked()
        return True

    def _apply(self, command: Command) -> None:
        engine = self._engine
        assert engine is not None
        job = command.job
        match command:
            case Submit():
                if job.stop_code is None:
                    self._waiting.append(job)
                else:
                    self._finish(job)  # stopped before it ever started
            case Fail(error=error):
                if not job.ended:
                    self._fail(job, error.code, str(error))
            case AddText(pieces=pieces, close=close):
                if job.ended:
                    return
                job.pending.extend(pieces)
                job.input_closed = job.input_closed or close
                if job.request is not None:
                    engine.feed(job.request, job.pending, job.input_closed)
                    job.pending.clear()
            case EmotionRead(result=result):
                if job.ended:
                    return
                if isinstance(result, TtsdError):
                    self._fail(job, result.code, str(result))
                else:
                    job.opts, job.emotion_pending = result, False
            case Credit():
                job.parked_since = None
                if job.request is not None:
                    engine.grant(job.request)
            case Stop():
                if job.ended:
                    return
                if job.request is not None:
                    engine.cancel(job.request)
                if job in self._active:
                    self._active.remove(job)
                if job in self._waiting:
                    self._waiting.remove(job)
                self._finish(job)

    def _promote(self) -> None:
        """Fill free engine slots from the queue, oldest first, passing over jobs whose emotion text is
        still being read; options are checked here, on the worker."""
        engine = self._engine
        assert engine is not None
        for job in list(self._waiting):
            if len(self._active) >= self.config.max_concurrent_requests:
                break
            if job.emotion_pending:
                continue
            self._waiting.remove(job)
            try:
                opts = self.pipeline.check_options(job.opts)
            except TtsdError as e:
                self._fail(job, e.code, str(e))
                continue
            job.request = Request(
                voice=job.voice, opts=opts, emo_voice=job.emo_voice, texts=deque(job.pending),
                input_closed=job.input_closed, incremental=job.incremental, credits=SEGMENT_CREDITS, tag=job,
            )
            job.pending.clear()
            self._active.append(job)
            engine.add(job.request)

    def _engine_step(self, engine: Engine) -> None:
        try:
            events = engine.step()
        except DeviceFault:
            raise
        except Exception as e:  # a bug outside any one request: fail them all, keep the daemon up
            log.exception("engine step failed")
            for job in list(self._active):
                self._fail(job, ErrorCode.INTERNAL, f"internal error: {type(e).__name__}")
            return
        for ev in events:
            job = ev.request.tag
            if not isinstance(job, _JOB_TYPE):
                continue
            if isinstance(ev, SegmentDone):
                a = ev.audio
                job.delivered += a.last  # segments, not pieces: credits are per segment
                if job.stop_code is None:
                    self._post(job.sink.on_segment, a.segment.index, a.segment.text, a.pcm, a.part == 0, a.last)
            elif isinstance(ev, RequestDone):
                self._leave(job)
                if job.stop_code is None:
                    self._post(job.sink.on_done)
                self._finish(job)
            elif isinstance(ev, RequestFailed):
                err = ev.error
                if isinstance(err, TtsdError):
                    log.info("request failed key=%d code=%s error=%r", job.key, err.code, str(err))
                    self._fail(job, err.code, str(err))
                else:
                    self._fail(job, ErrorCode.INTERNAL, f"internal error: {type(err).__name__}")

    def _on_engine_event(self, what: str, req: Request, index: int) -> None:
        job = req.tag
        if isinstance(job, _JOB_TYPE):
            if what == "decode":
                self._event("segment_begin", job, index)
            elif what == "audio":
                self._event("segment_end", job, index)

    def _leave(self, job: Job) -> None:
        if job in self._active:
            self._active.remove(job)

    def _fail(self, job: Job, code: str, message: str) -> None:
        """Worker-side failure: stop the job (telling its sink), take it out now."""
        with self._cond:
            self._stop(job, code, True, message)
        engine = self._engine
        if job.request is not None and engine is not None:
            engine.cancel(job.request)
        self._leave(job)
        if job in self._waiting:
            self._waiting.remove(job)
        self._finish(job)

    def _finish(self, job: Job) -> None:
        """A job leaves the worker, once: its sink hears a stop it should hear, it is counted out."""
        if job.ended:
            return
        job.ended = True
        if job.stop_code is not None and job.notify_stop:
            self._post(job.sink.on_error, job.stop_code, job.stop_message)
        with self._cond:
            if job.stop_code is None:
                self._live -= 1
            self._unfinished -= 1
        self._event("request_end", job, job.delivered)
        log.debug("request left worker key=%d segments=%d stop=%s", job.key, job.delivered, job.stop_code or "-")
        self._post(self._set_idle_if_idle)

    def _set_idle_if_idle(self) -> None:
        # Runs on the loop: re-checks under the lock, since a submit may have come in meanwhile.
        with self._cond:
            if self._unfinished == 0:
                self._idle.set()

    def _check_stalls(self) -> None:
        """Under the lock: a job parked for stall_timeout_s is cancelled as a slow consumer."""
        now = time.monotonic()
        for job in self._active:
            if job.parked_since is not None and job.stop_code is None:
                if now - job.parked_since >= self.config.stall_timeout_s:
                    log.info("request stalled key=%d parked_s=%.1f", job.key, now - job.parked_since)
                    self._stop(job, ErrorCode.SLOW_CONSUMER, True)

    def _park_timeout(self) -> float | None:
        """Under the lock: seconds until the earliest parked job stalls out (None: wait for a notify)."""
        deadlines = [
            j.parked_since + self.config.stall_timeout_s
            for j in self._active
            if j.parked_since is not None and j.stop_code is None
        ]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _mark_parked(self) -> None:
        for job in self._active:
            req = job.request
            if req is None or job.parked_since is not None or job.stop_code is not None:
                continue
            if req.credits is not None and req.credits <= 0 and (req.segments or req.texts):
                job.parked_since = time.monotonic()
                log.debug("request parked key=%d", job.key)
                self._event("parked", job, job.delivered)
        with self._cond:
            self._check_stalls()

    def report_fault(self, message: str) -> None:
        """Loop side: the device is unusable (a fault, or the watchdog saw a step that never ends)."""
        log.critical("device fault, the daemon must restart error=%r", message)
        self.device_fault_message = message
        self.device_fault.set()

    def _device_fault(self, message: str) -> None:
        self._post(self.report_fault, message)

    def _drain_after_fault(self) -> None:
        """After a device fault nothing more can run: fail every job and answer queued registrations."""
        with self._cond:
            jobs = [*self._active, *self._waiting, *(c.job for c in self._inbox if isinstance(c, Submit))]
            self._inbox.clear()
            for vj in self._voice_jobs:
                self._post(vj.done, TtsdError("internal error: device fault"))
            self._voice_jobs.clear()
            self._emotion_jobs.clear()  # their jobs are in the lists below
        for job in jobs:
            with self._cond:
                self._stop(job, ErrorCode.INTERNAL, True)
            self._finish(job)
        self._active.clear()
        self._waiting.clear()

    # ---------------------------------------------------------------------------------------
    # Warm-up and voices (worker thread)

    def _do_warm_up(self, warm_up: Callable[[Engine], float]) -> None:
        assert self._engine is not None
        try:
            seconds = warm_up(self._engine)
            log.info("warm-up done warm_s=%.2f", seconds)
        except DeviceFault:
            raise
        except Exception as e:  # serving eagerly beats not serving: log one line and go on
            log.error("warm-up failed; serving without it error=%r", e)
            self.pipeline.check_device(e)
        finally:
            self.warmed.set()

    def _fail_start(self, message: str) -> None:
        log.error("worker cannot start: %s", message)
        self.start_error = message
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._voice_cond.notify()
        self.warmed.set()

    def _voice_loop(self) -> None:
        """The voice thread: each turn, one batch of emotion texts and one registration, until the worker stops."""
        while True:
            with self._cond:
                while not (self._voice_jobs or self._emotion_jobs or self._stopping):
                    self._voice_cond.wait()
                if self._stopping:
                    for vj in self._voice_jobs:  # still queued: an answer instead of silence
                        self._post(vj.done, ShuttingDown("the daemon is shutting down"))
                    self._voice_jobs.clear()
                    self._emotion_jobs.clear()  # their jobs are stopped by the shutdown itself
                    return
                batch = self._take_emotion_batch()
                registration = self._voice_jobs.popleft() if self._voice_jobs else None
            try:
                if batch:
                    self._read_emotions(batch)
                if registration is not None:
                    self._run_voice(registration)
            except DeviceFault as e:
                self._device_fault(str(e))

    def _take_emotion_batch(self) -> list[tuple[Job, str]]:
        """Under the lock: the oldest queued emotion texts that fit one batch (EMOTION_BATCH_CHARS;
        always at least one), leaving out jobs stopped meanwhile."""
        batch: list[tuple[Job, str]] = []
        longest = 0
        while self._emotion_jobs:
            job, text = self._emotion_jobs[0]
            if job.stop_code is not None:
                self._emotion_jobs.popleft()
                continue
            chars = max(longest, len(job.opts.emotion_text(text) or ""))
            if batch and (len(batch) + 1) * chars > EMOTION_BATCH_CHARS:
                break
            batch.append(self._emotion_jobs.popleft())
            longest = chars
        return batch

    def _read_emotions(self, batch: list[tuple[Job, str]]) -> None:
        """QwenEmotion on the batch's texts; each job gets its options with the vector, or its error."""
        results: list[SynthesisOptions | TtsdError]
        fault: DeviceFault | None = None
        try:
            results = self.pipeline.read_emotion_texts([(job.opts, text) for job, text in batch])
        except DeviceFault as e:
            fault, results = e, [TtsdError("internal error: device fault")] * len(batch)
        except TtsdError as e:
            results = [e] * len(batch)
        except Exception as e:
            log.exception("emotion text failed")
            results = [TtsdError(f"internal error: {type(e).__name__}")] * len(batch)
            try:
                self.pipeline.check_device(e)
            except DeviceFault as f:
                fault = f
        with self._cond:
            for (job, _), result in zip(batch, results, strict=True):
                self._inbox.append(EmotionRead(job, result))
            self._cond.notify()
        if fault is not None:
            raise fault

    def _run_voice(self, vj: _VoiceJob) -> None:
        result: VoiceResult | TtsdError
        try:
            result = self._prepare_voice(vj.audio, vj.emo_audio)
        except TtsdError as e:
            result = e
        except Exception as e:
            log.exception("voice registration failed")
            self.pipeline.check_device(e)
            result = TtsdError(f"internal error: {type(e).__name__}")
        self._post(vj.done, result)

    def _prepare_voice(self, audio: bytes, emo_audio: bytes | None) -> VoiceResult:
        limit_s = self.config.max_reference_audio_s
        # From the file headers alone (no decode), so an over-long file costs nothing.
        audio_s = check_reference_audio(audio, "speaker reference audio", limit_s)
        if emo_audio is not None:
            check_reference_audio(emo_audio, "emotion reference audio", limit_s)
        voice_id = _voice_key(audio, emo_audio)
        store = self.store
        entry = self.voices.lookup(voice_id)
        if entry is not None:
            # Registering again is how a client answers unknown_voice: put back a voice that left
            # the library (deleted or evicted there) while this process still held it.
            if store is not None and not store.exists(voice_id):
                store.save(voice_id, entry[0], audio_s)
            return VoiceResult(voice_id, audio_s)
        if store is not None and (loaded := store.load(voice_id)) is not None:
            self._cache(voice_id, *loaded)
            return VoiceResult(voice_id, audio_s)
        t0 = time.perf_counter()
        voice = self.pipeline.prepare_voice(audio, emo_audio, max_input_s=limit_s)
        self._cache(voice_id, voice, audio_s)
        if store is not None:
            store.save(voice_id, voice, audio_s)
        log.info(
            "voice registered voice=%s audio_s=%.2f emo=%s prepare_ms=%.0f",
            voice_id, audio_s, emo_audio is not None, (time.perf_counter() - t0) * 1000,
        )
        return VoiceResult(voice_id, audio_s)


_JOB_TYPE = Job

_STOP_MESSAGES: Final = {
    ErrorCode.CANCELLED: "cancelled by the client",
    ErrorCode.SLOW_CONSUMER: "the client did not read its audio in time (stall_timeout_s); request cancelled",
    ErrorCode.SHUTTING_DOWN: "the daemon is shutting down; request cancelled",
}


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:300]
