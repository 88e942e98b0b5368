"""Pipeline benchmark: per-stage latency, time to first audio, RTF, peak memory, and GPT decode
throughput with 1, 2, 4, 8 requests sharing the decode batch.

    python bench/bench_pipeline.py --checkpoints CKPT [--device cuda --dtype float16]
    python bench/bench_pipeline.py --random-full --codes 50          # real sizes, random weights

A voice is prepared once (warm voice, as the daemon caches it); then each text is synthesised
with `Pipeline.stream` after `--warmup` untimed runs: that gives first audio, total time and RTF.
Stage times come from a second run of the same segments through the per-segment methods the
engine is built from (prefill, decode steps, second GPT pass, s2mel = regulator + CFM/DiT,
BigVGAN), each synchronised on CUDA. The concurrency table runs N requests (the same prefix,
different sampling keys) through one decode batch for `--codes` steps: codes per second summed
over the requests, against one request alone.

`--random-full` (or `--random tiny`) builds the architecture with seeded random weights
(`ttsd.tools.tiny.random_pipeline`) and suppresses the stop token (mel_head bias −1e4), so
every segment decodes exactly `--codes` codes: the real cost without real weights. Reference
audio defaults to a synthetic voiced signal of `--voice-s` seconds."""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import torch

from ttsd.api.options import SynthesisOptions
from ttsd.daemon.cli import simulated_cuda
from ttsd.pipeline import Pipeline
from ttsd.pipeline.decode import DecodeBatch
from ttsd.pipeline.engine import AcousticInput
from ttsd.pipeline.voice import Voice
from ttsd.tools.tiny import synthetic_voice

TEXTS = {
    "short": "Hello, how are you today?",
    "sentence": "The quick brown fox jumps over the lazy dog, and then it runs all the way back home again.",
    "paragraph": (
        "Streaming speech synthesis lets a listener hear the first words while the rest is still being "
        "generated. Each sentence becomes a segment: the language model writes semantic codes, the "
        "diffusion transformer turns them into a mel spectrogram, and the vocoder renders the waveform. "
        "The first segment decides how long the listener waits; the others only have to keep up."
    ),
}
STOP_SUPPRESSION_BIAS = -1e4  # added to the stop token's logit: random models never stop early
SAMPLE_RATE_HZ = 22_050


@dataclass(frozen=True, kw_only=True, slots=True)
class Row:
    text: str
    chars: int
    segments: int
    codes: int  # semantic codes over all segments (50 per audio second)
    audio_s: float  # speech samples produced (no inter-segment silence)
    first_audio_s: float  # stream start → first segment's PCM on the host (chunked: its first chunk's)
    pieces: int  # audio pieces delivered: segments, or with --chunk-codes every segment's chunks
    total_s: float
    rtf: float  # total_s / audio_s
    gpt_prefill_ms: float  # summed over segments
    gpt_step_ms: float  # decode loop time per generated code (all beams)
    gpt_decode_s: float
    gpt_latent_s: float  # the second GPT forward
    s2mel_s: float  # gpt_layer + vq2emb + length regulator + CFM (DiT × steps)
    bigvgan_s: float
    peak_mem_mb: float  # CUDA: max_memory_allocated; CPU: peak process RSS during the run


# ---------------------------------------------------------------------------------------------
# Environment


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@contextmanager
def peak_memory(device: torch.device) -> Iterator[list[float]]:
    """Yields a one-element list that holds the peak memory in MiB once the block ends: CUDA
    max_memory_allocated, or the process' peak RSS on CPU (weights included in both)."""
    out = [float("nan")]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        out[0] = torch.cuda.max_memory_allocated(device) / 2**20
        return
    # Linux: writing 5 to clear_refs resets VmHWM, so the high-water mark covers this block only.
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    yield out
    hwm = _proc_status_kb("VmHWM") if reset else None
    if hwm is not None:
        out[0] = hwm / 1024
    else:  # ru_maxrss is the process lifetime peak (KiB on Linux)
        out[0] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def suppress_stop(pipe: Pipeline) -> None:
    """Make the stop token unreachable, so every segment decodes exactly max_mel_tokens codes."""
    with torch.no_grad():
        pipe.gpt.mel_head.bias[pipe.gpt.cfg.stop_mel_token] += STOP_SUPPRESSION_BIAS


# ---------------------------------------------------------------------------------------------
# Measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(out: dict[str, float], key: str, device: torch.device) -> Iterator[None]:
    """Add the block's wall time to out[key], synchronising CUDA on both sides."""
    _sync(device)
    t0 = time.perf_counter()
    yield
    _sync(device)
    out[key] = out.get(key, 0.0) + time.perf_counter() - t0


def run_stream(pipe: Pipeline, voice: Voice, text: str, opts: SynthesisOptions) -> tuple[float, float, int, int]:
    """(first audio s, total s, samples, pieces) of one streamed synthesis through the engine."""
    t0 = time.perf_counter()
    first = None
    samples = pieces = 0
    for seg in pipe.stream(voice, text, opts):
        if first is None and len(seg.samples):
            first = time.perf_counter() - t0
        samples += len(seg.samples)
        pieces += 1
    total = time.perf_counter() - t0
    return (first if first is not None else total), total, samples, pieces


@torch.inference_mode()
def stage_times(pipe: Pipeline, voice: Voice, text: str, opts: SynthesisOptions) -> dict[str, float]:
    """Each segment through the engine's per-segment methods, one stage at a time, timed."""
    t: dict[str, float] = {}
    dev = pipe.device
    emovec = pipe.request_emovec(voice, opts, None)
    for seg in pipe.split_text(text, opts):
        batch = DecodeBatch(pipe.decode_gpt, max_rows=opts.num_beams, dtype=pipe.gpt_dtype)
        with timed(t, "prefill_s", dev):
            req = pipe.decode_request(voice, seg, opts, emovec)
            batch.admit(req)
        with timed(t, "decode_s", dev):
            while req.result is None:
                batch.step()
        codes = req.result
        t["codes"] = t.get("codes", 0) + codes.codes.size(1)
        item = AcousticInput(voice, emovec, seg, codes, opts)
        with timed(t, "latent_s", dev):
            latent = pipe.latents([(voice, emovec, seg, codes.codes)])[0]
        with timed(t, "s2mel_s", dev):
            row = pipe._cfm_row(item, latent)
            solve = pipe.cfm_solve([row], opts.diffusion_steps)
            while not solve.done:
                solve.step()
        with timed(t, "bigvgan_s", dev):
            pipe.vocode(solve.target(0))
    return t


def measure(pipe: Pipeline, voice: Voice, name: str, text: str, opts: SynthesisOptions) -> Row:
    segments = pipe.split_text(text, opts)
    with peak_memory(pipe.device) as peak:
        first, total, samples, pieces = run_stream(pipe, voice, text, opts)
    t = stage_times(pipe, voice, text, opts)
    codes = int(t.get("codes", 0))
    audio_s = samples / pipe.sample_rate_hz
    return Row(
        text=name,
        chars=len(text),
        segments=len(segments),
        codes=codes,
        audio_s=audio_s,
        first_audio_s=first,
        pieces=pieces,
        total_s=total,
        rtf=total / audio_s if audio_s else float("nan"),
        gpt_prefill_ms=1000 * t.get("prefill_s", 0.0),
        gpt_step_ms=1000 * t.get("decode_s", 0.0) / codes if codes else float("nan"),
        gpt_decode_s=t.get("decode_s", 0.0),
        gpt_latent_s=t.get("latent_s", 0.0),
        s2mel_s=t.get("s2mel_s", 0.0),
        bigvgan_s=t.get("bigvgan_s", 0.0),
        peak_mem_mb=peak[0],
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class ThroughputRow:
    requests: int
    rows: int  # batch rows (requests × beams)
    codes: int  # codes decoded, all requests together
    decode_s: float
    codes_per_s: float
    speedup: float  # codes/s against one request


@torch.inference_mode()
def decode_throughput(
    pipe: Pipeline, voice: Voice, opts: SynthesisOptions, counts: Sequence[int], steps: int
) -> list[ThroughputRow]:
    """N requests decoding together for `steps` steps (stop suppressed), codes per second summed."""
    seg = pipe.split_text(TEXTS["sentence"], opts)[0]
    emovec = pipe.request_emovec(voice, opts, None)
    params_opts = replace(opts, max_mel_tokens=steps, do_sample=True)
    out: list[ThroughputRow] = []
    base = None
    for n in counts:
        batch = DecodeBatch(pipe.decode_gpt, max_rows=n * opts.num_beams, dtype=pipe.gpt_dtype)
        reqs = []
        for i in range(n):
            req = pipe.decode_request(voice, seg, replace(params_opts, seed=i + 1), emovec)
            batch.admit(req)
            reqs.append(req)
        batch.step()  # the first step selects from the prefill logits; time the steady state
        _sync(pipe.device)
        t0 = time.perf_counter()
        while batch.active:
            batch.step()
        _sync(pipe.device)
        dt = time.perf_counter() - t0
        codes = sum(steps - 1 for _ in reqs)
        rate = codes / dt
        base = base or rate
        out.append(ThroughputRow(requests=n, rows=n * opts.num_beams, codes=codes, decode_s=dt,
                                 codes_per_s=rate, speedup=rate / base))
    return out


def median_row(rows: Sequence[Row]) -> Row:
    """Field-wise median of repeated runs of one text."""
    first = rows[0]
    values = {k: statistics.median(getattr(r, k) for r in rows) for k, v in asdict(first).items() if k != "text"}
    return Row(text=first.text, **{k: type(getattr(first, k))(v) for k, v in values.items()})


# ---------------------------------------------------------------------------------------------
# Output

COLUMNS = [
    ("text", "{}"),
    ("segments", "{}"),
    ("codes", "{}"),
    ("audio_s", "{:.2f}"),
    ("first_audio_s", "{:.3f}"),
    ("pieces", "{}"),
    ("total_s", "{:.3f}"),
    ("rtf", "{:.3f}"),
    ("gpt_prefill_ms", "{:.1f}"),
    ("gpt_step_ms", "{:.2f}"),
    ("gpt_decode_s", "{:.3f}"),
    ("gpt_latent_s", "{:.3f}"),
    ("s2mel_s", "{:.3f}"),
    ("bigvgan_s", "{:.3f}"),
    ("peak_mem_mb", "{:.0f}"),
]


THROUGHPUT_COLUMNS = [
    ("requests", "{}"),
    ("rows", "{}"),
    ("codes", "{}"),
    ("decode_s", "{:.3f}"),
    ("codes_per_s", "{:.1f}"),
    ("speedup", "{:.2f}"),
]


def table(rows: Sequence[object], columns: Sequence[tuple[str, str]] = COLUMNS) -> str:
    head = "| " + " | ".join(c for c, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt.format(getattr(r, c)) for c, fmt in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    simulated_cuda()  # TTSD_SIMCUDA=1: --device cuda on the simulated device (before the defaults read torch.cuda)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoints", type=Path, help="converted checkpoint directory (ttsd-convert)")
    src.add_argument("--random-full", action="store_true", help="full-size architecture, seeded random weights")
    src.add_argument("--random", choices=["tiny", "full"], help="random weights of a make-tiny preset")
    ap.add_argument("--seed", type=int, default=0, help="weights seed (random models) and synthesis seed")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="GPT dtype")
    ap.add_argument("--acoustic-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="DiT/CFM precision")
    ap.add_argument("--texts", default="short,sentence,paragraph", help=f"comma-separated subset of {list(TEXTS)}")
    ap.add_argument("--voice", type=Path, help="reference audio (default: a synthetic voiced signal)")
    ap.add_argument("--voice-s", type=float, default=6.0, help="length of the synthetic reference (seconds)")
    ap.add_argument("--codes", type=int, help="codes per segment (max_mel_tokens; exact for random models)")
    ap.add_argument("--num-beams", type=int, default=SynthesisOptions().num_beams)
    ap.add_argument("--greedy", action="store_true", help="greedy decoding (do_sample off) instead of sampling")
    ap.add_argument("--diffusion-steps", type=int, default=SynthesisOptions().diffusion_steps)
    ap.add_argument("--chunk-codes", type=int, default=SynthesisOptions().chunk_codes,
                    help="render segments in chunks of this many codes while they decode (0: whole segments)")
    ap.add_argument("--chunk-overlap", type=int, default=SynthesisOptions().chunk_overlap,
                    help="codes each chunk repeats of the one before")
    ap.add_argument("--first-chunk-codes", type=int, default=SynthesisOptions().first_chunk_codes,
                    help="codes in a segment's first chunk (0: --chunk-codes)")
    ap.add_argument("--versus-whole", action="store_true",
                    help="with --chunk-codes: alternate every run with one of whole segments (row 'TEXT whole'), "
                    "so both see the same machine load")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of each text first")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per text (the table shows medians)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument(
        "--concurrency", default="1,2,4,8", help="request counts for the decode throughput table ('' = skip)"
    )
    ap.add_argument("--suppress-stop", action="store_true",
                    help="make the stop token unreachable with --checkpoints too (random weights written by make-tiny)")
    ap.add_argument("--json", type=Path, help="also write the rows and the environment as JSON")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    names = [t for t in args.texts.split(",") if t]
    unknown = [t for t in names if t not in TEXTS]
    if unknown:
        ap.error(f"unknown text(s) {unknown}; choose from {list(TEXTS)}")
    preset = "full" if args.random_full else args.random
    t0 = time.perf_counter()
    if preset is not None:
        from ttsd.tools.tiny import random_pipeline

        pipe = random_pipeline(preset, args.seed, args.device, args.dtype, acoustic_dtype=args.acoustic_dtype)
        suppress_stop(pipe)
        model = f"random {preset} (seed {args.seed}, stop token suppressed)"
    else:
        pipe = Pipeline.load(args.checkpoints, args.device, args.dtype, acoustic_dtype=args.acoustic_dtype)
        model = str(args.checkpoints)
        if args.suppress_stop:
            suppress_stop(pipe)
            model += " (stop token suppressed)"
    load_s = time.perf_counter() - t0
    defaults = SynthesisOptions()
    rss_load_mb = _peak_rss_mb()
    opts = SynthesisOptions(
        seed=args.seed,
        do_sample=not args.greedy,
        num_beams=args.num_beams,
        diffusion_steps=args.diffusion_steps,
        max_mel_tokens=args.codes if args.codes is not None else defaults.max_mel_tokens,
        chunk_codes=args.chunk_codes,
        chunk_overlap=args.chunk_overlap,
        first_chunk_codes=args.first_chunk_codes,
    )
    voice_src: Path | bytes = args.voice if args.voice is not None else synthetic_voice(args.voice_s)
    t0 = time.perf_counter()
    voice = pipe.prepare_voice(voice_src)
    _sync(pipe.device)
    voice_ms = 1000 * (time.perf_counter() - t0)
    rss_voice_mb = _peak_rss_mb()

    rows = []
    whole = replace(opts, chunk_codes=0) if args.versus_whole and opts.chunk_codes else None
    for name in names:
        for _ in range(args.warmup):
            run_stream(pipe, voice, TEXTS[name], opts)
        if whole is None:
            rows.append(median_row([measure(pipe, voice, name, TEXTS[name], opts) for _ in range(args.repeat)]))
            continue
        runs = [(measure(pipe, voice, name, TEXTS[name], opts),
                 replace(measure(pipe, voice, name, TEXTS[name], whole), text=f"{name} whole"))
                for _ in range(args.repeat)]
        rows += [median_row([r[0] for r in runs]), median_row([r[1] for r in runs])]
    rss_synth_mb = _peak_rss_mb()
    counts = [int(c) for c in args.concurrency.split(",") if c]
    steps = args.codes if args.codes is not None else 64
    throughput = decode_throughput(pipe, voice, opts, counts, steps) if counts else []

    env = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(pipe.device),
        "dtype": f"GPT {args.dtype}, acoustic {args.acoustic_dtype}",
        "torch": torch.__version__,
        "model": model,
        "load_s": round(load_s, 2),
        "voice": f"{voice.audio_s:.2f} s reference, prepare_voice {voice_ms:.0f} ms",
        "options": f"do_sample={opts.do_sample} num_beams={opts.num_beams} diffusion_steps={opts.diffusion_steps} "
        f"max_mel_tokens={opts.max_mel_tokens} chunk_codes={opts.chunk_codes} chunk_overlap={opts.chunk_overlap} "
        f"first_chunk_codes={opts.first_chunk_codes} warmup={args.warmup} repeat={args.repeat}",
        # Process peak RSS so far, read after each stage (ru_maxrss never decreases).
        "peak_rss_mb": f"after load {rss_load_mb:.0f}, after prepare_voice {rss_voice_mb:.0f}, "
        f"after synthesis {rss_synth_mb:.0f}",
    }
    for k, v in env.items():
        print(f"{k}: {v}")
    print()
    print(table(rows))
    if throughput:
        print()
        print(f"GPT decode throughput, requests sharing one batch ({steps} codes each, {opts.num_beams} beams):")
        print(table(throughput, THROUGHPUT_COLUMNS))
    if args.json is not None:
        doc = {"env": env, "rows": [asdict(r) for r in rows], "throughput": [asdict(r) for r in throughput]}
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
