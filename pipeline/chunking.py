"""Chunked streaming inside a segment: which codes each chunk renders, and how chunk waveforms join.

Follows upstream's TensorRT streaming decoder (index-tts backends/trt/pipeline/streaming.py and
`generate_chunks` in backends/trt/runtime/gpt_trtllm_runtime.py): chunk k renders codes
[start_k, end_k) through the whole acoustic stage (with the voice's prompt, as a segment would), each
chunk after the first repeats the last `overlap` codes of the one before, and consecutive waveforms
are joined by a Hann crossfade over the audio of those codes; the end of a chunked segment fades out
over 512 samples. ttsd adds a first chunk of its own size (`first_chunk_codes`), so the first audio
comes early while later chunks stay long. A segment that ends inside its first chunk is rendered
whole, exactly as without chunking (no fade: it is the unchunked waveform).
Shapes: N samples, M codes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

FADE_OUT_SAMPLES = 512  # upstream _fade_out_tail: a linear ramp to 0 over the last 512 samples of a stream


@dataclass(frozen=True, kw_only=True, slots=True)
class ChunkPlan:
    """Chunk boundaries in codes: chunk 0 is [0, first), each next one starts `overlap` codes before
    the end of the one before and holds `size` codes (the last one: whatever the segment has left)."""

    size: int  # chunk_codes
    overlap: int  # chunk_overlap
    first: int  # first_chunk_codes, or chunk_codes when that is 0

    @classmethod
    def from_options(cls, chunk_codes: int, chunk_overlap: int, first_chunk_codes: int) -> ChunkPlan | None:
        """None when chunking is off (chunk_codes 0); the options were checked together (chunking_problem)."""
        if chunk_codes <= 0:
            return None
        return cls(size=chunk_codes, overlap=chunk_overlap, first=first_chunk_codes or chunk_codes)

    def end(self, k: int) -> int:
        """One past the last code of chunk k (when the segment is long enough to fill it)."""
        return self.first + k * (self.size - self.overlap)

    def start(self, k: int) -> int:
        return 0 if k == 0 else self.end(k) - self.size

    def spans(self, committed: int, total: int | None, done: int) -> list[tuple[int, int, bool]]:
        """The chunks that can be rendered now, after the `done` already taken: (start, end, last) for
        every chunk k ≥ done whose codes are all committed; with `total` (decoding finished, M codes),
        also the final, shorter chunk, marked last. A segment that ends inside chunk 0 is one chunk,
        [0, M). When M is exactly the end of a chunk already taken, no chunk is left (the joiner's
        `finish` ends the segment)."""
        out: list[tuple[int, int, bool]] = []
        k = done
        while True:
            s, e = self.start(k), self.end(k)
            if total is not None and k > 0 and total <= self.end(k - 1):
                break  # the chunk before ended with the segment: nothing new is left to render
            if total is not None and e >= total:
                out.append((s, total, True))
                break
            if e > committed:
                break
            out.append((s, e, False))
            k += 1
        return out


@dataclass(eq=False)
class SecondPass:
    """The second GPT pass of one chunked segment, extended as its codes are committed
    (Pipeline.chunk_latent). The pass is causal: the latent of a code depends only on the inputs before
    it, so rows computed for an earlier chunk stay valid and later chunks feed only the new codes."""

    kv: Tensor | None = None  # [L, 2, 1, H, S_cap, Dh] keys and values of every position fed
    fed: int = 0  # cache slots written: conditioning + text, then one per latent row
    rows: Tensor | None = None  # [1, n, D] float32 latent rows computed so far


@dataclass(frozen=True, slots=True)
class ChunkInput:
    """What the acoustic stage needs to render chunk `index` of a segment instead of the whole of it."""

    index: int  # chunk number within its segment (0 = first)
    start: int  # its first code within the segment
    prefix_codes: Tensor  # [1, end] every code of the segment up to the chunk's end, on the device
    second_pass: SecondPass  # the segment's incremental latent (unused without a second pass)


def overlap_samples(overlap_frames: int, hop_length: int) -> int:
    """Samples the crossfade spans: the overlap codes' mel frames (the family's count) × the hop."""
    return overlap_frames * hop_length


class ChunkJoiner:
    """Joins one segment's chunk waveforms in order into a gapless stream (upstream StreamingDecoder,
    per sample): each chunk but the last keeps back its last `overlap` samples, which the next chunk's
    first `overlap` samples crossfade into (Hann halves); the stream ends with a 512-sample fade-out.
    Samples are float32 at whatever scale the chunks have (the blend is linear)."""

    def __init__(self, overlap: int) -> None:
        self.overlap = overlap
        self.tail: np.ndarray | None = None  # held back from the previous chunk
        self.chunks = 0

    def push(self, audio: np.ndarray, last: bool) -> np.ndarray:
        """The next chunk's waveform (N,) → the float32 samples that can go out now. Blends and fades
        are computed in float64, as upstream's NumPy code does, and rounded once."""
        n = self.overlap
        self.chunks += 1
        if self.tail is None:
            if last:
                return _fade_out(audio)
            split = len(audio) - n
            self.tail = audio[split:]
            return audio[:split]
        blended = _crossfade(self.tail, audio[:n])  # float64
        rest = audio[n:]
        if last:
            self.tail = None
            return _fade_out(np.concatenate([blended, rest]))
        split = len(rest) - n
        self.tail = rest[split:]
        return np.concatenate([blended, rest[:split]]).astype(np.float32)

    def finish(self) -> np.ndarray:
        """The held-back tail, faded out, when the last chunk was pushed without `last` (upstream's flush)."""
        tail, self.tail = self.tail, None
        return np.zeros(0, dtype=np.float32) if tail is None else _fade_out(tail)


def _crossfade(tail: np.ndarray, head: np.ndarray) -> np.ndarray:
    n = min(len(tail), len(head))
    window = np.hanning(2 * n)  # rising half fades the new chunk in, falling half the old one out
    return tail[:n] * window[n:] + head[:n] * window[:n]


def _fade_out(audio: np.ndarray) -> np.ndarray:
    if len(audio) <= FADE_OUT_SAMPLES:
        return audio.astype(np.float32)  # upstream leaves a stream this short as it is
    out = audio.astype(np.float64)
    out[-FADE_OUT_SAMPLES:] *= np.linspace(1.0, 0.0, FADE_OUT_SAMPLES)
    return out.astype(np.float32)
