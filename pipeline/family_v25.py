"""IndexTTS-2.5 (infer_v2_5.py): tiktoken text with a `<|lang|> ` prefix and a language row per text
position, a CAMPPlus speaker prefix, no second GPT pass (EnhancedCodec decodes the codes alone into
content at twice their length) and `duration_factor` stretching the target.
Shapes: M codes, D GPT width, Cw w2v width."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ttsd.api.errors import BadOptions, ConfigError
from ttsd.api.options import LANGUAGES_25, SynthesisOptions

from . import convert
from .codec25 import UPSAMPLE, EnhancedCodec, load_codec25, target_lengths
from .family import Codec, Plan, register
from .gpt import CampplusVoice, GPTConfig, UnifiedVoice
from .requests import Segment
from .text import TextNormalizer
from .text.front25 import TextFrontEnd25, detect_language
from .text.tiktoken_tokenizer import TiktokenTokenizer


@dataclass(frozen=True, slots=True)
class IndexTTS25:
    name: str = "2.5"
    version: float = 2.5
    model_id: str = "indextts-2.5"
    languages: tuple[str, ...] = LANGUAGES_25
    second_pass: bool = False
    code_rate_hz: float = 25.0
    duration_control: bool = True
    s2mel_parts: tuple[str, ...] = convert.S2MEL_PARTS_V25
    official_tokenizer: str = convert.TIKTOKEN_NAME
    official_codec: str = "codec.pth"  # its own quantizer: MaskGCT's codec is not downloaded
    tokenizer_file: str = "tokenizer.tiktoken"  # the release's vocabulary, copied
    codec_file: str = "codec.safetensors"
    gpt_class: type[UnifiedVoice] = CampplusVoice

    def looks_like(self, root: Path) -> bool:
        return (root / "codec.pth").is_file() and any(root.glob("*.tiktoken")) and not (root / "bpe.model").is_file()

    def convert_plan(self, src: convert.SourceLayout) -> Plan:
        return convert.plan_v25(src)

    def check_gpt(self, cfg: GPTConfig) -> None:
        if cfg.campplus is None:
            raise ConfigError(f"config.yaml says version {self.name} but gpt.safetensors lacks spk_emb_proj")

    def load_front_end(self, ckpt: Path, normalizer: TextNormalizer, gpt_cfg: GPTConfig) -> TextFrontEnd25:
        path = ckpt / self.tokenizer_file
        front = TextFrontEnd25(tokenizer=TiktokenTokenizer.from_file(path), normalizer=normalizer,
                               max_text_tokens=gpt_cfg.max_text_tokens)
        vocab = front.tokenizer.vocab_size
        if vocab != gpt_cfg.number_text_tokens:
            raise ConfigError(f"{path}: {vocab} tokens but gpt.number_text_tokens is "
                              f"{gpt_cfg.number_text_tokens}")
        return front

    def load_codec(self, ckpt: Path, config: Mapping[str, Any], device: torch.device) -> EnhancedCodec:
        return load_codec25(ckpt, config, device)

    def load_gpt_layer(self, s2mel: Path, device: torch.device) -> None:
        return None  # infer_v2_5 builds MyModel without gpt_layer

    def check_parts(self, front: object, codec: Codec, gpt_layer: nn.Module | None) -> None:
        if not isinstance(front, TextFrontEnd25) or not isinstance(codec, EnhancedCodec) or gpt_layer is not None:
            raise ConfigError(f"parts of another model version given to an IndexTTS-{self.name} pipeline")

    def check_options(self, opts: SynthesisOptions) -> None:
        if opts.quick_streaming_tokens:
            raise BadOptions("quick_streaming_tokens is an IndexTTS-2 option; this daemon serves IndexTTS-2.5")
        if opts.lang is not None and opts.lang not in self.languages:
            raise BadOptions(f"lang must be one of {', '.join(self.languages)}, got {opts.lang!r}")

    def split_text(self, front: object, text: str, opts: SynthesisOptions) -> list[Segment]:
        assert isinstance(front, TextFrontEnd25)  # built by load_front_end; check_parts guards the rest
        plan = front.plan(text, opts.lang or detect_language(text), opts.max_text_tokens_per_segment)
        return [
            Segment(index=i, text_ids=list(ids), text=seg, lang_index=plan.lang_index)
            for i, (seg, ids) in enumerate(zip(plan.segments, plan.segment_ids, strict=True))
        ]

    def prefix(self, gpt: UnifiedVoice, speech_latent: Tensor, emovec: Tensor, segment: Segment) -> Tensor:
        # [1, 3 + L' + 2, D]: the language row is added to every text position
        return gpt.build_prefix(speech_latent, emovec, segment.text_ids, segment.lang_index)

    def mel_frames(self, codec: Codec, codes: int, opts: SynthesisOptions) -> int:
        return _codec(codec).frames(codes, opts.duration_factor)  # int(2M · 1.72 · duration_factor)

    def overlap_frames(self, codes: int, opts: SynthesisOptions) -> int:
        # The frames these codes' content becomes: two per code, then 1.72 mel frames each (and the
        # duration stretch), the same count `mel_frames` gives a segment of this many codes.
        return target_lengths(UPSAMPLE * codes, opts.duration_factor)

    def content(
        self, codec: Codec, gpt_layer: nn.Module | None, codes: Tensor, latent: Tensor | None, opts: SynthesisOptions
    ) -> tuple[Tensor, list[int]]:
        s_infer, frames = _codec(codec).content(codes, opts.duration_factor)  # [1, 2M, Cw], [1] on the host
        return s_infer, frames.tolist()

    def padded_content(self, codec: Codec, gpt_layer: nn.Module | None) -> Callable[[Tensor, Tensor], Tensor] | None:
        return None  # the content's length comes from durations the codec predicts per row


def _codec(codec: Codec) -> EnhancedCodec:
    assert isinstance(codec, EnhancedCodec)  # built by load_codec; check_parts guards the rest
    return codec


FAMILY = register(IndexTTS25())
