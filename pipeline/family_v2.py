"""IndexTTS-2 (infer_v2.py): BPE text with zh/en detected, a perceiver speaker prefix, the MaskGCT
semantic codec, and a second GPT pass whose latent gpt_layer adds to the codec's embeddings.
Shapes: M codes, D GPT width, Cw w2v width."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ttsd.api.errors import BadOptions, BadText, ConfigError
from ttsd.api.options import SynthesisOptions

from . import convert
from .family import Codec, Plan, register
from .gpt import GPTConfig, PerceiverVoice, UnifiedVoice
from .length_regulator import MEL_FRAMES_PER_CODE, load_gpt_layer, mel_lengths
from .requests import Segment
from .semantic_codec import SemanticCodec, load_semantic_codec
from .text import TextNormalizer, TextTokenizer, split_segments


@dataclass(frozen=True, slots=True)
class IndexTTS2:
    name: str = "2"
    version: float = 2.0
    model_id: str = "indextts-2"
    languages: tuple[str, ...] = ("zh", "en")  # detected by the text front end, not chosen
    second_pass: bool = True
    code_rate_hz: float = 50.0
    duration_control: bool = False
    s2mel_parts: tuple[str, ...] = convert.S2MEL_PARTS
    official_tokenizer: str = "bpe.model"
    official_codec: str = "hf_cache/semantic_codec_model.safetensors"  # MaskGCT's, an auxiliary model
    tokenizer_file: str = "tokenizer.json"  # converted from bpe.model
    codec_file: str = "semantic_codec.safetensors"
    gpt_class: type[UnifiedVoice] = PerceiverVoice

    def looks_like(self, root: Path) -> bool:
        return (root / "bpe.model").is_file()

    def convert_plan(self, src: convert.SourceLayout) -> Plan:
        return convert.plan(src)

    def check_gpt(self, cfg: GPTConfig) -> None:
        if cfg.campplus is not None:
            raise ConfigError(f"config.yaml says version {self.name} but gpt.safetensors has spk_emb_proj")

    def load_front_end(self, ckpt: Path, normalizer: TextNormalizer, gpt_cfg: GPTConfig) -> TextTokenizer:
        return TextTokenizer.from_file(ckpt / self.tokenizer_file, normalizer)

    def load_codec(self, ckpt: Path, config: Mapping[str, Any], device: torch.device) -> SemanticCodec:
        return load_semantic_codec(ckpt, device)

    def load_gpt_layer(self, s2mel: Path, device: torch.device) -> nn.Module:
        return load_gpt_layer(s2mel, device)

    def check_parts(self, front: object, codec: Codec, gpt_layer: nn.Module | None) -> None:
        if not isinstance(front, TextTokenizer) or not isinstance(codec, SemanticCodec) or gpt_layer is None:
            raise ConfigError(f"parts of another model version given to an IndexTTS-{self.name} pipeline")

    def check_options(self, opts: SynthesisOptions) -> None:
        # Refused rather than ignored: the client would otherwise believe it had been applied.
        if opts.lang is not None:
            raise BadOptions("lang is an IndexTTS-2.5 option; this daemon serves IndexTTS-2 (zh and en, detected)")
        if opts.duration_factor != 1.0:
            raise BadOptions("duration_factor is an IndexTTS-2.5 option; this daemon serves IndexTTS-2")

    def split_text(self, front: object, text: str, opts: SynthesisOptions) -> list[Segment]:
        tok = _tokenizer(front)
        pieces = tok.tokenize(text)
        groups = split_segments(pieces, opts.max_text_tokens_per_segment, opts.quick_streaming_tokens)
        segments = [
            Segment(index=i, text_ids=tok.convert_tokens_to_ids(g), text=tok.decode(g))
            for i, g in enumerate(g for g in groups if g)
        ]
        if not segments:
            raise BadText("nothing to speak: the text is empty after normalisation")
        return segments

    def prefix(self, gpt: UnifiedVoice, speech_latent: Tensor, emovec: Tensor, segment: Segment) -> Tensor:
        return gpt.build_prefix(speech_latent, emovec, segment.text_ids)  # [1, 34 + L' + 2, D]

    def mel_frames(self, codec: Codec, codes: int, opts: SynthesisOptions) -> int:
        return int(mel_lengths(torch.tensor([codes]))[0])  # floor(1.72 M) in float32 as upstream

    def overlap_frames(self, codes: int, opts: SynthesisOptions) -> int:
        return int(codes * MEL_FRAMES_PER_CODE)  # upstream streaming.py: Python float, truncated

    def content(
        self, codec: Codec, gpt_layer: nn.Module | None, codes: Tensor, latent: Tensor | None, opts: SynthesisOptions
    ) -> tuple[Tensor, list[int]]:
        assert latent is not None and gpt_layer is not None  # IndexTTS-2 always has the second pass
        s_infer = _codec(codec).vq2emb(codes).transpose(1, 2) + gpt_layer(latent)  # [1, M, Cw]
        return s_infer, mel_lengths(torch.tensor([codes.size(1)])).tolist()

    def padded_content(self, codec: Codec, gpt_layer: nn.Module | None) -> Callable[[Tensor, Tensor], Tensor] | None:
        assert gpt_layer is not None  # IndexTTS-2 always has the second pass
        vq = _codec(codec)
        return lambda codes, latent: vq.vq2emb(codes).transpose(1, 2) + gpt_layer(latent)  # [B, M, Cw]


def _tokenizer(front: object) -> TextTokenizer:
    assert isinstance(front, TextTokenizer)  # built by load_front_end; check_parts guards the rest
    return front


def _codec(codec: Codec) -> SemanticCodec:
    assert isinstance(codec, SemanticCodec)
    return codec


FAMILY = register(IndexTTS2())
