"""Strict loading of safetensors checkpoints into modules built on the meta device.

One path, one error: build the module on `meta`, compare the file's keys and shapes with the
module's state dict, raise a single `CheckpointMismatch` listing everything missing, unexpected
and mis-shaped, then `load_state_dict(strict=True, assign=True)`. Non-persistent buffers are
rebuilt on the target device by each module's `build_buffers(device)` right after the load, and
the loader fails if anything is still on `meta`."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import CheckpointError, CheckpointMismatch

M = TypeVar("M", bound=nn.Module)

_HEADER_LIMIT_BYTES = 100 * 1024 * 1024  # safetensors' own cap on the JSON header


def _check_file(path: Path) -> None:
    """Validate the safetensors framing so truncation is reported as such, not as a parse error."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > _HEADER_LIMIT_BYTES or 8 + n > size:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors header (claims {n} bytes, file {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from e
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: truncated safetensors file: tensors need {8 + n + end} bytes, file has {size}")


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, without reading any tensor data."""
    path = Path(path)
    _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(f"{path}: unreadable safetensors file: {e}") from e


def read_tensors(
    path: Path, device: torch.device | str = "cpu", keys: Iterable[str] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors file (all of them, or `keys`), onto `device`; with `dtype`,
    each is cast on the host first, one at a time, so the device never holds both precisions."""
    path = Path(path)
    _check_file(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device) if dtype is None else "cpu") as f:
            names = list(f.keys()) if keys is None else list(keys)
            if dtype is None:
                return {k: f.get_tensor(k) for k in names}
            return {k: f.get_tensor(k).to(dtype).to(device) for k in names}
    except SafetensorError as e:
        raise CheckpointError(f"{path}: unreadable safetensors file: {e}") from e


def load_strict(
    module: nn.Module,
    path: Path,
    device: torch.device | str,
    prefix: str = "",
    skip: Callable[[str], bool] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Load `module` from the keys of `path` that start with `prefix` (prefix stripped), cast to
    `dtype` when given (on the host, before they reach `device`).

    `skip` names keys that are present in the file but deliberately not used (for example the
    w2v-BERT layers after the one we read); they are still required to be in the file."""
    path = Path(path)
    shapes = {k[len(prefix) :]: s for k, s in read_shapes(path).items() if k.startswith(prefix)}
    skipped = {k for k in shapes if skip is not None and skip(k)}
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    have = {k: s for k, s in shapes.items() if k not in skipped}
    missing = sorted(want.keys() - have.keys())
    unexpected = sorted(have.keys() - want.keys())
    misshaped = sorted(
        f"{k}: file {have[k]} vs model {want[k]}" for k in want.keys() & have.keys() if have[k] != want[k]
    )
    if missing or unexpected or misshaped:
        where = f"{path} [{prefix}*]" if prefix else path
        raise CheckpointMismatch(where, missing, unexpected, misshaped)
    tensors = read_tensors(path, device, keys=[prefix + k for k in want], dtype=dtype)
    state = {k[len(prefix) :]: v for k, v in tensors.items()}
    module.load_state_dict(state, strict=True, assign=True)


def build_buffers(module: nn.Module, device: torch.device | str) -> None:
    """Create non-persistent buffers on `device`, then fail if any tensor is still on meta."""
    for sub in module.modules():
        fn = getattr(sub, "build_buffers", None)
        if callable(fn):
            fn(torch.device(device))
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{type(module).__name__}: tensors left uninitialised after load: {left}")


def load_module(
    build: Callable[[], M],
    path: Path,
    device: torch.device | str,
    prefix: str = "",
    skip: Callable[[str], bool] | None = None,
    dtype: torch.dtype | None = None,
) -> M:
    """Build a module on meta, load it strictly from `path` (cast to `dtype` if given), build its
    buffers, set eval mode."""
    with torch.device("meta"):
        module = build()
    load_strict(module, path, device, prefix=prefix, skip=skip, dtype=dtype)
    build_buffers(module, device)
    return module.eval().requires_grad_(False)
