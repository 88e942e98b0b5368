"""Conditional flow matching sampler: Euler ODE solve with classifier-free guidance.

Ports `CFM` / `BASECFM.inference` and `solve_euler` (indextts/s2mel/modules/flow_matching.py).
The module holds only the DiT estimator (keys `cfm.estimator.*` of s2mel.safetensors, loaded with
prefix `cfm.`). Per-request state (noise, the stacked CFG buffers, the ODE state) lives in a
`CFMSolve`, which also batches sequences of different lengths. Shapes: B batch (1 in the official
path), M mel bins, P prompt frames, N = P + T frames, Cc content width, S style width."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ttsd.api.errors import Cancelled

from .dit import DiT, DiTConfig
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
        cancel: Callable[[], bool] | None = None,
    ) -> Tensor:
        """Sample mel frames for one sequence (upstream's path, B = 1); the prompt region of the result is zero.

        mu (1, N, Cc) = cat(prompt_condition, cond); prompt (1, M, P) reference mel; style (1, S).
        The start state is `noise` (1, M, N) if given, used as-is (it already includes any
        temperature), else `randn(..., generator=generator) * temperature`. `cancel()` is polled
        before every step and raises `Cancelled`. Returns (1, M, N) in mu's dtype; the caller
        slices [..., P:]."""
        n = mu.size(1)
        if noise is None:
            shape = (1, self.in_channels, n)
            noise = torch.randn(shape, generator=generator, device=mu.device, dtype=mu.dtype) * temperature
        solve = CFMSolve(self, [CFMRow(mu, prompt, style, noise, inference_cfg_rate)], n_timesteps)
        while not solve.done:
            if cancel is not None and cancel():
                raise Cancelled(f"cancelled before CFM step {solve.steps_done + 1}/{n_timesteps}")
            solve.step()
        return solve.x


@dataclass(frozen=True, slots=True)
class CFMRow:
    """One sequence of a batched solve: mu (1, N_b, Cc), prompt mel (1, M, P_b), style (1, S), start noise
    (1, M, N_b) and its CFG rate."""

    mu: Tensor
    prompt: Tensor
    style: Tensor
    noise: Tensor
    cfg_rate: float


class CFMSolve:
    """An Euler solve in progress over B sequences at once, one `step()` at a time (so a caller can
    interleave other work and poll cancellation between steps).

    Sequences may differ in prompt length P_b and total length N_b: they are right-padded to N, the
    DiT masks keys and WaveNet frames past each N_b (`x_lens`) and re-reflects each row's own right
    edge, and frames past N_b are zeroed after every step. Each row's frames come out as they would
    alone, up to float rounding. With one sequence (or all of equal length) there is no padding and
    no mask: upstream's exact path."""

    def __init__(self, cfm: CFM, rows: Sequence[CFMRow], n_timesteps: int, *,
                 autocast: torch.dtype | None = None) -> None:
        """`autocast`: run the DiT under torch.autocast in that dtype (an opt-in precision mode; the ODE
        state and the CFG combination stay float32). None: the float32 path, at golden parity."""
        if not rows:
            raise ValueError("a solve needs at least one sequence")
        self.cfm = cfm
        self.autocast = autocast
        self.rows = list(rows)
        self.n_timesteps = n_timesteps
        self.steps_done = 0
        first = rows[0].mu
        dev, dtype = first.device, first.dtype
        B, M = len(rows), cfm.in_channels
        lengths = [r.mu.size(1) for r in rows]
        N = max(lengths)
        for r, n_b in zip(rows, lengths, strict=True):
            if r.prompt.size(-1) > n_b:
                raise ValueError(f"prompt has {r.prompt.size(-1)} frames but mu only {n_b}")
            if tuple(r.noise.shape) != (1, M, n_b):
                raise ValueError(f"noise shape {tuple(r.noise.shape)} != {(1, M, n_b)}")
        self.B, self.N, self.lengths = B, N, lengths
        self.cfg = any(r.cfg_rate > 0 for r in rows)
        R = 2 * B if self.cfg else B

        # All per-step inputs are preallocated once: rows [:B] conditional, rows [B:] the CFG null
        # branch whose raw prompt_x, style and mu stay zero (mu then becomes cond_projection.bias).
        self.stacked_x = first.new_zeros((R, M, N))
        self.stacked_prompt_x = first.new_zeros((R, M, N))
        self.stacked_style = rows[0].style.new_zeros((R, rows[0].style.size(-1)))
        self.stacked_mu = first.new_zeros((R, N, first.size(-1)))
        self.stacked_t = torch.empty(R, dtype=torch.float32, device=dev)
        prompt_mask = torch.zeros(B, 1, N, dtype=torch.bool, device=dev)
        for b, r in enumerate(rows):
            p, n_b = r.prompt.size(-1), lengths[b]
            self.stacked_prompt_x[b, :, :p] = r.prompt[0]
            self.stacked_style[b] = r.style[0]
            self.stacked_mu[b, :n_b] = r.mu[0]
            self.stacked_x[b, :, :n_b] = r.noise[0]
            prompt_mask[b, :, :p] = True
        self.prompt_mask = prompt_mask
        padded = any(n_b != N for n_b in lengths)
        self.pad_mask = (torch.arange(N, device=dev)[None, None, :] >= torch.tensor(lengths, device=dev)[:, None, None]
                         ) if padded else None  # [B, 1, N] frames past each sequence
        self.x_lens = torch.tensor(lengths * (2 if self.cfg else 1), device=dev) if padded else None
        # CFG weights per row, (1 + r) and r rounded to float32 exactly as a Python-float scalar would be.
        self.cond_w = torch.tensor([1.0 + r.cfg_rate for r in rows], dtype=dtype, device=dev).view(B, 1, 1)
        self.null_w = torch.tensor([r.cfg_rate for r in rows], dtype=dtype, device=dev).view(B, 1, 1)

        self.x = self.stacked_x[:B]  # the ODE state lives in the conditional rows; updated in place
        self.x.masked_fill_(prompt_mask, 0)  # the prompt region of the state starts at 0
        # t is accumulated by float32 addition (t += dt), not re-read from t_span, as upstream.
        t_span = torch.linspace(0, 1, n_timesteps + 1, dtype=torch.float32, device=dev)
        self.dts = t_span[1:] - t_span[:-1]
        self.t = t_span[0].clone()

    @property
    def done(self) -> bool:
        return self.steps_done >= self.n_timesteps

    @torch.no_grad()
    def step(self) -> None:
        """One Euler step of every sequence."""
        B, x = self.B, self.x
        dt = self.dts[self.steps_done]
        self.stacked_t.copy_(self.t.expand(self.stacked_t.size(0)))
        est = self.cfm.estimator
        with torch.autocast(x.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            if self.cfg:
                self.stacked_x[B:].copy_(x)  # the null branch shares x and t
                v = est(self.stacked_x, self.stacked_prompt_x, self.stacked_t, self.stacked_style, self.stacked_mu,
                        self.x_lens).float()
                v = self.cond_w * v[:B] - self.null_w * v[B:]
            else:
                v = est(x, self.stacked_prompt_x, self.stacked_t, self.stacked_style, self.stacked_mu,
                        self.x_lens).float()
        x.add_(dt * v)
        self.t.add_(dt)
        x.masked_fill_(self.prompt_mask, 0)  # re-zero the prompt region after every step
        if self.pad_mask is not None:
            x.masked_fill_(self.pad_mask, 0)  # padding stays finite: it is never attended, but inf·0 = NaN
        self.steps_done += 1

    def target(self, b: int) -> Tensor:
        """Sequence b's generated frames (1, M, N_b − P_b), after the last step."""
        return self.x[b : b + 1, :, self.rows[b].prompt.size(-1) : self.lengths[b]]


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
