"""The one float → int16 conversion: upstream's truncation, and no undefined casts."""

from __future__ import annotations

import numpy as np

from ttsd.api.pcm import to_int16, to_s16le


def test_truncates_toward_zero_and_clamps_like_upstream() -> None:
    """Values truncate toward zero and clamp to ±32767, as upstream's clamp + int16 cast."""
    x = np.array([0.9, -0.9, 1.5, -1.5, 32766.7, 40000.0, -40000.0], dtype=np.float32)
    assert to_int16(x).tolist() == [0, 0, 1, -1, 32766, 32767, -32767]


def test_non_finite_samples_never_reach_the_cast() -> None:
    """NaN becomes silence and ±inf the clamp bound, instead of whatever the platform's cast gives."""
    x = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30], dtype=np.float32)
    assert to_int16(x).tolist() == [0, 32767, -32767, 32767, -32767]


def test_s16le_puts_the_leading_silence_first() -> None:
    """to_s16le writes little-endian int16 after the requested number of zero samples."""
    data = to_s16le(np.array([1.0, -2.0], dtype=np.float32), leading_silence_samples=2)
    assert data == np.array([0, 0, 1, -2], dtype="<i2").tobytes()
