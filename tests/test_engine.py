"""The engine: many requests share every decode step and acoustic job, and each still gets exactly
the audio it gets alone; cancellation, flow control, scheduling order and failure isolation."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from ttsd.api.errors import BadText
from ttsd.api.options import SynthesisOptions
from ttsd.pipeline import Pipeline
from ttsd.pipeline.engine import AcousticInput, Engine, Event, Request, RequestDone, RequestFailed, SegmentDone
from ttsd.pipeline.voice import Voice

from .conftest import FixtureSet, assert_close

SHORT = dict(max_mel_tokens=16, diffusion_steps=2, max_text_tokens_per_segment=20)
THREE = "One two. Three four. Five six."
THREE_SEGMENTS = {**SHORT, "max_text_tokens_per_segment": 8}  # THREE is one segment per sentence


@dataclass
class Spec:
    """One request of a scenario: what to say, how, and when to join (engine steps from the start)."""

    text: str
    voice: str
    opts: dict[str, Any]
    emo_voice: str | None = None
    join_at: int = 0
    cancel_after_segments: int | None = None


@dataclass
class Outcome:
    audio: list[np.ndarray] = field(default_factory=list)
    codes: dict[int, list[int]] = field(default_factory=dict)
    done: bool = False
    error: BaseException | None = None


@pytest.fixture(scope="module")
def voices(fx: FixtureSet, pipeline: Pipeline) -> dict[str, Voice]:
    return {
        name: pipeline.prepare_voice(fx.input_path(f"{name}.wav")) for name in ("speaker", "emo_speaker")
    }


def run(pipeline: Pipeline, voices: dict[str, Voice], specs: Sequence[Spec], monkeypatch: pytest.MonkeyPatch,
        **engine_kw: Any) -> list[Outcome]:
    """Drive one engine through `specs`; each outcome records its audio and the codes of every segment."""
    engine = Engine(pipeline, max_batch_rows=16, **engine_kw)
    outcomes = [Outcome() for _ in specs]
    reqs = [
        Request(voice=voices[s.voice], opts=pipeline.check_options(SynthesisOptions(**s.opts)), texts=deque([s.text]),
                emo_voice=None if s.emo_voice is None else voices[s.emo_voice], tag=i)
        for i, s in enumerate(specs)
    ]
    real = pipeline.cfm_rows

    def recording(items: Sequence[AcousticInput], *args: Any) -> Any:
        for it, req in ((it, next(r for r in reqs if r.voice is it.voice and r.opts is it.opts)) for it in items):
            outcomes[req.tag].codes[it.segment.index] = it.codes.codes_host[0].tolist()
        return real(items, *args)

    monkeypatch.setattr(pipeline, "cfm_rows", recording)
    step = 0
    while not all(o.done or o.error for o in outcomes):
        for i, s in enumerate(specs):
            if s.join_at == step:
                engine.add(reqs[i])
        events: list[Event] = engine.step()
        for ev in events:
            o = outcomes[ev.request.tag]
            if isinstance(ev, SegmentDone):
                o.audio.append(ev.audio.samples)
                limit = specs[ev.request.tag].cancel_after_segments
                if limit is not None and len(o.audio) >= limit:
                    engine.cancel(ev.request)
                    o.done = True
            elif isinstance(ev, RequestDone):
                o.done = True
            elif isinstance(ev, RequestFailed):
                o.error = ev.error
        step += 1
        assert step < 20_000, "the engine made no progress"
    monkeypatch.setattr(pipeline, "cfm_rows", real)
    return outcomes


SCENARIO = [
    Spec("Hello world. This is a test of three apples.", "speaker", dict(do_sample=False, num_beams=1, seed=1)),
    Spec("The quick brown fox jumps over the lazy dog!", "emo_speaker",
         dict(do_sample=False, num_beams=3, seed=2, emo_vector=(0, 0.6, 0, 0, 0, 0, 0.3, 0)), join_at=2),
    Spec("One two three. Four five six.", "speaker", dict(do_sample=False, num_beams=1, seed=3, emo_alpha=0.6),
         emo_voice="emo_speaker", join_at=5),
    Spec("Sampling is seeded, so it repeats.", "emo_speaker",
         dict(do_sample=True, num_beams=1, seed=4, top_k=30, top_p=0.8, temperature=0.8), join_at=1),
    Spec("Beam sampling with three beams. Also seeded.", "speaker",
         dict(do_sample=True, num_beams=3, seed=5, top_k=30, top_p=0.8, temperature=0.8), join_at=9),
    Spec("This one is cancelled. After its first sentence. Nothing more.", "speaker",
         dict(do_sample=False, num_beams=1, seed=6), cancel_after_segments=1),
]


def test_concurrent_requests_get_exactly_their_solo_audio(
    pipeline: Pipeline, voices: dict[str, Voice], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six requests (two voices, emotion audio and vector, 1 and 3 beams, greedy and seeded sampling,
    one cancelled midway) decoding and rendering together give each exactly its solo codes, and its
    solo waveform under the parity rule."""
    specs = [Spec(s.text, s.voice, {**SHORT, **s.opts}, s.emo_voice, s.join_at, s.cancel_after_segments)
             for s in SCENARIO]
    together = run(pipeline, voices, specs, monkeypatch)
    for spec, got in zip(specs, together, strict=True):
        alone = run(pipeline, voices, [Spec(spec.text, spec.voice, spec.opts, spec.emo_voice, 0,
                                            spec.cancel_after_segments)], monkeypatch)[0]
        assert got.error is None and alone.error is None
        assert len(got.audio) == len(alone.audio) >= 1
        for k in alone.codes:
            if k < len(alone.audio):
                assert got.codes[k] == alone.codes[k], (spec.text, k)
        for a, b in zip(got.audio, alone.audio, strict=True):
            assert_close(torch.from_numpy(a)[None], torch.from_numpy(b)[None], spec.text)
    assert len(together[-1].audio) == 1  # the cancelled one stopped after its first segment


def test_engine_equals_the_plain_per_segment_path(
    fx: FixtureSet, pipeline: Pipeline, voices: dict[str, Voice]
) -> None:
    """What `stream` yields per segment equals run_gpt + run_acoustic on that segment alone, with
    the same seed (sampling, beams): the batched engine computes the reference path's function."""
    opts = pipeline.check_options(SynthesisOptions(**SHORT, num_beams=2, seed=11))
    voice = voices["speaker"]
    streamed = list(pipeline.stream(voice, fx.text, opts))
    segments = pipeline.split_text(fx.text, opts)
    assert len(streamed) == len(segments) >= 2
    emovec = pipeline.request_emovec(voice, opts, None)
    for got, seg in zip(streamed, segments, strict=True):
        out = pipeline.run_gpt(voice, seg, opts, emovec)
        pcm = pipeline.run_acoustic(voice, out, opts, segment=seg, emovec=emovec)
        assert got.segment.text == seg.text
        assert_close(torch.from_numpy(got.samples)[None], pcm[None], f"segment {seg.index}")
        want_silence = 0 if seg.index == 0 else int(22050 * opts.interval_silence_ms / 1000)
        assert got.silence_samples == want_silence


def test_cancelled_request_gets_no_more_events_while_others_continue(
    pipeline: Pipeline, voices: dict[str, Voice]
) -> None:
    """Cancel mid-decode: the request leaves the batch at once, nothing more is produced for it, and
    the request beside it still finishes."""
    engine = Engine(pipeline, max_batch_rows=8)
    opts = pipeline.check_options(SynthesisOptions(**SHORT, do_sample=False, num_beams=1, seed=1))
    a = Request(voice=voices["speaker"], opts=opts, texts=deque(["Hello there. How are you?"]), tag="a")
    b = Request(voice=voices["speaker"], opts=opts, texts=deque(["Another request entirely."]), tag="b")
    engine.add(a)
    engine.add(b)
    seen: list[Event] = []
    for _ in range(3):
        seen += engine.step()
    assert engine.batch.n == 2  # both are decoding
    engine.cancel(a)
    assert engine.batch.n == 1
    for _ in range(5000):
        if any(isinstance(e, RequestDone) and e.request is b for e in seen):
            break
        seen += engine.step()
    assert all(e.request is not a for e in seen)


def test_flow_control_holds_the_next_segment_until_credit_returns(
    pipeline: Pipeline, voices: dict[str, Voice]
) -> None:
    """A request with one credit starts no second segment until grant(): a client that stops reading
    costs at most its credits in server work."""
    starts: list[int] = []

    def observe(what: str, _req: Request, index: int) -> None:
        if what == "decode":
            starts.append(index)

    engine = Engine(pipeline, max_batch_rows=8, observer=observe)
    opts = pipeline.check_options(SynthesisOptions(**THREE_SEGMENTS, do_sample=False, num_beams=1, seed=1))
    req = Request(voice=voices["speaker"], opts=opts, texts=deque([THREE]), credits=1)
    assert len(pipeline.split_text(THREE, opts)) == 3
    engine.add(req)
    audio = 0
    for _ in range(2000):
        audio += sum(isinstance(e, SegmentDone) for e in engine.step())
        if audio:
            break
    for _ in range(20):
        assert engine.step() == []
    assert starts == [0] and not engine.busy  # parked: nothing to do without credit
    engine.grant(req)
    finished = False
    for _ in range(5000):
        if finished:
            break
        for e in engine.step():
            if isinstance(e, SegmentDone):
                assert len(starts) == e.audio.segment.index + 1  # never more than one credit ahead
                engine.grant(req)
            finished = finished or isinstance(e, RequestDone)
    assert starts == [0, 1, 2]


def test_newcomers_start_before_an_incumbents_later_segments(
    pipeline: Pipeline, voices: dict[str, Voice]
) -> None:
    """With rows for one request at a time, a newcomer's first segment decodes before the incumbent's
    next one (time to first audio first), and the incumbent is not starved."""
    order: list[tuple[str, int]] = []
    engine = Engine(pipeline, max_batch_rows=4,
                    observer=lambda what, r, i: order.append((r.tag, i)) if what == "decode" else None)
    opts = pipeline.check_options(SynthesisOptions(**THREE_SEGMENTS, do_sample=False, num_beams=4, seed=1))
    old = Request(voice=voices["speaker"], opts=opts, texts=deque([THREE]), tag="old")
    engine.add(old)
    for _ in range(2):
        engine.step()
    new = Request(voice=voices["speaker"], opts=opts, texts=deque(["Newcomer here."]), tag="new")
    engine.add(new)
    done: set[str] = set()
    for _ in range(10_000):
        if len(done) == 2:
            break
        done |= {e.request.tag for e in engine.step() if isinstance(e, RequestDone)}
    assert done == {"old", "new"}
    assert order.index(("new", 0)) < order.index(("old", 1))
    assert [i for tag, i in order if tag == "old"] == [0, 1, 2]


def test_a_failing_segment_fails_only_its_own_request(
    pipeline: Pipeline, voices: dict[str, Voice], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception inside a shared acoustic job is retried segment by segment: the request whose
    segment fails alone gets RequestFailed, its neighbour in the job gets its normal audio."""
    opts = pipeline.check_options(SynthesisOptions(**SHORT, do_sample=False, num_beams=1, seed=1))
    bad_opts = pipeline.check_options(SynthesisOptions(**SHORT, do_sample=False, num_beams=1, seed=2))
    real = pipeline.cfm_rows

    def failing(items: Sequence[AcousticInput], *args: Any) -> Any:
        if any(it.opts is bad_opts for it in items):
            raise RuntimeError("injected failure")
        return real(items, *args)

    monkeypatch.setattr(pipeline, "cfm_rows", failing)
    engine = Engine(pipeline, max_batch_rows=8)
    good = Request(voice=voices["speaker"], opts=opts, texts=deque(["Hello there."]), tag="good")
    bad = Request(voice=voices["speaker"], opts=bad_opts, texts=deque(["Hello there."]), tag="bad")
    engine.add(good)
    engine.add(bad)
    results: dict[str, Event] = {}
    audio: list[np.ndarray] = []
    for _ in range(5000):
        if len(results) == 2:
            break
        for e in engine.step():
            if isinstance(e, SegmentDone):
                audio.append(e.audio.samples)
            elif isinstance(e, RequestDone | RequestFailed):
                results[e.request.tag] = e
    assert isinstance(results["good"], RequestDone) and isinstance(results["bad"], RequestFailed)
    monkeypatch.setattr(pipeline, "cfm_rows", real)
    solo = pipeline.synthesize(voices["speaker"], "Hello there.", opts)
    assert len(audio) == 1
    assert_close(torch.from_numpy(audio[0])[None], torch.from_numpy(solo)[None], "good request audio")


def test_unspeakable_text_fails_a_request_and_is_skipped_in_a_stream(
    pipeline: Pipeline, voices: dict[str, Voice]
) -> None:
    """Text with nothing to speak fails a whole request with BadText; in incremental input it is skipped."""
    opts = pipeline.check_options(SynthesisOptions(**SHORT, seed=1))
    engine = Engine(pipeline, max_batch_rows=8)
    whole = Request(voice=voices["speaker"], opts=opts, texts=deque(["   "]), tag="whole")
    streamed = Request(voice=voices["speaker"], opts=opts, texts=deque(["  ", " \n "]), incremental=True, tag="inc")
    engine.add(whole)
    engine.add(streamed)
    events = engine.step()
    failed = [e for e in events if isinstance(e, RequestFailed)]
    assert len(failed) == 1 and failed[0].request is whole and isinstance(failed[0].error, BadText)
    assert any(isinstance(e, RequestDone) and e.request is streamed for e in events)


@torch.inference_mode()
def test_cpu_batch_frees_a_stopped_row_in_the_step_that_chose_the_stop_code(
    pipeline: Pipeline, voices: dict[str, Voice]
) -> None:
    """On CPU reading the batch costs no sync, so the stop check runs after every step: a request whose
    stop code is selected in step k leaves the batch in step k (CUDA waits for a multiple of 8)."""
    from ttsd.pipeline.decode import DecodeBatch, decode_step

    stop, forced_from = pipeline.gpt.cfg.stop_mel_token, 5  # the 5th forward's logits pick code 6: stop
    calls = 0

    def step_fn(*args: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        logits = decode_step(*args)
        if calls >= forced_from:
            logits[:, stop] = 1e4
        return logits

    o = pipeline.check_options(SynthesisOptions(max_mel_tokens=40, do_sample=False, num_beams=1))
    voice = next(iter(voices.values()))
    emovec = pipeline.request_emovec(voice, o, None)
    batch = DecodeBatch(pipeline.decode_gpt, max_rows=1, dtype=pipeline.gpt_dtype, step_fn=step_fn)
    assert batch.stop_check_every == 1
    req = pipeline.decode_request(voice, pipeline.split_text("Hello world.", o)[0], o, emovec)
    batch.admit(req)
    while req.result is None:
        batch.step()
    assert req.result.codes.size(1) == forced_from  # codes 1..5, then the stop code
    assert batch.step_count == forced_from + 1 and calls == forced_from
