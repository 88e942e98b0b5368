"""MaskGCT semantic codec (RepCodec): normalised w2v-BERT features → semantic codes and embeddings.

Ports indextts/utils/maskgct/models/codec/kmeans/repcodec_model.py (`RepCodec`), its
`VocosBackbone` / `ConvNeXtBlock` (codec/amphion_codec/vocos.py) and `ResidualVQ` /
`FactorizedVectorQuantize` (codec/amphion_codec/quantize/). IndexTTS2 uses `quantize` once per
speaker prompt (S_ref) and `quantizer.vq2emb` once per segment (GPT codes → content features).
Keys are those of `semantic_codec.safetensors` (`encoder.*`, `decoder.*`, `quantizer.*`); the
decoder is declared for a strict load but never runs.
Shapes: B batch, T frames (50 Hz), D hidden_size, V vocos_dim, I vocos_intermediate_dim,
Q codebook_dim, K codebook_size."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from ttsd.api.errors import ConfigError

from .config import require
from .layers import WNConv1d, fold_weight_norm
from .weights import load_module

VOCOS_KERNEL = 7          # embed and depthwise conv taps (VocosBackbone / ConvNeXtBlock)
VOCOS_LN_EPS = 1e-6       # every LayerNorm of the Vocos backbone


@dataclass(frozen=True, kw_only=True, slots=True)
class SemanticCodecConfig:
    codebook_size: int            # semantic_codec.codebook_size (K)
    hidden_size: int              # semantic_codec.hidden_size (D, the w2v-BERT width)
    codebook_dim: int             # semantic_codec.codebook_dim (Q)
    vocos_dim: int                # semantic_codec.vocos_dim (V)
    vocos_intermediate_dim: int   # semantic_codec.vocos_intermediate_dim (I)
    vocos_num_layers: int         # semantic_codec.vocos_num_layers
    num_quantizers: int           # semantic_codec.num_quantizers (absent in IndexTTS2: RepCodec default 1)

    @classmethod
    def from_yaml(cls, config: Mapping[str, Any]) -> SemanticCodecConfig:
        """Build from the parsed config.yaml (the whole document)."""
        where = "semantic_codec"
        raw = require(config, where, "")
        # RepCodec reads these two with hasattr() and falls back to its class defaults (1, 1).
        if int(raw.get("downsample_scale", 1)) > 1:
            raise ConfigError(f"{where}.downsample_scale > 1 (the IndexTTS-2.5 codec) is not supported")
        return cls(
            codebook_size=int(require(raw, "codebook_size", where)),
            hidden_size=int(require(raw, "hidden_size", where)),
            codebook_dim=int(require(raw, "codebook_dim", where)),
            vocos_dim=int(require(raw, "vocos_dim", where)),
            vocos_intermediate_dim=int(require(raw, "vocos_intermediate_dim", where)),
            vocos_num_layers=int(require(raw, "vocos_num_layers", where)),
            num_quantizers=int(raw.get("num_quantizers", 1)),
        )


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, intermediate_dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, VOCOS_KERNEL, padding=VOCOS_KERNEL // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=VOCOS_LN_EPS)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.empty(dim))  # learned layer scale

    def forward(self, x: Tensor) -> Tensor:  # [B, V, T] -> [B, V, T]
        y = self.norm(self.dwconv(x).transpose(1, 2))  # [B, T, V]
        y = self.pwconv2(F.gelu(self.pwconv1(y)))  # exact (erf) GELU
        return x + (self.gamma * y).transpose(1, 2)


class VocosBackbone(nn.Module):
    """(B, C_in, T) → (B, T, V): conv embed, LayerNorm, ConvNeXt blocks, final LayerNorm (no AdaLN)."""

    def __init__(self, cfg: SemanticCodecConfig) -> None:
        super().__init__()
        v = cfg.vocos_dim
        self.embed = nn.Conv1d(cfg.hidden_size, v, VOCOS_KERNEL, padding=VOCOS_KERNEL // 2)
        self.norm = nn.LayerNorm(v, eps=VOCOS_LN_EPS)
        self.convnext = nn.ModuleList(
            ConvNeXtBlock(v, cfg.vocos_intermediate_dim) for _ in range(cfg.vocos_num_layers)
        )
        self.final_layer_norm = nn.LayerNorm(v, eps=VOCOS_LN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.embed(x).transpose(1, 2)).transpose(1, 2)  # [B, V, T]
        for block in self.convnext:
            x = block(x)
        return self.final_layer_norm(x.transpose(1, 2))  # [B, T, V]


class FactorizedVectorQuantize(nn.Module):
    """Project D → Q, pick the codebook row of highest cosine similarity, project the raw row back."""

    def __init__(self, cfg: SemanticCodecConfig) -> None:
        super().__init__()
        # weight_norm(Conv1d k=1): keys in_project.weight_g (Q,1,1) / weight_v (Q,D,1) / bias
        self.in_project = WNConv1d(cfg.hidden_size, cfg.codebook_dim, 1)
        self.out_project = WNConv1d(cfg.codebook_dim, cfg.hidden_size, 1)
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.codebook_dim)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z (B, D, T) → (quantized (B, D, T), indices (B, T) int64)."""
        z_e = self.in_project(z)  # [B, Q, T]
        b, q, t = z_e.shape
        e = F.normalize(z_e.transpose(1, 2).reshape(b * t, q))  # [B·T, Q]
        c = F.normalize(self.codebook.weight)  # [K, Q]
        # The distance form of upstream, not e·c: near-ties must resolve the same way.
        dist = e.pow(2).sum(1, keepdim=True) - 2 * e @ c.t() + c.pow(2).sum(1, keepdim=True).t()  # [B·T, K]
        indices = (-dist).max(1)[1].view(b, t)
        z_q = self.codebook(indices).transpose(1, 2)  # [B, Q, T]: the raw, un-normalised rows
        z_q = z_e + (z_q - z_e)  # upstream's straight-through sum, kept for its float rounding
        return self.out_project(z_q), indices

    def vq2emb(self, codes: Tensor) -> Tensor:
        """codes (B, T) int → (B, D, T): raw codebook rows through out_project."""
        return self.out_project(self.codebook(codes).transpose(1, 2))


class ResidualVQ(nn.Module):
    def __init__(self, cfg: SemanticCodecConfig) -> None:
        super().__init__()
        self.quantizers = nn.ModuleList(FactorizedVectorQuantize(cfg) for _ in range(cfg.num_quantizers))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z (B, D, T) → (sum of quantized (B, D, T), indices (N_q, B, T))."""
        out = torch.zeros_like(z)
        residual = z
        all_indices = []
        for quantizer in self.quantizers:
            z_q, idx = quantizer(residual)
            out = out + z_q
            residual = residual - z_q
            all_indices.append(idx)
        return out, torch.stack(all_indices)

    def vq2emb(self, codes: Tensor) -> Tensor:
        """codes (N_q, B, T) → (B, D, T): sum over quantizers of `quantizers[i].vq2emb(codes[i])`."""
        embs = [q.vq2emb(c) for q, c in zip(self._stages(), codes, strict=True)]  # each [B, D, T]
        out = embs[0]
        for e in embs[1:]:
            out = out + e
        return out

    def _stages(self) -> list[FactorizedVectorQuantize]:  # typed view of the ModuleList
        return [q for q in self.quantizers if isinstance(q, FactorizedVectorQuantize)]


class SemanticCodec(nn.Module):
    def __init__(self, cfg: SemanticCodecConfig) -> None:
        super().__init__()
        self.encoder = nn.Sequential(VocosBackbone(cfg), nn.Linear(cfg.vocos_dim, cfg.hidden_size))
        self.decoder = nn.Sequential(VocosBackbone(cfg), nn.Linear(cfg.vocos_dim, cfg.hidden_size))  # unused
        self.quantizer = ResidualVQ(cfg)
        self.codebook_size = cfg.codebook_size  # K: valid codes are [0, K)

    def quantize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised w2v-BERT features (B, T, D) → (indices (B, T) int64, S_ref (B, T, D) float32).

        Indices are (N_q, B, T) when the codec has more than one quantizer (upstream squeezes one)."""
        h = self.encoder(x.transpose(1, 2)).transpose(1, 2)  # [B, D, T]
        quantized, indices = self.quantizer(h)
        if indices.shape[0] == 1:
            indices = indices.squeeze(0)
        return indices, quantized.transpose(1, 2)

    def reference_features(self, spk_cond_emb: Tensor) -> Tensor:
        """The features the s2mel prompt is regulated from: IndexTTS-2 quantizes the reference's
        w2v-BERT features (B, T, D) and uses the codebook embeddings S_ref (B, T, D)."""
        return self.quantize(spk_cond_emb)[1]

    def vq2emb(self, codes: Tensor) -> Tensor:
        """GPT codes (B, M) in [0, K) → content features (B, D, M), as `quantizer.vq2emb(codes[:, None])`.

        Upstream passes (B, 1, M) and indexes its first axis, which selects the code row only
        because B = 1; here the quantizer axis is explicit ((N_q, B, M) is also accepted), so any
        B works."""
        return self.quantizer.vq2emb(codes.unsqueeze(0) if codes.dim() == 2 else codes)

    def fold(self) -> None:
        """Fold the weight-normed projections once (inference only; call after the strict load)."""
        fold_weight_norm(self)


def load_semantic_codec(ckpt_dir: Path, device: torch.device | str) -> SemanticCodec:
    """SemanticCodec from config.yaml + semantic_codec.safetensors, projections folded."""
    ckpt_dir = Path(ckpt_dir)
    try:
        config = yaml.safe_load((ckpt_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{ckpt_dir / 'config.yaml'}: cannot read config: {e}") from e
    cfg = SemanticCodecConfig.from_yaml(config)
    codec = load_module(lambda: SemanticCodec(cfg), ckpt_dir / "semantic_codec.safetensors", device)
    codec.fold()
    return codec
