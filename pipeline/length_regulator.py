"""s2mel content path: the `gpt_layer` projection and the length regulator.

Ports `InterpolateRegulator` (indextts/s2mel/modules/length_regulator.py) and the `gpt_layer`
Sequential built by `MyModel` (indextts/s2mel/modules/commons.py, keys `gpt_layer.*` and
`length_regulator.*` of s2mel.safetensors). The regulator stretches 50 Hz semantic features to
the 86.13 Hz mel frame rate. Shapes: B batch, T_in code frames, T_out mel frames, D semantic
width (in_channels), C regulator channels, G GPT width."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ttsd.api.errors import ConfigError

from .config import require
from .device import staged
from .graphs import Graphs, recent
from .weights import load_module, read_shapes

MEL_FRAMES_PER_CODE = 1.72  # ≈ (22050 / 256) / 50: mel frames per 50 Hz semantic code (infer_v2)


@dataclass(frozen=True, kw_only=True, slots=True)
class LengthRegulatorConfig:
    channels: int  # s2mel.length_regulator.channels
    in_channels: int  # s2mel.length_regulator.in_channels
    content_codebook_size: int  # s2mel.length_regulator.content_codebook_size (unused embedding)
    sampling_ratios: tuple[int, ...]  # s2mel.length_regulator.sampling_ratios (one conv block each)
    is_discrete: bool  # s2mel.length_regulator.is_discrete
    n_codebooks: int  # s2mel.length_regulator.n_codebooks
    f0_condition: bool  # s2mel.length_regulator.f0_condition

    @classmethod
    def from_yaml(cls, config: Mapping[str, Any]) -> LengthRegulatorConfig:
        """Build from the parsed config.yaml (the whole document)."""
        where = "s2mel.length_regulator"
        raw = require(require(config, "s2mel", ""), "length_regulator", "s2mel")
        cfg = cls(
            channels=int(require(raw, "channels", where)),
            in_channels=int(require(raw, "in_channels", where)),
            content_codebook_size=int(require(raw, "content_codebook_size", where)),
            sampling_ratios=tuple(int(r) for r in require(raw, "sampling_ratios", where)),
            is_discrete=bool(require(raw, "is_discrete", where)),
            n_codebooks=int(require(raw, "n_codebooks", where)),
            f0_condition=bool(require(raw, "f0_condition", where)),
        )
        # IndexTTS2 feeds continuous features with no f0; the other upstream modes are not ported.
        if cfg.is_discrete or cfg.n_codebooks != 1 or cfg.f0_condition or not cfg.sampling_ratios:
            raise ConfigError(
                f"{where}: only is_discrete=false, n_codebooks=1, f0_condition=false and "
                "non-empty sampling_ratios are supported"
            )
        return cfg


@dataclass(frozen=True, kw_only=True, slots=True)
class GptLayerConfig:
    # Upstream hard-codes Linear(1280→256)→Linear(256→128)→Linear(128→1024); read from the checkpoint.
    widths: tuple[int, ...]  # (G, 256, 128, D) from gpt_layer.{i}.weight shapes

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]], prefix: str = "gpt_layer.") -> GptLayerConfig:
        """Build from `weights.read_shapes(s2mel.safetensors)`."""
        widths: list[int] = []
        i = 0
        while f"{prefix}{i}.weight" in shapes:
            out_features, in_features = shapes[f"{prefix}{i}.weight"]
            if not widths:
                widths.append(in_features)
            elif widths[-1] != in_features:
                raise ConfigError(
                    f"{prefix}{i}.weight: input width {in_features} != previous output {widths[-1]}"
                )
            widths.append(out_features)
            i += 1
        if not widths:
            raise ConfigError(f"checkpoint has no {prefix}0.weight")
        return cls(widths=tuple(widths))


def build_gpt_layer(cfg: GptLayerConfig) -> nn.Sequential:
    """The factorised linear map GPT latent (B, T, G) → (B, T, D); no activations, as upstream."""
    return nn.Sequential(*(nn.Linear(a, b) for a, b in zip(cfg.widths[:-1], cfg.widths[1:], strict=True)))


def mel_lengths(code_lens: Tensor) -> Tensor:
    """Mel frames per segment: `(code_lens * 1.72).long()` (float32 product, truncated), as upstream."""
    return (code_lens * MEL_FRAMES_PER_CODE).long()


def nearest_indices(t_in: int, t_out: int, device: torch.device) -> Tensor:
    """Source frame of each output frame for PyTorch's legacy `nearest` interpolation.

    index = min(floor(i · scale), t_in − 1) with scale = t_in / t_out divided in float32, and
    the product also in float32, exactly as ATen's `nearest_neighbor_compute_source_index`."""
    if t_out == t_in:
        return torch.arange(t_out, device=device)
    if t_out == 2 * t_in:  # ATen's shortcut; identical to the formula, kept for clarity
        return torch.arange(t_out, device=device) // 2
    # float32 division like ATen's (float)in / out; rounding a float64 quotient could differ by an ulp.
    # A 0-d host tensor: the device reads it by value (a device tensor made from it would be a blocking copy).
    scale = torch.tensor(t_in, dtype=torch.float32) / t_out
    i = torch.arange(t_out, dtype=torch.float32, device=device)
    return torch.floor(i * scale).long().clamp_(max=t_in - 1)


class InterpolateRegulator(nn.Module):
    """Continuous features (B, T_in, D) → mel-rate content (B, T_out, C)."""

    def __init__(self, cfg: LengthRegulatorConfig) -> None:
        super().__init__()
        c = cfg.channels
        blocks: list[nn.Module] = []
        for _ in cfg.sampling_ratios:
            # GroupNorm(1) normalises over all channels *and frames*: a frame depends on the whole
            # sequence, so the prompt and each segment must go through separately and unpadded.
            blocks += [nn.Conv1d(c, c, 3, 1, 1), nn.GroupNorm(1, c), nn.Mish()]
        blocks.append(nn.Conv1d(c, c, 1, 1))
        self.model = nn.Sequential(*blocks)  # keys model.{0,1,3,4,...,12}
        # Unused at inference (discrete and masked-training paths) but stored in the checkpoint.
        self.embedding = nn.Embedding(cfg.content_codebook_size, c)
        self.mask_token = nn.Parameter(torch.zeros(1, c))
        self.content_in_proj = nn.Linear(cfg.in_channels, c)

    def forward(self, x: Tensor, ylens: Sequence[int] | Tensor) -> Tensor:
        """x (B, T_in, D) float32, ylens (B,) target frames → (B, max(ylens), C), zero past ylens.

        `ylens` are host values (a list, or a CPU tensor as upstream passes them): the output length is
        a shape, so a device tensor here would cost a host sync. Upstream returns a 5-tuple whose first
        entry callers use; `n_quantizers` and `f0` are no-ops."""
        lens = [int(n) for n in (ylens.tolist() if isinstance(ylens, Tensor) else ylens)]  # a sync if on device
        t_out = max(lens)
        h = self.content_in_proj(x).transpose(1, 2)  # [B, C, T_in]
        h = h.index_select(2, nearest_indices(h.size(2), t_out, h.device))  # [B, C, T_out]
        h = self.model(h).transpose(1, 2)  # [B, T_out, C]
        if any(n < t_out for n in lens):
            # Upstream multiplies by a 0/1 mask; zeroing the same frames in place gives the same values
            # without building the mask from host lengths on the device.
            h = h.contiguous()
            for b, n in enumerate(lens):
                h[b, n:] = 0
        return h

    def padded(self, x: Tensor, sources: Tensor, frames: Tensor) -> Tensor:
        """`forward` of B rows at once with no host value (`RegulatorGraphs`): x (B, T_in, D) features
        right-padded, sources (B, T_out) int64 the source frame of each output frame, frames (B,) int64
        each row's output frames → (B, T_out, C), zero past each row's frames. Each row is as `forward`
        of that row alone: frames past its end are zeroed before every convolution (its zero padding),
        and each GroupNorm(1) takes its statistics over the row's own frames only."""
        h = self.content_in_proj(x).transpose(1, 2)  # [B, C, T_in]
        h = h.gather(2, sources.unsqueeze(1).expand(-1, h.size(1), -1))  # [B, C, T_out]
        keep = (torch.arange(h.size(2), device=h.device) < frames.unsqueeze(1)).unsqueeze(1).to(h.dtype)  # [B, 1, T]
        count = frames.to(h.dtype).view(-1, 1, 1) * h.size(1)  # values per row: C × frames
        for layer in self.model:
            if isinstance(layer, nn.Conv1d):
                h = layer(h * keep)
            elif isinstance(layer, nn.GroupNorm):
                assert layer.num_groups == 1  # built so in __init__
                h = _row_group_norm(h, keep, count, layer)
            else:
                h = layer(h)
        return (h * keep).transpose(1, 2)  # [B, T_out, C]


def _row_group_norm(h: Tensor, keep: Tensor, count: Tensor, norm: nn.GroupNorm) -> Tensor:
    """GroupNorm(1) of each row (B, C, T) over its kept frames: biased variance, as F.group_norm."""
    mean = (h * keep).sum(dim=(1, 2), keepdim=True) / count
    centred = h - mean
    var = (centred * centred * keep).sum(dim=(1, 2), keepdim=True) / count
    y = centred * torch.rsqrt(var + norm.eps)
    return y * norm.weight.view(1, -1, 1) + norm.bias.view(1, -1, 1)


class RegulatorGraphs:
    """The length regulator of a job's rows on CUDA as one graph replay per (rows, input bucket, output
    bucket), with the family's content before it where that needs no host value (`content`: IndexTTS-2's
    vq2emb + gpt_layer, from the codes and the second-pass latents). Each row's features (or latents)
    are copied into the shape's input buffer, and its host values (the nearest-neighbour source of each
    output frame, its frame count, its codes) go in one host→device copy; the graph stretches every
    row, zeroes each row's frames past its end before every convolution (a lone segment's zero padding)
    and normalises over each row's own frames (GroupNorm(1) takes its statistics over the whole
    sequence, so plain padding would change them). Rows come out as they would alone, up to float
    rounding. Beyond `keep` shapes the least recently used one goes."""

    IN_BUCKET = 32
    OUT_BUCKET = 64

    def __init__(self, regulator: InterpolateRegulator, content: Callable[[Tensor, Tensor], Tensor] | None = None,
                 *, keep: int = 8) -> None:
        self.regulator, self.content, self.keep = regulator, content, keep
        self.shapes: dict[tuple[int, int, int], tuple[Tensor, Tensor, Graphs]] = {}  # oldest first

    def __call__(self, xs: Sequence[Tensor], frames: Sequence[int]) -> list[Tensor]:
        """Features, each [1, T_in_b, D], and target frames (host ints, each > 0) → each row's
        (1, T_out_b, C) content, views of the graph's output: valid until the next call."""
        if self.content is not None:
            raise ValueError("this regulator graph starts from codes and latents (of_codes)")
        return self._run(xs, None, frames)

    def of_codes(self, codes: Sequence[Tensor], latents: Sequence[Tensor], frames: Sequence[int]) -> list[Tensor]:
        """`content` then the regulator: codes, each [1, M_b] on the host, their second-pass latents
        [1, M_b, D] and target frames (each > 0) → each row's (1, T_out_b, C), as `__call__`."""
        if self.content is None:
            raise ValueError("this regulator graph has no content stage")
        return self._run(latents, codes, frames)

    def _run(self, xs: Sequence[Tensor], codes: Sequence[Tensor] | None, frames: Sequence[int]) -> list[Tensor]:
        if min(frames) <= 0:
            raise ValueError("a row of the graphed regulator needs at least one frame")
        first = xs[0]
        t_in = -(-max(x.size(1) for x in xs) // self.IN_BUCKET) * self.IN_BUCKET
        t_out = -(-max(frames) // self.OUT_BUCKET) * self.OUT_BUCKET
        key = (len(xs), t_in, t_out)
        width = t_out + 1 + (0 if codes is None else t_in)  # sources, frames, codes
        x_buf, values, graphs = recent(self.shapes, key, lambda: (
            torch.zeros((key[0], t_in, first.size(2)), device=first.device, dtype=first.dtype),
            torch.zeros((key[0], width), device=first.device, dtype=torch.long), Graphs("regulator")), self.keep)
        with staged(values) as host:
            for b, (x, n) in enumerate(zip(xs, frames, strict=True)):
                host[b, :n] = nearest_indices(x.size(1), n, host.device)  # the eager path's indices, made here
                host[b, t_out] = n
                if codes is not None:
                    host[b, t_out + 1 : t_out + 1 + x.size(1)] = codes[b].reshape(-1)
                x_buf[b, : x.size(1)] = x[0]
        content = self.content

        def run() -> Tensor:
            x = x_buf if content is None else content(values[:, t_out + 1 :], x_buf)  # [B, T_in, D]
            return self.regulator.padded(x, values[:, :t_out], values[:, t_out])

        out = graphs.run("regulate", run)
        return [out[b : b + 1, :n] for b, n in enumerate(frames)]


def load_length_regulator(
    s2mel_path: Path, config: Mapping[str, Any], device: torch.device | str
) -> InterpolateRegulator:
    """Strictly load `length_regulator.*` of s2mel.safetensors; config is the parsed config.yaml."""
    cfg = LengthRegulatorConfig.from_yaml(config)
    return load_module(lambda: InterpolateRegulator(cfg), s2mel_path, device, prefix="length_regulator.")


def load_gpt_layer(s2mel_path: Path, device: torch.device | str) -> nn.Sequential:
    """Strictly load `gpt_layer.*` of s2mel.safetensors; its widths come from the tensor shapes."""
    cfg = GptLayerConfig.from_shapes(read_shapes(s2mel_path))
    return load_module(lambda: build_gpt_layer(cfg), s2mel_path, device, prefix="gpt_layer.")
