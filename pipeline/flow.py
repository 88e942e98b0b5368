"""Conditional flow matching sampler: Euler ODE solve with classifier-free guidance.

Ports `CFM` / `BASECFM.inference` and `solve_euler` (indextts/s2mel/modules/flow_matching.py).
The module holds only the DiT estimator (keys `cfm.estimator.*` of s2mel.safetensors, loaded with
prefix `cfm.`). Per-request state (noise, the stacked CFG buffers, the ODE state) lives in a
`CFMSolve`, which also batches sequences of different lengths. Shapes: B batch (1 in the official
path), M mel bins, P prompt frames, N = P + T frames, Cc content width, S style width."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ttsd.api.errors import Cancelled

from .device import staged
from .dit import DiT, DiTConfig
from .graphs import Graphs
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


def padded_frames(cfm: CFM, lengths: Sequence[int], *, bucket: int = 1, always: bool = False) -> int:
    """Frames N of a batched solve: the sequences' length when all are equal (no padding, no mask: the
    exact path) unless `always`; otherwise the longest plus the WaveNet's reach, since every row of a
    padded batch is masked and needs that many frames of padding (a row 1 frame short of N would see
    the padded tensor's reflection at its end, not its own); rounded up to a multiple of `bucket`."""
    longest = max(lengths)
    need = longest if not always and min(lengths) == longest else longest + cfm.estimator.wavenet.reach
    return -(-need // bucket) * bucket


class CFMSolve:
    """An Euler solve in progress over B sequences at once, one `step()` at a time (so a caller can
    interleave other work and poll cancellation between steps).

    Sequences may differ in prompt length P_b and total length N_b: they are right-padded to N, the
    DiT masks keys and WaveNet frames past each N_b (`x_lens`) and re-reflects each row's own right
    edge, and frames past N_b are zeroed after every step. Each row's frames come out as they would
    alone, up to float rounding. With one sequence (or all of equal length) there is no padding and
    no mask: upstream's exact path.

    With a `workspace` (CUDA graphs, `CFMWorkspaces`) the solve's buffers are the workspace's, N is
    its frame bucket (always masked), and every step is one replay of the workspace's graph: the step
    reads its time delta through a device counter, so all steps are the same graph."""

    def __init__(self, cfm: CFM, rows: Sequence[CFMRow], n_timesteps: int, *,
                 autocast: torch.dtype | None = None, workspace: CFMWorkspace | None = None) -> None:
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
        N = padded_frames(cfm, lengths) if workspace is None else workspace.frames
        for r, n_b in zip(rows, lengths, strict=True):
            if r.prompt.size(-1) > n_b:
                raise ValueError(f"prompt has {r.prompt.size(-1)} frames but mu only {n_b}")
            if tuple(r.noise.shape) != (1, M, n_b):
                raise ValueError(f"noise shape {tuple(r.noise.shape)} != {(1, M, n_b)}")
        self.B, self.N, self.lengths = B, N, lengths
        self.cfg = any(r.cfg_rate > 0 for r in rows)
        R = 2 * B if self.cfg else B
        if workspace is not None and N < padded_frames(cfm, lengths, bucket=1, always=True):
            raise ValueError(f"a workspace of {N} frames cannot pad sequences of {max(lengths)}")
        padded = workspace is not None or any(n_b != N for n_b in lengths)
        self.workspace = workspace
        ws = workspace or CFMWorkspace.alloc(R, B, M, N, first.size(-1), rows[0].style.size(-1), n_timesteps,
                                             padded=padded, dtype=dtype, device=dev)
        if (ws.rows, ws.batch, ws.frames, ws.padded) != (R, B, N, padded):
            raise ValueError(f"workspace of {ws.rows} rows x {ws.frames} frames cannot hold {R} x {N}")
        if workspace is not None:
            ws.reset(n_timesteps)

        # All per-step inputs are preallocated once: rows [:B] conditional, rows [B:] the CFG null
        # branch whose raw prompt_x, style and mu stay zero (mu then becomes cond_projection.bias).
        self.stacked_x, self.stacked_prompt_x, self.stacked_style = ws.x, ws.prompt_x, ws.style
        self.stacked_mu, self.stacked_t, self.prompt_mask = ws.mu, ws.t_rows, ws.prompt_mask
        for b0, b1 in _same_voice_runs(rows):
            # A voice's prompt and style go to its consecutive rows in one broadcast copy each (a job's
            # segments mostly come from one request).
            p = rows[b0].prompt.size(-1)
            self.stacked_prompt_x[b0:b1, :, :p] = rows[b0].prompt
            self.stacked_style[b0:b1] = rows[b0].style
        for b, r in enumerate(rows):
            p, n_b = r.prompt.size(-1), lengths[b]
            self.stacked_mu[b, :n_b] = r.mu[0]
            # The state starts as the noise with its prompt region at 0 (the rest of x is already 0).
            self.stacked_x[b, :, p:n_b] = r.noise[0, :, p:]
        # Every host value of the solve (masks, lengths, CFG weights, time deltas, the step counter) in
        # one copy: the workspace's small tensors are views of one block.
        ws.stage([r.prompt.size(-1) for r in rows], lengths, [r.cfg_rate for r in rows], n_timesteps)
        self.pad_mask = self.x_lens = None
        if padded:
            assert ws.pad_mask is not None and ws.x_lens is not None
            self.pad_mask, self.x_lens = ws.pad_mask, ws.x_lens  # [B, 1, N] frames past each sequence
        self.cond_w, self.null_w = ws.cond_w, ws.null_w
        self.x = self.stacked_x[:B]  # the ODE state lives in the conditional rows; updated in place
        self.dts, self.t, self.counter = ws.dts, ws.t, ws.counter

    @property
    def done(self) -> bool:
        return self.steps_done >= self.n_timesteps

    @torch.no_grad()
    def step(self, most: int = 1) -> int:
        """Euler steps of every sequence: `most` of them, or the ones left if fewer → how many were taken.
        With a workspace, `most` steps are one replay of a graph of that many steps; the steps left after
        the last whole replay go one at a time (two graphs per workspace, not one per remainder)."""
        if self.done:
            raise RuntimeError("the solve is done")
        ws = self.workspace
        left = self.n_timesteps - self.steps_done
        n = most if most <= left else 1
        if ws is None:
            self._advance(n)
        else:
            # The steps are the same work on the same buffers (the time delta comes through the device's
            # step counter), so n of them record as one graph.
            ws.graphs.run(("steps", n), functools.partial(self._advance, n), ws.tensors())
        self.steps_done += n
        return n

    def _advance(self, n: int = 1) -> None:
        """`n` steps on the device alone (no host value changes between steps: graphed on CUDA)."""
        for _ in range(n):
            self._advance_one()

    def _advance_one(self) -> None:
        B, x = self.B, self.x
        dt = self.dts.index_select(0, self.counter.view(1)).squeeze(0)  # 0-d (dts[counter] would read counter)
        self.stacked_t.copy_(self.t.expand(self.stacked_t.size(0)))
        est = self.cfm.estimator
        # No autocast weight cache: a graph cannot keep one (and each weight is cast once per step anyway).
        with torch.autocast(x.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None,
                            cache_enabled=False):
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
        self.counter.add_(1)

    def target(self, b: int) -> Tensor:
        """Sequence b's generated frames (1, M, N_b − P_b), after the last step (a view of the solve's
        state: read it before the workspace serves another solve)."""
        return self.x[b : b + 1, :, self.rows[b].prompt.size(-1) : self.lengths[b]]

    def close(self) -> None:
        """Give the workspace back (the device reads issued so far on this stream stay ordered first)."""
        if self.workspace is not None:
            self.workspace.busy = False
            self.workspace = None


def _same_voice_runs(rows: Sequence[CFMRow]) -> list[tuple[int, int]]:
    """[b0, b1) ranges of consecutive rows sharing one prompt mel and one style (the same tensors)."""
    runs: list[tuple[int, int]] = []
    for b, r in enumerate(rows):
        if runs and r.prompt is rows[runs[-1][0]].prompt and r.style is rows[runs[-1][0]].style:
            runs[-1] = (runs[-1][0], b + 1)
        else:
            runs.append((b, b + 1))
    return runs


MAX_DIFFUSION_STEPS = 200  # the time-delta table of a workspace (SynthesisOptions.diffusion_steps ≤ 200)


@dataclass(eq=False, kw_only=True)
class CFMWorkspace:
    """The fixed buffers of solves of one shape: R rows (2B with CFG), B sequences, N frames. Rows [:B]
    are the conditional branch, [B:] the null branch. `graphs` holds the step's CUDA graph."""

    rows: int
    batch: int
    frames: int
    padded: bool
    x: Tensor  # [R, M, N]
    prompt_x: Tensor  # [R, M, N]
    style: Tensor  # [R, S]
    mu: Tensor  # [R, N, Cc]
    t_rows: Tensor  # [R] float32
    prompt_mask: Tensor  # [B, 1, N] bool
    pad_mask: Tensor | None  # [B, 1, N] bool
    x_lens: Tensor | None  # [R] int64
    cond_w: Tensor  # [B, 1, 1]
    null_w: Tensor  # [B, 1, 1]
    dts: Tensor  # [MAX_DIFFUSION_STEPS] float32
    t: Tensor  # [] float32
    counter: Tensor  # [] int64: steps done
    graphs: Graphs
    block: Tensor  # [bytes] uint8: the small tensors above are views of it (`stage` fills it in one copy)
    busy: bool = False

    @classmethod
    def alloc(cls, R: int, B: int, M: int, N: int, content: int, style: int, steps: int, *, padded: bool,
              dtype: torch.dtype, device: torch.device) -> CFMWorkspace:
        def z(*shape: int, dt: torch.dtype = dtype) -> Tensor:
            return torch.zeros(shape, dtype=dt, device=device)

        small = _small_layout(R, B, N, max(steps, MAX_DIFFUSION_STEPS), padded=padded, dtype=dtype)
        block = torch.zeros(_block_bytes(small), dtype=torch.uint8, device=device)
        views = _views(block, small)
        return cls(rows=R, batch=B, frames=N, padded=padded, x=z(R, M, N), prompt_x=z(R, M, N), style=z(R, style),
                   mu=z(R, N, content), t_rows=z(R, dt=torch.float32), prompt_mask=views["prompt_mask"],
                   pad_mask=views.get("pad_mask"), x_lens=views.get("x_lens"), cond_w=views["cond_w"],
                   null_w=views["null_w"], dts=views["dts"], t=views["t"], counter=views["counter"],
                   graphs=Graphs("cfm"), block=block)

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.x, self.prompt_x, self.style, self.mu, self.t_rows, self.prompt_mask, self.pad_mask,
                            self.x_lens, self.cond_w, self.null_w, self.dts, self.t, self.counter) if t is not None]

    def reset(self, steps: int) -> None:
        """Zero what a solve fills row by row (a shorter sequence must not see the last one's frames)."""
        if steps > self.dts.size(0):
            raise ValueError(f"{steps} diffusion steps exceed the workspace's {self.dts.size(0)}")
        for t in (self.x, self.prompt_x, self.mu):  # style: every conditional row is written, null rows stay 0
            t.zero_()

    def stage(self, prompts: Sequence[int], lengths: Sequence[int], cfg_rates: Sequence[float], steps: int) -> None:
        """A solve's host values into the small tensors, in one host→device copy (on CUDA from pinned
        memory: the copy does not wait): prompt and padding masks, lengths, CFG weights (1 + r) and r
        rounded to float32 as Python-float scalars would be, the time deltas of `steps` Euler steps (from
        a float32 linspace, as upstream), t and the step counter at 0."""
        small = _small_layout(self.rows, self.batch, self.frames, self.dts.size(0), padded=self.padded,
                              dtype=self.cond_w.dtype)
        with staged(self.block) as host:
            v = _views(host, small)
            frames = torch.arange(self.frames)
            for b, (p, n_b) in enumerate(zip(prompts, lengths, strict=True)):
                v["prompt_mask"][b, 0] = frames < p
                if self.padded:
                    v["pad_mask"][b, 0] = frames >= n_b
            if self.padded:
                v["x_lens"].copy_(torch.tensor(list(lengths) * (self.rows // self.batch)))
            v["cond_w"].copy_(torch.tensor([1.0 + r for r in cfg_rates], dtype=self.cond_w.dtype).view(-1, 1, 1))
            v["null_w"].copy_(torch.tensor(list(cfg_rates), dtype=self.null_w.dtype).view(-1, 1, 1))
            t_span = torch.linspace(0, 1, steps + 1, dtype=torch.float32)
            v["dts"][:steps] = t_span[1:] - t_span[:-1]


def _small_layout(R: int, B: int, N: int, steps: int, *, padded: bool, dtype: torch.dtype
                  ) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """A workspace's small tensors: name, shape, dtype, in their order in its block."""
    layout = [("prompt_mask", (B, 1, N), torch.bool), ("cond_w", (B, 1, 1), dtype), ("null_w", (B, 1, 1), dtype),
              ("dts", (steps,), torch.float32), ("t", (), torch.float32), ("counter", (), torch.long)]
    if padded:
        layout += [("pad_mask", (B, 1, N), torch.bool), ("x_lens", (R,), torch.long)]
    return layout


_ALIGN = 16  # each small tensor starts on this many bytes (a view as int64 needs 8)


def _block_bytes(layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]]) -> int:
    total = 0
    for _, shape, dt in layout:
        total += -(-math.prod(shape) * dt.itemsize // _ALIGN) * _ALIGN
    return total


def _views(block: Tensor, layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]]) -> dict[str, Tensor]:
    """Each small tensor of `layout` as a view of the uint8 `block`."""
    out, at = {}, 0
    for name, shape, dt in layout:
        n = math.prod(shape) * dt.itemsize
        out[name] = block[at : at + n].view(dt).view(shape)
        at += -(-n // _ALIGN) * _ALIGN
    return out


class CFMWorkspaces:
    """Workspaces by shape for the CUDA engine: B sequences padded to a multiple of FRAME_BUCKET frames, so
    a handful of graphs serve every job. A workspace serves one solve at a time (`solve` checks one out,
    `CFMSolve.close` gives it back); idle ones beyond `keep` are dropped oldest first, graphs and all."""

    FRAME_BUCKET = 64

    def __init__(self, cfm: CFM, autocast: torch.dtype | None, *, keep: int = 32) -> None:
        self.cfm, self.autocast, self.keep = cfm, autocast, keep
        self.pool: list[CFMWorkspace] = []  # least recently used first

    def solve(self, rows: Sequence[CFMRow], steps: int) -> CFMSolve:
        first = rows[0]
        B, M = len(rows), self.cfm.in_channels
        R = 2 * B if any(r.cfg_rate > 0 for r in rows) else B
        N = padded_frames(self.cfm, [r.mu.size(1) for r in rows], bucket=self.FRAME_BUCKET, always=True)
        ws = next((w for w in self.pool if not w.busy and (w.rows, w.batch, w.frames) == (R, B, N)
                   and w.x.dtype == first.mu.dtype), None)
        if ws is None:
            ws = CFMWorkspace.alloc(R, B, M, N, first.mu.size(-1), first.style.size(-1), steps, padded=True,
                                    dtype=first.mu.dtype, device=first.mu.device)
            idle = [w for w in self.pool if not w.busy]
            for w in idle[: max(0, len(self.pool) + 1 - self.keep)]:
                self.pool.remove(w)
        else:
            self.pool.remove(ws)
        self.pool.append(ws)
        ws.busy = True
        try:
            return CFMSolve(self.cfm, rows, steps, autocast=self.autocast, workspace=ws)
        except BaseException:
            ws.busy = False
            raise


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
