"""Which torch device to run on, checked before anything is loaded, with one-line errors.

A GPU host that installed the default CPU wheel would otherwise meet a long traceback deep inside
loading ("... requires a CUDA or other accelerator backend"); here it gets one line that says what
is wrong and what to install."""

from __future__ import annotations

import re

import torch

from .errors import ConfigError

CUDA_WHEEL_HINT = (
    "install a CUDA build of torch, e.g. TTSD_TORCH='torch==2.13.0' "
    "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu128 bash scripts/setup.sh"
)
_NAME = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N' → torch.device, or ConfigError."""
    m = _NAME.match(name.strip().lower())
    if m is None:
        raise ConfigError(f"device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    kind, index = m.group(1), m.group(2)
    if kind == "auto":
        if index is not None:
            raise ConfigError(f"device {name!r}: 'auto' takes no index")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cpu":
        if index not in (None, "0"):
            raise ConfigError(f"device {name!r}: the CPU has no index")
        return torch.device("cpu")
    if torch.version.cuda is None:
        raise ConfigError(f"device {name!r}: this torch {torch.__version__} was built without CUDA; {CUDA_WHEEL_HINT}")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: no CUDA device is visible (driver missing or CUDA_VISIBLE_DEVICES empty)")
    n = torch.cuda.device_count()
    i = 0 if index is None else int(index)
    if i >= n:
        raise ConfigError(f"device {name!r}: only {n} CUDA device(s) visible (cuda:0..cuda:{n - 1})")
    return torch.device("cuda", i)
