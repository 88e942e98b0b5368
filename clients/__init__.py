"""ttsd clients: the asyncio client library (`Client`, `SyncClient`) and ttsd-say.

Importing this package needs only websockets and msgpack; playback (sounddevice) and file
output (soundfile) are imported by ttsd-say when used."""

from .client import (
    ERRORS,
    AudioTooLong,
    BadAudio,
    BadFrame,
    BadMessage,
    BadText,
    Busy,
    Cancelled,
    Client,
    ClientError,
    ConnectError,
    ConnectionLost,
    Internal,
    ServerError,
    ShuttingDown,
    SlowConsumer,
    SyncClient,
    SyncSynthesis,
    Synthesis,
    TextTooLong,
    TooLarge,
    Unauthorized,
    UnknownType,
    UnknownVoice,
    synthesize,
)

__all__ = [
    "Client", "SyncClient", "Synthesis", "SyncSynthesis", "synthesize", "ERRORS",
    "ClientError", "ConnectError", "ConnectionLost", "ServerError",
    "BadFrame", "BadMessage", "UnknownType", "TooLarge", "BadText", "TextTooLong", "BadAudio",
    "AudioTooLong", "UnknownVoice", "Busy", "Cancelled", "SlowConsumer", "Unauthorized", "Internal",
    "ShuttingDown",
]
