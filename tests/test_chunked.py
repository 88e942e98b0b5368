"""Chunked streaming inside a segment (chunk_codes > 0) through the engine, on both model versions:
parity with whole segments, joins without clicks, beams, batching beside unchunked requests, cancel."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch

from ttsd.api.options import SynthesisOptions
from ttsd.pipeline import Pipeline
from ttsd.pipeline.chunking import ChunkInput, ChunkPlan, SecondPass
from ttsd.pipeline.engine import AcousticInput, Engine, Request, RequestDone, SegmentDone
from ttsd.pipeline.requests import SegmentAudio
from ttsd.pipeline.voice import Voice

from .conftest import FixtureSet, assert_close

pytestmark = pytest.mark.model_versions("2", "2.5")

TEXT = "Hello world, this is a test."
BASE = dict(max_mel_tokens=48, diffusion_steps=2, do_sample=False, num_beams=1, seed=5)
CHUNKS = dict(chunk_codes=16, chunk_overlap=4, first_chunk_codes=8)
Rendered = list[tuple[int, int | None, int, list[int]]]  # (segment, chunk or None, first code, codes)


@pytest.fixture(scope="module")
def voice(fx: FixtureSet, pipeline: Pipeline) -> Voice:
    return pipeline.prepare_voice(fx.input_path("speaker.wav"))


def opts(pipeline: Pipeline, **kw: Any) -> SynthesisOptions:
    return pipeline.check_options(SynthesisOptions(**{**BASE, **kw}))


def by_segment(pieces: Sequence[SegmentAudio]) -> dict[int, list[SegmentAudio]]:
    out: dict[int, list[SegmentAudio]] = {}
    for p in pieces:
        out.setdefault(p.segment.index, []).append(p)
    return out


def joined(pieces: Sequence[SegmentAudio]) -> np.ndarray:
    return np.concatenate([p.samples for p in pieces])


def recording_codes(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> Rendered:
    """Record (segment, chunk index or None, first code, codes) of everything the acoustic stage renders."""
    seen: Rendered = []
    real = pipeline.cfm_rows

    def cfm_rows(items: Sequence[AcousticInput], *args: Any) -> Any:
        for it in items:
            k, start = (None, 0) if it.chunk is None else (it.chunk.index, it.chunk.start)
            seen.append((it.segment.index, k, start, it.codes.codes_host[0].tolist()))
        return real(items, *args)

    monkeypatch.setattr(pipeline, "cfm_rows", cfm_rows)
    return seen


def test_chunk_covering_the_segment_is_the_unchunked_waveform(pipeline: Pipeline, voice: Voice) -> None:
    """A first chunk at least as long as the segment gives one piece per segment, the unchunked waveform."""
    whole = list(pipeline.stream(voice, TEXT, opts(pipeline)))
    one_chunk = list(pipeline.stream(voice, TEXT, opts(pipeline, chunk_codes=48, chunk_overlap=4)))
    assert [(p.segment.index, p.part, p.last) for p in one_chunk] == [(p.segment.index, 0, True) for p in whole]
    for a, b in zip(one_chunk, whole, strict=True):
        assert_close(torch.from_numpy(a.samples)[None], torch.from_numpy(b.samples)[None], "one chunk")
        assert a.silence_samples == b.silence_samples


def test_chunked_segment_comes_in_pieces_without_a_click(pipeline: Pipeline, voice: Voice,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A long segment arrives as several pieces (part 0, 1, ..., the last flagged once) whose chunks are
    slices of the segment's unchunked codes, and the joined audio jumps no more between samples than
    the unchunked audio does."""
    whole = list(pipeline.stream(voice, TEXT, opts(pipeline)))
    seen = recording_codes(pipeline, monkeypatch)
    pieces = list(pipeline.stream(voice, TEXT, opts(pipeline, **CHUNKS)))
    monkeypatch.undo()
    segs = by_segment(pieces)
    assert sorted(segs) == [p.segment.index for p in whole]
    assert max(len(v) for v in segs.values()) >= 3
    for w in whole:
        parts = segs[w.segment.index]
        assert [p.part for p in parts] == list(range(len(parts)))
        assert [p.last for p in parts] == [False] * (len(parts) - 1) + [True]
        assert parts[0].silence_samples == w.silence_samples and all(p.silence_samples == 0 for p in parts[1:])
        x, y = joined(parts), w.samples
        assert abs(len(x) - len(y)) <= 256 * 3 * len(parts)  # each chunk rounds its frames down
        if len(parts) > 1:
            assert np.max(np.abs(np.diff(x))) <= np.max(np.abs(np.diff(y)))
    # Each chunk renders exactly the codes the unchunked segment has there, in ChunkPlan's spans.
    plan = ChunkPlan.from_options(CHUNKS["chunk_codes"], CHUNKS["chunk_overlap"], CHUNKS["first_chunk_codes"])
    assert plan is not None
    whole_codes = {i: c for i, k, _, c in recording_codes_of(pipeline, voice, opts(pipeline))}
    chunks = [(i, k, s, c) for i, k, s, c in seen if k is not None]
    assert chunks
    for i, k, start, codes in chunks:
        assert codes == whole_codes[i][start : start + len(codes)]
        assert start == plan.start(k)


def recording_codes_of(pipeline: Pipeline, voice: Voice, o: SynthesisOptions) -> Rendered:
    """The codes an unchunked run renders, segment by segment."""
    with pytest.MonkeyPatch.context() as mp:
        seen = recording_codes(pipeline, mp)
        list(pipeline.stream(voice, TEXT, o))
    return seen


def test_beams_commit_only_codes_every_beam_agrees_on(pipeline: Pipeline, voice: Voice,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """With 3 beams (sampled), every chunk's codes are a slice of the final best sequence: no chunk
    rendered codes a later beam reordering replaced."""
    o = dict(num_beams=3, do_sample=True, top_k=30, top_p=0.8, temperature=0.8, seed=9)
    final = {i: c for i, _, _, c in recording_codes_of(pipeline, voice, opts(pipeline, **o))}
    seen = recording_codes(pipeline, monkeypatch)
    pieces = list(pipeline.stream(voice, TEXT, opts(pipeline, **o, chunk_codes=12, chunk_overlap=2,
                                                    first_chunk_codes=6)))
    monkeypatch.undo()
    assert pieces and pieces[-1].last
    chunks = [(i, s, c) for i, k, s, c in seen if k is not None]
    assert len(chunks) >= 2
    for i, start, codes in chunks:
        assert codes == final[i][start : start + len(codes)], (i, start)
    # Together the chunks of a segment cover all its codes.
    for i, codes in final.items():
        covered = [(s, s + len(c)) for j, s, c in chunks if j == i]
        if covered:
            assert covered[0][0] == 0 and max(e for _, e in covered) == len(codes)


def test_chunked_requests_leave_unchunked_neighbours_unchanged(pipeline: Pipeline, voice: Voice) -> None:
    """An unchunked request batched with a chunked one (joining mid-decode) gets exactly its solo audio,
    and the chunked one gets its solo pieces."""
    def run(reqs: list[Request], join_at: list[int]) -> dict[int, list[SegmentAudio]]:
        engine = Engine(pipeline, max_batch_rows=8)
        out: dict[int, list[SegmentAudio]] = {id(r): [] for r in reqs}
        done: set[int] = set()
        step = 0
        while len(done) < len(reqs):
            for r, at in zip(reqs, join_at, strict=True):
                if at == step:
                    engine.add(r)
            for ev in engine.step():
                if isinstance(ev, SegmentDone):
                    out[id(ev.request)].append(ev.audio)
                elif isinstance(ev, RequestDone):
                    done.add(id(ev.request))
                else:
                    raise AssertionError(ev)
            step += 1
            assert step < 5000
        return out

    def req(**kw: Any) -> Request:
        return Request(voice=voice, opts=opts(pipeline, **kw), texts=deque([TEXT]))

    plain, chunked = req(seed=1), req(seed=2, **CHUNKS)
    together = run([plain, chunked], [0, 3])
    alone_plain, alone_chunked = req(seed=1), req(seed=2, **CHUNKS)
    solo = {**run([alone_plain], [0]), **run([alone_chunked], [0])}
    for got, want in ((together[id(plain)], solo[id(alone_plain)]), (together[id(chunked)], solo[id(alone_chunked)])):
        assert [(p.segment.index, p.part, p.last) for p in got] == [(p.segment.index, p.part, p.last) for p in want]
        for a, b in zip(got, want, strict=True):
            assert_close(torch.from_numpy(a.samples)[None], torch.from_numpy(b.samples)[None], "beside")
    assert len(together[id(chunked)]) > len(together[id(plain)])


def test_cancel_between_chunks(pipeline: Pipeline, voice: Voice) -> None:
    """Cancelling a chunked request after its first piece stops it at once; its neighbour finishes."""
    engine = Engine(pipeline, max_batch_rows=8)
    a = Request(voice=voice, opts=opts(pipeline, seed=3, **CHUNKS), texts=deque([TEXT]))
    b = Request(voice=voice, opts=opts(pipeline, seed=4, **CHUNKS), texts=deque([TEXT]))
    engine.add(a)
    engine.add(b)
    got: dict[int, int] = {id(a): 0, id(b): 0}
    b_done = False
    for _ in range(5000):
        for ev in engine.step():
            assert ev.request is b or (isinstance(ev, SegmentDone) and got[id(a)] == 0), "event after cancel"
            if isinstance(ev, SegmentDone):
                got[id(ev.request)] += 1
                if ev.request is a:
                    assert not ev.audio.last  # cancelled inside its first segment
                    engine.cancel(a)
            b_done = b_done or isinstance(ev, RequestDone)
        if b_done:
            break
    assert b_done and got[id(a)] == 1 and got[id(b)] >= 3
    assert not engine.busy


@pytest.mark.model_versions("2")
def test_incremental_second_pass_equals_the_whole_pass(pipeline: Pipeline, voice: Voice) -> None:
    """The second-pass latent computed chunk by chunk (keys and values kept) equals the one-shot pass
    over the whole segment under the parity rule: the pass is causal."""
    o = opts(pipeline)
    segment = pipeline.split_text(TEXT, o)[0]
    emovec = pipeline.request_emovec(voice, o, None)
    codes = pipeline.run_gpt(voice, segment, o, emovec).codes  # [1, M]
    m = codes.size(1)
    assert m >= 20
    whole = pipeline.latents([(voice, emovec, segment, codes)])[0]  # [1, M, D]
    sp = SecondPass()
    plan = ChunkPlan(size=9, overlap=3, first=5)
    spans = plan.spans(m, m, 0)
    assert len(spans) >= 3
    for k, (start, end, _) in enumerate(spans):
        part = pipeline.chunk_latent(voice, emovec, segment, ChunkInput(k, start, codes[:, :end], sp))
        assert_close(part, whole[:, start:end], f"chunk {k}")
    assert sp.rows is not None and sp.rows.size(1) == m  # every row computed once


def test_incremental_text_is_chunked_segment_by_segment(pipeline: Pipeline, voice: Voice) -> None:
    """Text fed while the request runs is segmented and chunked as it comes; every segment still ends once."""
    engine = Engine(pipeline, max_batch_rows=4)
    o = opts(pipeline, **CHUNKS, max_text_tokens_per_segment=8)
    req = Request(voice=voice, opts=o, texts=deque(["Hello world."]), input_closed=False, incremental=True)
    engine.add(req)
    pieces: list[SegmentAudio] = []
    done = False
    for step in range(5000):
        if step == 40:
            engine.feed(req, ["This is a test."], close=True)
        for ev in engine.step():
            if isinstance(ev, SegmentDone):
                pieces.append(ev.audio)
            else:
                assert isinstance(ev, RequestDone), ev
                done = True
        if done:
            break
    segs = by_segment(pieces)
    assert done and sorted(segs) == list(range(len(segs))) and len(segs) >= 2
    for parts in segs.values():
        assert [p.last for p in parts].count(True) == 1 and parts[-1].last
    assert max(len(v) for v in segs.values()) >= 2


def test_a_failed_decode_step_resumes_chunked_segments(pipeline: Pipeline, voice: Voice) -> None:
    """A decode step that raises after chunks went out retries the segments alone; they re-commit the
    same codes, carry on from the chunks already cut, and deliver exactly the pieces of a clean run."""
    from ttsd.pipeline.decode import decode_step

    calls = 0

    def flaky(*args: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 60:  # two rows: step 30, after the first chunks were committed
            raise RuntimeError("injected decode failure")
        return decode_step(*args)

    def run(step_fn: Any) -> list[list[SegmentAudio]]:
        engine = Engine(pipeline, max_batch_rows=4, step_fn=step_fn)
        reqs = [Request(voice=voice, opts=opts(pipeline, seed=s, **CHUNKS), texts=deque([TEXT]), tag=i)
                for i, s in enumerate((6, 7))]
        for r in reqs:
            engine.add(r)
        out: list[list[SegmentAudio]] = [[], []]
        done = 0
        for _ in range(5000):
            for ev in engine.step():
                if isinstance(ev, SegmentDone):
                    out[ev.request.tag].append(ev.audio)
                else:
                    assert isinstance(ev, RequestDone), ev
                    done += 1
            if done == 2:
                return out
        raise AssertionError("no progress")

    clean = run(None)
    retried = run(flaky)
    assert calls > 60
    for got, want in zip(retried, clean, strict=True):
        assert len(want) >= 3
        assert [(p.segment.index, p.part, p.last) for p in got] == [(p.segment.index, p.part, p.last) for p in want]
        for a, b in zip(got, want, strict=True):
            assert_close(torch.from_numpy(a.samples)[None], torch.from_numpy(b.samples)[None], "retried")


def test_on_cpu_a_first_chunk_renders_without_decode_steps_in_between(pipeline: Pipeline, voice: Voice) -> None:
    """CPU runs decode steps and acoustic units in order: once the job holding a request's first audio
    exists, no decode step runs until that audio is out (a step in between could only delay it); the
    first chunk is cut in the step its last code was selected (CPU checks the batch every step)."""
    engine = Engine(pipeline, max_batch_rows=4)
    first = 5  # not a multiple of CUDA's stop-check cadence (8)
    req = Request(voice=voice, opts=opts(pipeline, seed=3, **{**CHUNKS, "first_chunk_codes": first}),
                  texts=deque([TEXT]))
    engine.add(req)
    steps_at_job = steps_at_audio = None
    for _ in range(5000):
        events = engine.step()
        if steps_at_job is None and engine._jobs:
            steps_at_job = engine.stats["decode_steps"]
        if any(isinstance(ev, SegmentDone) for ev in events):
            steps_at_audio = engine.stats["decode_steps"]
            break
    assert steps_at_job is not None and steps_at_audio is not None
    assert steps_at_audio == steps_at_job, (steps_at_job, steps_at_audio)
    assert steps_at_job == first  # code k is selected in decode step k: no wait for a stop check
    assert pipeline.device.type == "cpu"
    for _ in range(5000):  # the rest of the request decodes and renders as usual
        if any(isinstance(ev, RequestDone) for ev in engine.step()):
            break
    assert not engine.busy
    assert engine.stats["chunks"] >= 3  # its later chunks were cut too (up to 48 codes: 5, then 16 with 4 overlap)
