"""Model families: what differs between IndexTTS-2 and IndexTTS-2.5, answered in one place.

A family is looked up once per checkpoint from config.yaml's `version` (`family_for`): when the
official files are converted (convert.py), when a converted directory is loaded (Pipeline.load)
and when random weights are written (tools/tiny.py). Everything else asks the family it was given
instead of comparing versions or the types of the parts. A family is stateless: the parts it
builds (front end, codec, gpt_layer) live on the Pipeline and are handed back to it.

Adding a model is one module with a frozen class implementing `ModelFamily` that calls `register`
on import (family_v2.py and family_v25.py are the ones there are), and its name in `_BUILTIN`.
Shapes: M codes, D GPT width, Cw w2v width, T target mel frames."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ttsd.api.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from ttsd.api.options import SynthesisOptions

    from .convert import SourceLayout
    from .gpt import GPTConfig, UnifiedVoice
    from .requests import Segment
    from .text import TextNormalizer

# The modules whose import registers a family: a new family is one more name here.
_BUILTIN = ("family_v2", "family_v25")

DEFAULT_VERSION = 2.0  # a config.yaml without `version` is IndexTTS-2 (upstream never reads the key)

Plan = dict[str, Callable[[Path], None]]  # output file name → writer, as convert.plan returns


class Codec(Protocol):
    """What the code around a family reads of its semantic codec."""

    codebook_size: int  # K: valid GPT codes are [0, K)

    def reference_features(self, spk_cond_emb: Tensor) -> Tensor: ...


class ModelFamily(Protocol):
    """One model version's answers. Parts typed `object` are the family's own (built by it)."""

    # Read-only data (a frozen dataclass's fields satisfy these properties).
    @property
    def name(self) -> str:
        """ "2", "2.5": clients are told the model is f"IndexTTS-{name}"."""
        ...

    @property
    def version(self) -> float:
        """config.yaml's `version`."""
        ...

    @property
    def model_id(self) -> str:
        """The `ttsd fetch --model` / `ttsd make-tiny --model` name."""
        ...

    @property
    def languages(self) -> tuple[str, ...]:
        """The `lang` codes it speaks (reported in the protocol's hello)."""
        ...

    @property
    def second_pass(self) -> bool:
        """s2mel reads a second GPT pass through gpt_layer; False: the codec decodes the codes alone."""
        ...

    @property
    def code_rate_hz(self) -> float:
        """GPT codes per second of speech (50 for IndexTTS-2, 25 for IndexTTS-2.5)."""
        ...

    @property
    def duration_control(self) -> bool:
        """duration_factor stretches the target (the OpenAI `speed` maps to it)."""
        ...

    @property
    def s2mel_parts(self) -> tuple[str, ...]:
        """The `net` entries of s2mel.pth it reads (what convert and make-tiny write)."""
        ...

    @property
    def gpt_class(self) -> type[UnifiedVoice]:
        """The GPT with this family's speaker conditioning (gpt.py)."""
        ...

    @property
    def official_tokenizer(self) -> str:
        """The release's vocabulary file (what make-tiny writes for it)."""
        ...

    @property
    def official_codec(self) -> str:
        """The release's semantic codec file, relative to the official directory."""
        ...

    @property
    def tokenizer_file(self) -> str:
        """The vocabulary's name in the converted directory."""
        ...

    @property
    def codec_file(self) -> str:
        """The semantic codec's name in the converted directory."""
        ...

    # --- convert time ---------------------------------------------------------------------------
    def looks_like(self, root: Path) -> bool:
        """An official directory whose config has no `version`: are these this family's files?"""
        ...

    def convert_plan(self, src: SourceLayout) -> Plan:
        """Converted file name → writer for an official directory of this family."""
        ...

    # --- load time ------------------------------------------------------------------------------
    def check_gpt(self, cfg: GPTConfig) -> None:
        """ConfigError unless gpt.safetensors has this family's speaker conditioning."""
        ...

    def load_front_end(self, ckpt: Path, normalizer: TextNormalizer, gpt_cfg: GPTConfig) -> object:
        """The text front end (vocabulary from the converted directory)."""
        ...

    def load_codec(self, ckpt: Path, config: Mapping[str, Any], device: torch.device) -> Codec: ...

    def load_gpt_layer(self, s2mel: Path, device: torch.device) -> nn.Module | None: ...

    def check_parts(self, front: object, codec: Codec, gpt_layer: nn.Module | None) -> None:
        """ConfigError when a part belongs to another family (a Pipeline built by hand)."""
        ...

    # --- per request ----------------------------------------------------------------------------
    def check_options(self, opts: SynthesisOptions) -> None:
        """BadOptions for an option this model does not have, rather than ignoring it."""
        ...

    def split_text(self, front: object, text: str, opts: SynthesisOptions) -> list[Segment]:
        """Text → GPT-sized segments as upstream splits them. Raises BadText."""
        ...

    def prefix(self, gpt: UnifiedVoice, speech_latent: Tensor, emovec: Tensor, segment: Segment) -> Tensor:
        """The decode prefix [1, P, D] of one segment."""
        ...

    def mel_frames(self, codec: Codec, codes: int, opts: SynthesisOptions) -> int:
        """Target mel frames of `codes` GPT codes (host arithmetic, no device access)."""
        ...

    def overlap_frames(self, codes: int, opts: SynthesisOptions) -> int:
        """Mel frames a chunk crossfade spans for `codes` overlapping codes (upstream's streaming
        recipe: int(codes × 1.72) at 50 codes/s; IndexTTS-2.5 from its 25 codes/s)."""
        ...

    def content(
        self, codec: Codec, gpt_layer: nn.Module | None, codes: Tensor, latent: Tensor | None, opts: SynthesisOptions
    ) -> tuple[Tensor, list[int]]:
        """Codes [1, M] (and the second-pass latent [1, M, D]) → content [1, M', Cw] and target lengths [T]."""
        ...

    def padded_content(self, codec: Codec, gpt_layer: nn.Module | None) -> Callable[[Tensor, Tensor], Tensor] | None:
        """`content` of B right-padded rows with no host value, for a graph: (codes [B, M], latents
        [B, M, D]) → [B, M, Cw], position by position (a row's padding does not reach its frames); None
        where the content needs host values (IndexTTS-2.5's durations): then it runs row by row."""
        ...


FAMILIES: dict[float, ModelFamily] = {}  # config `version` → family


def register(family: ModelFamily) -> ModelFamily:
    """Make `family` the one `family_for` returns for its config `version`."""
    FAMILIES[float(family.version)] = family
    return family


def families() -> tuple[ModelFamily, ...]:
    """Every registered family, built-in ones first."""
    for module in _BUILTIN:
        importlib.import_module(f"{__package__}.{module}")
    return tuple(FAMILIES.values())


def family_for(config: Mapping[str, Any], file: str = "config.yaml") -> ModelFamily:
    """The family a parsed config.yaml describes (its `version` key; none means IndexTTS-2).
    Any other value is a ConfigError naming `file`."""
    known = families()
    raw = config.get("version")
    try:
        return FAMILIES[DEFAULT_VERSION if raw is None else float(raw)]
    except (KeyError, TypeError, ValueError):
        names = " or ".join(f"{f.version:.1f}" for f in known)
        raise ConfigError(f"{file}: version {raw!r} is not supported (IndexTTS {names})") from None


def family_named(model_id: str) -> ModelFamily:
    """The family `ttsd fetch --model` / `make-tiny --model` calls `model_id`; ValueError if none."""
    for f in families():
        if f.model_id == model_id:
            return f
    raise ValueError(f"unknown model {model_id!r}; choose one of {', '.join(f.model_id for f in families())}")


def source_family(root: Path, config: Mapping[str, Any]) -> ModelFamily:
    """The family of an official directory: its config's `version` when it has one, else the
    family whose files it holds (IndexTTS-2 when none claims them)."""
    if "version" in config:
        return family_for(config, str(root / "config.yaml"))
    claimed = [f for f in families() if f.looks_like(root)]
    return claimed[0] if len(claimed) == 1 else family_for(config)
