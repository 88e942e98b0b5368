"""IndexTTS-2.5 semantic codec (`EnhancedCodec`): 25 Hz GPT codes → 50 Hz content features S_infer.

Ports indextts/codec/models.py (`EnhancedCodec.decode`, the path infer_v2_5 runs once per
segment) and the `target_lengths` arithmetic of infer_v2_5. The codec is the MaskGCT RepCodec of
IndexTTS-2 (the same Vocos backbone and factorised residual VQ, reused from semantic_codec.py)
plus a stride-2 `down` conv before the encoder and a nearest ×2 upsample + `up` conv after the
decoder, so its codes run at half the w2v-BERT frame rate and decoding doubles the length again.
Keys are those of codec.pth's `model` dict (`down.*`, `up.*`, `encoder.*`, `decoder.*`,
`quantizer.*`); `down` and the encoder are declared for a strict load but never run (2.5 builds
its prompt from the continuous w2v-BERT features, not from codec codes).
Shapes: B batch, L codes (25 Hz), W hidden_size (the w2v-BERT width), T = 2L frames (50 Hz)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttsd.api.errors import ConfigError

from .config import require
from .layers import fold_weight_norm
from .length_regulator import MEL_FRAMES_PER_CODE
from .semantic_codec import ResidualVQ, SemanticCodecConfig, VocosBackbone
from .weights import load_module

UPSAMPLE = 2  # decode's nearest upsampling factor: hard-coded upstream whatever downsample_scale > 1 says
UP_KERNEL = 3  # `down` (stride 2) and `up` (stride 1) convs, padding 1


@dataclass(frozen=True, kw_only=True, slots=True)
class EnhancedCodecConfig:
    codebook_size: int  # semantic_codec.codebook_size
    hidden_size: int  # semantic_codec.hidden_size (W)
    codebook_dim: int  # semantic_codec.codebook_dim
    vocos_dim: int  # semantic_codec.vocos_dim
    vocos_intermediate_dim: int  # semantic_codec.vocos_intermediate_dim
    vocos_num_layers: int  # semantic_codec.vocos_num_layers
    num_quantizers: int  # semantic_codec.num_quantizers
    downsample_scale: int  # semantic_codec.downsample_scale (> 1: builds down/up)

    @classmethod
    def from_yaml(cls, config: Mapping[str, Any]) -> EnhancedCodecConfig:
        """Build from the parsed config.yaml (the whole document)."""
        where = "semantic_codec"
        raw = require(config, where, "")
        cfg = cls(
            codebook_size=int(require(raw, "codebook_size", where)),
            hidden_size=int(require(raw, "hidden_size", where)),
            codebook_dim=int(require(raw, "codebook_dim", where)),
            vocos_dim=int(require(raw, "vocos_dim", where)),
            vocos_intermediate_dim=int(require(raw, "vocos_intermediate_dim", where)),
            vocos_num_layers=int(require(raw, "vocos_num_layers", where)),
            num_quantizers=int(require(raw, "num_quantizers", where)),
            downsample_scale=int(require(raw, "downsample_scale", where)),
        )
        # With a scale of 1 upstream builds no `up` conv and its decode fails; 2.5 always uses 2.
        if cfg.downsample_scale <= 1:
            raise ConfigError(f"{where}.downsample_scale must be > 1 for the IndexTTS-2.5 codec")
        return cfg

    def blocks(self) -> SemanticCodecConfig:
        """The config of the RepCodec blocks (backbones, quantizer) this codec shares with IndexTTS-2's."""
        return SemanticCodecConfig(
            codebook_size=self.codebook_size,
            hidden_size=self.hidden_size,
            codebook_dim=self.codebook_dim,
            vocos_dim=self.vocos_dim,
            vocos_intermediate_dim=self.vocos_intermediate_dim,
            vocos_num_layers=self.vocos_num_layers,
            num_quantizers=self.num_quantizers,
        )


def target_lengths(frames: int, duration_factor: float = 1.0) -> int:
    """Mel frames for `frames` S_infer frames: int(frames · 1.72 · duration_factor) in Python
    float64, left to right and truncated, exactly as infer_v2_5 (96 for 56 frames, 120 at 1.25)."""
    return int(frames * MEL_FRAMES_PER_CODE * duration_factor)


class EnhancedCodec(nn.Module):
    def __init__(self, cfg: EnhancedCodecConfig) -> None:
        super().__init__()
        w, blocks = cfg.hidden_size, cfg.blocks()
        self.down = nn.Conv1d(w, w, UP_KERNEL, stride=2, padding=1)  # encoder side: unused at inference
        self.up = nn.Conv1d(w, w, UP_KERNEL, stride=1, padding=1)
        self.encoder = nn.Sequential(VocosBackbone(blocks), nn.Linear(cfg.vocos_dim, w))  # unused at inference
        self.decoder = nn.Sequential(VocosBackbone(blocks), nn.Linear(cfg.vocos_dim, w))
        self.quantizer = ResidualVQ(blocks)
        self.codebook_size = cfg.codebook_size  # K: valid codes are [0, K)

    def frames(self, codes: int, duration_factor: float = 1.0) -> int:
        """Target mel frames for `codes` codes (what `content` returns), computed on the host."""
        return target_lengths(UPSAMPLE * codes, duration_factor)

    def embed(self, codes: Tensor) -> Tensor:
        """GPT codes [B, L] → quantizer embeddings [B, W, L] (upstream `quantizer.vq2emb(codes[None])`)."""
        return self.quantizer.vq2emb(codes.unsqueeze(0))

    def upsample(self, h: Tensor) -> Tensor:
        """Decoder output [B, L, W] → nearest ×2 [B, W, 2L] (each code's frame repeated)."""
        return F.interpolate(h.transpose(1, 2), scale_factor=UPSAMPLE, mode="nearest")

    def decode(self, codes: Tensor) -> Tensor:
        """GPT codes [B, L] int64 (stop token trimmed) → S_infer [B, 2L, W] float32 (EnhancedCodec.decode)."""
        h = self.decoder(self.embed(codes))  # [B, L, W]: backbone over [B, W, L], then Linear
        return self.up(self.upsample(h)).transpose(1, 2)  # [B, 2L, W]

    def content(self, codes: Tensor, duration_factor: float = 1.0) -> tuple[Tensor, Tensor]:
        """One segment's codes [1, L] → (S_infer [1, 2L, W], target mel frames [1] int64 on the host) for the
        length regulator; `duration_factor` (0.5–2.0 upstream) stretches the target only."""
        s_infer = self.decode(codes)
        frames = target_lengths(s_infer.size(1), duration_factor)
        return s_infer, torch.tensor([frames], dtype=torch.long)  # on the host: a length, not device data

    def reference_features(self, spk_cond_emb: Tensor) -> Tensor:
        """The features the s2mel prompt is regulated from: IndexTTS-2.5 uses the normalised
        w2v-BERT features [B, T, W] themselves (infer_v2_5's `S_ref` is a second get_emb call)."""
        return spk_cond_emb

    def fold(self) -> None:
        """Fold the quantizer's weight-normed projections once (inference only; after the strict load)."""
        fold_weight_norm(self)


def load_codec25(ckpt_dir: Path, config: Mapping[str, Any], device: torch.device | str) -> EnhancedCodec:
    """EnhancedCodec from config.yaml (parsed) + codec.safetensors, projections folded."""
    cfg = EnhancedCodecConfig.from_yaml(config)
    codec = load_module(lambda: EnhancedCodec(cfg), Path(ckpt_dir) / "codec.safetensors", device)
    codec.fold()
    return codec
