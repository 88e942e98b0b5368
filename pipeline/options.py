"""Per-request synthesis options with upstream IndexTTS2 defaults, and their validation.

Defaults follow `IndexTTS2.infer` (infer_v2.py): sampling with 3 beams, top-k 30, top-p 0.8,
temperature 0.8, repetition penalty 10, 1500 codes at most, 25 Euler steps, CFG rate 0.7,
segments of at most 120 text tokens, 200 ms of silence between segments."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Self

from .errors import BadOptions

# Upstream category order of the 8-dim emotion vector (infer_v2.py, QwenEmotion.cn_key_to_en).
EMOTIONS = ("happy", "angry", "sad", "afraid", "disgusted", "melancholic", "surprised", "calm")


@dataclass(frozen=True, kw_only=True, slots=True)
class SynthesisOptions:
    emo_alpha: float = 1.0  # emotion strength (audio: interpolation; vector: scale)
    emo_vector: tuple[float, ...] | None = None  # 8 weights in EMOTIONS order
    use_random: bool = False  # random emotion-matrix rows instead of nearest style
    do_sample: bool = True  # False: greedy / plain beam search
    temperature: float = 0.8
    top_k: int = 30  # 0 disables
    top_p: float = 0.8  # 1.0 disables
    num_beams: int = 3
    repetition_penalty: float = 10.0
    max_mel_tokens: int = 1500  # semantic codes per segment (50 per audio second)
    diffusion_steps: int = 25
    inference_cfg_rate: float = 0.7
    max_text_tokens_per_segment: int = 120
    quick_streaming_tokens: int = 0
    interval_silence_ms: int = 200  # zeros between segments in offline output
    seed: int | None = None  # seeds GPT sampling and CFM noise per segment

    def validated(self, max_mel_tokens_limit: int | None = None) -> Self:
        """Return self if every field is in range, else raise BadOptions naming the field."""
        checks: list[tuple[bool, str]] = [
            (0.0 <= self.emo_alpha <= 2.0, "emo_alpha must be in [0, 2]"),
            (self.temperature > 0.0, "temperature must be > 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (1 <= self.num_beams <= 16, "num_beams must be in [1, 16]"),
            (self.repetition_penalty > 0.0, "repetition_penalty must be > 0"),
            (self.max_mel_tokens >= 1, "max_mel_tokens must be >= 1"),
            (1 <= self.diffusion_steps <= 200, "diffusion_steps must be in [1, 200]"),
            (0.0 <= self.inference_cfg_rate <= 10.0, "inference_cfg_rate must be in [0, 10]"),
            (self.max_text_tokens_per_segment >= 2, "max_text_tokens_per_segment must be >= 2"),
            (self.quick_streaming_tokens >= 0, "quick_streaming_tokens must be >= 0"),
            (0 <= self.interval_silence_ms <= 10_000, "interval_silence_ms must be in [0, 10000]"),
            (self.seed is None or 0 <= self.seed < 2**63, "seed must be in [0, 2^63)"),
        ]
        if max_mel_tokens_limit is not None:
            checks.append(
                (self.max_mel_tokens <= max_mel_tokens_limit, f"max_mel_tokens must be <= {max_mel_tokens_limit}")
            )
        if self.emo_vector is not None:
            checks.append((len(self.emo_vector) == len(EMOTIONS), f"emo_vector needs {len(EMOTIONS)} weights"))
            checks.append((all(0.0 <= w <= 1.2 for w in self.emo_vector), "emo_vector weights must be in [0, 1.2]"))
        for ok, message in checks:
            if not ok:
                raise BadOptions(message)
        return self

    def with_seed(self, seed: int) -> Self:
        return replace(self, seed=seed)
