"""IndexTTS2 inference in plain PyTorch: the public surface.

Names are imported lazily so that `ttsd.pipeline.text` or `ttsd.pipeline.errors` can be used
without building the model modules."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import TtsdError
    from .options import EMOTIONS, SynthesisOptions
    from .pipeline import GptOutput, Pipeline, Segment
    from .voice import Voice

_EXPORTS = {
    "TtsdError": ".errors",
    "EMOTIONS": ".options",
    "SynthesisOptions": ".options",
    "GptOutput": ".pipeline",
    "Pipeline": ".pipeline",
    "Segment": ".pipeline",
    "Voice": ".voice",
}

__all__ = ["EMOTIONS", "GptOutput", "Pipeline", "Segment", "SynthesisOptions", "TtsdError", "Voice"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
