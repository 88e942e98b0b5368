"""Perceiver resampler: a conditioning sequence → a fixed number of latents.

Ports indextts/gpt/perceiver.py (`PerceiverResampler`, `Attention`, `Attend` without flash,
`FeedForward` with GEGLU, `RMSNorm`) as UnifiedVoice builds it. Upstream quirks kept: the
latents attend to `[latents ; context]` (cross_attn_include_queries), there is no pre-norm,
`to_kv` yields K then V, masked keys get -finfo.max (not -inf), GEGLU gates with the *second*
half through exact GELU, and the final RMSNorm is `F.normalize(x) · √dim · gamma`.
Shapes: B batch, N latents, T context frames, D dim, Dc context dim, H heads, Dh head dim."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True, kw_only=True, slots=True)
class PerceiverConfig:
    dim: int          # D: GPT model_dim (speaker) or the w2v-BERT width (emotion, hard-coded upstream)
    dim_context: int  # Dc: the conformer's output_size
    num_latents: int  # N: 32 (speaker, condition_num_latent) or 1 (emotion)
    heads: int        # condition_module.attention_heads
    dim_head: int     # 64 upstream default; read from the checkpoint (to_q rows / heads)
    ff_mult: int      # condition_module.perceiver_mult
    depth: int        # 2 upstream default; read from the checkpoint

    @property
    def dim_inner(self) -> int:
        return self.heads * self.dim_head

    @property
    def ff_inner(self) -> int:
        return int(self.dim * self.ff_mult * 2 / 3)  # upstream FeedForward width before GEGLU halving


class GEGLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.gelu(gate) * x


class Attention(nn.Module):
    """Latents attend to [latents ; context]; no biases, key padding masked with -finfo.max."""

    def __init__(self, cfg: PerceiverConfig) -> None:
        super().__init__()
        self.heads, self.dim_head = cfg.heads, cfg.dim_head
        self.to_q = nn.Linear(cfg.dim, cfg.dim_inner, bias=False)
        self.to_kv = nn.Linear(cfg.dim, 2 * cfg.dim_inner, bias=False)
        self.to_out = nn.Linear(cfg.dim_inner, cfg.dim, bias=False)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        b, n, _ = x.shape
        context = torch.cat((x, context), dim=1)  # [B, N + T, D]
        q = self.to_q(x).view(b, n, self.heads, self.dim_head).transpose(1, 2)  # [B, H, N, Dh]
        k, v = self.to_kv(context).chunk(2, dim=-1)
        k = k.view(b, -1, self.heads, self.dim_head).transpose(1, 2)  # [B, H, N + T, Dh]
        v = v.view(b, -1, self.heads, self.dim_head).transpose(1, 2)
        sim = (q @ k.transpose(-2, -1)) * self.dim_head**-0.5  # [B, H, N, N + T]
        sim = sim.masked_fill(~mask[:, None, None, :], -torch.finfo(sim.dtype).max)
        out = sim.softmax(dim=-1) @ v  # [B, H, N, Dh]
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))  # [B, N, H·Dh] -> [B, N, D]


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) * self.scale * self.gamma


class PerceiverResampler(nn.Module):
    """[B, T, Dc] context + [B, N + T] key mask → [B, N, D] latents."""

    def __init__(self, cfg: PerceiverConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Upstream uses nn.Identity (no key) when the context already has the model width.
        self.proj_context: nn.Module = (
            nn.Linear(cfg.dim_context, cfg.dim) if cfg.dim_context != cfg.dim else nn.Identity()
        )
        self.latents = nn.Parameter(torch.empty(cfg.num_latents, cfg.dim))
        # Keys layers.{i}.0 (Attention) and layers.{i}.1.{0,2} (FeedForward Sequential, .1 = GEGLU).
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    Attention(cfg),
                    nn.Sequential(nn.Linear(cfg.dim, 2 * cfg.ff_inner), GEGLU(), nn.Linear(cfg.ff_inner, cfg.dim)),
                ]
            )
            for _ in range(cfg.depth)
        )
        self.norm = RMSNorm(cfg.dim)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """`mask` [B, N + T] is True on keys that may be attended (the N latents first)."""
        context = self.proj_context(x)  # [B, T, D]
        latents = self.latents.expand(x.size(0), -1, -1)  # [B, N, D]
        for layer in self.layers:
            attn, ff = cast(nn.ModuleList, layer)  # layers.{i}.0 Attention, layers.{i}.1 FeedForward
            latents = attn(latents, context, mask) + latents
            latents = ff(latents) + latents
        return self.norm(latents)

    def latent_mask(self, frame_mask: Tensor) -> Tensor:
        """[B, 1, T] conformer mask → [B, N + T] with N `True` left-padded (upstream cond_mask_pad)."""
        m = frame_mask.squeeze(1)
        return F.pad(m, (self.cfg.num_latents, 0), value=True)
