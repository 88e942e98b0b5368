"""Streaming audio encoders for the OpenAI-compatible HTTP API's `response_format`s.

An encoder takes the daemon's s16le mono PCM at 22.05 kHz one segment at a time: `encode(pcm)`
returns the bytes that can be sent now, `finish()` the rest. Nothing waits for the end of the
request, so audio streams out as segments finish.

    wav   RIFF, PCM s16le, 22.05 kHz; sizes 0xFFFFFFFF ("until the end"), as a streamed WAV must have
    pcm   raw s16le mono at 24 kHz: OpenAI's pcm rate, so clients that assume it play at the right speed
    flac  FLAC, 22.05 kHz; STREAMINFO without length or MD5 ("unknown"), as any streamed FLAC
    mp3   MPEG-2 layer III (LAME), 22.05 kHz; starts with LAME's empty info frame (26 ms of silence)
    opus  Ogg Opus at 24 kHz (Opus takes only 8/12/16/24/48 kHz)

libsndfile rewrites header fields when a file is closed (FLAC's STREAMINFO, MP3's info frame). Those
bytes are sent long before, so `_Spool` drops writes at offsets already taken: what a client gets
is the stream as first written, which is what a streamed file of each format looks like. `aac`
has no encoder in libsndfile. Which formats this installation can write is checked at import
(`FORMATS`); mp3 needs a libsndfile built with LAME (the soundfile wheels are)."""

from __future__ import annotations

import struct
from typing import Final, Protocol

import numpy as np

from ttsd.api.protocol import SAMPLE_RATE_HZ

OPENAI_PCM_RATE_HZ: Final = 24_000      # OpenAI's `pcm` and the nearest rate Opus accepts
WAV_UNKNOWN_SIZE: Final = 0xFFFF_FFFF   # RIFF and data sizes of a WAV whose length is not known yet


class Encoder(Protocol):
    def encode(self, pcm: bytes) -> bytes:
        """s16le mono at SAMPLE_RATE_HZ → bytes to send now (maybe none: the codec buffers)."""

    def finish(self) -> bytes:
        """The last bytes of the stream; the encoder is closed afterwards."""


class _Resampler:
    """22.05 kHz → `rate_hz`, stateful across calls so segment joins are seamless (soxr, HQ)."""

    def __init__(self, rate_hz: int) -> None:
        import soxr

        self.stream = soxr.ResampleStream(SAMPLE_RATE_HZ, rate_hz, 1, dtype="int16")

    def __call__(self, pcm: bytes, last: bool = False) -> np.ndarray:
        x = np.frombuffer(pcm, dtype="<i2")
        return np.asarray(self.stream.resample_chunk(x, last=last), dtype="<i2")


class WavEncoder:
    def __init__(self) -> None:
        self.header_sent = False

    def encode(self, pcm: bytes) -> bytes:
        if self.header_sent:
            return pcm
        self.header_sent = True
        return wav_header(SAMPLE_RATE_HZ) + pcm

    def finish(self) -> bytes:
        return b"" if self.header_sent else wav_header(SAMPLE_RATE_HZ)


def wav_header(rate_hz: int) -> bytes:
    """The 44-byte header of a mono s16le WAV of unknown length."""
    block = 2  # bytes per frame: one 16-bit channel
    fmt = struct.pack("<HHIIHH", 1, 1, rate_hz, rate_hz * block, block, 16)  # PCM, mono
    return (
        b"RIFF" + struct.pack("<I", WAV_UNKNOWN_SIZE) + b"WAVE"
        + b"fmt " + struct.pack("<I", len(fmt)) + fmt
        + b"data" + struct.pack("<I", WAV_UNKNOWN_SIZE)
    )


class PcmEncoder:
    def __init__(self) -> None:
        self.resample = _Resampler(OPENAI_PCM_RATE_HZ)

    def encode(self, pcm: bytes) -> bytes:
        return self.resample(pcm).tobytes()

    def finish(self) -> bytes:
        return self.resample(b"", last=True).tobytes()


class _Spool:
    """The file libsndfile writes into: new bytes wait in `pending` until taken; a write at an
    offset already taken (a header rewritten at close) is dropped, since it has been sent."""

    def __init__(self) -> None:
        self.pending = bytearray()
        self.end = 0        # bytes written so far (taken or pending)
        self.pos = 0

    def write(self, data: bytes) -> int:
        n = len(data)
        if self.pos + n > self.end:
            skip = max(0, self.end - self.pos)
            self.pending += b"\0" * max(0, self.pos - self.end) + bytes(data[skip:])
            self.end = self.pos + n
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset + (0, self.pos, self.end)[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, size: int = -1) -> bytes:
        return b""  # write-only: libsndfile opens it with mode "w" and never reads back

    def take(self) -> bytes:
        out = bytes(self.pending)
        self.pending.clear()
        return out


class SoundFileEncoder:
    def __init__(self, format: str, subtype: str, rate_hz: int) -> None:
        import soundfile as sf

        self.spool = _Spool()
        self.file = sf.SoundFile(self.spool, "w", samplerate=rate_hz, channels=1, format=format, subtype=subtype)
        self.resample = _Resampler(rate_hz) if rate_hz != SAMPLE_RATE_HZ else None

    def encode(self, pcm: bytes) -> bytes:
        x = np.frombuffer(pcm, dtype="<i2") if self.resample is None else self.resample(pcm)
        if len(x):
            self.file.write(x)
        return self.spool.take()

    def finish(self) -> bytes:
        if self.resample is not None:
            tail = self.resample(b"", last=True)
            if len(tail):
                self.file.write(tail)
        self.file.close()
        return self.spool.take()


def _soundfile_formats() -> dict[str, tuple[str, str, int]]:
    """The formats this libsndfile can write: name → (format, subtype, rate)."""
    import soundfile as sf

    wanted = {
        "flac": ("FLAC", "PCM_16", SAMPLE_RATE_HZ),
        "mp3": ("MP3", "MPEG_LAYER_III", SAMPLE_RATE_HZ),
        "opus": ("OGG", "OPUS", OPENAI_PCM_RATE_HZ),
    }
    return {
        name: spec for name, spec in wanted.items()
        if spec[0] in sf.available_formats() and spec[1] in sf.available_subtypes(spec[0])
    }


_SOUNDFILE: Final = _soundfile_formats()
CONTENT_TYPES: Final = {
    "wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg", "opus": "audio/ogg",
}
FORMATS: Final = ("wav", "pcm", *_SOUNDFILE)   # what `new_encoder` can make here
OPENAI_FORMATS: Final = ("mp3", "opus", "aac", "flac", "wav", "pcm")


def new_encoder(name: str) -> Encoder:
    """An encoder for a name in FORMATS (KeyError otherwise)."""
    if name == "wav":
        return WavEncoder()
    if name == "pcm":
        return PcmEncoder()
    return SoundFileEncoder(*_SOUNDFILE[name])


def is_cheap(name: str) -> bool:
    """wav costs a header: it is made on the event loop; resampling and codecs run in a thread."""
    return name == "wav"
