"""ttsd's CUDA branch, run on every CI machine through the simulated device (ttsd.tools.simcuda).

Everything here loads the model with device="cuda" on a CPU-only torch: graphed decode steps on the
GPT stream, acoustic jobs on the acoustic stream, voices on the voice stream, pinned non-blocking
copies. The harness raises on a device mix, a stream race or a sync during graph capture, so each test
also asserts that none happened. What runs here and would fail on a real GPU is what this file is for:
each defect found by reading the CUDA path has a test below (named in its docstring)."""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from websockets.asyncio.client import connect

from ttsd.api import protocol as p
from ttsd.api.options import SynthesisOptions
from ttsd.pipeline import Pipeline
from ttsd.pipeline import decode as decode_module
from ttsd.pipeline.accel import step_function
from ttsd.pipeline.decode import STOP_CHECK_EVERY, DecodeBatch, Generated
from ttsd.pipeline.engine import AcousticInput, Engine, Request, RequestDone, RequestFailed, SegmentDone
from ttsd.pipeline.voice import Voice
from ttsd.tools import simcuda

from .conftest import FixtureSet, assert_close, reap
from .test_daemon import FAST, GATE_TIMEOUT_S, Client, last, pcm_of
from .test_daemon import speaker_wav as speaker_wav  # the fixture, used by the serve test
from .test_pipeline import (
    golden_int16,
    golden_noise,
    golden_options,
    golden_text,
    noise_file,
    read_wav,
    synth_flags,
)

SHORT = dict(max_mel_tokens=20, diffusion_steps=2, max_text_tokens_per_segment=20)


@pytest.fixture(scope="module")
def sim() -> Iterator[dict[Any, Any]]:
    """The simulated device for the module, and what the module loaded on it (one model and one voice per
    fixture set, whatever order the tests run in); no violation may be left at its end."""
    gc.collect()
    simcuda.clear_violations()
    loaded: dict[Any, Any] = {}
    with simcuda.installed():
        yield loaded
        # The weights are read on every stream: the device is synchronised before they may be freed.
        torch.cuda.synchronize()
        loaded.clear()
        gc.collect()
        assert simcuda.violations() == []


@pytest.fixture
def gpu(sim: dict[Any, Any], converted: Path) -> Pipeline:
    """The fixture's model on the simulated CUDA device, float32, graphed decode steps."""
    if converted not in sim:
        sim[converted] = Pipeline.load(converted, device="cuda")
    pipe: Pipeline = sim[converted]
    return pipe


@pytest.fixture
def voice(sim: dict[Any, Any], gpu: Pipeline, fx: FixtureSet) -> Voice:
    key = ("voice", fx.root)
    if key not in sim:
        sim[key] = gpu.prepare_voice(fx.input_path("speaker.wav"))
    v: Voice = sim[key]
    return v


@pytest.fixture(autouse=True)
def no_violations(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test ends with no violation recorded (frees included)."""
    yield
    if "sim" in request.fixturenames:
        gc.collect()
        found = simcuda.violations()
        simcuda.clear_violations()
        assert found == [], "\n".join(map(str, found))


@pytest.mark.model_versions("2", "2.5")
def test_golden_waveform_on_simulated_cuda(fx: FixtureSet, variant: str, gpu: Pipeline) -> None:
    """Each variant of both model versions, loaded on "cuda" and run through the graphed, two-stream
    engine, reproduces upstream's waveform under the parity rule (defect: the first IndexTTS-2 request
    failed in the length regulator, a host length tensor meeting a CUDA arange)."""
    call = fx.variant(variant)["call"]
    emo = call["emo_audio_prompt"]
    v = gpu.prepare_voice(fx.input_path(call["spk_audio_prompt"]), None if emo is None else fx.input_path(emo))
    pcm = gpu.synthesize(v, golden_text(fx, variant), golden_options(fx, variant), noise=golden_noise(fx, variant))
    assert_close(torch.from_numpy(pcm)[None], fx.golden(variant, "16_output")["wav_pcm"], f"{variant} wav_pcm")


def test_synth_cli_on_simulated_cuda(fx: FixtureSet, converted: Path, sim: dict[Any, Any], tmp_path: Path) -> None:
    """`ttsd synth --device cuda --noise ...` on the simulated device writes the golden waveform of the
    set's first variant (the CLI route of the CUDA branch; both versions' device paths are covered by the
    golden test above, so the command runs for IndexTTS-2 only)."""
    from ttsd.pipeline.synth import main

    variant = fx.variants[0]
    out = tmp_path / "out.wav"
    argv = ["--checkpoints", str(converted), "--device", "cuda", *synth_flags(fx, variant), "--out", str(out),
            "--noise", str(noise_file(fx, variant, tmp_path))]
    assert main(argv) == 0
    assert_close(read_wav(out), golden_int16(fx, variant), f"{variant} synth wav")


def test_warm_up_records_every_row_bucket_and_serving_records_none(gpu: Pipeline, voice: Voice) -> None:
    """Warm-up captures the forward graph of every (row bucket, kv bucket), the whole cache included, and
    the greedy and default-sampling selection graphs of every row bucket, so a batch of any size and
    length replays recorded graphs (defect: max_batch_rows outside the bucket list, here 6, left the
    6-row batch without a graph, recorded and compiled mid-serving)."""
    engine = gpu.engine(max_batch_rows=6)
    assert engine.batch.row_buckets == (4, 8)
    engine.capture()
    assert engine.batch.graphs is not None
    graphs = engine.batch.graphs.graphs
    recorded = set(graphs)
    forward = {key[1:] for key in recorded if key[0] == "forward"}
    assert forward == {(r, kv) for r in (4, 8) for kv in engine.batch.kv_buckets}
    select = {key[1:] for key in recorded if key[0] == "select"}
    assert select == {(r, sample, sample, 32 if sample else 0) for r in (4, 8) for sample in (False, True)}
    modes = [dict(num_beams=3), dict(do_sample=False), dict(do_sample=True)]  # top_k 30 and top_p 0.8: defaults
    reqs = [Request(voice=voice, opts=gpu.check_options(SynthesisOptions(**SHORT, **mode, seed=1)),
                    texts=deque(["Hello there."])) for mode in modes for _ in range(2)]
    events = _drive(engine, reqs)
    assert all(isinstance(e, RequestDone) for e in events if not isinstance(e, SegmentDone))
    assert set(graphs) == recorded


@torch.inference_mode()
def test_graphed_step_equals_eager_on_every_bucket(gpu: Pipeline, voice: Voice) -> None:
    """The replayed selection and forward leave exactly the state the eager ones leave (codes, seen ids,
    positions, logits, cache) at every row bucket and several attention lengths, from the same state
    (graphs read their inputs in place and keep nothing from capture time)."""
    batch = DecodeBatch(gpu.decode_gpt, max_rows=16, dtype=gpu.gpt_dtype,
                        step_fn=step_function(gpu.device, compile=True), row_buckets=gpu.row_buckets)
    opts = gpu.check_options(SynthesisOptions(**SHORT, seed=2))
    for i, text in enumerate(("One two.", "Three four five.", "Six.")):
        seg = gpu.split_text(text, opts)[0].with_index(i)
        batch.admit(gpu.decode_request(voice, seg, opts, gpu.request_emovec(voice, opts, None)))
    batch.step()
    s = batch.s
    state = [*s.device_tensors(), batch.cache.buf]
    start = [t.clone() for t in state]

    def outcome(run: Any) -> list[torch.Tensor]:
        for t, v in zip(state, start, strict=True):
            t.copy_(v)
        run()
        return [t.cpu() for t in state]

    cases: list[tuple[str, Any, Any]] = []
    for rows in batch.row_buckets:
        for sample, top_p, k in ((False, False, 0), (True, True, 32), (True, False, 0)):
            cases.append((f"select rows={rows} sample={sample} top_p={top_p} k={k}",
                          lambda r=rows, a=sample, b=top_p, c=k: batch._select_rows(r, a, b, c),
                          lambda r=rows, a=sample, b=top_p, c=k: batch._select_graphed(r, a, b, c)))
        for kv_len in [*batch.kv_buckets[:2], batch.cache.slots]:
            cases.append((f"forward rows={rows} kv_len={kv_len}",
                          lambda r=rows, n=kv_len: batch._forward_rows(r, n),
                          lambda r=rows, n=kv_len: batch._forward_graphed(r, n)))
    for name, eager, graphed in cases:
        want = outcome(eager)
        for _ in range(2):  # the first call captures, the second replays the recorded graph
            got = outcome(graphed)
            for i, (a, b) in enumerate(zip(want, got, strict=True)):
                assert torch.equal(a, b), f"{name}: state tensor {i}"
    assert batch.graphs is not None and len(batch.graphs.graphs) == len(cases)


def test_steady_state_decode_steps_do_not_sync(gpu: Pipeline, voice: Voice) -> None:
    """Greedy, seeded sampling (top-k, top-p) and 3-beam rows decoding together read nothing back from the
    device between stop checks: 0 host syncs per step, 1 at each STOP_CHECK_EVERY-th step (defect:
    blocking copies of host top-k/min-keep tensors on every sampling step, and torch.tensor(...,
    device=) in beam bookkeeping)."""
    modes = [dict(do_sample=False), dict(do_sample=True, top_k=20, top_p=0.8, temperature=0.9),
             dict(do_sample=False, num_beams=3), dict(do_sample=True, num_beams=3, top_k=20)]
    lanes = gpu.lanes
    with lanes.on(lanes.gpt):  # the batch lives on the GPT stream, as in the engine
        lanes.start(lanes.gpt)
        batch = DecodeBatch(gpu.decode_gpt, max_rows=16, dtype=gpu.gpt_dtype,
                            step_fn=step_function(gpu.device, compile=True), row_buckets=gpu.row_buckets)
        for i, mode in enumerate(modes):
            opts = gpu.check_options(SynthesisOptions(**{**SHORT, "max_mel_tokens": 40, **mode}, seed=i))
            seg = gpu.split_text("The quick brown fox jumps.", opts)[0].with_index(i)
            batch.admit(gpu.decode_request(voice, seg, opts, gpu.request_emovec(voice, opts, None)))
        counts: list[tuple[int, int, int]] = []  # (step, syncs, requests finished)
        while batch.requests:
            with simcuda.count_syncs() as region:
                finished = batch.step()
            counts.append((batch.step_count, region.count, len(finished)))
    steady = [c for c in counts if c[2] == 0]
    assert len(steady) >= 2 * STOP_CHECK_EVERY, counts
    for step, syncs, _ in steady:
        assert syncs == (1 if step % STOP_CHECK_EVERY == 0 else 0), (step, syncs, counts)


def test_overlapping_requests_match_their_solo_codes(gpu: Pipeline, voice: Voice, monkeypatch: pytest.MonkeyPatch
                                                     ) -> None:
    """Greedy, sampling and 3-beam requests decoding together on graphed steps, while a fourth is cancelled
    with rows in the batch and a fifth fails, each get exactly their solo codes, with no stream race
    (defect: a cancel removed rows on the default stream while the GPT stream still used them)."""
    specs = [dict(do_sample=False, seed=11), dict(do_sample=True, top_k=30, top_p=0.8, seed=12),
             dict(do_sample=False, num_beams=3, seed=13), dict(do_sample=False, seed=14), dict(seed=15)]
    texts = ["Hello world. A second one.", "Sampling is seeded here.", "Three beams at once.",
             "This one is cancelled midway.", "This one fails."]
    opts = [gpu.check_options(SynthesisOptions(**SHORT, **s)) for s in specs]
    real = gpu.decode_request

    def failing(v: Voice, segment: Any, o: SynthesisOptions, emovec: torch.Tensor) -> Any:
        if o.seed == 15:
            raise RuntimeError("a request that fails in its prefill")
        return real(v, segment, o, emovec)

    monkeypatch.setattr(gpu, "decode_request", failing)

    def run(indices: Sequence[int], cancel: int | None) -> dict[int, dict[int, list[int]]]:
        codes: dict[int, dict[int, list[int]]] = {i: {} for i in indices}
        cfm_rows = gpu.cfm_rows

        def recording(items: Sequence[AcousticInput], *args: Any) -> Any:
            for it in items:
                owner = next(i for i in indices if opts[i] is it.opts)
                codes[owner][it.segment.index] = it.codes.codes_host[0].tolist()
            return cfm_rows(items, *args)

        monkeypatch.setattr(gpu, "cfm_rows", recording)
        engine = gpu.engine(max_batch_rows=16)
        reqs = {i: Request(voice=voice, opts=opts[i], texts=deque([texts[i]])) for i in indices}
        outcome = _drive(engine, list(reqs.values()), cancel=reqs.get(cancel) if cancel is not None else None)
        monkeypatch.setattr(gpu, "cfm_rows", cfm_rows)
        failed = [e for e in outcome if isinstance(e, RequestFailed)]
        assert [e.request for e in failed] == ([reqs[4]] if 4 in reqs else [])
        return codes

    together = run(range(5), cancel=3)
    for i in range(3):
        assert together[i] == run([i], None)[i], f"request {i}"


def test_zero_code_segment_is_empty_audio(gpu: Pipeline, voice: Voice, monkeypatch: pytest.MonkeyPatch) -> None:
    """A segment whose first code is the stop code comes out as an empty segment, and the request
    finishes (defect: the engine sent 0 frames through the length regulator's convolution and failed)."""
    real = decode_module._trim
    monkeypatch.setattr(decode_module, "_trim", lambda raw, stop: real(torch.full_like(raw[:, :1], stop), stop))
    opts = gpu.check_options(SynthesisOptions(**SHORT, seed=1))
    events = _drive(gpu.engine(max_batch_rows=4), [Request(voice=voice, opts=opts, texts=deque(["Hi there."]))])
    audio = [e.audio for e in events if isinstance(e, SegmentDone)]
    assert isinstance(events[-1], RequestDone) and audio and all(a.samples.size == 0 for a in audio)


@torch.inference_mode()
def test_graphed_cfm_solves_match_eager_solves(gpu: Pipeline, voice: Voice) -> None:
    """The engine's CFM solves run on workspaces (several Euler steps per graph replay, a remainder one
    step per replay): each sequence gets the frames an eager solve gives it, for the first solve of a
    shape (which records the graphs) and for a later one of other lengths on the same workspace (which
    replays them: nothing of the first leaks); a workspace in use is never handed to a second solve."""
    engine = gpu.engine(max_batch_rows=4)
    workspaces = engine.cfm_workspaces
    assert workspaces is not None
    opts = gpu.check_options(SynthesisOptions(**{**SHORT, "diffusion_steps": 3}, seed=3))
    emovec = gpu.request_emovec(voice, opts, None)
    seg = gpu.split_text("Hello there.", opts)[0]
    gen = torch.Generator().manual_seed(5)

    def items(lengths: Sequence[int]) -> list[AcousticInput]:
        out = []
        for i, n in enumerate(lengths):
            codes = torch.randint(0, gpu.codec.codebook_size, (1, n), generator=gen)
            out.append(AcousticInput(voice, emovec, seg.with_index(i), Generated(codes.cuda(), codes.cuda(), True,
                                                                                 codes), opts))
        return out

    def frames(solve: Any, most: int = 1) -> list[torch.Tensor]:
        while not solve.done:
            solve.step(most)
        return [solve.target(b).cpu() for b in range(solve.B)]

    used = []
    steps = opts.diffusion_steps  # 3: a two-step replay, then the step left alone
    for lengths in ((9, 14), (14, 4)):  # the same frame bucket: the second solve reuses the workspace
        rows = gpu.cfm_rows(items(lengths))
        want = frames(gpu.cfm_solve(rows, steps))
        solve = workspaces.solve(rows, steps)
        assert solve.workspace is not None
        used.append(solve.workspace)
        other = workspaces.solve(rows, steps)
        assert other.workspace is not solve.workspace  # in use: a second solve gets its own
        other.close()
        if len(used) == 2:
            with simcuda.meter() as step:
                assert solve.step(2) == 2  # two Euler steps, one replay
            assert (step.launches, step.graph_nodes > 0) == (1, True), step
        got = frames(solve, 2)  # the step left over goes alone (its own one-step graph)
        solve.close()
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape
            assert float((g - w).abs().max()) <= 1e-4 * max(1.0, float(w.abs().max()))
    assert used[0] is used[1] and set(used[0].graphs.graphs) == {("steps", 2), ("steps", 1)}


@torch.inference_mode()
def test_graphed_second_pass_matches_the_eager_pass(gpu: Pipeline, voice: Voice) -> None:
    """The engine's second pass, its input embeddings included, is one replay per (rows, length bucket)
    with no host sync and 4 + rows launches: each segment gets the latent the eager padded pass gives it,
    for the call that records the graph and for a later one of other lengths in the same bucket (which
    replays it, over the first call's leftovers past each row's end); the latents handed out are copies,
    untouched by the next replay; beyond `keep` shapes the oldest goes."""
    prep = gpu.engine(max_batch_rows=4).prep_graphs
    assert prep is not None and prep.latent is not None
    graphs = prep.latent
    graphs.keep = 1
    opts = gpu.check_options(SynthesisOptions(**SHORT, seed=4))
    emovec = gpu.request_emovec(voice, opts, None)
    segs = gpu.split_text("Hello there, how are you today?", opts)
    gen = torch.Generator().manual_seed(3)

    def items(lengths: Sequence[int]) -> list[tuple[Voice, torch.Tensor, Any, torch.Tensor]]:
        return [(voice, emovec, segs[i % len(segs)],
                 torch.randint(0, gpu.codec.codebook_size, (1, n), generator=gen).cuda())
                for i, n in enumerate(lengths)]

    kept = []
    for lengths in ((9, 20, 3), (4, 17, 12)):  # both in one bucket: the second call replays
        batch = items(lengths)
        want = [w.cpu() for w in gpu.latents(batch)]
        host = [(v, e, s, c.cpu()) for v, e, s, c in batch]  # the graphed pass stages host codes
        with simcuda.meter() as region:
            got = gpu.latents(host, graphs)
        assert region.syncs == 0
        launches = region.launches
        kept.append((got, [g.cpu() for g in got], next(iter(graphs.shapes))))
        for g, w, n in zip(got, want, lengths, strict=True):
            assert g.shape == (1, n, w.size(2)) and g.dtype == torch.float32
            assert_close(g.cpu(), w, "latent")
    assert region.graph_nodes > 0 and len(graphs.shapes) == 1 and kept[0][2] == kept[1][2]  # one shape, replayed
    # A replay's launches: the tokens' one copy, two concatenations, the replay, each row's copy out.
    assert launches == 4 + len(lengths), region.ops
    for g, copy in zip(kept[0][0], kept[0][1], strict=True):
        assert torch.equal(g.cpu(), copy)
    first = next(iter(graphs.shapes))
    # Another shape (one row): with keep=1 it replaces the first.
    gpu.latents([(v, e, s, c.cpu()) for v, e, s, c in items((40,))], graphs)
    assert len(graphs.shapes) == 1 and first not in graphs.shapes


@pytest.mark.model_versions("2", "2.5")
@torch.inference_mode()
def test_graphed_regulator_matches_each_row_alone(gpu: Pipeline) -> None:
    """The regulator of a job's rows (IndexTTS-2: with vq2emb + gpt_layer before it, from host codes and
    second-pass latents) is one replay per (rows, input bucket, output bucket), with no host sync and
    2 + rows launches: each row comes out as the eager content and regulator give it alone (its
    GroupNorms over its own frames, zero padding at its own end), for the call that records the graph
    and for a later one of other lengths replaying it over the first one's leftovers."""
    prep = gpu.engine(max_batch_rows=4).prep_graphs
    assert prep is not None
    graphs = prep.regulator
    assert (graphs.content is None) == (not gpu.family.second_pass)
    opts = gpu.check_options(SynthesisOptions(**SHORT, seed=4))
    gen = torch.Generator().manual_seed(5)
    kept = []
    for lengths in ((9, 20, 3), (14, 17, 30)):  # codes per row; both calls in one shape
        codes = [torch.randint(0, gpu.codec.codebook_size, (1, n), generator=gen) for n in lengths]
        if graphs.content is None:
            content = [gpu.family.content(gpu.codec, gpu.gpt_layer, c.cuda(), None, opts) for c in codes]
            xs = [x for x, _ in content]
            frames = [t[0] for _, t in content]
            call = functools.partial(graphs, xs, frames)
        else:
            d = gpu.gpt.cfg.model_dim
            latents = [torch.randn((1, n, d), generator=gen).cuda() for n in lengths]
            content = [gpu.family.content(gpu.codec, gpu.gpt_layer, c.cuda(), lat, opts)
                       for c, lat in zip(codes, latents, strict=True)]
            frames = [t[0] for _, t in content]
            call = functools.partial(graphs.of_codes, codes, latents, frames)
        want = [gpu.length_regulator(x, t).cpu() for x, t in content]
        with simcuda.meter() as region:
            got = call()
        assert region.syncs == 0
        kept.append(next(iter(graphs.shapes)))
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape
            assert_close(g.cpu(), w, "regulated content")
    assert len(graphs.shapes) == 1 and kept[0] == kept[1]
    # A replay's launches: the host values' one copy, each row's input staged, the replay.
    assert region.launches == 2 + len(lengths), region.ops
    with pytest.raises(ValueError, match="at least one frame"):
        graphs._run([torch.zeros((1, 3, 4)).cuda()], None, [0])


@pytest.mark.model_versions("2", "2.5")
@torch.inference_mode()
def test_acoustic_prep_reads_nothing_back(gpu: Pipeline, voice: Voice) -> None:
    """Turning segments' codes into CFM inputs (second GPT pass, codec, length regulator, noise) issues
    no host sync: the acoustic stream's thread never waits for the device there (defect: the speed rows
    indexed with a Python list and the regulator's scale made on the device, two blocking copies per
    segment)."""
    opts = gpu.check_options(SynthesisOptions(**SHORT, seed=4))
    emovec = gpu.request_emovec(voice, opts, None)
    seg = gpu.split_text("Hello there.", opts)[0]
    gen = torch.Generator().manual_seed(2)
    items = []
    for i, n in enumerate((9, 14)):
        codes = torch.randint(0, gpu.codec.codebook_size, (1, n), generator=gen)
        items.append(AcousticInput(voice, emovec, seg.with_index(i), Generated(codes.cuda(), codes.cuda(), True,
                                                                               codes), opts))
    with simcuda.count_syncs() as region:
        rows = gpu.cfm_rows(items)
    assert len(rows) == 2 and region.events == []


@torch.inference_mode()
def test_graphed_batched_vocoding_matches_one_segment_at_a_time(gpu: Pipeline, voice: Voice) -> None:
    """The engine vocodes a job's segments as one replay per (rows, frame bucket): each segment's PCM is
    the one it gets vocoded alone, for the call that records the graph and for a later call with other
    lengths (which replays it, with a handful of launches to load the mels)."""
    vocoder = gpu.engine(max_batch_rows=4).vocoder_graphs
    assert vocoder is not None
    gen = torch.Generator().manual_seed(9)
    for lengths in ((40, 37), (33, 40)):  # one frame bucket: the second call replays the first's graph
        mels = [torch.randn(1, voice.ref_mel.size(1), n, generator=gen).cuda() for n in lengths]
        want = [gpu.vocode(m).cpu() for m in mels]
        with simcuda.meter() as cost:
            got = [p.cpu() for p in vocoder(mels)]
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape
            assert float((g - w).abs().max()) <= 1e-4 * max(1.0, float(w.abs().max()))
    assert cost.launches < 10 and cost.graph_nodes > 0, cost.launches
    assert len(vocoder.shapes) == 1


def _drive(engine: Engine, reqs: Sequence[Request], cancel: Request | None = None) -> list[Any]:
    """Run `reqs` to the end; `cancel` is cancelled once it has rows in the decode batch."""
    for r in reqs:
        engine.add(r)
    events: list[Any] = []
    left = {id(r) for r in reqs}
    for _ in range(20_000):
        if not left:
            return events
        if cancel is not None and engine.batch.n and any(d.tag.req is cancel for d in engine.batch.requests):
            engine.cancel(cancel)
            left.discard(id(cancel))
            cancel = None
        for ev in engine.step():
            events.append(ev)
            if isinstance(ev, RequestDone | RequestFailed):
                left.discard(id(ev.request))
    raise AssertionError("the engine made no progress")


# ------------------------------------------------------------------------------------------------
# `ttsd serve` on the simulated device (subprocesses: TTSD_SIMCUDA=1 is the entry point)


def _serve(*flags: str, memory_gib: float | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "TTSD_SIMCUDA": "1"}
    env.pop("JOURNAL_STREAM", None)
    env.pop("NOTIFY_SOCKET", None)
    if memory_gib is not None:
        env["TTSD_SIMCUDA_MEMORY_GIB"] = str(memory_gib)
    cmd = [sys.executable, "-m", "ttsd.daemon", "serve", "--random-weights", "tiny", "--random-seed", "1",
           "--port", "0", "--device", "cuda", *flags]
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)


def test_engine_out_of_memory_exits_1_with_one_line() -> None:
    """A KV cache that does not fit the device ends `ttsd serve` with status 1 and one line saying so,
    instead of a dead worker thread and a daemon waiting for its warm-up forever."""
    proc = _serve("--max-batch-rows", "128", memory_gib=0.05)
    try:
        _, err = proc.communicate(timeout=GATE_TIMEOUT_S)
    finally:
        reap(proc)
    assert proc.returncode == 1, err
    errors = [line for line in err.splitlines() if " ERROR " in line or " CRITICAL " in line]
    assert any("OutOfMemoryError" in line and "max_batch_rows=128" in line for line in errors), err
    assert "Traceback" not in err


async def test_serve_concurrent_cancelled_and_failing_requests_without_violation(speaker_wav: bytes) -> None:
    """`TTSD_SIMCUDA=1 ttsd serve --device cuda` warms up (graphs at every bucket), serves two requests at
    once while a third is cancelled mid-stream and a fourth fails, and logs no simulation violation."""
    proc = _serve("--max-batch-rows", "4", "--max-num-beams", "2")  # 4 rows: requests 1, 2 (2 beams) and 3
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        while not lines or "ttsd ready" not in lines[-1]:
            lines.append(await asyncio.to_thread(proc.stderr.readline))
            assert lines[-1], "daemon exited before logging its ready line: " + "".join(lines)
        url = lines[-1].split("url=", 1)[1].split()[0]
        async with connect(url, compression=None, max_size=None) as ws:
            c = Client(ws)
            voice = await c.register(speaker_wav)
            fast = {**FAST, "max_mel_tokens": 16}
            await c.send(p.Synthesize(id=1, text="Hello world. Second sentence.", voice=voice, **fast))
            await c.send(p.Synthesize(id=2, text="The quick brown fox.", voice=voice, **{**fast, "num_beams": 2}))
            await c.send(p.Synthesize(id=3, text="Cancel me. Please. Right now.", voice=voice, **fast))
            await c.send(p.Synthesize(id=4, text="...", voice=voice, **fast))
            await c.send(p.Cancel(id=3))
            messages = await c.until(1) + await c.until(2)
        done = [m for m in messages if isinstance(m, p.Done)]
        assert {m.id for m in done} >= {1, 2}, messages
        assert pcm_of(messages, 1) and pcm_of(messages, 2)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, GATE_TIMEOUT_S) == 0
        rest = proc.stderr.read()
        log = "".join(lines) + rest
        assert "simcuda" not in log, log
        assert isinstance(last(messages), p.Done | p.Error)
    finally:
        reap(proc)
