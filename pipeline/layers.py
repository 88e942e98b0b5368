"""Blocks shared by two or more components: weight-normed Linear / Conv1d / ConvTranspose1d.

The official s2mel DiT (x_embedder, WaveNet convs, FinalLayer) and BigVGAN both wrap layers in
`torch.nn.utils.weight_norm`, which stores `weight_g` and `weight_v` and recomputes
`weight = v · (g / ‖v‖)` on every forward (norm over every axis but 0). These modules declare
exactly those two parameters so a strict load works, and `fold()` computes the weight once after
the load. A checkpoint that is already folded (plain `weight`) is loaded by building the module
with `folded=True`. Shapes: B batch, C channels, T time, K kernel taps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def weight_norm_weight(weight_v: Tensor, weight_g: Tensor) -> Tensor:
    """v · (g / ‖v‖) with the norm over all axes but 0 (upstream `torch._weight_norm(v, g, 0)`)."""
    dims = tuple(range(1, weight_v.dim()))
    return weight_v * (weight_g / weight_v.norm(dim=dims, keepdim=True))


class WeightNorm(nn.Module):
    """Holds either `weight_g` + `weight_v` (upstream weight_norm layout) or a folded `weight`."""

    weight: Tensor
    weight_g: Tensor
    weight_v: Tensor
    bias: Tensor | None

    def __init__(self, weight_shape: tuple[int, ...], bias: int | None, *, folded: bool) -> None:
        super().__init__()
        self.folded = folded
        if folded:
            self.weight = nn.Parameter(torch.empty(weight_shape))
        else:
            # g keeps axis 0 and is 1 elsewhere: (out, 1) for Linear, (C, 1, 1) for convs.
            self.weight_g = nn.Parameter(torch.empty(weight_shape[0], *[1] * (len(weight_shape) - 1)))
            self.weight_v = nn.Parameter(torch.empty(weight_shape))
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(torch.empty(bias))

    def effective_weight(self) -> Tensor:
        return self.weight if self.folded else weight_norm_weight(self.weight_v, self.weight_g)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace `weight_g`/`weight_v` by `weight = v · (g / ‖v‖)`, computed once (inference only)."""
        if self.folded:
            return
        w = weight_norm_weight(self.weight_v, self.weight_g)
        del self.weight_g
        del self.weight_v
        self.weight = nn.Parameter(w, requires_grad=False)
        self.folded = True


class WNLinear(WeightNorm):
    """weight_norm(nn.Linear): weight (out, in), weight_g (out, 1)."""

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool = True, folded: bool = False
    ) -> None:
        super().__init__((out_features, in_features), out_features if bias else None, folded=folded)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


class WNConv1d(WeightNorm):
    """weight_norm(nn.Conv1d) with zero padding: weight (C_out, C_in, K), weight_g (C_out, 1, 1)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        dilation: int = 1,
        padding: int = 0,
        bias: bool = True,
        folded: bool = False,
    ) -> None:
        super().__init__(
            (out_channels, in_channels, kernel_size), out_channels if bias else None, folded=folded
        )
        self.dilation = dilation
        self.padding = padding

    def forward(self, x: Tensor) -> Tensor:  # [B, C_in, T] -> [B, C_out, T']
        return F.conv1d(x, self.effective_weight(), self.bias, padding=self.padding, dilation=self.dilation)


class WNConvTranspose1d(WeightNorm):
    """weight_norm(nn.ConvTranspose1d): weight (C_in, C_out, K), so g and the norm are per *input* channel."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int,
        padding: int,
        folded: bool = False,
    ) -> None:
        super().__init__((in_channels, out_channels, kernel_size), out_channels, folded=folded)
        self.stride = stride
        self.padding = padding

    def forward(self, x: Tensor) -> Tensor:  # [B, C_in, T] -> [B, C_out, T·stride]
        return F.conv_transpose1d(
            x, self.effective_weight(), self.bias, stride=self.stride, padding=self.padding
        )


def fold_weight_norm(module: nn.Module) -> None:
    """Fold every weight-normed layer inside `module` (call after the strict load)."""
    for sub in module.modules():
        if isinstance(sub, WeightNorm):
            sub.fold()
