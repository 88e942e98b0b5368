"""Chunk boundaries and the crossfade join (pipeline/chunking.py) against upstream's streaming recipe."""

from __future__ import annotations

import numpy as np
import pytest

from ttsd.api.options import SynthesisOptions
from ttsd.pipeline.audio import HOP_LENGTH
from ttsd.pipeline.chunking import FADE_OUT_SAMPLES, ChunkJoiner, ChunkPlan, overlap_samples
from ttsd.pipeline.family import ModelFamily, families


def upstream_stream(chunks: list[np.ndarray], last_flags: list[bool], ovlp: int) -> list[np.ndarray]:
    """index-tts backends/trt/pipeline/streaming.py, StreamingDecoder.generate for one sample, re-derived
    from its source: the float audio it would convert to int16, chunk by chunk, then the flush."""
    out: list[np.ndarray] = []
    prev_tail: np.ndarray | None = None
    finished = False

    def fade_out_tail(a: np.ndarray) -> np.ndarray:
        if len(a) <= 512:
            return a
        a = a.copy()
        a[-512:] *= np.linspace(1.0, 0.0, 512)
        return a

    def crossfade(tail: np.ndarray, head: np.ndarray) -> np.ndarray:
        n = min(len(tail), len(head))
        if n == 0:
            return np.array([], dtype=np.float32)
        hann = np.hanning(n * 2)
        return tail[:n] * hann[n:] + head[:n] * hann[:n]

    for audio, is_last in zip(chunks, last_flags, strict=True):
        if finished:
            break
        if prev_tail is None:
            if is_last:
                out.append(fade_out_tail(audio))
                finished = True
            else:
                split = len(audio) - ovlp
                out.append(audio[:split])
                prev_tail = audio[split:]
        else:
            head, rest = audio[:ovlp], audio[ovlp:]
            blended = crossfade(prev_tail, head)
            if is_last:
                out.append(fade_out_tail(np.concatenate([blended, rest])))
                prev_tail = None
                finished = True
            else:
                split = len(rest) - ovlp
                out.append(np.concatenate([blended, rest[:split]]))
                prev_tail = rest[split:]
    if prev_tail is not None and not finished:
        out.append(fade_out_tail(prev_tail))
    return out


def random_chunks(rng: np.random.Generator, codes: list[int], frames_per_code: float) -> list[np.ndarray]:
    return [(rng.standard_normal(int(n * frames_per_code) * HOP_LENGTH) * 3000).astype(np.float32) for n in codes]


@pytest.mark.parametrize("flush", [False, True], ids=["last-flag", "flush"])
def test_join_matches_upstream_recipe(flush: bool) -> None:
    """The same per-chunk waveforms give upstream's samples, chunk by chunk, ending with or without a last flag."""
    rng = np.random.default_rng(7)
    plan = ChunkPlan(size=100, overlap=20, first=100)
    spans = plan.spans(committed=10_000, total=345, done=0)
    assert [(s, e) for s, e, _ in spans] == [(0, 100), (80, 180), (160, 260), (240, 340), (320, 345)]
    if flush:
        spans = spans[:-1]
    chunks = random_chunks(rng, [e - s for s, e, _ in spans], 1.72)
    flags = [last for _, _, last in spans]
    ovlp = overlap_samples(int(20 * 1.72), HOP_LENGTH)
    assert ovlp == 34 * 256  # upstream: int(20 * 1.72) * 256
    want = upstream_stream(chunks, flags, ovlp)
    joiner = ChunkJoiner(ovlp)
    got = [joiner.push(c, last) for c, last in zip(chunks, flags, strict=True)]
    if flush:
        got.append(joiner.finish())
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.float32
        np.testing.assert_array_equal(g, w.astype(np.float32))
    joined = np.concatenate(got)
    # Every code's audio is there once: the chunks' lengths less one overlap per join.
    assert len(joined) == sum(map(len, chunks)) - ovlp * (len(chunks) - 1)
    assert np.all(joined[-1:] == 0) and np.any(joined[-FADE_OUT_SAMPLES:-1] != 0)


def test_crossfade_of_one_signal_is_the_signal() -> None:
    """Chunks cut from one waveform with the overlap repeated join back into it (the Hann halves sum to one)."""
    rng = np.random.default_rng(3)
    n, ovlp = 40 * 256, 8 * 256
    x = (rng.standard_normal(5 * n) * 1000).astype(np.float32)
    cuts = [(0, n), (n - ovlp, 2 * n), (2 * n - ovlp, 3 * n), (3 * n - ovlp, 5 * n)]
    joiner = ChunkJoiner(ovlp)
    y = np.concatenate([joiner.push(x[a:b], i == len(cuts) - 1) for i, (a, b) in enumerate(cuts)])
    assert len(y) == len(x)
    body = slice(0, len(x) - FADE_OUT_SAMPLES)
    # np.hanning(2n)'s halves sum to 1 up to its own rounding and the window's end points.
    assert np.max(np.abs(y[body] - x[body])) <= 0.05 * np.max(np.abs(x))


def test_first_chunk_and_plan_edges() -> None:
    """A smaller first chunk shifts every later boundary; the final chunk only exists when it has new codes."""
    plan = ChunkPlan.from_options(100, 20, 25)
    assert plan is not None and ChunkPlan.from_options(0, 20, 25) is None
    assert plan.spans(committed=24, total=None, done=0) == []
    assert plan.spans(committed=25, total=None, done=0) == [(0, 25, False)]
    assert plan.spans(committed=200, total=None, done=1) == [(5, 105, False), (85, 185, False)]
    assert plan.spans(committed=10, total=10, done=0) == [(0, 10, True)]  # the whole segment in chunk 0
    assert plan.spans(committed=105, total=105, done=2) == []  # ended exactly with chunk 1: flush
    assert plan.spans(committed=106, total=106, done=2) == [(85, 106, True)]


@pytest.mark.parametrize("family", families(), ids=lambda f: f.model_id)
def test_overlap_frames_per_family(family: ModelFamily) -> None:
    """Overlap frames are upstream's int(codes × 1.72) at 50 codes/s, and as many frames per second otherwise."""
    opts = SynthesisOptions()
    per_code = 1.72 * 50.0 / family.code_rate_hz
    for n in (1, 5, 20, 37, 100):
        assert 0 <= n * per_code - family.overlap_frames(n, opts) < 1 + 1e-9
    assert family.overlap_frames(20, SynthesisOptions(duration_factor=1.5)) >= family.overlap_frames(20, opts)
