"""Conditional flow matching sampler: Euler ODE solve with classifier-free guidance.

Ports `CFM` / `BASECFM.inference` and `solve_euler` (indextts/s2mel/modules/flow_matching.py).
The module holds only the DiT estimator (keys `cfm.estimator.*` of s2mel.safetensors, loaded with
prefix `cfm.`). Per-request state (noise, RNG, the stacked CFG buffers) lives in `inference`'s
locals. Shapes: B batch (1 in the official path), M mel bins, P prompt frames, N = P + T frames,
Cc content width, S style width."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .dit import DiT, DiTConfig
from .errors import Cancelled
from .weights import load_module, read_shapes


@dataclass(frozen=True, kw_only=True, slots=True)
class CFMConfig:
    estimator: DiTConfig  # s2mel.DiT, s2mel.wavenet, s2mel.style_encoder (+ checkpoint shapes)

    @property
    def in_channels(self) -> int:
        return self.estimator.in_channels

    @classmethod
    def from_yaml(cls, config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> CFMConfig:
        """Build from the parsed config.yaml and `weights.read_shapes(s2mel.safetensors)`."""
        return cls(estimator=DiTConfig.from_yaml(config, shapes, prefix="cfm.estimator."))


class CFM(nn.Module):
    def __init__(self, cfg: CFMConfig) -> None:
        super().__init__()
        self.in_channels = cfg.in_channels
        self.estimator = DiT(cfg.estimator)

    def fold_weight_norm(self) -> None:
        """Fold the estimator's weight-normed layers once (inference only; after the strict load)."""
        self.estimator.fold_weight_norm()

    @torch.no_grad()
    def inference(
        self,
        mu: Tensor,
        prompt: Tensor,
        style: Tensor,
        *,
        n_timesteps: int = 25,
        inference_cfg_rate: float = 0.7,
        temperature: float = 1.0,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        x_lens: Tensor | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> Tensor:
        """Sample mel frames for the whole sequence; the prompt region of the result is zero.

        mu (B, N, Cc) = cat(prompt_condition, cond); prompt (B, M, P) reference mel; style (B, S).
        The start state is `noise` (B, M, N) if given, used as-is (it already includes any
        temperature), else `randn(..., generator=generator) * temperature`. `cancel()` is polled
        before every step and raises `Cancelled`. Returns (B, M, N) in mu's dtype; the caller
        slices [..., P:]."""
        B, N, _ = mu.shape
        P = prompt.size(-1)
        if P > N:
            raise ValueError(f"prompt has {P} frames but mu only {N}")
        shape = (B, self.in_channels, N)
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != {shape}")
        cfg = inference_cfg_rate > 0
        rows = 2 * B if cfg else B

        # All per-step inputs are preallocated once: rows [:B] conditional, rows [B:] the CFG null
        # branch whose raw prompt_x, style and mu stay zero (mu then becomes cond_projection.bias).
        stacked_x = mu.new_empty((rows, *shape[1:]))
        stacked_prompt_x = mu.new_zeros((rows, *shape[1:]))
        stacked_prompt_x[:B, :, :P] = prompt
        stacked_style = style.new_zeros((rows, style.size(-1)))
        stacked_style[:B] = style
        stacked_mu = mu.new_zeros((rows, *mu.shape[1:]))
        stacked_mu[:B] = mu
        stacked_t = torch.empty(rows, dtype=torch.float32, device=mu.device)

        x = stacked_x[:B]  # the ODE state lives in the conditional rows; updated in place
        if noise is None:
            x.copy_(torch.randn(shape, generator=generator, device=mu.device, dtype=mu.dtype) * temperature)
        else:
            x.copy_(noise)
        x[..., :P] = 0  # the prompt region of the state starts at 0

        # t is accumulated by float32 addition (t += dt), not re-read from t_span, as upstream.
        t_span = torch.linspace(0, 1, n_timesteps + 1, dtype=torch.float32, device=mu.device)
        dts = t_span[1:] - t_span[:-1]
        t = t_span[0].clone()
        for step in range(n_timesteps):
            if cancel is not None and cancel():
                raise Cancelled(f"cancelled before CFM step {step + 1}/{n_timesteps}")
            dt = dts[step]
            stacked_t.copy_(t.expand(rows))
            if cfg:
                stacked_x[B:].copy_(x)  # the null branch shares x and t
                v = self.estimator(stacked_x, stacked_prompt_x, stacked_t, stacked_style, stacked_mu, x_lens)
                v = (1.0 + inference_cfg_rate) * v[:B] - inference_cfg_rate * v[B:]
            else:
                v = self.estimator(x, stacked_prompt_x, stacked_t, stacked_style, stacked_mu, x_lens)
            x.add_(dt * v)
            t.add_(dt)
            x[..., :P] = 0  # re-zero the prompt region after every step
        return x


def load_cfm(
    s2mel_path: Path, config: Mapping[str, Any], device: torch.device | str, *, fold: bool = True
) -> CFM:
    """Strictly load `cfm.*` of s2mel.safetensors, build the RoPE table and (by default) fold weight norm.

    Upstream recomputes v·(g/‖v‖) on every forward; folding once gives the same values."""
    cfg = CFMConfig.from_yaml(config, read_shapes(s2mel_path))
    cfm = load_module(lambda: CFM(cfg), s2mel_path, device, prefix="cfm.")
    if fold:
        cfm.fold_weight_norm()
    return cfm
