"""The ttsd exception hierarchy. Every error a caller can act on has a stable `code`.

The daemon turns a `TtsdError` into a protocol `Error` message carrying `code`; anything else is
a bug and ends only the request that hit it, with code `internal`."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar


class TtsdError(Exception):
    code: ClassVar[str] = "internal"


class CheckpointError(TtsdError):
    """A checkpoint file is absent, unreadable, truncated or inconsistent with the config."""

    code = "checkpoint"


class CheckpointMismatch(CheckpointError):
    """A state dict does not match the module built from the config: lists every bad key."""

    def __init__(
        self,
        path: Path | str,
        missing: list[str],
        unexpected: list[str],
        misshaped: list[str],
    ) -> None:
        self.path = str(path)
        self.missing = missing
        self.unexpected = unexpected
        self.misshaped = misshaped
        lines = [f"checkpoint {self.path} does not match the model:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                lines.append(f"  {title} ({len(keys)}):")
                lines.extend(f"    {k}" for k in keys)
        super().__init__("\n".join(lines))


class ConfigError(TtsdError):
    """A config file lacks a key or holds a value of the wrong type."""

    code = "config"


class BadAudio(TtsdError):
    """Reference audio that cannot be decoded, is empty, or is too long."""

    code = "bad_audio"


class BadText(TtsdError):
    """Text that is empty after normalisation or otherwise cannot be spoken."""

    code = "bad_text"


class Cancelled(TtsdError):
    """The request was cancelled by its client (or the client went away)."""

    code = "cancelled"
