"""BigVGAN v2 generator (nvidia/bigvgan_v2_22khz_80band_256x): mel → waveform in [-1, 1].

Ports bigvgan.py, activations.py and alias_free_activation/torch/{act,resample,filter}.py of
NVIDIA BigVGAN v2 (vendored as indextts/s2mel/modules/bigvgan/). Torch path only: the fused CUDA
activation kernel is not bit-identical, so it is not the parity reference. Keys are those of
bigvgan.safetensors (`bigvgan_generator.pt["generator"]`): weight-normed `weight_g`/`weight_v`, or
plain `weight` for an already-folded file. Shapes: B batch, M mel bins, C channels, T frames,
N = T·hop samples."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttsd.api.errors import ConfigError

from .config import require
from .device import upload
from .graphs import Graphs, recent
from .layers import WNConv1d, WNConvTranspose1d, fold_weight_norm
from .weights import load_module, read_shapes

PCM_SCALE = 32767.0  # infer_v2: wav = clamp(32767 · wav, -32767, 32767)
AA_RATIO = 2  # Activation1d up/down ratio (hard-coded upstream)
AA_KERNEL = 12  # Activation1d filter taps: int(6 · ratio // 2) · 2
SNAKE_EPS = 1e-9  # SnakeBeta no_div_by_zero


@dataclass(frozen=True, kw_only=True, slots=True)
class BigVGANConfig:
    resblock: str  # "1" (AMPBlock1)
    num_mels: int
    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    upsample_initial_channel: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    activation: str  # "snakebeta" or "snake"
    snake_logscale: bool
    use_tanh_at_final: bool
    use_bias_at_final: bool
    sampling_rate: int
    hop_size: int

    @property
    def upsample_factor(self) -> int:
        """Samples per mel frame produced by the ups (= hop_size for a consistent config)."""
        f = 1
        for r in self.upsample_rates:
            f *= r
        return f

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> BigVGANConfig:
        """Build from the parsed bigvgan.json (the HF config.json of the vocoder)."""
        cfg = cls(
            resblock=str(require(raw, "resblock", file="bigvgan.json")),
            num_mels=int(require(raw, "num_mels", file="bigvgan.json")),
            upsample_rates=tuple(int(r) for r in require(raw, "upsample_rates", file="bigvgan.json")),
            upsample_kernel_sizes=tuple(int(k) for k in require(raw, "upsample_kernel_sizes", file="bigvgan.json")),
            upsample_initial_channel=int(require(raw, "upsample_initial_channel", file="bigvgan.json")),
            resblock_kernel_sizes=tuple(int(k) for k in require(raw, "resblock_kernel_sizes", file="bigvgan.json")),
            resblock_dilation_sizes=tuple(
                tuple(int(d) for d in ds) for ds in require(raw, "resblock_dilation_sizes", file="bigvgan.json")
            ),
            activation=str(require(raw, "activation", file="bigvgan.json")),
            snake_logscale=bool(require(raw, "snake_logscale", file="bigvgan.json")),
            # Upstream reads these two with h.get(key, True): absent means True.
            use_tanh_at_final=bool(raw.get("use_tanh_at_final", True)),
            use_bias_at_final=bool(raw.get("use_bias_at_final", True)),
            sampling_rate=int(require(raw, "sampling_rate", file="bigvgan.json")),
            hop_size=int(require(raw, "hop_size", file="bigvgan.json")),
        )
        if cfg.resblock != "1":
            raise ConfigError(f'bigvgan.json: resblock {cfg.resblock!r} is not supported (v2 uses "1")')
        if cfg.activation not in ("snake", "snakebeta"):
            raise ConfigError(f"bigvgan.json: unknown activation {cfg.activation!r}")
        if len(cfg.upsample_rates) != len(cfg.upsample_kernel_sizes):
            raise ConfigError("bigvgan.json: upsample_rates and upsample_kernel_sizes differ in length")
        return cfg

    @classmethod
    def load(cls, path: Path) -> BigVGANConfig:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


class Snake(nn.Module):
    """x + 1/(α + ε) · sin²(α·x), per channel; α = exp(alpha) when log-scale. With beta: 1/β instead."""

    def __init__(self, channels: int, *, beta: bool, logscale: bool) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.empty(channels))
        if beta:
            self.beta = nn.Parameter(torch.empty(channels))
        self.has_beta = beta
        self.logscale = logscale

    def forward(self, x: Tensor) -> Tensor:  # [B, C, T]
        alpha = self.alpha[None, :, None]
        beta = self.beta[None, :, None] if self.has_beta else alpha
        if self.logscale:
            alpha, beta = torch.exp(alpha), torch.exp(beta)
        return x + (1.0 / (beta + SNAKE_EPS)) * torch.sin(x * alpha).pow(2)


@dataclass(frozen=True, slots=True)
class Ends:
    """Where each row of a right-padded batch ends, at one time resolution: what lets a batch of
    sequences of different lengths give each row the samples it gets alone. Before a zero-padded conv
    the frames past a row's end are zeroed (`mask`); before a replicate-padded filter of the anti-aliased
    activation they repeat the row's last frame (`last`, and `last2` at the activation's 2× rate)."""

    mask: Tensor  # [B, 1, T] 1.0 before the row's end, 0.0 past it
    last: Tensor  # [B, 1, T] int64: t before the row's end, its last frame past it
    last2: Tensor  # [B, 1, 2T] the same at twice the rate

    @classmethod
    def of(cls, lengths: Tensor, frames: int, dtype: torch.dtype) -> Ends:
        """lengths (B,) of rows in a batch of `frames` frames."""
        t = torch.arange(2 * frames, device=lengths.device)[None, :]
        n = lengths[:, None]
        return cls((t[:, :frames] < n).to(dtype)[:, None, :], torch.minimum(t[:, :frames], n - 1)[:, None, :],
                   torch.minimum(t, 2 * n - 1)[:, None, :])

    def zeroed(self, x: Tensor) -> Tensor:
        return x * self.mask

    def extended(self, x: Tensor, at_twice: bool = False) -> Tensor:
        idx = self.last2 if at_twice else self.last
        return x.gather(2, idx.expand(-1, x.size(1), -1))


class UpSample1d(nn.Module):
    filter: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.pad = AA_KERNEL // AA_RATIO - 1  # 5
        self.crop_left = self.pad * AA_RATIO + (AA_KERNEL - AA_RATIO) // 2  # 15
        self.crop_right = self.pad * AA_RATIO + (AA_KERNEL - AA_RATIO + 1) // 2  # 15
        self.register_buffer("filter", torch.empty(1, 1, AA_KERNEL))  # Kaiser sinc, stored in the file

    def forward(self, x: Tensor) -> Tensor:  # [B, C, T] -> [B, C, 2T]
        C = x.size(1)
        x = F.pad(x, (self.pad, self.pad), mode="replicate")
        x = AA_RATIO * F.conv_transpose1d(x, self.filter.expand(C, -1, -1), stride=AA_RATIO, groups=C)
        return x[..., self.crop_left : x.size(-1) - self.crop_right]


class LowPassFilter1d(nn.Module):
    filter: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.pad_left = AA_KERNEL // 2 - int(AA_KERNEL % 2 == 0)  # 5
        self.pad_right = AA_KERNEL // 2  # 6
        self.register_buffer("filter", torch.empty(1, 1, AA_KERNEL))

    def forward(self, x: Tensor) -> Tensor:  # [B, C, 2T] -> [B, C, T]
        C = x.size(1)
        x = F.pad(x, (self.pad_left, self.pad_right), mode="replicate")
        return F.conv1d(x, self.filter.expand(C, -1, -1), stride=AA_RATIO, groups=C)


class DownSample1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lowpass = LowPassFilter1d()  # key downsample.lowpass.filter

    def forward(self, x: Tensor) -> Tensor:
        return self.lowpass(x)


class Activation1d(nn.Module):
    """Anti-aliased activation: 2× upsample, Snake, low-pass and 2× downsample."""

    def __init__(self, act: Snake) -> None:
        super().__init__()
        self.act = act
        self.upsample = UpSample1d()
        self.downsample = DownSample1d()

    def forward(self, x: Tensor, ends: Ends | None = None) -> Tensor:
        if ends is None:
            return self.downsample(self.act(self.upsample(x)))
        y = self.act(self.upsample(ends.extended(x)))
        return self.downsample(ends.extended(y, at_twice=True))


class AMPBlock1(nn.Module):
    def __init__(
        self, cfg: BigVGANConfig, channels: int, kernel_size: int, dilations: tuple[int, ...], *, folded: bool
    ) -> None:
        super().__init__()
        k = kernel_size
        self.convs1 = nn.ModuleList(
            WNConv1d(channels, channels, k, dilation=d, padding=(k * d - d) // 2, folded=folded)
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            WNConv1d(channels, channels, k, padding=(k - 1) // 2, folded=folded) for _ in dilations
        )
        beta = cfg.activation == "snakebeta"
        self.activations = nn.ModuleList(
            Activation1d(Snake(channels, beta=beta, logscale=cfg.snake_logscale))
            for _ in range(2 * len(dilations))
        )

    def forward(self, x: Tensor, ends: Ends | None = None) -> Tensor:  # [B, C, T]
        for n, (c1, c2) in enumerate(zip(self.convs1, self.convs2, strict=True)):
            if ends is None:
                xt = c2(self.activations[2 * n + 1](c1(self.activations[2 * n](x))))
            else:
                xt = c1(ends.zeroed(self.activations[2 * n](x, ends)))
                xt = c2(ends.zeroed(self.activations[2 * n + 1](xt, ends)))
            x = xt + x
        return x


class BigVGAN(nn.Module):
    """mel (B, M, T) float32 → waveform (B, 1, T·hop) clamped to [-1, 1]."""

    def __init__(self, cfg: BigVGANConfig, *, folded: bool = False) -> None:
        super().__init__()
        c0 = cfg.upsample_initial_channel
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        self.conv_pre = WNConv1d(cfg.num_mels, c0, 7, padding=3, folded=folded)
        # Each upsampler sits in its own one-element ModuleList upstream: keys ups.{s}.0.*.
        self.ups = nn.ModuleList(
            nn.ModuleList(
                [
                    WNConvTranspose1d(
                        c0 // 2**s, c0 // 2 ** (s + 1), k, stride=u, padding=(k - u) // 2, folded=folded
                    )
                ]
            )
            for s, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True))
        )
        self.resblocks = nn.ModuleList(
            AMPBlock1(cfg, c0 // 2 ** (s + 1), k, d, folded=folded)
            for s in range(len(cfg.upsample_rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True)
        )
        ch = c0 // 2 ** len(cfg.upsample_rates)
        self.activation_post = Activation1d(
            Snake(ch, beta=cfg.activation == "snakebeta", logscale=cfg.snake_logscale)
        )
        self.conv_post = WNConv1d(ch, 1, 7, padding=3, bias=cfg.use_bias_at_final, folded=folded)
        self.use_tanh_at_final = cfg.use_tanh_at_final
        self.upsample_rates = cfg.upsample_rates

    def fold_weight_norm(self) -> None:
        """Compute every `weight = v · (g / ‖v‖)` once, as infer_v2's remove_weight_norm() does."""
        fold_weight_norm(self)

    def forward(self, mel: Tensor, lengths: Tensor | None = None) -> Tensor:
        """mel (B, M, T); `lengths` (B,) frames of each row of a right-padded batch (None: every row is
        T frames, upstream's path). Row b's first lengths[b]·hop samples are those it gets alone."""
        ends: list[Ends | None] = [None] * (len(self.ups) + 1)
        if lengths is not None:
            frames, scale = mel.size(-1), 1
            for s in range(len(self.ups) + 1):
                ends[s] = Ends.of(lengths * scale, frames * scale, mel.dtype)
                scale *= self.upsample_rates[s] if s < len(self.ups) else 1
        x = self.conv_pre(mel if ends[0] is None else ends[0].zeroed(mel))  # [B, C0, T]
        for s, up in enumerate(self.ups):
            e = ends[s]
            for layer in up.children():  # one ConvTranspose1d per stage
                x = layer(x if e is None else e.zeroed(x))  # [B, C0/2^(s+1), T·∏rates]
            blocks = self.resblocks[s * self.num_kernels : (s + 1) * self.num_kernels]
            xs = blocks[0](x, ends[s + 1])
            for block in blocks[1:]:
                xs = xs + block(x, ends[s + 1])
            x = xs / self.num_kernels  # mean of the multi-receptive-field blocks
        e = ends[-1]
        x = self.activation_post(x, e)
        x = self.conv_post(x if e is None else e.zeroed(x))  # [B, 1, N]
        return torch.tanh(x) if self.use_tanh_at_final else torch.clamp(x, min=-1.0, max=1.0)


class VocoderGraphs:
    """Batched, graphed vocoding for the CUDA engine: B mels, right-padded to a multiple of FRAME_BUCKET
    frames, are one replay of the graph recorded for (B, frames), each row masked at its own end (`Ends`),
    so it gets the samples it gets alone. The rows returned are views of the graph's output: the caller
    copies them (to the host, on the same stream) before the next call. Beyond `keep` shapes, the least
    recently used one is dropped, graph and all."""

    FRAME_BUCKET = 32

    def __init__(self, model: BigVGAN, *, keep: int = 8) -> None:
        self.model, self.keep = model, keep
        self.shapes: dict[tuple[int, int], tuple[Tensor, Tensor, Graphs]] = {}  # oldest first

    def __call__(self, mels: Sequence[Tensor]) -> list[Tensor]:
        """mels, each (1, M, T_b) → float PCM at ±32767 scale, each (T_b·hop,), on the device."""
        mel, n, graphs = self.stage(mels)
        out = graphs.run("vocode", lambda: self.render(mel, n))  # [B, frames·hop]
        hop = out.size(-1) // mel.size(-1)
        return [out[b, : m.size(-1) * hop] for b, m in enumerate(mels)]

    def stage(self, mels: Sequence[Tensor]) -> tuple[Tensor, Tensor, Graphs]:
        """The buffers of the mels' shape, loaded with them (zero past each row's end), and its graphs."""
        lengths = [m.size(-1) for m in mels]
        key = (len(mels), -(-max(lengths) // self.FRAME_BUCKET) * self.FRAME_BUCKET)
        first = mels[0]
        entry = recent(self.shapes, key, lambda: (
            torch.zeros((key[0], first.size(1), key[1]), device=first.device),
            torch.zeros(key[0], dtype=torch.long, device=first.device), Graphs("vocoder")), self.keep)
        mel, n, _ = entry
        mel.zero_()
        for b, m in enumerate(mels):
            mel[b, :, : lengths[b]] = m[0]
        n.copy_(upload(lengths, mel.device))
        return entry

    def render(self, mel: Tensor, lengths: Tensor) -> Tensor:
        """What the graph runs: the staged batch → PCM scale [B, frames·hop]."""
        return to_pcm_scale(self.model(mel, lengths))


def load_bigvgan(weights_path: Path, config_path: Path, device: torch.device | str) -> BigVGAN:
    """Build, strictly load and fold BigVGAN; a checkpoint that already holds plain `weight`s loads too."""
    cfg = BigVGANConfig.load(config_path)
    folded = "conv_pre.weight" in read_shapes(weights_path)  # upstream retries without weight norm likewise
    model = load_module(lambda: BigVGAN(cfg, folded=folded), weights_path, device)
    model.fold_weight_norm()
    return model


def to_pcm_scale(wav: Tensor) -> Tensor:
    """BigVGAN output (B, 1, N) in [-1, 1] → (B, N) float PCM scale: clamp(32767 · wav, ±32767)."""
    return torch.clamp(PCM_SCALE * wav.squeeze(1), -PCM_SCALE, PCM_SCALE)
