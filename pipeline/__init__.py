"""IndexTTS2 inference in plain PyTorch: the public surface (what the daemon and the CLIs import).

Names are imported lazily so that the light parts (`errors`, `requests`, `text`) can be used without
building, or even importing, the model modules. The synthesis options and the errors a client sees
are in `ttsd.api`, which never imports torch."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import Engine
    from .errors import DeviceFault
    from .pipeline import Pipeline, Segment
    from .requests import Event, Request, RequestDone, RequestFailed, SegmentAudio, SegmentDone
    from .voice import Voice

_EXPORTS = {
    "Engine": ".engine",
    "DeviceFault": ".errors",
    "Pipeline": ".pipeline",
    "Segment": ".pipeline",
    "Event": ".requests",
    "Request": ".requests",
    "RequestDone": ".requests",
    "RequestFailed": ".requests",
    "SegmentAudio": ".requests",
    "SegmentDone": ".requests",
    "Voice": ".voice",
}

__all__ = [
    "DeviceFault", "Engine", "Event", "Pipeline", "Request", "RequestDone", "RequestFailed", "Segment",
    "SegmentAudio", "SegmentDone", "Voice",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
