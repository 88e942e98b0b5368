"""IndexTTS2 inference in plain PyTorch: the public surface (what the daemon and the CLIs import).

Names are imported lazily so that the torch-free parts (`errors`, `options`, `requests`, `pcm`,
`text`) can be used without building, or even importing, the model modules."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import Engine
    from .errors import DeviceFault, TtsdError
    from .options import EMOTIONS, SynthesisOptions
    from .pipeline import Pipeline, Segment
    from .requests import Event, Request, RequestDone, RequestFailed, SegmentAudio, SegmentDone
    from .voice import Voice

_EXPORTS = {
    "Engine": ".engine",
    "DeviceFault": ".errors",
    "TtsdError": ".errors",
    "EMOTIONS": ".options",
    "SynthesisOptions": ".options",
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
    "DeviceFault", "EMOTIONS", "Engine", "Event", "Pipeline", "Request", "RequestDone", "RequestFailed",
    "Segment", "SegmentAudio", "SegmentDone", "SynthesisOptions", "TtsdError", "Voice",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
