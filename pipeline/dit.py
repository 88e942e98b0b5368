"""s2mel DiT estimator with the WaveNet final stage: predicts the flow-matching velocity.

Ports `DiT` (indextts/s2mel/modules/diffusion_transformer.py), its gpt-fast style `Transformer`
(indextts/s2mel/modules/gpt_fast/model.py) and `WN` / `SConv1d` (indextts/s2mel/modules/wavenet.py,
encodec.py). Keys are those of s2mel.safetensors under `cfm.estimator.`. Shapes: B batch (2 under
CFG), T frames (prompt + target), M mel bins (in_channels, 80), D DiT width (hidden_dim), H heads,
Dh head width, W WaveNet width, S style width, Cc content width."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttsd.api.errors import ConfigError

from .config import require, shape
from .layers import WNConv1d, WNLinear, fold_weight_norm

ROPE_BASE = 10_000.0  # gpt-fast ModelArgs.rope_base (hard-coded upstream)
NORM_EPS = 1e-5  # RMSNorm eps (ModelArgs.norm_eps)
FINAL_NORM_EPS = 1e-6  # FinalLayer LayerNorm eps
TIME_MAX_PERIOD = 10_000  # TimestepEmbedder.max_period
TIME_SCALE = 1000.0  # TimestepEmbedder.scale: t in [0, 1] is embedded as 1000·t


@dataclass(frozen=True, kw_only=True, slots=True)
class WaveNetConfig:
    hidden_dim: int  # s2mel.wavenet.hidden_dim
    num_layers: int  # s2mel.wavenet.num_layers
    kernel_size: int  # s2mel.wavenet.kernel_size
    dilation_rate: int  # s2mel.wavenet.dilation_rate


@dataclass(frozen=True, kw_only=True, slots=True)
class DiTConfig:
    hidden_dim: int  # s2mel.DiT.hidden_dim
    num_heads: int  # s2mel.DiT.num_heads
    depth: int  # s2mel.DiT.depth
    in_channels: int  # s2mel.DiT.in_channels (mel bins)
    content_dim: int  # s2mel.DiT.content_dim
    content_codebook_size: int  # s2mel.DiT.content_codebook_size (unused cond_embedder)
    style_condition: bool  # s2mel.DiT.style_condition
    long_skip_connection: bool  # s2mel.DiT.long_skip_connection
    uvit_skip_connection: bool  # s2mel.DiT.uvit_skip_connection
    style_dim: int  # s2mel.style_encoder.dim
    wavenet: WaveNetConfig  # s2mel.wavenet
    # Hard-coded upstream, so read from the checkpoint's shapes:
    intermediate_size: int  # FFN width find_multiple(int(8·D/3), 256): feed_forward.w1.weight
    frequency_embedding_size: int  # TimestepEmbedder sinusoid width (256): t_embedder.mlp.0.weight
    block_size: int  # RoPE table length (16384): input_pos

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    @property
    def merge_in_dim(self) -> int:
        """Width of [x, prompt_x, content, style] fed to cond_x_merge_linear."""
        return 2 * self.in_channels + self.hidden_dim + (self.style_dim if self.style_condition else 0)

    @classmethod
    def from_yaml(
        cls, config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], prefix: str = "cfm.estimator."
    ) -> DiTConfig:
        """Build from the parsed config.yaml and `weights.read_shapes(s2mel.safetensors)`."""
        s2mel = require(config, "s2mel", "")
        dit = require(s2mel, "DiT", "s2mel")
        wn = require(s2mel, "wavenet", "s2mel")
        w = "s2mel.DiT"
        unsupported = {
            "final_layer_type": (require(dit, "final_layer_type", w), "wavenet"),
            "is_causal": (bool(require(dit, "is_causal", w)), False),
            "time_as_token": (bool(require(dit, "time_as_token", w)), False),
            "style_as_token": (bool(require(dit, "style_as_token", w)), False),
        }
        for name, (have, want) in unsupported.items():
            if have != want:
                raise ConfigError(f"{w}.{name}={have!r} is not supported (IndexTTS2 uses {want!r})")
        return cls(
            hidden_dim=int(require(dit, "hidden_dim", w)),
            num_heads=int(require(dit, "num_heads", w)),
            depth=int(require(dit, "depth", w)),
            in_channels=int(require(dit, "in_channels", w)),
            content_dim=int(require(dit, "content_dim", w)),
            content_codebook_size=int(require(dit, "content_codebook_size", w)),
            style_condition=bool(require(dit, "style_condition", w)),
            long_skip_connection=bool(require(dit, "long_skip_connection", w)),
            uvit_skip_connection=bool(require(dit, "uvit_skip_connection", w)),
            style_dim=int(require(require(s2mel, "style_encoder", "s2mel"), "dim", "s2mel.style_encoder")),
            wavenet=WaveNetConfig(
                hidden_dim=int(require(wn, "hidden_dim", "s2mel.wavenet")),
                num_layers=int(require(wn, "num_layers", "s2mel.wavenet")),
                kernel_size=int(require(wn, "kernel_size", "s2mel.wavenet")),
                dilation_rate=int(require(wn, "dilation_rate", "s2mel.wavenet")),
            ),
            intermediate_size=shape(
                shapes, f"{prefix}transformer.layers.0.feed_forward.w1.weight", "s2mel.safetensors"
            )[0],
            frequency_embedding_size=shape(shapes, f"{prefix}t_embedder.mlp.0.weight", "s2mel.safetensors")[1],
            block_size=shape(shapes, f"{prefix}input_pos", "s2mel.safetensors")[0],
        )


def rope_table(length: int, head_dim: int, device: torch.device) -> Tensor:
    """gpt-fast `precompute_freqs_cis` in float32: (length, Dh/2, 2) holding (cos, sin) of pos·θ_p."""
    theta = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    angle = torch.outer(torch.arange(length, device=device), theta)  # [length, Dh/2] float32
    return torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate interleaved pairs (2p, 2p+1) of x (B, T, H, Dh) by table (T, Dh/2, 2), in float32."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)  # [B, T, H, Dh/2, 2]
    rot = table.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack(
        [
            xs[..., 0] * rot[..., 0] - xs[..., 1] * rot[..., 1],
            xs[..., 1] * rot[..., 0] + xs[..., 0] * rot[..., 1],
        ],
        dim=-1,
    )
    return out.flatten(3).type_as(x)  # [B, T, H, Dh]


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()  # statistics in float32 whatever the activation dtype
        return (xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + NORM_EPS)).type_as(x) * self.weight


class AdaptiveLayerNorm(nn.Module):
    """w·RMSNorm(x) + b with (w, b) = project_layer(c); note: no "1 +" on w, unlike FinalLayer."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.project_layer = nn.Linear(dim, 2 * dim)
        self.norm = RMSNorm(dim)
        self.dim = dim

    def forward(self, x: Tensor, c: Tensor) -> Tensor:  # x [B, T, D], c [B, 1, D]
        weight, bias = torch.split(self.project_layer(c), self.dim, dim=-1)
        return weight * self.norm(x) + bias


class Attention(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.wqkv = nn.Linear(cfg.hidden_dim, 3 * cfg.hidden_dim, bias=False)  # rows [q; k; v]
        self.wo = nn.Linear(cfg.hidden_dim, cfg.hidden_dim, bias=False)
        self.heads = cfg.num_heads
        self.head_dim = cfg.head_dim

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor | None) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.wqkv(x).split(D, dim=-1)
        q = apply_rope(q.view(B, T, self.heads, self.head_dim), rope).transpose(1, 2)  # [B, H, T, Dh]
        k = apply_rope(k.view(B, T, self.heads, self.head_dim), rope).transpose(1, 2)
        v = v.view(B, T, self.heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # bidirectional, scale 1/√Dh
        return self.wo(y.transpose(1, 2).reshape(B, T, D))


class FeedForward(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_dim, cfg.intermediate_size, bias=False)
        self.w3 = nn.Linear(cfg.hidden_dim, cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = AdaptiveLayerNorm(cfg.hidden_dim)
        self.ffn_norm = AdaptiveLayerNorm(cfg.hidden_dim)
        if cfg.uvit_skip_connection:
            # Present in every block, used only by those that receive a U-ViT skip.
            self.skip_in_linear = nn.Linear(2 * cfg.hidden_dim, cfg.hidden_dim)

    def forward(self, x: Tensor, c: Tensor, rope: Tensor, mask: Tensor | None, skip: Tensor | None) -> Tensor:
        if skip is not None:
            x = self.skip_in_linear(torch.cat([x, skip], dim=-1))
        h = x + self.attention(self.attention_norm(x, c), rope, mask)
        return h + self.feed_forward(self.ffn_norm(h, c))


class Transformer(nn.Module):
    """Pre-norm AdaLN transformer with U-ViT long skips: layer n−1−i receives the output of layer i."""

    rope: Tensor

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.depth))
        self.norm = AdaptiveLayerNorm(cfg.hidden_dim)
        n = cfg.depth
        self.emit_skip = frozenset(range(n // 2)) if cfg.uvit_skip_connection else frozenset()
        self.receive_skip = frozenset(range(n // 2 + 1, n)) if cfg.uvit_skip_connection else frozenset()
        self.block_size = cfg.block_size
        self.head_dim = cfg.head_dim
        # Upstream setup_caches() builds this table (not stored in the checkpoint).
        self.register_buffer("rope", torch.empty(cfg.block_size, cfg.head_dim // 2, 2), persistent=False)

    def build_buffers(self, device: torch.device) -> None:
        self.rope = rope_table(self.block_size, self.head_dim, device)

    def forward(self, x: Tensor, c: Tensor, mask: Tensor | None) -> Tensor:  # x [B, T, D], c [B, 1, D]
        if x.size(1) > self.block_size:
            raise ValueError(f"DiT sequence of {x.size(1)} frames exceeds the RoPE table ({self.block_size})")
        rope = self.rope[: x.size(1)]  # positions 0..T-1
        skips: list[Tensor] = []
        for i, layer in enumerate(self.layers):
            skip = skips.pop() if i in self.receive_skip else None
            x = layer(x, c, rope, mask, skip)
            if i in self.emit_skip:
                skips.append(x)
        return self.norm(x, c)


class TimestepEmbedder(nn.Module):
    freqs: Tensor

    def __init__(self, hidden: int, frequency_embedding_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        half = frequency_embedding_size // 2
        self.odd = frequency_embedding_size % 2 == 1
        # Persistent upstream (key t_embedder.freqs): exp(−ln(10000)·k/half).
        self.register_buffer("freqs", torch.exp(-math.log(TIME_MAX_PERIOD) * torch.arange(half) / half))

    def forward(self, t: Tensor) -> Tensor:  # t [B] -> [B, hidden]
        args = TIME_SCALE * t[:, None].float() * self.freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cos first, as upstream
        if self.odd:
            emb = F.pad(emb, (0, 1))
        return self.mlp(emb)


class NormConv1d(nn.Module):
    """encodec NormConv1d with norm='weight_norm': only here to nest keys as `conv.conv.*`."""

    def __init__(self, conv: WNConv1d) -> None:
        super().__init__()
        self.conv = conv


class SConv1d(nn.Module):
    """encodec SConv1d: reflect padding applied outside the conv (its own `padding=` is ignored upstream)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv = NormConv1d(WNConv1d(in_channels, out_channels, kernel_size, dilation=dilation))
        total = (kernel_size - 1) * dilation  # stride 1, non-causal
        self.pad_right = total // 2
        self.pad_left = total - self.pad_right

    def forward(self, x: Tensor) -> Tensor:  # [B, C_in, T] -> [B, C_out, T]
        if self.pad_left or self.pad_right:
            length = x.size(-1)
            # encodec pad1d: reflect needs length > pad, so very short inputs get zeros first.
            extra = max(0, max(self.pad_left, self.pad_right) - length + 1)
            if extra:
                x = F.pad(x, (0, extra))
            x = F.pad(x, (self.pad_left, self.pad_right), mode="reflect")
            if extra:
                x = x[..., : x.size(-1) - extra]
        return self.conv.conv(x)


def reflect_index(lengths: Tensor, frames: int) -> Tensor:
    """For a right-padded batch: frame t of row b reads frame t while t < L_b and the reflection
    2(L_b − 1) − t past it (clamped at 0; only the few frames within a kernel's reach matter), so a
    reflect-padded conv sees each row as if it ended at L_b, provided `frames` ≥ L_b + the conv's reach
    (beyond `frames` the conv reflects the padded tensor instead). lengths (B,) → (B, 1, frames) int64."""
    t = torch.arange(frames, device=lengths.device)[None, :]
    last = (lengths[:, None] - 1).clamp(min=0)
    return torch.where(t <= last, t, (2 * last - t).clamp(min=0)).unsqueeze(1)


class WN(nn.Module):
    """Gated dilated-conv WaveNet stack, globally conditioned on a time embedding."""

    def __init__(self, cfg: WaveNetConfig) -> None:
        super().__init__()
        w, n = cfg.hidden_dim, cfg.num_layers
        self.hidden = w
        self.cond_layer = SConv1d(w, 2 * w * n, 1)  # gin_channels = W
        in_layers = [SConv1d(w, 2 * w, cfg.kernel_size, dilation=cfg.dilation_rate**i) for i in range(n)]
        self.in_layers = nn.ModuleList(in_layers)
        # Frames the widest conv reads past a frame on the right: a padded row needs at least this many
        # frames of padding for `tails` to stand in for its own reflection (see `reflect_index`).
        self.reach = max(layer.pad_right for layer in in_layers)
        # The last layer has no residual half: it writes only W skip channels.
        self.res_skip_layers = nn.ModuleList(SConv1d(w, 2 * w if i < n - 1 else w, 1) for i in range(n))

    def forward(self, x: Tensor, x_mask: Tensor | None, g: Tensor, tails: Tensor | None = None) -> Tensor:
        """x (B, W, T), x_mask (B or 1, 1, T) or None for all-valid, g (B, W, 1) → (B, W, T).

        `tails` (B, 1, T) from `reflect_index` makes each row of a padded batch see, past its own end,
        the reflection its dilated convs would see if the row were alone."""
        g = self.cond_layer(g)  # [B, 2·W·n, 1]
        w = self.hidden
        out = torch.zeros_like(x)
        last = len(self.in_layers) - 1
        for i, (in_layer, res_skip) in enumerate(zip(self.in_layers, self.res_skip_layers, strict=True)):
            xi = x if tails is None else x.gather(2, tails.expand(x.size(0), x.size(1), -1))
            z = in_layer(xi) + g[:, 2 * w * i : 2 * w * (i + 1)]  # [B, 2W, T]
            acts = torch.tanh(z[:, :w]) * torch.sigmoid(z[:, w:])
            rs = res_skip(acts)
            if i < last:
                x = x + rs[:, :w]
                x = x if x_mask is None else x * x_mask
                out = out + rs[:, w:]
            else:
                out = out + rs
        return out if x_mask is None else out * x_mask


class FinalLayer(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = WNLinear(hidden, hidden)
        # The Linear is index 1 of the Sequential: key adaLN_modulation.1.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.hidden = hidden

    def forward(self, x: Tensor, c: Tensor) -> Tensor:  # x [B, T, W], c [B, W]
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = F.layer_norm(x, (self.hidden,), eps=FINAL_NORM_EPS)
        return self.linear(x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1))  # DiT modulate(): 1 + scale


class DiT(nn.Module):
    """The CFM estimator: velocity (B, M, T) from state x, prompt mel, time, style and content."""

    input_pos: Tensor

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d, m, wn = cfg.hidden_dim, cfg.in_channels, cfg.wavenet.hidden_dim
        self.cfg = cfg
        self.transformer = Transformer(cfg)
        # Stored in the checkpoint but never used at inference: x_embedder, cond_embedder,
        # content_mask_embedder, input_pos (arange), skip_in_linear of non-receiving layers.
        self.x_embedder = WNLinear(m, d)
        self.cond_embedder = nn.Embedding(cfg.content_codebook_size, d)
        self.content_mask_embedder = nn.Embedding(1, d)
        self.register_buffer("input_pos", torch.arange(cfg.block_size))
        # IndexTTS2 always takes the continuous-content projection, whatever `content_type` says.
        self.cond_projection = nn.Linear(cfg.content_dim, d)
        self.cond_x_merge_linear = nn.Linear(cfg.merge_in_dim, d)
        self.t_embedder = TimestepEmbedder(d, cfg.frequency_embedding_size)
        if cfg.long_skip_connection:
            self.skip_linear = nn.Linear(d + m, d)
        self.conv1 = nn.Linear(d, wn)  # named conv1 upstream, but a Linear
        self.t_embedder2 = TimestepEmbedder(wn, cfg.frequency_embedding_size)
        self.wavenet = WN(cfg.wavenet)
        self.res_projection = nn.Linear(d, wn)
        self.final_layer = FinalLayer(wn)
        self.conv2 = nn.Conv1d(wn, m, 1)

    def fold_weight_norm(self) -> None:
        """Compute every weight-normed weight once (inference only; call after the strict load)."""
        fold_weight_norm(self)

    def forward(
        self,
        x: Tensor,
        prompt_x: Tensor,
        t: Tensor,
        style: Tensor,
        cond: Tensor,
        x_lens: Tensor | None = None,
    ) -> Tensor:
        """x, prompt_x (B, M, T); t (B,) in [0, 1]; style (B, S); cond = mu (B, T, Cc) → (B, M, T).

        x_lens (B or 1,) masks frames past each length; None (the official path, where x_lens is
        always T) skips masking."""
        B, _, T = x.shape
        t1 = self.t_embedder(t)  # [B, D]
        c = self.cond_projection(cond)  # [B, T, D]
        xt = x.transpose(1, 2)  # [B, T, M]
        parts = [xt, prompt_x.transpose(1, 2), c]
        if self.cfg.style_condition:
            parts.append(style[:, None, :].expand(B, T, style.size(-1)))  # raw style on every frame
        h = self.cond_x_merge_linear(torch.cat(parts, dim=-1))  # [B, T, D]

        attn_mask: Tensor | None = None
        x_mask: Tensor | None = None  # None = every frame valid (multiplying by ones is skipped)
        tails: Tensor | None = None
        if x_lens is not None:
            valid = torch.arange(T, device=x.device)[None, :] < x_lens[:, None]  # [B, T]
            # Keys only, as the additive bias SDPA adds (0 or -inf, in the activations' dtype): made once
            # here, where a boolean mask would be converted by every layer's call (a kernel each on CUDA).
            attn_mask = torch.zeros_like(valid, dtype=h.dtype).masked_fill_(~valid, float("-inf"))[:, None, None, :]
            x_mask = valid[:, None, :].to(x.dtype)  # [B, 1, T]
            tails = reflect_index(x_lens, T)

        h = self.transformer(h, t1.unsqueeze(1), attn_mask)  # [B, T, D]
        if self.cfg.long_skip_connection:
            h = self.skip_linear(torch.cat([h, xt], dim=-1))
        y = self.conv1(h).transpose(1, 2)  # [B, W, T]
        t2 = self.t_embedder2(t)  # [B, W]
        y = self.wavenet(y, x_mask, t2.unsqueeze(2), tails).transpose(1, 2) + self.res_projection(h)  # [B, T, W]
        y = self.final_layer(y, t1).transpose(1, 2)  # [B, W, T]
        return self.conv2(y)  # [B, M, T]
