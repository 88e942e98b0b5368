"""`ttsd synth`: offline synthesis of one text with one voice into an audio file.

The same Pipeline the daemon serves, run once from the command line, under the daemon's rules
(ttsd.api.rules): the same text and reference-audio limits and output formats. Everything
that can be checked without the model is checked before it is loaded: the options, the text, the
reference files, the output path and format, the device. Every failure is one line on stderr.
Progress is shown per segment (a tqdm bar on a terminal when tqdm is installed, log lines
otherwise). `--noise` injects CFM starting noise from a safetensors file (keys `seg{i}.noise`,
shape [1, 80, P+T]) so the output can be compared sample by sample with a reference implementation."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from ttsd.api.errors import BadOptions, BadText, ConfigError, TtsdError
from ttsd.api.options import SynthesisOptions, add_option_flags, given_options
from ttsd.api.pcm import to_int16
from ttsd.api.rules import (
    MAX_REFERENCE_AUDIO_S,
    MAX_TEXT_CHARS,
    check_reference_audio,
    check_text,
    check_writable,
    output_format,
)

if TYPE_CHECKING:
    import torch

    from .pipeline import Pipeline
    from .requests import SegmentAudio

log = logging.getLogger(__name__)

EXIT_FAILED: Final = 1      # the model could not be loaded or synthesis failed
EXIT_USAGE: Final = 2       # an argument is wrong; nothing was loaded
EXIT_INTERRUPTED: Final = 130


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ttsd synth", description="Offline synthesis with a ttsd checkpoint directory.",
                                 epilog="Exit status: 0 done, 1 load or synthesis failed, 2 bad arguments.")
    ap.add_argument("--checkpoints", type=Path, required=True, help="converted checkpoint directory (ttsd-convert)")
    ap.add_argument("--voice", type=Path, required=True, help="speaker reference audio (wav/flac/ogg/mp3)")
    ap.add_argument("--emo-audio", type=Path, help="emotion reference audio (default: the voice itself)")
    ap.add_argument("--text", required=True, help="text to speak ('-' reads standard input)")
    ap.add_argument("--out", type=Path, required=True,
                    help="output file; the format follows the extension (wav, flac, ogg; mp3 where libsndfile has it)")
    ap.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N (default auto)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="GPT dtype (default float32; float16 needs CUDA)")
    ap.add_argument("--acoustic-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="DiT/CFM precision (default float32, the parity path; float16 needs CUDA)")
    ap.add_argument("--no-cuda-graphs", action="store_true",
                    help="run the GPT decode step eagerly on CUDA (no torch.compile)")
    ap.add_argument("--max-text-chars", type=int, default=MAX_TEXT_CHARS,
                    help="longest text accepted, in characters (default %(default)s, as the daemon)")
    ap.add_argument("--max-reference-audio-s", type=float, default=MAX_REFERENCE_AUDIO_S,
                    help="longest reference audio accepted, in seconds (default %(default)s, as the daemon)")
    ap.add_argument("--noise", type=Path, help="safetensors with CFM starting noise per segment (seg{i}.noise)")
    ap.add_argument("--no-emo-text", action="store_true",
                    help="never load the checkpoint's QwenEmotion model (it is loaded only for --emo-text or "
                         "--use-emo-text; with this flag they are refused)")
    add_option_flags(ap)
    return ap


@dataclass(frozen=True, kw_only=True, slots=True)
class Job:
    """A command line that passed every check that needs no model."""

    text: str
    opts: SynthesisOptions
    out: Path
    out_format: tuple[str, str]  # libsndfile (container, subtype)
    device: torch.device


def check(args: argparse.Namespace, text: str) -> Job:
    """Everything that can be wrong before the model is loaded, in the order a user would fix it.
    Raises a TtsdError with a one-line message."""
    from .device import resolve_device

    opts = SynthesisOptions(**given_options(args))  # BadOptions naming a value out of range
    if args.max_text_chars < 1 or args.max_reference_audio_s <= 0:
        raise ConfigError("--max-text-chars must be >= 1 and --max-reference-audio-s > 0")
    if not text.strip():
        raise BadText("text is empty")
    check_text(text, args.max_text_chars)
    check_reference_audio(args.voice, f"speaker reference audio {args.voice}", args.max_reference_audio_s)
    if args.emo_audio is not None:
        check_reference_audio(args.emo_audio, f"emotion reference audio {args.emo_audio}", args.max_reference_audio_s)
    out_format = output_format(args.out)
    check_writable(args.out)
    if not args.checkpoints.is_dir():
        raise ConfigError(f"no such checkpoint directory: {args.checkpoints}")
    if args.noise is not None and not args.noise.is_file():
        raise ConfigError(f"no such file: {args.noise}")
    if opts.wants_emotion_text:
        from .qwen_emo import QWEN_EMO_DIR, find_qwen_emo

        if args.no_emo_text:
            raise BadOptions("--emo-text and --use-emo-text need the checkpoint's QwenEmotion model, which "
                             "--no-emo-text leaves out")
        if find_qwen_emo(args.checkpoints) is None:
            raise BadOptions(f"--emo-text and --use-emo-text need the checkpoint's QwenEmotion model, and "
                             f"{args.checkpoints} has no {QWEN_EMO_DIR}/ (ttsd fetch without --no-emo-text "
                             "brings it); set the emotion with --emo-vector or --emo-audio instead")
    return Job(text=text, opts=opts, out=args.out, out_format=out_format, device=resolve_device(args.device))


def render(segments: Iterable[SegmentAudio]) -> np.ndarray:
    """Pipeline.stream's segments → the whole float PCM, each segment after its interval silence
    (upstream's insert_interval_silence), exactly as Pipeline.synthesize joins them."""
    parts: list[np.ndarray] = []
    for seg in segments:
        if seg.silence_samples:
            parts.append(np.zeros(seg.silence_samples, dtype=np.float32))
        parts.append(seg.samples)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def with_progress(segments: Iterator[SegmentAudio], total: int, sample_rate_hz: int) -> Iterator[SegmentAudio]:
    """Pass the stream through, reporting each finished segment: a tqdm bar on a terminal, else log lines."""
    bar: Any = None
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="segment", desc="ttsd synth", file=sys.stderr)
        except ImportError:  # tqdm comes with the `convert` extra; plain lines do without it
            bar = None
    t0 = time.perf_counter()
    try:
        for i, seg in enumerate(segments, 1):
            if bar is not None:
                bar.update(1)
            else:
                log.info("segment %d/%d done audio_s=%.2f elapsed_s=%.1f text=%r",
                         i, total, len(seg.samples) / sample_rate_hz, time.perf_counter() - t0, seg.segment.text[:60])
            yield seg
    finally:
        if bar is not None:
            bar.close()


def synthesize(pipe: Pipeline, job: Job, args: argparse.Namespace) -> np.ndarray:
    """Load the voice, then stream every segment of the text through the progress report → float PCM."""

    from .weights import read_tensors

    voice = pipe.prepare_voice(args.voice, args.emo_audio, max_input_s=args.max_reference_audio_s)
    noise: dict[int, torch.Tensor] | None = None
    if args.noise is not None:
        raw = read_tensors(args.noise)
        noise = {int(k[3:].split(".")[0]): v for k, v in raw.items() if k.startswith("seg") and k.endswith(".noise")}
    opts = pipe.check_options(job.opts)
    segments = len(pipe.split_text(job.text, opts))
    log.info("synth text_chars=%d segments=%d", len(job.text), segments)
    return render(with_progress(pipe.stream(voice, job.text, opts, noise=noise), segments, pipe.sample_rate_hz))


def write(path: Path, pcm: np.ndarray, sample_rate_hz: int, out_format: tuple[str, str]) -> None:
    """Float PCM at ±32767 scale → the output file as 16-bit samples; ConfigError if it cannot be written."""
    import soundfile as sf

    container, subtype = out_format
    try:
        sf.write(str(path), to_int16(pcm), sample_rate_hz, format=container, subtype=subtype)
    except (sf.SoundFileError, RuntimeError, OSError) as e:
        raise ConfigError(f"cannot write {path}: {str(e).rsplit(': ', 1)[-1]}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    text = sys.stdin.read() if args.text == "-" else args.text
    try:
        job = check(args, text)
    except TtsdError as e:
        print(f"ttsd synth: {e}", file=sys.stderr)
        return EXIT_USAGE
    from .pipeline import Pipeline

    try:
        t0 = time.perf_counter()
        pipe = Pipeline.load(args.checkpoints, device=job.device, dtype=args.dtype, acoustic_dtype=args.acoustic_dtype,
                             cuda_graphs=not args.no_cuda_graphs, max_num_beams=job.opts.num_beams,
                             emo_text=job.opts.wants_emotion_text)  # one request: only when it asks
        t1 = time.perf_counter()
        pcm = synthesize(pipe, job, args)
        t2 = time.perf_counter()
        write(job.out, pcm, pipe.sample_rate_hz, job.out_format)
    except TtsdError as e:
        print(f"ttsd synth: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("ttsd synth: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug, or a device error: one line, the traceback only at debug level
        log.debug("synth failed", exc_info=e)
        print(f"ttsd synth: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    audio_s = len(pcm) / pipe.sample_rate_hz
    log.info("synth done out=%s audio_s=%.2f load_s=%.2f synth_s=%.2f rtf=%.3f",
             job.out, audio_s, t1 - t0, t2 - t1, (t2 - t1) / max(audio_s, 1e-9))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
