"""The CUDA path (`pytest -m cuda`; skipped without a CUDA device, so CI never runs it).

What runs here and nowhere else: the two-stream engine with prefetch (segment k+1 decodes while k
renders; a text of three segments reaches the branch where k+1's codes and k's audio race), the
graphed decode step at several row buckets, half precision, and warm-up on the worker thread
followed by serving on the same thread.

Tolerances. Every test runs with `cudnn.deterministic = True` and `benchmark = False` (the same
convolution algorithm on every call, so two runs of one computation give equal PCM), and with TF32
off for cuDNN convolutions *and* matmuls: PyTorch leaves TF32 on for cuDNN convolutions by default,
which rounds their inputs to a 10-bit mantissa — fine for serving, but it would put a float32
comparison with upstream's CPU golden tensors out of reach. With TF32 off the GPU still sums in a
different order than the CPU, and those differences compound over 25 CFM steps and BigVGAN, so
float32 waveforms are compared under CUDA_REL_TOL = 1e-3 of the tensor's scale (10× the CPU rule);
codes are compared exactly (greedy argmax margins on the fixtures are far above float32 noise).
Runs on one device compare under the CPU rule: the engine's batched steps against the same
requests alone. Half precision has no golden reference: it must produce finite audio of the same
length, and agree with float32 on most codes."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ttsd.api import protocol as p
from ttsd.api.options import SynthesisOptions
from ttsd.daemon.config import DaemonConfig
from ttsd.daemon.server import Server
from ttsd.daemon.worker import VoiceCache
from ttsd.pipeline import Pipeline
from ttsd.pipeline.accel import step_function
from ttsd.pipeline.engine import Engine, Request
from ttsd.pipeline.pipeline import probe_device

from .conftest import FixtureSet, assert_close, max_abs_err
from .test_daemon import FAST, client, last, offline_pcm, pcm_of
from .test_engine import SCENARIO, SHORT, THREE, THREE_SEGMENTS, Spec, run
from .test_pipeline import golden_noise, golden_options, golden_text

pytestmark = pytest.mark.cuda

CUDA_REL_TOL = 1e-3  # float32 GPU vs CPU golden: see the module docstring


@pytest.fixture(autouse=True)
def deterministic() -> Iterator[None]:
    """cuDNN deterministic and TF32 off for the test, restored afterwards."""
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
         torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) = saved


@pytest.fixture(scope="module")
def gpu(converted: Path) -> Pipeline:
    """The fixture's model on the GPU in float32 (one per module: loading is the slow part)."""
    return Pipeline.load(converted, device="cuda", dtype="float32")


def assert_cuda_close(actual: torch.Tensor, golden: torch.Tensor, name: str) -> None:
    """Same shape, and max|a-b| <= CUDA_REL_TOL * max(1, max|golden|)."""
    assert tuple(actual.shape) == tuple(golden.shape), f"{name}: shape {tuple(actual.shape)} != {tuple(golden.shape)}"
    scale = max(1.0, float(golden.double().abs().max()))
    err = max_abs_err(actual, golden)
    assert err <= CUDA_REL_TOL * scale, f"{name}: max abs err {err:.3e} > {CUDA_REL_TOL:.0e} * {scale:.3g}"


@pytest.mark.model_versions("2", "2.5")
def test_every_variant_matches_the_golden_waveform_on_cuda(fx: FixtureSet, gpu: Pipeline, variant: str) -> None:
    """Each variant's joined waveform from the GPU (greedy, injected CFM noise) matches upstream's under
    the CUDA tolerance, for both model versions."""
    call = fx.variant(variant)["call"]
    emo = call["emo_audio_prompt"]
    voice = gpu.prepare_voice(fx.input_path(call["spk_audio_prompt"]), None if emo is None else fx.input_path(emo))
    pcm = gpu.synthesize(voice, golden_text(fx, variant), golden_options(fx, variant), noise=golden_noise(fx, variant))
    assert_cuda_close(torch.from_numpy(pcm)[None], fx.golden(variant, "16_output")["wav_pcm"], f"{variant} wav_pcm")


def test_three_segments_with_prefetch_equal_the_per_segment_path(fx: FixtureSet, gpu: Pipeline) -> None:
    """A three-segment text streamed with prefetch (k+1 decodes while k renders) gives, per segment, what the
    plain per-segment path gives, with beams and sampling seeded; audio leaves in order as soon as it is ready."""
    opts = gpu.check_options(SynthesisOptions(**THREE_SEGMENTS, num_beams=2, seed=7))
    voice = gpu.prepare_voice(fx.input_path("speaker.wav"))
    segments = gpu.split_text(THREE, opts)
    assert len(segments) == 3
    events: list[str] = []
    engine = Engine(gpu, max_batch_rows=8, observer=lambda what, _r, i: events.append(f"{what}{i}"))
    assert engine.prefetch  # the CUDA default
    streamed = list(gpu.stream(voice, THREE, opts, engine=engine))
    order = {e: n for n, e in enumerate(events)}
    assert order["decode1"] < order["audio0"] and order["decode2"] < order["audio1"]
    assert [s.segment.index for s in streamed] == [0, 1, 2]
    emovec = gpu.request_emovec(voice, opts, None)
    for got, seg in zip(streamed, segments, strict=True):
        out = gpu.run_gpt(voice, seg, opts, emovec)
        pcm = gpu.run_acoustic(voice, out, opts, segment=seg, emovec=emovec)
        assert_close(torch.from_numpy(got.samples)[None], pcm.cpu()[None], f"segment {seg.index}")


def test_overlapping_requests_get_their_solo_audio_on_cuda(
    fx: FixtureSet, gpu: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine scenario on the GPU (two voices, emotion audio and vector, 1 and 3 beams, greedy and
    seeded sampling, one cancelled midway, graphed decode steps): each request gets its solo codes
    exactly and its solo waveform under the parity rule."""
    voices = {name: gpu.prepare_voice(fx.input_path(f"{name}.wav")) for name in ("speaker", "emo_speaker")}
    specs = [Spec(s.text, s.voice, {**SHORT, **s.opts}, s.emo_voice, s.join_at, s.cancel_after_segments)
             for s in SCENARIO]
    # The decode step the daemon uses: compiled and graphed per row bucket.
    graphed = dict(step_fn=step_function(gpu.device, compile=gpu.compile),
                   row_buckets=gpu.row_buckets)
    assert gpu.row_buckets
    together = run(gpu, voices, specs, monkeypatch, **graphed)
    for spec, got in zip(specs, together, strict=True):
        alone = run(gpu, voices, [Spec(spec.text, spec.voice, spec.opts, spec.emo_voice, 0,
                                       spec.cancel_after_segments)], monkeypatch, **graphed)[0]
        assert got.error is None and alone.error is None
        assert len(got.audio) == len(alone.audio) >= 1
        for k in alone.codes:
            if k < len(alone.audio):
                assert got.codes[k] == alone.codes[k], (spec.text, k)
        for a, b in zip(got.audio, alone.audio, strict=True):
            assert_close(torch.from_numpy(a)[None], torch.from_numpy(b)[None], spec.text)
    assert len(together[-1].audio) == 1


def test_same_request_twice_gives_equal_pcm_on_cuda(fx: FixtureSet, gpu: Pipeline) -> None:
    """With cuDNN deterministic, a seeded sampled request repeated on the GPU gives bit-equal PCM."""
    opts = SynthesisOptions(**THREE_SEGMENTS, num_beams=3, seed=21)
    voice = gpu.prepare_voice(fx.input_path("speaker.wav"))
    first, second = (gpu.synthesize(voice, THREE, opts) for _ in range(2))
    assert np.array_equal(first, second)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_runs_and_agrees_with_float32(
    fx: FixtureSet, converted: Path, gpu: Pipeline, dtype: str
) -> None:
    """A half-precision GPT gives finite audio of the float32 length (greedy, the stop token suppressed by
    max_mel_tokens) and mostly the same codes."""
    half = Pipeline.load(converted, device="cuda", dtype=dtype)
    opts = SynthesisOptions(**SHORT, do_sample=False, num_beams=1, seed=3)
    segment = half.split_text("Hello world, this is a test.", opts)[0]
    codes = {}
    for name, pipe in (("float32", gpu), (dtype, half)):
        voice = pipe.prepare_voice(fx.input_path("speaker.wav"))
        emovec = pipe.request_emovec(voice, opts, None)
        out = pipe.run_gpt(voice, segment, opts, emovec)
        pcm = pipe.run_acoustic(voice, out, opts, segment=segment, emovec=emovec)
        assert bool(torch.isfinite(pcm).all()), name
        codes[name] = out.codes[0].tolist()
    n = min(len(codes["float32"]), len(codes[dtype]))
    agree = sum(a == b for a, b in zip(codes["float32"][:n], codes[dtype][:n], strict=True))
    assert n > 0 and agree >= 0.5 * n, (agree, n)


async def test_warm_up_then_serving_on_the_worker_thread(
    fx: FixtureSet, gpu: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon warms up on its worker thread (every beam count, graphs recorded) and then serves a
    three-segment request and an overlapping one on that same thread, each equal to offline synthesis."""
    threads: list[str] = []
    real = gpu.warm_up

    def recording(engine: Any) -> float:
        threads.append(threading.current_thread().name)
        return real(engine)

    monkeypatch.setattr(gpu, "warm_up", recording)
    voices = VoiceCache(max_voices=2)
    server = Server(DaemonConfig(port=0).validated(), gpu, voices=voices)
    await server.start(warm_up=True)
    texts = {1: THREE, 2: "The quick brown fox jumps over the lazy dog!"}
    options = {**FAST, "max_text_tokens_per_segment": THREE_SEGMENTS["max_text_tokens_per_segment"]}
    try:
        assert threads == ["ttsd-worker"]
        async with client(server) as c:
            voice = await c.register((fx.root / "inputs" / "speaker.wav").read_bytes())
            for rid, text in texts.items():
                await c.send(p.Synthesize(id=rid, text=text, voice=voice, **{**options, "seed": rid}))
            replies = [await c.until(rid) for rid in texts]
    finally:
        await server.shutdown()
    for (rid, text), messages in zip(texts.items(), replies, strict=True):
        assert isinstance(last(messages), p.Done), last(messages)
        expected = offline_pcm(gpu, voices.get(voice), text, **{**options, "seed": rid})
        got, want = (torch.from_numpy(np.frombuffer(x, dtype="<i2").astype(np.float32))[None]
                     for x in (pcm_of(messages, rid), expected))
        assert_close(got, want, f"request {rid}")


def test_no_gpu_memory_is_left_behind_by_a_cancelled_request(fx: FixtureSet, gpu: Pipeline) -> None:
    """A request cancelled mid-decode gives its rows back: allocated GPU memory returns to where it was."""
    voice = gpu.prepare_voice(fx.input_path("speaker.wav"))
    engine = Engine(gpu, max_batch_rows=8)
    opts = gpu.check_options(SynthesisOptions(**THREE_SEGMENTS, do_sample=False, num_beams=3, seed=1))
    list(gpu.stream(voice, THREE, opts, engine=engine))  # every buffer of this shape exists now
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    req = Request(voice=voice, opts=opts, texts=deque([THREE]))
    engine.add(req)
    for _ in range(5):
        engine.step()
    engine.cancel(req)
    while engine.busy:
        engine.step()
    torch.cuda.synchronize()
    assert not engine.batch.active
    assert torch.cuda.memory_allocated() <= before


def test_the_device_probe_passes_on_a_healthy_gpu(gpu: Pipeline) -> None:
    """The probe the daemon runs after an unexplained failure completes on a working GPU, and check_device
    does not call an ordinary error a device fault."""
    probe_device(gpu.device)
    gpu.check_device(RuntimeError("an ordinary bug, not the device"))
