"""w2v-BERT 2.0 encoder, run only as far as the layer IndexTTS2 reads, plus its normalisation.

Ports transformers 4.52.1 `Wav2Vec2BertModel` (models/wav2vec2_bert/modeling_wav2vec2_bert.py) in
eval mode with `position_embeddings_type="relative_key"`, and `IndexTTS2.get_emb`
(indextts/infer_v2.py): `(hidden_states[17] - mean) / sqrt(var)` with the Emilia statistics of
`wav2vec2bert_stats.pt`. Key names are those of the HF `model.safetensors` (`feature_projection.*`,
`encoder.layers.{i}.*`, `masked_spec_embed`); layers from HIDDEN_STATE_LAYER on are in the file
but skipped at load, so they are never allocated.
Shapes: B batch, T stacked feature rows (50 Hz), D hidden_size, H heads, Dh head size,
I intermediate_size, R relative distances (left + right + 1)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttsd.api.errors import ConfigError

from .config import require
from .weights import load_module, read_shapes

# infer_v2 `get_emb` reads hidden_states[17]: the output of encoder layer index 16, the layer
# MaskGCT's semantic codec was trained on. Layers 17.. never run.
HIDDEN_STATE_LAYER = 17
HF_PREFIX = "wav2vec2_bert."  # transformers accepts (and some exports carry) this key prefix


@dataclass(frozen=True, kw_only=True, slots=True)
class W2VBertConfig:
    hidden_size: int                     # D
    num_hidden_layers: int               # layers in the file (24); only HIDDEN_STATE_LAYER are built
    num_attention_heads: int             # H
    intermediate_size: int               # I
    hidden_act: str                      # "swish" (SiLU)
    feature_projection_input_dim: int    # 160 = 2 stacked 80-bin frames
    layer_norm_eps: float                # every LayerNorm
    position_embeddings_type: str        # only "relative_key" is supported
    left_max_position_embeddings: int    # clip of j - i below 0
    right_max_position_embeddings: int   # clip of j - i above 0
    conv_depthwise_kernel_size: int      # causal depthwise conv taps
    mask_time_prob: float                # > 0 makes HF create the (unused) masked_spec_embed
    mask_feature_prob: float             # idem
    add_adapter: bool                    # must be false

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], where: str = "w2v_bert.json") -> W2VBertConfig:
        """Build from the parsed HF config.json (converted copy: w2v_bert.json)."""
        cfg = cls(
            hidden_size=int(require(raw, "hidden_size", file=where)),
            num_hidden_layers=int(require(raw, "num_hidden_layers", file=where)),
            num_attention_heads=int(require(raw, "num_attention_heads", file=where)),
            intermediate_size=int(require(raw, "intermediate_size", file=where)),
            hidden_act=str(require(raw, "hidden_act", file=where)),
            feature_projection_input_dim=int(require(raw, "feature_projection_input_dim", file=where)),
            layer_norm_eps=float(require(raw, "layer_norm_eps", file=where)),
            position_embeddings_type=str(require(raw, "position_embeddings_type", file=where)),
            left_max_position_embeddings=int(require(raw, "left_max_position_embeddings", file=where)),
            right_max_position_embeddings=int(require(raw, "right_max_position_embeddings", file=where)),
            conv_depthwise_kernel_size=int(require(raw, "conv_depthwise_kernel_size", file=where)),
            mask_time_prob=float(require(raw, "mask_time_prob", file=where)),
            mask_feature_prob=float(require(raw, "mask_feature_prob", file=where)),
            add_adapter=bool(require(raw, "add_adapter", file=where)),
        )
        if cfg.position_embeddings_type != "relative_key" or cfg.hidden_act not in ("swish", "silu"):
            raise ConfigError(f"{where}: only position_embeddings_type=relative_key with swish is supported")
        if cfg.add_adapter or cfg.num_hidden_layers < HIDDEN_STATE_LAYER:
            raise ConfigError(f"{where}: need no adapter and at least {HIDDEN_STATE_LAYER} layers")
        return cfg

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_distances(self) -> int:
        return self.left_max_position_embeddings + self.right_max_position_embeddings + 1


class FeatureProjection(nn.Module):
    def __init__(self, cfg: W2VBertConfig) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(cfg.feature_projection_input_dim, eps=cfg.layer_norm_eps)
        self.projection = nn.Linear(cfg.feature_projection_input_dim, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, 160] -> [B, T, D]
        return self.projection(self.layer_norm(x))


class FeedForward(nn.Module):
    def __init__(self, cfg: W2VBertConfig) -> None:
        super().__init__()
        self.intermediate_dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output_dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.output_dense(F.silu(self.intermediate_dense(x)))


class SelfAttention(nn.Module):
    """MHSA with Shaw-style learned relative keys (query side only), clipped to [-left, +right]."""

    def __init__(self, cfg: W2VBertConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.left, self.right = cfg.left_max_position_embeddings, cfg.right_max_position_embeddings
        self.linear_q = nn.Linear(d, d)
        self.linear_k = nn.Linear(d, d)
        self.linear_v = nn.Linear(d, d)
        self.linear_out = nn.Linear(d, d)
        self.distance_embedding = nn.Embedding(cfg.num_distances, cfg.head_dim)

    def forward(self, x: Tensor, attn_bias: Tensor | None) -> Tensor:
        b, t, _ = x.shape
        q = self.linear_q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        k = self.linear_k(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        v = self.linear_v(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        scale = math.sqrt(self.head_dim)
        scores = torch.matmul(q, k.transpose(-2, -1)) / scale  # [B, H, T, T]
        pos = torch.arange(t, device=x.device)
        dist = (pos[None, :] - pos[:, None]).clamp(-self.left, self.right) + self.left  # [T(query), T(key)]
        rel = self.distance_embedding(dist).to(q.dtype)  # [T, T, Dh]
        scores = scores + torch.einsum("bhld,lrd->bhlr", q, rel) / scale
        if attn_bias is not None:
            scores = scores + attn_bias
        h = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B, H, T, Dh]
        return self.linear_out(h.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class ConvolutionModule(nn.Module):
    """Pointwise conv + GLU, causal depthwise conv, LayerNorm, SiLU, pointwise conv (no biases)."""

    def __init__(self, cfg: W2VBertConfig) -> None:
        super().__init__()
        d, k = cfg.hidden_size, cfg.conv_depthwise_kernel_size
        self.layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.pointwise_conv1 = nn.Conv1d(d, 2 * d, 1, bias=False)
        self.depthwise_conv = nn.Conv1d(d, d, k, groups=d, bias=False)
        self.depthwise_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.pointwise_conv2 = nn.Conv1d(d, d, 1, bias=False)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        h = self.layer_norm(x)
        if mask is not None:
            h = h.masked_fill(~mask.bool().unsqueeze(-1), 0.0)  # padded rows must not leak into the conv
        h = F.glu(self.pointwise_conv1(h.transpose(1, 2)), dim=1)  # [B, D, T]
        h = F.pad(h, (self.depthwise_conv.kernel_size[0] - 1, 0))  # causal: left padding only
        h = self.depthwise_conv(h)
        h = self.depthwise_layer_norm(h.transpose(1, 2)).transpose(1, 2)
        return self.pointwise_conv2(F.silu(h)).transpose(1, 2)  # [B, T, D]


class ConformerLayer(nn.Module):
    """Macaron conformer block: ½FFN, MHSA, conv, ½FFN, final LayerNorm (all pre-norm)."""

    def __init__(self, cfg: W2VBertConfig) -> None:
        super().__init__()
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.ffn1_layer_norm = nn.LayerNorm(d, eps=eps)
        self.ffn1 = FeedForward(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.self_attn = SelfAttention(cfg)
        self.conv_module = ConvolutionModule(cfg)
        self.ffn2_layer_norm = nn.LayerNorm(d, eps=eps)
        self.ffn2 = FeedForward(cfg)
        self.final_layer_norm = nn.LayerNorm(d, eps=eps)

    def forward(self, x: Tensor, attn_bias: Tensor | None, mask: Tensor | None) -> Tensor:
        x = self.ffn1(self.ffn1_layer_norm(x)) * 0.5 + x
        x = self.self_attn(self.self_attn_layer_norm(x), attn_bias) + x
        x = x + self.conv_module(x, mask)
        x = self.ffn2(self.ffn2_layer_norm(x)) * 0.5 + x
        return self.final_layer_norm(x)


class Encoder(nn.Module):
    def __init__(self, cfg: W2VBertConfig, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ConformerLayer(cfg) for _ in range(num_layers))


class W2VBert(nn.Module):
    """Stacked SeamlessM4T features (B, T, 160) → hidden_states[HIDDEN_STATE_LAYER] (B, T, D)."""

    def __init__(self, cfg: W2VBertConfig) -> None:
        super().__init__()
        if cfg.mask_time_prob > 0 or cfg.mask_feature_prob > 0:
            # Created by HF for SpecAugment (training only); stored in the file, never used here.
            self.masked_spec_embed = nn.Parameter(torch.empty(cfg.hidden_size))
        self.feature_projection = FeatureProjection(cfg)
        self.encoder = Encoder(cfg, HIDDEN_STATE_LAYER)

    def forward(
        self, input_features: Tensor, attention_mask: Tensor | None = None, layer: int = HIDDEN_STATE_LAYER
    ) -> Tensor:
        """input_features (B, T, 160) float32, attention_mask (B, T) int (1 = real row) → (B, T, D).

        Returns HF `hidden_states[layer]` (0 = feature projection, n = after encoder layer n-1).
        A masked row (odd SeamlessM4T frame count) is zeroed at the input and excluded as a key,
        but still computed as a query: it stays in the output, as IndexTTS2 uses it."""
        h = self.feature_projection(input_features)  # [B, T, D] = hidden_states[0] after masking
        attn_bias = None
        if attention_mask is not None:
            h = h.masked_fill(~attention_mask.bool().unsqueeze(-1), 0.0)
            # Finite finfo.min, not -inf: a fully masked query row still gets a defined softmax.
            keep = attention_mask[:, None, None, :].to(h.dtype)  # [B, 1, 1, T]
            attn_bias = (1.0 - keep) * torch.finfo(h.dtype).min
        for block in self.encoder.layers[:layer]:
            h = block(h, attn_bias, attention_mask)
        return h


class W2VStats(nn.Module):
    """Emilia layer-17 statistics (keys `mean`, `var` of w2v_stats.safetensors), shape (D,)."""

    mean: Tensor
    var: Tensor

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.empty(hidden_size))
        self.register_buffer("var", torch.empty(hidden_size))

    def forward(self, h: Tensor) -> Tensor:
        """(B, T, D) → (B, T, D): (h - mean) / sqrt(var), no epsilon (upstream precomputes the std)."""
        return (h - self.mean) / torch.sqrt(self.var)


def load_w2v_bert(ckpt_dir: Path, device: torch.device | str) -> tuple[W2VBert, W2VStats]:
    """The truncated encoder from w2v_bert.safetensors/.json and the normaliser from w2v_stats.safetensors."""
    ckpt_dir = Path(ckpt_dir)
    cfg_path = ckpt_dir / "w2v_bert.json"
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{cfg_path}: cannot read w2v-BERT config: {e}") from e
    cfg = W2VBertConfig.from_json(raw, str(cfg_path))
    path = ckpt_dir / "w2v_bert.safetensors"
    keys = read_shapes(path).keys()
    prefix = HF_PREFIX if keys and all(k.startswith(HF_PREFIX) for k in keys) else ""
    unused = re.compile(r"encoder\.layers\.(\d+)\.")

    def skip(key: str) -> bool:  # layers after the one we read: required in the file, never loaded
        m = unused.match(key)
        return m is not None and HIDDEN_STATE_LAYER <= int(m.group(1)) < cfg.num_hidden_layers

    model = load_module(lambda: W2VBert(cfg), path, device, prefix=prefix, skip=skip)
    stats = load_module(lambda: W2VStats(cfg.hidden_size), ckpt_dir / "w2v_stats.safetensors", device)
    return model, stats
