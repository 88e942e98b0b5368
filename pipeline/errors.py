"""The errors only the model side raises: checkpoints that do not load, the emotion model's
unreadable answers, a failed accelerator. Their codes come from `ttsd.api.errors.ErrorCode`; the
errors a client can be told about live there too."""

from __future__ import annotations

from pathlib import Path

from ttsd.api.errors import ErrorCode, TtsdError


class CheckpointError(TtsdError):
    """A checkpoint file is absent, unreadable, truncated or inconsistent with the config."""

    code = ErrorCode.CHECKPOINT


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


class EmotionTextError(TtsdError):
    """QwenEmotion's answer to an emotion text cannot be read as emotion weights (upstream raises too).
    Greedy decoding makes the answer a function of the text, so retrying the same text cannot help:
    to a client this is a property of its text."""

    code = ErrorCode.BAD_TEXT


class EmotionScoreError(EmotionTextError, ValueError):
    """A score that float() refuses: upstream's ValueError (clamp_score's message, or float()'s own)."""


class EmotionAnswerError(EmotionTextError, AttributeError):
    """A melancholic text whose answer is not a JSON object: upstream's AttributeError from `.get`."""


class VoiceFileError(TtsdError):
    """Stored voice conditioning (a voice library entry) that cannot be read back: truncated, not
    safetensors, a tensor missing or mis-shaped, or bytes that no longer match their checksum."""

    code = ErrorCode.INTERNAL


class DeviceFault(TtsdError):
    """The accelerator failed in a way that leaves it unusable (a CUDA device-side assert, an illegal
    address, a hang): every later request would fail too, so the daemon must restart."""

    code = ErrorCode.INTERNAL
