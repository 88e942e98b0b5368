"""The torch device a command asked for, checked before any weight is loaded; host values moved onto it.

`ttsd synth` and `ttsd serve` both resolve `--device` here, so a GPU name on a CPU-only torch
build (the wheel `scripts/setup.sh` installs by default) fails at once with one line saying what
to install, instead of a traceback from deep inside the first CUDA call."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Final

import torch
from torch import Tensor

from ttsd.api.errors import ConfigError

# How a GPU host gets a CUDA build of torch (README "GPU hosts"); named in the error below.
CUDA_WHEEL_HINT: Final = (
    "reinstall with a CUDA build of torch: rm -rf .venv && "
    "TTSD_TORCH_INDEX=https://download.pytorch.org/whl/cu128 bash scripts/setup.sh (README: GPU hosts)"
)


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA if available, else CPU), `cpu`, `cuda` or `cuda:N` → a usable torch.device.

    Raises ConfigError with one line for anything else: an unknown name, a device type this
    pipeline does not run on, CUDA on a torch built without it, or no such CUDA device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"device {name!r} is not supported: ttsd runs on cpu or cuda[:N] (or auto)")
    if torch.version.cuda is None:
        raise ConfigError(f"device {name!r}: this torch {torch.__version__} is built without CUDA; {CUDA_WHEEL_HINT}")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r}: torch {torch.__version__} has CUDA {torch.version.cuda}, but no GPU is usable "
            "(check nvidia-smi, the driver, and CUDA_VISIBLE_DEVICES)"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"device {name!r} does not exist: this machine has {count} CUDA device(s)")
    return device


def upload(values: Sequence[float] | Sequence[Sequence[int]], device: torch.device, dtype: torch.dtype = torch.long
           ) -> Tensor:
    """Host numbers → a tensor on `device` without blocking the host: on CUDA a non-blocking copy from
    pinned memory, issued on the current stream (PyTorch's pinned allocator keeps the buffer until that
    copy is done). A plain `torch.tensor(values, device=...)` would wait for the copy: a host sync."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True) if device.type == "cuda" else host


@contextmanager
def staged(buffer: Tensor) -> Iterator[Tensor]:
    """A zeroed host tensor shaped like the device `buffer`, to fill in the block; on leaving it, one
    non-blocking copy into `buffer` on the current stream. On CUDA the host tensor is pinned (so the copy
    does not wait, and PyTorch's pinned allocator keeps it until the copy is done); on the host it is
    `buffer` itself, zeroed, and nothing is copied."""
    if buffer.device.type == "cpu":
        yield buffer.zero_()
        return
    host = torch.zeros(buffer.shape, dtype=buffer.dtype, pin_memory=True)
    yield host
    buffer.copy_(host, non_blocking=True)
