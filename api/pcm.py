"""Float PCM → 16-bit PCM, in one place. NumPy only (the daemon and clients use it without torch).

The pipeline produces float samples at ±32767 scale (upstream's `wav * 32767`, clamped); the
one conversion to int16 truncates toward zero as upstream's `wav.type(torch.int16)` does. NaN and
±inf never reach the cast (its result would be undefined): NaN becomes 0, ±inf the clamp bound."""

from __future__ import annotations

import numpy as np

PCM_MAX = 32767.0  # upstream clamps to ±32767 (not −32768) before the cast


def to_int16(samples: np.ndarray) -> np.ndarray:
    """Float samples at ±32767 scale (1-D) → int16, truncated toward zero; NaN → 0, ±inf → ±32767."""
    x = np.nan_to_num(np.asarray(samples, dtype=np.float32), nan=0.0, posinf=PCM_MAX, neginf=-PCM_MAX)
    return np.clip(x, -PCM_MAX, PCM_MAX).astype(np.int16)


def to_s16le(samples: np.ndarray, leading_silence_samples: int = 0) -> bytes:
    """Float samples at ±32767 scale → s16le bytes, after `leading_silence_samples` zeros."""
    out = np.zeros(leading_silence_samples + samples.shape[0], dtype="<i2")
    out[leading_silence_samples:] = to_int16(samples)
    return out.tobytes()
