"""GPU serving benchmark: N concurrent requests through one engine, on the device the daemon uses.

    python bench/gpu_bench.py --checkpoints DIR --device cuda --clients 1,8,32 --dtype bfloat16
    python bench/gpu_bench.py --random tiny --device cpu --clients 1,2 --codes 10   # a dry run

One model is loaded; one engine (graphed decode steps on CUDA, recorded at warm-up) serves every
round. A round submits N requests of one sentence at once (greedy, one beam, stop token suppressed so
each request decodes exactly `--codes` codes, 50 per audio second) and runs them to the end. Per
round: time to first audio at p50/p95 (from submission to the first segment's PCM on the host),
aggregate audio seconds per wall second (how many real-time streams the round sustained), each
request's RTF, the decode step time (the engine's decode time over its steps, host syncs included)
and the peak device memory. Then, on the same model: one decode step at 1/8/32 rows on the graphed
step (CUDA-event timed) and one DiT/CFM solve (`--diffusion-steps`) of 1 and 8 segments."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ttsd.api.options import SynthesisOptions
from ttsd.daemon.cli import simulated_cuda
from ttsd.pipeline import Pipeline
from ttsd.pipeline.accel import step_function
from ttsd.pipeline.decode import DecodeBatch
from ttsd.pipeline.engine import AcousticInput, Engine, Request, RequestDone, RequestFailed, SegmentDone
from ttsd.pipeline.voice import Voice
from ttsd.tools.tiny import synthetic_voice, write_converted

TEXT = "The quick brown fox jumps over the lazy dog, and then it runs all the way back home again."
STOP_SUPPRESSION_BIAS = -1e4  # the stop token's logit: random weights never stop early


@dataclass(frozen=True, kw_only=True, slots=True)
class Round:
    clients: int
    codes: int  # per request
    ttfa_p50_ms: float
    ttfa_p95_ms: float
    wall_s: float
    audio_s_per_s: float  # aggregate audio seconds per wall second = real-time streams sustained
    rtf_p50: float  # per request: its total time over its audio
    decode_ms_per_step: float  # the engine's decode time per batched step (all rows)
    peak_mem_gib: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


@torch.inference_mode()
def serve_round(pipe: Pipeline, engine: Engine, voice: Voice, n: int, opts: SynthesisOptions) -> Round:
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pipe.device)
    reqs = [Request(voice=voice, opts=opts.with_seed(i + 1), texts=deque([TEXT])) for i in range(n)]
    steps0, decode0 = engine.stats["decode_steps"], engine.stats.get("decode_s", 0.0)
    t0 = time.perf_counter()
    for r in reqs:
        engine.add(r)
    first: dict[int, float] = {}
    end: dict[int, float] = {}
    samples: dict[int, int] = {id(r): 0 for r in reqs}
    while len(end) < n:
        for ev in engine.step():
            now = time.perf_counter() - t0
            key = id(ev.request)
            if isinstance(ev, SegmentDone):
                first.setdefault(key, now)
                samples[key] += len(ev.audio.samples)
            elif isinstance(ev, RequestDone):
                end[key] = now
            elif isinstance(ev, RequestFailed):
                raise RuntimeError(f"request failed: {ev.error!r}")
    wall = time.perf_counter() - t0
    audio = {k: s / pipe.sample_rate_hz for k, s in samples.items()}
    steps = engine.stats["decode_steps"] - steps0
    return Round(
        clients=n,
        codes=opts.max_mel_tokens,
        ttfa_p50_ms=1000 * _pct(list(first.values()), 0.5),
        ttfa_p95_ms=1000 * _pct(list(first.values()), 0.95),
        wall_s=wall,
        audio_s_per_s=sum(audio.values()) / wall,
        rtf_p50=statistics.median(end[k] / audio[k] for k in end),
        decode_ms_per_step=1000 * (engine.stats.get("decode_s", 0.0) - decode0) / max(1, steps),
        peak_mem_gib=torch.cuda.max_memory_allocated(pipe.device) / 2**30 if pipe.device.type == "cuda" else 0.0,
    )


@torch.inference_mode()
def decode_step_ms(pipe: Pipeline, voice: Voice, opts: SynthesisOptions, rows: int, steps: int) -> float:
    """One graphed decode step of `rows` requests (greedy), CUDA-event timed over `steps` steps."""
    lanes = pipe.lanes
    with lanes.on(lanes.gpt):
        lanes.start(lanes.gpt)
        batch = DecodeBatch(pipe.decode_gpt, max_rows=rows, dtype=pipe.gpt_dtype,
                            step_fn=step_function(pipe.device, compile=pipe.compile),
                            row_buckets=pipe.row_buckets)
        emovec = pipe.request_emovec(voice, opts, None)
        seg = pipe.split_text(TEXT, opts)[0]
        long = replace(opts, max_mel_tokens=steps + 8)
        for i in range(rows):
            batch.admit(pipe.decode_request(voice, seg.with_index(i), long, emovec))
        for _ in range(4):  # graph capture and warm-up
            batch.step()
        _sync(pipe.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            batch.step()
        _sync(pipe.device)
        return 1000 * (time.perf_counter() - t0) / steps


@torch.inference_mode()
def dit_ms(pipe: Pipeline, voice: Voice, opts: SynthesisOptions, segments: int) -> float:
    """One CFM solve (all diffusion steps, CFG) over `segments` segments of `opts.max_mel_tokens` codes."""
    from ttsd.pipeline.decode import Generated

    lanes = pipe.lanes
    with lanes.on(lanes.acoustic):
        lanes.start(lanes.acoustic)
        emovec = pipe.request_emovec(voice, opts, None)
        seg = pipe.split_text(TEXT, opts)[0]
        codes = torch.randint(0, pipe.codec.codebook_size, (1, opts.max_mel_tokens), device=pipe.device)
        gen = Generated(codes, codes, True, codes.cpu())
        rows = pipe.cfm_rows([AcousticInput(voice, emovec, seg, gen, opts) for _ in range(segments)])
        best = float("inf")
        for _ in range(2):
            _sync(pipe.device)
            t0 = time.perf_counter()
            solve = pipe.cfm_solve(rows, opts.diffusion_steps)
            while not solve.done:
                solve.step()
            _sync(pipe.device)
            best = min(best, time.perf_counter() - t0)
        return 1000 * best


def main(argv: list[str] | None = None) -> int:
    simulated_cuda()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoints", type=Path, help="converted checkpoint directory")
    src.add_argument("--random", choices=["tiny", "full"], help="seeded random weights of a make-tiny preset")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--acoustic-dtype", default=None, help="DiT/CFM precision (default: --dtype)")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--codes", type=int, default=100, help="codes per request (50 per audio second)")
    ap.add_argument("--diffusion-steps", type=int, default=SynthesisOptions().diffusion_steps)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                    help="compile the decode step with inductor before graphing it (default off: seconds per bucket)")
    ap.add_argument("--step-rows", default="1,8,32", help="row counts of the decode-step timing")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",") if c]
    step_rows = [int(c) for c in args.step_rows.split(",") if c]
    acoustic = args.acoustic_dtype or args.dtype
    rows_max = max([*clients, *step_rows])
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoints
        if ckpt is None:
            ckpt = Path(tmp) / "ckpt"
            write_converted(ckpt, args.random, 0)
        t0 = time.perf_counter()
        pipe = Pipeline.load(ckpt, device=args.device, dtype=args.dtype, acoustic_dtype=acoustic,
                             compile=args.compile, max_num_beams=1, max_batch_rows=rows_max)
        load_s = time.perf_counter() - t0
    with torch.no_grad():
        for gpt in {id(pipe.gpt): pipe.gpt, id(pipe.decode_gpt): pipe.decode_gpt}.values():
            gpt.mel_head.bias[gpt.cfg.stop_mel_token] += STOP_SUPPRESSION_BIAS
    voice = pipe.prepare_voice(synthetic_voice(3.0))
    opts = pipe.check_options(SynthesisOptions(do_sample=False, num_beams=1, max_mel_tokens=args.codes,
                                               diffusion_steps=args.diffusion_steps, seed=1,
                                               max_text_tokens_per_segment=120))
    engine = pipe.engine(max_batch_rows=rows_max)
    t0 = time.perf_counter()
    warm_s = pipe.warm_up(engine)
    print(f"# {torch.cuda.get_device_name(pipe.device) if pipe.device.type == 'cuda' else 'cpu'} torch "
          f"{torch.__version__} cuda {torch.version.cuda} dtype={args.dtype} acoustic={acoustic} "
          f"compile={args.compile} load_s={load_s:.1f} warm_s={warm_s:.1f}", flush=True)
    rounds = []
    for n in clients:
        serve_round(pipe, engine, voice, min(n, 2), replace(opts, max_mel_tokens=8))  # settle this batch size
        rounds.append(serve_round(pipe, engine, voice, n, opts))
        print(json.dumps(asdict(rounds[-1])), flush=True)
    steps = {r: decode_step_ms(pipe, voice, opts, r, 32) for r in step_rows}
    dits = {b: dit_ms(pipe, voice, opts, b) for b in (1, 8)}
    cols = list(asdict(rounds[0]))
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rounds:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in asdict(r).values()) + " |")
    print("decode step ms by rows: " + ", ".join(f"{r}: {ms:.2f}" for r, ms in steps.items()))
    print(f"DiT/CFM solve ms ({args.diffusion_steps} steps, {args.codes} codes + 3 s prompt): "
          + ", ".join(f"{b} seg: {ms:.1f}" for b, ms in dits.items()))
    if args.json is not None:
        args.json.write_text(json.dumps({"rounds": [asdict(r) for r in rounds], "decode_step_ms": steps,
                                         "dit_ms": dits, "dtype": args.dtype, "acoustic_dtype": acoustic,
                                         "compile": args.compile, "torch": torch.__version__}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
