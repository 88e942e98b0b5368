"""Pipeline benchmark: per-stage latency, time to first audio, RTF and peak memory (issue 5).

    python bench/bench_pipeline.py --checkpoints CKPT [--device cuda --dtype float16]
    python bench/bench_pipeline.py --random-full --codes 50          # real sizes, random weights

A voice is prepared once (warm voice, as the daemon caches it); then each text is synthesised
with `Pipeline.stream` after `--warmup` untimed runs. Stage times come from the Pipeline's
`timings` (GPT decode loop, GPT second forward, s2mel = length regulator + CFM/DiT, BigVGAN);
the GPT prefill is timed separately on the same prefix. On CUDA the timed run synchronises at
every stage boundary, so first audio and RTF come from an extra run without timings.

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
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from ttsd.pipeline import Pipeline, SynthesisOptions
from ttsd.pipeline.generate import prefill
from ttsd.pipeline.gpt import KVCache
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
    first_audio_s: float  # stream start → first segment's PCM on the host
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


@torch.inference_mode()
def prefill_s(pipe: Pipeline, voice: Voice, text_ids: Sequence[int], emovec: torch.Tensor, beams: int) -> float:
    """Time of the GPT prefill (conditioning + text prefix into a fresh KV cache) for one segment."""
    text = torch.tensor([list(text_ids)], dtype=torch.int64, device=pipe.device)
    prefix = pipe.gpt.build_prefix(voice.speech_latent, emovec, text)  # [1, P, D]
    cache = KVCache(pipe.gpt.cfg, beams, prefix.size(1) + 8, pipe.device, prefix.dtype)
    _sync(pipe.device)
    t0 = time.perf_counter()
    prefill(pipe.gpt, prefix.expand(beams, -1, -1), cache)  # beam search prefills every beam row
    _sync(pipe.device)
    return time.perf_counter() - t0


def run_stream(
    pipe: Pipeline, voice: Voice, text: str, opts: SynthesisOptions, timings: dict[str, float] | None
) -> tuple[float, float, int]:
    """(first audio s, total s, samples) of one streamed synthesis."""
    segments = pipe.split_text(text, opts)
    t0 = time.perf_counter()
    first = None
    samples = 0
    for _, pcm in pipe.stream(voice, segments, opts, timings=timings):
        if first is None:
            first = time.perf_counter() - t0
        samples += len(pcm)
    total = time.perf_counter() - t0
    return (first if first is not None else total), total, samples


def measure(pipe: Pipeline, voice: Voice, name: str, text: str, opts: SynthesisOptions) -> Row:
    segments = pipe.split_text(text, opts)
    emovec = pipe.emovec(voice, opts)
    timings: dict[str, float] = {}
    with peak_memory(pipe.device) as peak:
        first, total, samples = run_stream(pipe, voice, text, opts, timings)
    if pipe.device.type == "cuda":  # the timed run synchronised at every stage: time a clean one
        first, total, samples = run_stream(pipe, voice, text, opts, None)
    prefill_total = sum(prefill_s(pipe, voice, s.text_ids, emovec, opts.num_beams) for s in segments)
    codes = int(timings.get("gpt_codes", 0))
    decode = max(0.0, timings.get("gpt_s", 0.0) - prefill_total)
    audio_s = samples / pipe.sample_rate_hz
    return Row(
        text=name,
        chars=len(text),
        segments=len(segments),
        codes=codes,
        audio_s=audio_s,
        first_audio_s=first,
        total_s=total,
        rtf=total / audio_s if audio_s else float("nan"),
        gpt_prefill_ms=1000 * prefill_total,
        gpt_step_ms=1000 * decode / codes if codes else float("nan"),
        gpt_decode_s=decode,
        gpt_latent_s=timings.get("gpt_latent_s", 0.0),
        s2mel_s=timings.get("s2mel_s", 0.0),
        bigvgan_s=timings.get("bigvgan_s", 0.0),
        peak_mem_mb=peak[0],
    )


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


def table(rows: Sequence[Row]) -> str:
    head = "| " + " | ".join(c for c, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(fmt.format(getattr(r, c)) for c, fmt in COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoints", type=Path, help="converted checkpoint directory (ttsd-convert)")
    src.add_argument("--random-full", action="store_true", help="full-size architecture, seeded random weights")
    src.add_argument("--random", choices=["tiny", "full"], help="random weights of a make-tiny preset")
    ap.add_argument("--seed", type=int, default=0, help="weights seed (random models) and synthesis seed")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="GPT dtype")
    ap.add_argument("--texts", default="short,sentence,paragraph", help=f"comma-separated subset of {list(TEXTS)}")
    ap.add_argument("--voice", type=Path, help="reference audio (default: a synthetic voiced signal)")
    ap.add_argument("--voice-s", type=float, default=6.0, help="length of the synthetic reference (seconds)")
    ap.add_argument("--codes", type=int, help="codes per segment (max_mel_tokens; exact for random models)")
    ap.add_argument("--num-beams", type=int, default=SynthesisOptions().num_beams)
    ap.add_argument("--diffusion-steps", type=int, default=SynthesisOptions().diffusion_steps)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of each text first")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per text (the table shows medians)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
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

        pipe = random_pipeline(preset, args.seed, args.device, args.dtype)
        suppress_stop(pipe)
        model = f"random {preset} (seed {args.seed}, stop token suppressed)"
    else:
        pipe = Pipeline.load(args.checkpoints, args.device, args.dtype)
        model = str(args.checkpoints)
    load_s = time.perf_counter() - t0
    defaults = SynthesisOptions()
    opts = SynthesisOptions(
        seed=args.seed,
        num_beams=args.num_beams,
        diffusion_steps=args.diffusion_steps,
        max_mel_tokens=args.codes if args.codes is not None else defaults.max_mel_tokens,
    ).validated()
    voice_src: Path | bytes = args.voice if args.voice is not None else synthetic_voice(args.voice_s)
    t0 = time.perf_counter()
    voice = pipe.prepare_voice(voice_src)
    _sync(pipe.device)
    voice_ms = 1000 * (time.perf_counter() - t0)

    rows = []
    for name in names:
        for _ in range(args.warmup):
            run_stream(pipe, voice, TEXTS[name], opts, None)
        rows.append(median_row([measure(pipe, voice, name, TEXTS[name], opts) for _ in range(args.repeat)]))

    env = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(pipe.device),
        "dtype": f"GPT {args.dtype}, acoustic float32",
        "torch": torch.__version__,
        "model": model,
        "load_s": round(load_s, 2),
        "voice": f"{voice.audio_s:.2f} s reference, prepare_voice {voice_ms:.0f} ms",
        "options": f"num_beams={opts.num_beams} diffusion_steps={opts.diffusion_steps} "
        f"max_mel_tokens={opts.max_mel_tokens} warmup={args.warmup} repeat={args.repeat}",
    }
    for k, v in env.items():
        print(f"{k}: {v}")
    print()
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"env": env, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
