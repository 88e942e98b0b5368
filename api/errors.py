"""The stable error codes and the errors a client can be told about. Standard library only.

`ErrorCode` is the one list of codes: the wire protocol (`ttsd.api.protocol`) re-exports it, and
every `TtsdError` subclass names its code from it. The daemon turns a `TtsdError` into a protocol
`Error` message carrying `code`; anything else is a bug and ends only the request that hit it,
with code `internal`. The errors that only loading a model can raise (checkpoints, the emotion
model's answers, a failed accelerator) are in `ttsd.pipeline.errors`. `missing_extra` names the
pyproject extra that installs a module an installation lacks (`pip install ttsd` has no torch)."""

from __future__ import annotations

from typing import ClassVar, Final


class ErrorCode:
    """Stable error codes carried by the protocol's `Error.code`; clients may switch on these strings."""

    BAD_FRAME: Final = "bad_frame"            # not a msgpack map in a binary frame (incl. invalid UTF-8)
    BAD_MESSAGE: Final = "bad_message"        # a known type with a missing, unknown or ill-typed field
    UNKNOWN_TYPE: Final = "unknown_type"      # `type` names no client message
    TOO_LARGE: Final = "too_large"            # frame over max_frame_bytes (connection closed with 1009)
    BAD_TEXT: Final = "bad_text"              # empty, or nothing speakable after normalisation
    TEXT_TOO_LONG: Final = "text_too_long"    # over max_text_chars for one request
    BAD_AUDIO: Final = "bad_audio"            # reference audio that cannot be decoded or is empty
    AUDIO_TOO_LONG: Final = "audio_too_long"  # reference audio over max_reference_audio_s
    UNKNOWN_VOICE: Final = "unknown_voice"    # voice id never registered, or evicted from the cache
    BUSY: Final = "busy"                      # the request queue is full; retry later
    CANCELLED: Final = "cancelled"            # the client cancelled the request
    SLOW_CONSUMER: Final = "slow_consumer"    # the client did not read its audio for stall_timeout_s
    UNAUTHORIZED: Final = "unauthorized"      # missing or wrong bearer token (HTTP 401 at the handshake)
    INTERNAL: Final = "internal"              # a server bug; the request ended, the connection lives
    SHUTTING_DOWN: Final = "shutting_down"    # the daemon is draining and takes no new work
    # Raised while starting up (loading weights, reading config); never sent to a client.
    CHECKPOINT: Final = "checkpoint"
    CONFIG: Final = "config"

    ALL: ClassVar[frozenset[str]] = frozenset(
        {
            BAD_FRAME, BAD_MESSAGE, UNKNOWN_TYPE, TOO_LARGE, BAD_TEXT, TEXT_TOO_LONG, BAD_AUDIO,
            AUDIO_TOO_LONG, UNKNOWN_VOICE, BUSY, CANCELLED, SLOW_CONSUMER, UNAUTHORIZED, INTERNAL,
            SHUTTING_DOWN,
        }
    )  # the codes that travel on the wire


class TtsdError(Exception):
    code: ClassVar[str] = ErrorCode.INTERNAL


class ConfigError(TtsdError):
    """A config file lacks a key or holds a value of the wrong type."""

    code = ErrorCode.CONFIG


class BadAudio(TtsdError):
    """Reference audio that cannot be decoded, is empty, or is too long."""

    code = ErrorCode.BAD_AUDIO


class AudioTooLong(TtsdError):
    """Reference audio over the daemon's max_reference_audio_s."""

    code = ErrorCode.AUDIO_TOO_LONG


class BadText(TtsdError):
    """Text that is empty after normalisation or otherwise cannot be spoken."""

    code = ErrorCode.BAD_TEXT


class TextTooLong(TtsdError):
    """Text over the max_text_chars limit."""

    code = ErrorCode.TEXT_TOO_LONG


class BadOptions(TtsdError):
    """A synthesis option outside its valid range (the protocol's `bad_message`: an ill-ranged field)."""

    code = ErrorCode.BAD_MESSAGE


class UnknownVoice(TtsdError):
    """A voice id that was never registered, or was evicted from the voice cache."""

    code = ErrorCode.UNKNOWN_VOICE


class Busy(TtsdError):
    """The queue is full: max_concurrent_requests are running and max_queued_requests wait."""

    code = ErrorCode.BUSY


class ShuttingDown(TtsdError):
    """The daemon is draining and takes no new work."""

    code = ErrorCode.SHUTTING_DOWN


class Cancelled(TtsdError):
    """The request was cancelled by its client (or the client went away)."""

    code = ErrorCode.CANCELLED


# Optional modules → the extra of pyproject.toml that installs them.
EXTRAS: Final = {
    "torch": "server",           # the model: ttsd serve, ttsd synth and everything else but ttsd-say
    "safetensors": "server",
    "tokenizers": "server",
    "tiktoken": "server",
    "kaldifst": "server",
    "yaml": "server",            # pyyaml, which the checkpoints' config.yaml is read with
    "soxr": "server",
    "prometheus_client": "server",
    "jinja2": "server",
    "sentencepiece": "convert",  # bpe.model → tokenizer.json (ttsd-convert, ttsd fetch, make-tiny)
    "google": "convert",         # protobuf, which sentencepiece reads its model with
    "tqdm": "convert",           # progress bars of ttsd-convert, ttsd fetch and make-tiny
    "huggingface_hub": "fetch",  # ttsd fetch downloads
    "sounddevice": "client",     # ttsd-say live playback
}


def missing_extra(e: ModuleNotFoundError) -> str | None:
    """One line naming the extra that installs the module `e` could not import; None if none does."""
    extra = EXTRAS.get((e.name or "").split(".")[0])
    if extra is None:
        return None
    return f"needs the '{extra}' extra ({e.name} is not installed): pip install 'ttsd[{extra}]'"
