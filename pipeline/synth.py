"""`ttsd synth`: offline synthesis of one text with one voice into a WAV/FLAC/OGG file.

The same Pipeline the daemon serves, run once from the command line. `--noise` injects CFM
starting noise from a safetensors file (keys `seg{i}.noise`, shape [1, 80, P+T]) so the output
can be compared sample by sample with a reference implementation."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .errors import TtsdError
from .options import EMOTIONS, SynthesisOptions
from .pcm import to_int16

log = logging.getLogger(__name__)


def add_synthesis_flags(ap: argparse.ArgumentParser) -> None:
    """Flags shared by `ttsd synth` and the benchmarks: emotion, sampling and segmentation options."""
    d = SynthesisOptions()
    g = ap.add_argument_group("emotion")
    g.add_argument("--emo-audio", type=Path, help="emotion reference audio (default: the voice itself)")
    g.add_argument(
        "--emo-vector",
        type=_emo_vector,
        help=f"8 comma-separated weights in the order {','.join(EMOTIONS)}",
    )
    g.add_argument("--emo-alpha", type=float, default=d.emo_alpha, help="emotion strength (default %(default)s)")
    g.add_argument("--emo-random", action="store_true", help="pick emotion-matrix rows at random (upstream use_random)")
    s = ap.add_argument_group("sampling")
    s.add_argument("--greedy", action="store_true", help="greedy decoding (do_sample=False)")
    s.add_argument("--temperature", type=float, default=d.temperature)
    s.add_argument("--top-k", type=int, default=d.top_k)
    s.add_argument("--top-p", type=float, default=d.top_p)
    s.add_argument("--num-beams", type=int, default=d.num_beams)
    s.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    s.add_argument("--max-mel-tokens", type=int, default=d.max_mel_tokens)
    s.add_argument("--seed", type=int, help="seed for GPT sampling and CFM noise (reproducible output)")
    a = ap.add_argument_group("acoustic / segmentation")
    a.add_argument("--diffusion-steps", type=int, default=d.diffusion_steps)
    a.add_argument("--cfg-rate", type=float, default=d.inference_cfg_rate)
    a.add_argument("--max-text-tokens-per-segment", type=int, default=d.max_text_tokens_per_segment)
    a.add_argument("--quick-streaming-tokens", type=int, default=d.quick_streaming_tokens)
    a.add_argument("--interval-silence-ms", type=int, default=d.interval_silence_ms)


def options_from_args(args: argparse.Namespace) -> SynthesisOptions:
    return SynthesisOptions(
        emo_alpha=args.emo_alpha,
        emo_vector=args.emo_vector,
        use_random=args.emo_random,
        do_sample=not args.greedy,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        num_beams=args.num_beams,
        repetition_penalty=args.repetition_penalty,
        max_mel_tokens=args.max_mel_tokens,
        diffusion_steps=args.diffusion_steps,
        inference_cfg_rate=args.cfg_rate,
        max_text_tokens_per_segment=args.max_text_tokens_per_segment,
        quick_streaming_tokens=args.quick_streaming_tokens,
        interval_silence_ms=args.interval_silence_ms,
        seed=args.seed,
    ).validated()


def _emo_vector(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--emo-vector: {e}") from e
    if len(values) != len(EMOTIONS):
        raise argparse.ArgumentTypeError(f"--emo-vector needs {len(EMOTIONS)} values, got {len(values)}")
    return values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ttsd synth", description="Offline synthesis with a ttsd checkpoint directory.")
    ap.add_argument("--checkpoints", type=Path, required=True, help="converted checkpoint directory (ttsd-convert)")
    ap.add_argument("--voice", type=Path, required=True, help="speaker reference audio (wav/flac/ogg/mp3)")
    ap.add_argument("--text", required=True, help="text to speak ('-' reads standard input)")
    ap.add_argument("--out", type=Path, required=True, help="output file; format from the extension (wav/flac/ogg)")
    ap.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="GPT dtype")
    ap.add_argument(
        "--no-cuda-graphs", action="store_true", help="run the GPT decode step eagerly on CUDA (no torch.compile)"
    )
    ap.add_argument("--noise", type=Path, help="safetensors with CFM starting noise per segment (seg{i}.noise)")
    add_synthesis_flags(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import soundfile as sf
    import torch

    from .pipeline import Pipeline
    from .weights import read_tensors

    text = sys.stdin.read() if args.text == "-" else args.text
    try:
        opts = options_from_args(args)
        t0 = time.perf_counter()
        pipe = Pipeline.load(
            args.checkpoints, device=args.device, dtype=args.dtype, cuda_graphs=not args.no_cuda_graphs
        )
        t1 = time.perf_counter()
        voice = pipe.prepare_voice(args.voice, args.emo_audio)
        noise: dict[int, torch.Tensor] | None = None
        if args.noise is not None:
            raw = read_tensors(args.noise)
            noise = {
                int(k[3:].split(".")[0]): v for k, v in raw.items() if k.startswith("seg") and k.endswith(".noise")
            }
        pcm = pipe.synthesize(voice, text, opts, noise=noise)
        t2 = time.perf_counter()
    except TtsdError as e:
        print(f"ttsd synth: {e}", file=sys.stderr)
        return 2
    sf.write(str(args.out), to_int16(pcm), pipe.sample_rate_hz, subtype="PCM_16" if args.out.suffix == ".wav" else None)
    audio_s = len(pcm) / pipe.sample_rate_hz
    log.info(
        "synth done out=%s audio_s=%.2f load_s=%.2f synth_s=%.2f rtf=%.3f",
        args.out,
        audio_s,
        t1 - t0,
        t2 - t1,
        (t2 - t1) / max(audio_s, 1e-9),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
