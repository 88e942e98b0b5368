"""The rules offline synthesis and the daemon share, and the checks run before any work starts.

`ttsd synth`, `ttsd serve` and `ttsd-say` take text of at most `MAX_TEXT_CHARS` characters and
reference audio of at most `MAX_REFERENCE_AUDIO_S` seconds (each command can raise its own limit:
`--max-text-chars`, `--max-reference-audio-s`), and write the same output formats
(`output_format`: wav, flac, ogg, plus mp3 where this machine's libsndfile can encode it). The
checks here read file headers and touch the output path only: they run before a model is loaded
or a daemon is contacted, so a typo costs nothing. Standard library only; soundfile is imported
when a check needs it (clients have it from the `client` extra, the pipeline at run time)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Final

from .errors import AudioTooLong, BadAudio, ConfigError, TextTooLong

MAX_TEXT_CHARS: Final = 5_000            # characters per request (daemon: all incremental chunks together)
MAX_REFERENCE_AUDIO_S: Final = 30.0      # seconds per reference audio file (upstream itself uses the first 15 s)

# Output file extension → (libsndfile container, subtype). 16-bit PCM where the container holds PCM.
OUTPUT_FORMATS: Final = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
    ".mp3": ("MP3", "MPEG_LAYER_III"),  # only where libsndfile was built with LAME/mpg123 (>= 1.1.0)
}


def writable_formats() -> dict[str, tuple[str, str]]:
    """The OUTPUT_FORMATS this machine's libsndfile can write (mp3 depends on how it was built)."""
    import soundfile as sf

    return {ext: (fmt, sub) for ext, (fmt, sub) in OUTPUT_FORMATS.items() if sf.check_format(fmt, sub)}


def output_format(path: Path) -> tuple[str, str]:
    """(container, subtype) for an output file by its extension, or ConfigError naming the choices."""
    formats = writable_formats()
    ext = path.suffix.lower()
    if ext not in formats:
        choices = ", ".join(e.lstrip(".") for e in formats)
        why = "cannot be written by this machine's libsndfile" if ext in OUTPUT_FORMATS else "is not supported"
        raise ConfigError(f"{path}: output format {ext or '(no extension)'!r} {why}; use {choices}")
    return formats[ext]


def check_writable(path: Path) -> None:
    """ConfigError "cannot write PATH: reason" unless `path` can be created or overwritten.

    A new file is created and removed again: that is the only test that sees every reason (no such
    directory, permissions, a read-only file system, a name that is a directory)."""
    if path.is_dir():
        raise ConfigError(f"cannot write {path}: it is a directory")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise ConfigError(f"cannot write {path}: permission denied")
        return
    try:
        with path.open("xb"):
            pass
        path.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from None


def check_text(text: str, max_chars: int = MAX_TEXT_CHARS) -> None:
    """TextTooLong naming both numbers when `text` is over the limit."""
    if len(text) > max_chars:
        raise TextTooLong(f"text has {len(text)} characters; the limit is {max_chars}")


def reference_audio_seconds(src: Path | bytes, what: str) -> float:
    """A reference file's duration from its header alone (no decode). BadAudio if it is missing,
    cannot be read as audio, or holds no samples."""
    import soundfile as sf

    if isinstance(src, Path) and not src.is_file():
        raise BadAudio(f"no such file: {src}")
    try:
        info = sf.info(io.BytesIO(src) if isinstance(src, bytes) else str(src))
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError, OSError) as e:
        # libsndfile's message embeds the file name or a BytesIO repr; keep only its reason.
        raise BadAudio(f"cannot decode {what}: {str(e).rsplit(': ', 1)[-1]}") from None
    if info.samplerate <= 0 or info.frames <= 0:
        raise BadAudio(f"{what} holds no samples")
    return float(info.frames) / float(info.samplerate)


def check_reference_audio(src: Path | bytes, what: str, max_s: float = MAX_REFERENCE_AUDIO_S) -> float:
    """Duration of a reference file in seconds, or BadAudio / AudioTooLong (over `max_s`)."""
    seconds = reference_audio_seconds(src, what)
    if seconds > max_s:
        raise AudioTooLong(f"{what} is {seconds:.1f} s; the limit is {max_s:g} s")
    return seconds
