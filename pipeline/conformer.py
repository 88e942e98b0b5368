"""Conformer encoder for the GPT's speaker and emotion conditioning (wenet-style, inference only).

Ports indextts/gpt/conformer_encoder.py as IndexTTS2 builds it (`ConformerEncoder` with
input_layer "conv2d2", rel_pos attention, conv module, no macaron FFN) and its helpers from
indextts/gpt/conformer/{subsampling,embedding,attention}.py. Two upstream quirks are kept:
the relative-position attention has no `rel_shift` (the positional term uses the absolute
sinusoid of the key position), and every block ends in `norm_final`.
Shapes: B batch, T input frames, W input width (w2v-BERT hidden size), T' = (T - 1) // 2 frames
after subsampling, C model channels (output_size), H heads, Dk = C / H."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CNN_MODULE_KERNEL = 15   # upstream ConformerEncoder default cnn_module_kernel
POS_ENC_MAX_LEN = 5000   # RelPositionalEncoding max_len; the table is a persistent buffer in gpt.pth
LN_EPS = 1e-5


@dataclass(frozen=True, kw_only=True, slots=True)
class ConformerConfig:
    input_size: int       # W: hard-coded 1024 upstream (w2v-BERT width); read from the checkpoint
    output_size: int      # gpt.condition_module.output_size (or emo_condition_module)
    linear_units: int     # ...linear_units
    attention_heads: int  # ...attention_heads
    num_blocks: int       # ...num_blocks
    input_layer: str      # ...input_layer (only "conv2d2" is used by IndexTTS2)

    @property
    def d_k(self) -> int:
        return self.output_size // self.attention_heads

    @property
    def subsampled_width(self) -> int:
        return (self.input_size - 1) // 2  # frequency bins left by the stride-2, kernel-3 conv


def pad_mask(lengths: Tensor, max_len: int) -> Tensor:
    """[B] lengths → [B, 1, T] bool, True on valid frames (upstream `~make_pad_mask(...).unsqueeze(1)`)."""
    steps = torch.arange(max_len, device=lengths.device)
    return (steps[None, :] < lengths[:, None]).unsqueeze(1)


class RelPositionalEncoding(nn.Module):
    """Scales the input by √C and returns the absolute sinusoid table for positions 0..T'-1."""

    pe: Tensor

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.xscale = math.sqrt(d_model)
        # Persistent upstream: key `*.embed.pos_enc.pe` [1, 5000, C] is in gpt.pth.
        self.register_buffer("pe", torch.empty(1, POS_ENC_MAX_LEN, d_model))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x * self.xscale, self.pe[:, : x.size(1)]  # [B, T', C], [1, T', C]


class Conv2dSubsampling2(nn.Module):
    """Conv2d(1→C, k3, s2) + ReLU, then a Linear over the channel-major flattened (C·W') features."""

    def __init__(self, cfg: ConformerConfig) -> None:
        super().__init__()
        c = cfg.output_size
        self.conv = nn.Sequential(nn.Conv2d(1, c, 3, 2), nn.ReLU())
        self.out = nn.Sequential(nn.Linear(c * cfg.subsampled_width, c))
        self.pos_enc = RelPositionalEncoding(c)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.conv(x.unsqueeze(1))  # [B, C, T', W']
        b, c, t, f = x.shape
        x = self.out(x.transpose(1, 2).reshape(b, t, c * f))  # [B, T', C·W'] -> [B, T', C]
        x, pos_emb = self.pos_enc(x)
        # Upstream keeps every second mask entry starting at 2: length (T - 1) // 2 = T'.
        return x, pos_emb, mask[:, :, 2::2]


class RelPositionMultiHeadedAttention(nn.Module):
    """Transformer-XL style attention with learned u/v biases, but WITHOUT rel_shift (upstream)."""

    def __init__(self, cfg: ConformerConfig) -> None:
        super().__init__()
        c, h = cfg.output_size, cfg.attention_heads
        self.h, self.d_k = h, cfg.d_k
        self.linear_q = nn.Linear(c, c)
        self.linear_k = nn.Linear(c, c)
        self.linear_v = nn.Linear(c, c)
        self.linear_out = nn.Linear(c, c)
        self.linear_pos = nn.Linear(c, c, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(h, self.d_k))

    def forward(self, x: Tensor, mask: Tensor, pos_emb: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.linear_q(x).view(b, t, self.h, self.d_k)  # [B, T', H, Dk]
        k = self.linear_k(x).view(b, t, self.h, self.d_k).transpose(1, 2)  # [B, H, T', Dk]
        v = self.linear_v(x).view(b, t, self.h, self.d_k).transpose(1, 2)  # [B, H, T', Dk]
        p = self.linear_pos(pos_emb).view(pos_emb.size(0), -1, self.h, self.d_k).transpose(1, 2)  # [1, H, T', Dk]
        q_u = (q + self.pos_bias_u).transpose(1, 2)  # [B, H, T', Dk]
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        scores = (q_u @ k.transpose(-2, -1) + q_v @ p.transpose(-2, -1)) / math.sqrt(self.d_k)  # [B, H, T', T']
        invalid = ~mask.unsqueeze(1)  # [B, 1, 1, T'] masks keys only, as upstream
        scores = scores.masked_fill(invalid, -float("inf"))
        attn = torch.softmax(scores, dim=-1).masked_fill(invalid, 0.0)
        out = (attn @ v).transpose(1, 2).reshape(b, t, self.h * self.d_k)  # [B, T', C]
        return self.linear_out(out)


class PositionwiseFeedForward(nn.Module):
    def __init__(self, c: int, units: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(c, units)
        self.w_2 = nn.Linear(units, c)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConvolutionModule(nn.Module):
    """Pointwise conv → GLU → depthwise conv → LayerNorm → SiLU → pointwise conv; padding zeroed."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.pointwise_conv1 = nn.Conv1d(c, 2 * c, 1)
        self.depthwise_conv = nn.Conv1d(c, c, CNN_MODULE_KERNEL, padding=(CNN_MODULE_KERNEL - 1) // 2, groups=c)
        self.norm = nn.LayerNorm(c, eps=LN_EPS)  # use_layer_norm=True upstream, not BatchNorm
        self.pointwise_conv2 = nn.Conv1d(c, c, 1)

    def forward(self, x: Tensor, mask_pad: Tensor) -> Tensor:
        x = x.transpose(1, 2).masked_fill(~mask_pad, 0.0)  # [B, C, T']
        x = F.glu(self.pointwise_conv1(x), dim=1)  # [B, 2C, T'] -> [B, C, T']
        x = self.depthwise_conv(x)
        x = F.silu(self.norm(x.transpose(1, 2))).transpose(1, 2)  # LayerNorm over channels
        x = self.pointwise_conv2(x).masked_fill(~mask_pad, 0.0)
        return x.transpose(1, 2)  # [B, T', C]


class ConformerEncoderLayer(nn.Module):
    def __init__(self, cfg: ConformerConfig) -> None:
        super().__init__()
        c = cfg.output_size
        self.self_attn = RelPositionMultiHeadedAttention(cfg)
        self.feed_forward = PositionwiseFeedForward(c, cfg.linear_units)
        self.conv_module = ConvolutionModule(c)
        self.norm_ff = nn.LayerNorm(c, eps=LN_EPS)
        self.norm_mha = nn.LayerNorm(c, eps=LN_EPS)
        self.norm_conv = nn.LayerNorm(c, eps=LN_EPS)
        self.norm_final = nn.LayerNorm(c, eps=LN_EPS)  # present because the conv module is

    def forward(self, x: Tensor, mask: Tensor, pos_emb: Tensor) -> Tensor:
        x = x + self.self_attn(self.norm_mha(x), mask, pos_emb)
        x = x + self.conv_module(self.norm_conv(x), mask)
        x = x + self.feed_forward(self.norm_ff(x))  # ff_scale 1.0: no macaron half-step
        return self.norm_final(x)


class ConformerEncoder(nn.Module):
    """[B, T, W] features → ([B, T', C] encodings, [B, 1, T'] valid-frame mask)."""

    def __init__(self, cfg: ConformerConfig) -> None:
        super().__init__()
        if cfg.input_layer != "conv2d2":
            raise ValueError(f"conformer input_layer {cfg.input_layer!r} is not supported (IndexTTS2 uses conv2d2)")
        self.cfg = cfg
        self.embed = Conv2dSubsampling2(cfg)
        self.encoders = nn.ModuleList(ConformerEncoderLayer(cfg) for _ in range(cfg.num_blocks))
        self.after_norm = nn.LayerNorm(cfg.output_size, eps=LN_EPS)

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """`lengths` [B] counts valid input frames; frames at or past it are masked as padding."""
        mask = pad_mask(lengths, x.size(1))  # [B, 1, T]
        x, pos_emb, mask = self.embed(x, mask)  # [B, T', C], [1, T', C], [B, 1, T']
        for layer in self.encoders:
            x = layer(x, mask, pos_emb)
        return self.after_norm(x), mask
