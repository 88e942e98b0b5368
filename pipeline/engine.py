"""The engine: many synthesis requests at once, sharing every model step.

A request's text becomes segments (upstream's segmentation); each segment goes through the GPT
decode batch (decode.py: one row per beam of every running segment, joining and leaving between
steps), then through an acoustic job that renders several ready segments together (second GPT
pass, length regulator, DiT/CFM in one padded batch, BigVGAN), and comes out as `SegmentAudio`.

One thread drives an engine: it calls `step()` repeatedly, and between calls `add`, `feed`,
`cancel` and `grant`. A step does one unit of work: admit waiting segments into free decode rows,
one decode step, then one unit (prep, Euler steps: one, or CFM_STEPS_PER_REPLAY with CUDA graphs, or
the vocoder) of one acoustic job, so a long acoustic job never holds up everyone's decoding. On CUDA
the decode batch runs on one stream and acoustic jobs on another, so they overlap; a job's audio is
handed out as soon as its copy to the host is done. On CPU the same code runs in order, with one
exception: a job that renders some request's first audio runs to its end before the next decode
step, since in order a decode step in between can only delay that audio.

Streams (CUDA): everything that touches the decode batch — admitting, stepping, removing a cancelled
or failed request, resetting after a failure — is issued on the GPT stream, and the batch's buffers
are allocated there; acoustic jobs run on the acoustic stream. A segment's codes (and its request's
emotion vector) cross from the GPT stream to the acoustic one through `Streams.hand_over` when its
decoding finishes: an ordering, and a `record_stream` so their memory is not reused while the
acoustic stream may still read it. Voices come ready from `Pipeline.prepare_voice`.

Scheduling: segments start decoding in order of priority — requests that have not had audio yet
first (time to first audio), then by arrival — as rows free up. A request runs at most one segment
ahead of its audio on CUDA (none on CPU, where running ahead only delays the segment before) and
never more than its flow-control credits allow. Every request's audio is delivered in order.

Chunks (chunk_codes > 0, chunking.py): a segment's audio need not wait for its last code. With
every stop check (`DecodeBatch.stop_checked`: the host reads the batch then anyway) the engine reads the
codes of each chunked segment that can no longer change (one row: all of them; beams: the common
prefix of every live beam and finished hypothesis) and sends each chunk whose codes are all there
to the acoustic stage, where it batches with segments and other chunks; IndexTTS-2's second-pass
latent is extended chunk by chunk (Pipeline.chunk_latent). Chunk audio is joined in order by the
segment's ChunkJoiner and delivered as pieces of that segment (SegmentAudio.part / last); flow
control, ordering and the "audio" observer event stay per segment. A segment that ends inside its
first chunk is rendered whole, exactly as with chunk_codes 0.

Robustness: an exception in a shared decode step or acoustic job does not fail its neighbours:
the segments involved are retried alone, and only a segment that fails alone fails its request."""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ttsd.api.errors import TtsdError

from .audio import HOP_LENGTH
from .chunking import ChunkInput, ChunkJoiner, ChunkPlan, SecondPass, overlap_samples
from .decode import DecodeBatch, DecodeRequest, Generated, StepFn
from .device import upload
from .requests import Event, Observer, Request, RequestDone, RequestFailed, SegmentAudio, SegmentDone

if TYPE_CHECKING:
    from ttsd.api.options import SynthesisOptions

    from .pipeline import Pipeline, Segment
    from .voice import Voice

log = logging.getLogger(__name__)

MAX_ACOUSTIC_JOBS = 2  # acoustic jobs in progress at once (round-robin, one unit each per engine step)
# Euler steps per acoustic unit with graphed solves (CUDA): one graph replay each. On CUDA the unit is
# only issued (decode runs on its own stream), so fewer, larger replays cost the acoustic thread fewer
# launches; a dropped job is still noticed within ~5 DiT passes. Eager solves (CPU) take one step per
# unit, so decode steps interleave finely on the shared cores.
CFM_STEPS_PER_REPLAY = 5
ACOUSTIC_PAD_RATIO = 0.25  # a job's padded frames stay under this share of its real frames


@dataclass(frozen=True, slots=True)
class AcousticInput:
    """What the acoustic stage needs of one segment."""

    voice: Voice
    emovec: Tensor  # (1, D) in the GPT's dtype
    segment: Segment
    codes: Generated
    opts: SynthesisOptions
    noise: Tensor | None = None  # injected CFM start noise (1, 80, P + T), whole segments only; else from the seed
    chunk: ChunkInput | None = None  # render only this chunk of the segment (codes: the chunk's own)



@dataclass(eq=False)
class _Chunking:
    """A chunked segment's progress (chunk_codes > 0): chunks cut so far, their audio awaiting the join."""

    plan: ChunkPlan
    joiner: ChunkJoiner
    committed: Tensor  # [n] host codes no candidate can change any more
    second_pass: SecondPass = field(default_factory=SecondPass)
    taken: int = 0  # chunks cut (sent to the acoustic stage)
    total: int | None = None  # chunks the segment has, once its decoding finished
    joined: int = 0  # chunks whose audio went through the joiner
    pcm: dict[int, tuple[np.ndarray, bool]] = field(default_factory=dict)  # rendered (PCM, last), awaiting earlier ones


@dataclass(eq=False)
class _Seg:
    """A segment on its way through the engine."""

    req: Request
    segment: Segment
    solo: bool = False  # retried alone after a shared step failed
    decode: DecodeRequest | None = None
    codes: Generated | None = None
    dropped: bool = False  # its request went away; finish quietly
    chunking: _Chunking | None = None  # rendered chunk by chunk while it decodes (None: whole)
    pieces: int = 0  # pieces of its audio queued for delivery
    ended: bool = False  # its last piece is queued

    def acoustic_input(self) -> AcousticInput:
        r = self.req
        assert r.emovec is not None and self.codes is not None  # set before a segment reaches acoustics
        noise = r.noise.get(self.segment.index) if r.noise is not None else None
        return AcousticInput(r.voice, r.emovec, self.segment, self.codes, r.opts, noise)


@dataclass(eq=False)
class _Chunk:
    """One chunk of a chunked segment on its way through the acoustic stage (it batches like a segment)."""

    seg: _Seg
    index: int
    start: int
    prefix: Tensor  # [end] host codes of the segment up to the chunk's end
    last: bool  # the segment's final chunk
    solo: bool = False

    @property
    def req(self) -> Request:
        return self.seg.req

    @property
    def segment(self) -> Segment:
        return self.seg.segment

    @property
    def dropped(self) -> bool:
        return self.seg.dropped

    @dropped.setter
    def dropped(self, value: bool) -> None:
        self.seg.dropped = value

    @property
    def codes(self) -> Generated:
        c = self.prefix[self.start :].unsqueeze(0)  # [1, M_c] on the host
        return Generated(c, c, self.last, c)

    def acoustic_input(self) -> AcousticInput:
        r, ch = self.req, self.seg.chunking
        assert r.emovec is not None and ch is not None  # chunks exist only for chunked segments
        dev = r.emovec.device
        # Uploaded on the acoustic stream that reads them (pinned, non-blocking), inside the job's first unit.
        prefix = upload([self.prefix.tolist()], dev)  # [1, end]
        host = self.prefix[self.start :].unsqueeze(0)
        codes = Generated(prefix[:, self.start :], prefix[:, self.start :], self.last, host)
        return AcousticInput(r.voice, r.emovec, self.segment, codes, r.opts,
                             chunk=ChunkInput(self.index, self.start, prefix, ch.second_pass))


_Work = _Seg | _Chunk  # what an acoustic job renders: a whole segment or one chunk of one


class _AcousticJob:
    """Several ready segments rendered together, as a generator of units (see `run`)."""

    def __init__(self, engine: Engine, segs: list[_Work]) -> None:
        self.engine = engine
        self.segs = segs
        self.units = self.run()
        self.results: list[tuple[_Work, Tensor]] = []  # (segment or chunk, PCM on the host, maybe still copying)
        # It renders the first piece of some request's audio (its first segment, or that one's first chunk).
        self.first_audio = any(
            s.req.delivered == 0 and s.segment.index == 0 and (isinstance(s, _Seg) or s.index == 0) for s in segs
        )
        self.event: torch.cuda.Event | None = None
        self.issued = False  # every unit has run (on CUDA the device may still be working)

    def run(self) -> Iterator[None]:
        e = self.engine
        pipe = e.pipe
        segs = [s for s in self.segs if not s.dropped]
        if not segs:
            return
        # Each unit runs on the acoustic stream: the engine enters it around every `next()` (a stream
        # context held across a yield would leak into whatever the engine does in between).
        e.lanes.start(e.lanes.acoustic)
        rows = pipe.cfm_rows([s.acoustic_input() for s in segs], e.prep_graphs)
        yield
        steps = segs[0].req.opts.diffusion_steps
        solve = pipe.cfm_solve(rows, steps) if e.cfm_workspaces is None else e.cfm_workspaces.solve(rows, steps)
        per_unit = 1 if e.cfm_workspaces is None else CFM_STEPS_PER_REPLAY
        try:
            while not solve.done:
                if all(s.dropped for s in segs):
                    return
                solve.step(per_unit)
                yield
            live = [(b, s) for b, s in enumerate(segs) if not s.dropped]
            mels = [solve.target(b) for b, _ in live]
            pcms = [pipe.vocode(m) for m in mels] if e.vocoder_graphs is None else e.vocoder_graphs(mels)
            for (_, s), pcm in zip(live, pcms, strict=True):  # [N] each, on the device
                self.results.append((s, e.lanes.to_host(pcm)))
        finally:
            solve.close()  # a job dropped, failed or done: its workspace serves the next solve
        self.event = e.lanes.mark(e.lanes.acoustic)
        self.issued = True

    @property
    def finished(self) -> bool:
        return self.issued and (self.event is None or self.event.query())


class Engine:
    """Runs many requests through one Pipeline (module docstring). Driven by one thread."""

    def __init__(
        self,
        pipe: Pipeline,
        *,
        max_batch_rows: int = 16,
        step_fn: StepFn | None = None,
        row_buckets: Sequence[int] = (),
        prefetch: bool | None = None,
        max_acoustic_frames: int = 16_384,
        observer: Observer | None = None,
    ) -> None:
        self.pipe = pipe
        self.observer = observer
        self.lanes = pipe.lanes
        with self.lanes.on(self.lanes.gpt):  # the batch's buffers belong to the stream that uses them
            self.batch = DecodeBatch(
                pipe.decode_gpt, max_rows=max_batch_rows, dtype=pipe.gpt_dtype, step_fn=step_fn,
                row_buckets=row_buckets,
            )
        self.max_batch_rows = max_batch_rows
        self.prefetch = pipe.device.type == "cuda" if prefetch is None else prefetch
        # CPU: decode steps and acoustic units run one after the other on the same cores, so a decode
        # step taken while a job renders someone's first audio only delays that audio (on CUDA the two
        # overlap on their streams). Such a job then runs to its end before decoding goes on.
        self.first_audio_first = pipe.device.type != "cuda"
        self.prep_graphs = pipe.prep_graphs()  # CUDA: a job's second pass and regulator, a replay each
        self.cfm_workspaces = pipe.cfm_workspaces()  # CUDA: CFM_STEPS_PER_REPLAY steps per graph replay
        self.vocoder_graphs = pipe.vocoder_graphs()  # CUDA: a job's segments vocoded in one graph replay
        self.max_acoustic_frames = max_acoustic_frames
        self.requests: list[Request] = []
        self._arrivals = itertools.count()
        self._decoding: dict[int, _Seg] = {}  # id(DecodeRequest) → segment
        self._ready: deque[_Work] = deque()  # codes done (a segment's or a chunk's), waiting for an acoustic job
        self._jobs: deque[_AcousticJob] = deque()
        self._solo: deque[_Seg] = deque()  # decodes retried alone after a shared failure
        self.stats: dict[str, float] = {"decode_steps": 0, "codes": 0, "acoustic_units": 0}

    # ------------------------------------------------------------------ control (driving thread)

    def add(self, req: Request) -> None:
        """Start serving `req` (its options already checked)."""
        if req.opts.seed is None:
            # One seed per request, not per segment: segments share the emotion mix and the noise lineage.
            req.opts = req.opts.with_seed(secrets.randbits(62))
        req.seq = next(self._arrivals)
        self.requests.append(req)

    def feed(self, req: Request, texts: Sequence[str | tuple[Segment, ...]], close: bool) -> None:
        """More input for a request (text, or segments split ahead of time); `close` ends its input."""
        req.texts.extend(texts)
        req.input_closed = req.input_closed or close

    def grant(self, req: Request, n: int = 1) -> None:
        """Return flow-control credits (the caller has sent n segments)."""
        if req.credits is not None:
            req.credits += n

    def capture(self) -> None:
        """Record the graphed decode step of every row bucket now (warm-up), on the GPT stream."""
        with self.lanes.on(self.lanes.gpt):
            self.lanes.start(self.lanes.gpt)
            self.batch.capture()

    def cancel(self, req: Request) -> None:
        """Stop `req` now: its rows leave the decode batch, its other work is dropped, no more events."""
        self._drop(req)

    @property
    def busy(self) -> bool:
        """Whether `step()` has anything to do right now."""
        return bool(
            self.batch.active
            or self._ready
            or self._jobs
            or self._solo
            or self._startable()
            or any(r.exhausted for r in self.requests)  # its RequestDone is due
        )

    # ------------------------------------------------------------------ the step

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One unit of work (module docstring). Returns the events it produced, in order."""
        events: list[Event] = []
        self._admit(events)
        if self.batch.active and not self._first_audio_rendering():
            self._decode_step(events)
        self._acoustic_unit(events)
        self._deliver(events)
        return events

    def _startable(self) -> list[Request]:
        out = []
        limit = 2 if self.prefetch else 1
        for r in self.requests:
            if r.finished or r.in_flight >= limit or (r.credits is not None and r.credits <= 0):
                continue
            if r.segments or r.texts:
                out.append(r)
        # Requests without audio yet go first (time to first audio), then by arrival.
        return sorted(out, key=lambda r: (r.delivered > 0 or r.started > 0, r.seq))

    def _admit(self, events: list[Event]) -> None:
        if any(s.solo for s in self._decoding.values()):
            return  # a segment retried after a shared failure decodes alone
        if self._solo:
            if not self.batch.active:
                self._start_decode(self._solo.popleft(), events)
            return
        for req in self._startable():
            segment = self._next_segment(req, events)
            if segment is None:
                continue
            if req.opts.num_beams > self.batch.free_rows():
                req.segments.appendleft(segment)  # first in line when rows free up
                break
            req.started += 1
            if req.credits is not None:
                req.credits -= 1
            self._start_decode(_Seg(req, segment), events)

    def _next_segment(self, req: Request, events: list[Event]) -> Segment | None:
        while not req.segments:
            if not req.texts:
                return None
            item = req.texts.popleft()
            if isinstance(item, tuple):
                segments = list(item)  # split ahead of time by the caller
            else:
                pieces, error = self.pipe.split_pieces([item], req.opts, incremental=req.incremental)
                if error is not None:
                    self._fail(req, error, events)
                    return None
                segments = [seg for piece in pieces for seg in piece]
            for seg in segments:
                # Indices run across the whole request: the seed derives each segment's noise from them.
                req.segments.append(seg.with_index(req.next_index))
                req.next_index += 1
        return req.segments.popleft()

    def _start_decode(self, s: _Seg, events: list[Event]) -> None:
        req = s.req
        plan = ChunkPlan.from_options(req.opts.chunk_codes, req.opts.chunk_overlap, req.opts.first_chunk_codes)
        if plan is not None and s.chunking is None:
            frames = self.pipe.family.overlap_frames(plan.overlap, req.opts)
            joiner = ChunkJoiner(overlap_samples(frames, HOP_LENGTH))
            s.chunking = _Chunking(plan, joiner, torch.zeros(0, dtype=torch.long))
        try:
            with self.lanes.on(self.lanes.gpt):
                self.lanes.start(self.lanes.gpt)
                if req.emovec is None:
                    req.emovec = self.pipe.request_emovec(req.voice, req.opts, req.emo_voice)
                s.decode = self.pipe.decode_request(req.voice, s.segment, req.opts, req.emovec)
                s.decode.tag = s
                self.batch.admit(s.decode)
            self._decoding[id(s.decode)] = s
            self._notify("decode", req, s.segment.index)
        except TtsdError as e:
            self._fail(req, e, events)
        except Exception as e:  # a bug in one request's prefill fails that request only
            self._crash(req, e, events)

    def _decode_step(self, events: list[Event]) -> None:
        t0 = time.perf_counter()
        try:
            with self.lanes.on(self.lanes.gpt):
                finished = self.batch.step()
        except Exception as e:
            self._decode_failed(e, events)
            return
        self.stats["decode_steps"] += 1
        self.stats["decode_s"] = self.stats.get("decode_s", 0.0) + time.perf_counter() - t0
        for d in finished:
            s = self._decoding.pop(id(d))
            assert d.result is not None and s.req.emovec is not None  # set by the batch / _start_decode
            s.codes = d.result
            self.stats["codes"] += d.result.codes.size(1)
            if s.dropped:
                continue
            self._notify("codes", s.req, s.segment.index)
            if d.result.codes.size(1) == 0 and (s.chunking is None or s.chunking.taken == 0):
                # The GPT stopped at once: nothing to render (a length regulator over 0 frames fails).
                s.chunking = None
                self._put(s, np.zeros(0, dtype=np.float32), last=True)
                continue
            if s.chunking is not None:
                try:
                    if self._cut_final(s, d.result):
                        continue
                except Exception as e:  # this request's bug (its final codes disagree with its chunks)
                    self._crash(s.req, e, events)
                    continue
            # The acoustic stream reads these after the GPT stream wrote them.
            self.lanes.hand_over(self.lanes.gpt, self.lanes.acoustic, d.result.codes, s.req.emovec)
            self._ready.append(s)
        if self.batch.stop_checked:  # the batch read the device for its stop check too
            for s in list(self._decoding.values()):
                if s.chunking is not None and not s.dropped and s.decode is not None:
                    try:
                        with self.lanes.on(self.lanes.gpt):
                            self._commit(s, self.batch.committed(s.decode))  # host sync
                        self._cut(s, None)
                    except Exception as e:  # this request's bug (a retried decode that disagrees): it alone fails
                        self._crash(s.req, e, events)

    # ------------------------------------------------------------------ chunks (chunk_codes > 0)

    def _commit(self, s: _Seg, codes: Tensor) -> None:
        """Record `codes` [n] (host) as the segment's committed codes when they extend the ones before."""
        ch = s.chunking
        assert ch is not None
        n = min(ch.committed.numel(), codes.numel())  # a decode retried alone catches up from its start
        if not torch.equal(codes[:n], ch.committed[:n]):
            # Audio of the old codes may have gone out already; it cannot be taken back.
            raise RuntimeError(f"segment {s.segment.index}: committed codes changed while decoding")
        if codes.numel() > ch.committed.numel():
            ch.committed = codes

    def _cut(self, s: _Seg, total: int | None) -> None:
        """Send every chunk whose codes are committed (with `total`: the rest of the segment) to the acoustic stage."""
        ch = s.chunking
        assert ch is not None
        spans = ch.plan.spans(ch.committed.numel(), total, ch.taken)
        if spans and ch.taken == 0:
            assert s.req.emovec is not None  # computed when the segment started decoding
            # The acoustic stream reads the emotion vector after the GPT stream wrote it.
            self.lanes.hand_over(self.lanes.gpt, self.lanes.acoustic, s.req.emovec)
        for start, end, last in spans:
            self._ready.append(_Chunk(s, ch.taken, start, ch.committed[:end], last))
            ch.taken += 1
            self.stats["chunks"] = self.stats.get("chunks", 0) + 1
        if total is not None:
            ch.total = ch.taken
            self._join(s)  # ended exactly with a chunk already cut: only the held-back tail is left

    def _cut_final(self, s: _Seg, result: Generated) -> bool:
        """Decoding of a chunked segment finished. False when it never left its first chunk: it is then
        rendered whole, exactly as without chunking (the parity path); True when its chunks take over."""
        ch = s.chunking
        assert ch is not None
        codes = result.codes_host[0]
        if ch.taken == 0 and ch.plan.spans(codes.numel(), codes.numel(), 0) == [(0, codes.numel(), True)]:
            s.chunking = None
            return False
        if codes.numel() < ch.committed.numel():
            raise RuntimeError(f"segment {s.segment.index}: decoding ended before codes it had committed")
        self._commit(s, codes)
        self._cut(s, codes.numel())
        return True

    def _join(self, s: _Seg) -> None:
        """Push the segment's rendered chunks, in order, through its joiner; queue what comes out."""
        ch = s.chunking
        assert ch is not None
        while ch.joined in ch.pcm:
            pcm, last = ch.pcm.pop(ch.joined)
            ch.joined += 1
            self._put(s, ch.joiner.push(pcm, last), last)
        if ch.total is not None and ch.joined == ch.total and not s.ended:
            self._put(s, ch.joiner.finish(), last=True)  # the last chunk was cut before the segment ended

    def _decode_failed(self, e: Exception, events: list[Event]) -> None:
        """A shared decode step raised: nobody can tell whose input caused it, so every segment in the
        batch restarts alone; one that fails alone fails its request (and only it)."""
        self.pipe.check_device(e)
        victims = list(self._decoding.values())
        self._decoding.clear()
        with self.lanes.on(self.lanes.gpt):
            self.batch.reset()
        if len(victims) == 1 and victims[0].solo:
            self._crash(victims[0].req, e, events)
            return
        log.error("decode step failed; retrying its segments=%d alone error=%r", len(victims), e)
        for s in victims:
            if not s.dropped:
                # The same segment decodes again from its start; a chunked one keeps its progress (chunks
                # already cut point at it), and a seeded decode commits the same codes again.
                s.solo, s.decode, s.codes = True, None, None
                self._solo.append(s)

    # ------------------------------------------------------------------ acoustic

    def _first_audio_rendering(self) -> bool:
        """CPU: a job holding some request's first audio has units left (they go before decode steps)."""
        return self.first_audio_first and any(j.first_audio and not j.issued for j in self._jobs)

    def _acoustic_unit(self, events: list[Event]) -> None:
        while len(self._jobs) < MAX_ACOUSTIC_JOBS and self._ready:
            self._jobs.append(_AcousticJob(self, self._take_batch()))
        running = [j for j in self._jobs if not j.issued]
        if not running:
            return
        job = running[0]
        self._jobs.remove(job)
        self._jobs.append(job)  # round-robin
        try:
            with self.lanes.on(self.lanes.acoustic):
                next(job.units)
        except StopIteration:
            job.issued = True
        except Exception as e:
            self._jobs.remove(job)
            self._acoustic_failed(job, e, events)
            return
        self.stats["acoustic_units"] += 1

    def _take_batch(self) -> list[_Work]:
        """The ready segments to render together: same acoustic settings, first segments first, and
        padding kept small so one long segment does not inflate everyone's work."""
        first = sorted(self._ready, key=lambda s: (s.segment.index > 0, s.req.seq))[0]
        key = self._acoustic_key(first)
        same = [s for s in self._ready if self._acoustic_key(s) == key and not s.solo]
        same.sort(key=lambda s: (s.segment.index > 0, s.req.seq))
        if first.solo or first not in same:
            same = [first]
        picked: list[_Work] = []
        longest = total = 0
        for s in same:
            assert s.codes is not None  # ready segments have codes
            n = self.pipe.acoustic_frames(s.req.voice, s.codes, s.req.opts)
            new_longest = max(longest, n)
            padded = new_longest * (len(picked) + 1) - (total + n)
            if picked and (new_longest * (len(picked) + 1) > self.max_acoustic_frames
                           or padded > ACOUSTIC_PAD_RATIO * (total + n)):
                continue
            picked.append(s)
            longest, total = new_longest, total + n
        for s in picked:
            self._ready.remove(s)
            self._notify("acoustic", s.req, s.segment.index)
        return picked

    @staticmethod
    def _acoustic_key(s: _Work) -> tuple[int, bool]:
        o = s.req.opts
        return o.diffusion_steps, o.inference_cfg_rate > 0

    def _acoustic_failed(self, job: _AcousticJob, e: Exception, events: list[Event]) -> None:
        self.pipe.check_device(e)
        live = [s for s in job.segs if not s.dropped]
        if len(live) == 1:
            self._crash(live[0].req, e, events)
            return
        log.error("acoustic job failed; retrying its segments=%d alone error=%r", len(live), e)
        for s in live:
            s.solo = True
            self._ready.append(s)

    # ------------------------------------------------------------------ delivery

    def _deliver(self, events: list[Event]) -> None:
        done = [j for j in self._jobs if j.finished]
        for job in done:
            self._jobs.remove(job)
            for w, pcm in job.results:
                if w.dropped or w.req.finished:
                    continue
                if isinstance(w, _Chunk):
                    assert w.seg.chunking is not None  # chunks come from chunked segments
                    w.seg.chunking.pcm[w.index] = (pcm.numpy(), w.last)
                    self._join(w.seg)
                else:
                    self._put(w, pcm.numpy(), last=True)
        for req in list(self.requests):
            while not req.finished and (queue := req.ready.get(req.delivered)):
                audio = queue.popleft()
                if audio.last:
                    del req.ready[req.delivered]
                    req.delivered += 1
                    self._notify("audio", req, audio.segment.index)
                events.append(SegmentDone(req, audio))
            if not req.finished and req.exhausted:
                req.finished = True
                self.requests.remove(req)
                events.append(RequestDone(req))

    def _put(self, s: _Seg, samples: np.ndarray, last: bool) -> None:
        """Queue the next piece of a segment's audio for in-order delivery (a whole segment: one piece)."""
        queue = s.req.ready.setdefault(s.segment.index, deque())
        silence = 0
        if s.segment.index > 0 and s.pieces == 0:
            # Upstream joins segments with int(sr * ms / 1000) zeros; streaming sends them up front.
            silence = int(self.pipe.sample_rate_hz * s.req.opts.interval_silence_ms / 1000)
        queue.append(SegmentAudio(s.segment, samples, silence, part=s.pieces, last=last))
        s.pieces += 1
        s.ended = last

    def _notify(self, what: str, req: Request, index: int) -> None:
        if self.observer is not None:
            self.observer(what, req, index)

    # ------------------------------------------------------------------ ending requests

    def _drop(self, req: Request) -> None:
        req.finished = True
        if req in self.requests:
            self.requests.remove(req)
        for key, s in list(self._decoding.items()):
            if s.req is req:
                s.dropped = True
                assert s.decode is not None
                with self.lanes.on(self.lanes.gpt):  # ordered after the steps that still use its rows
                    self.batch.remove(s.decode)
                del self._decoding[key]
        for w in itertools.chain(self._ready, self._solo, (w for j in self._jobs for w in j.segs)):
            if w.req is req:
                w.dropped = True
        self._ready = deque(w for w in self._ready if not w.dropped)
        self._solo = deque(s for s in self._solo if not s.dropped)

    def _fail(self, req: Request, error: BaseException, events: list[Event]) -> None:
        if req.finished:
            return
        self._drop(req)
        events.append(RequestFailed(req, error))

    def _crash(self, req: Request, error: Exception, events: list[Event]) -> None:
        self.pipe.check_device(error)
        log.error("request failed error=%r", error, exc_info=error)
        self._fail(req, error, events)


def run_to_end(engine: Engine, requests: Sequence[Request], cancel: Callable[[], bool] | None = None
               ) -> Iterator[Event]:
    """Drive `engine` until every request in `requests` is done or failed, yielding events as they come.
    `cancel()` is polled between steps and cancels them all with `Cancelled` raised."""
    from ttsd.api.errors import Cancelled

    for r in requests:
        engine.add(r)
    left = set(map(id, requests))
    while left:
        if cancel is not None and cancel():
            for r in requests:
                engine.cancel(r)
            raise Cancelled("synthesis cancelled")
        for ev in engine.step():
            yield ev
            if isinstance(ev, RequestDone | RequestFailed):
                left.discard(id(ev.request))
