"""Reading the configuration that lives next to the weights: config.yaml and the JSON configs.

Component configs are frozen dataclasses at the top of each component file; they read their
fields through `require`, so a missing key is named, with its file and path, in one place.
Dimensions the official code hard-codes come from checkpoint tensor shapes through `shape`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ttsd.api.errors import ConfigError


def require(raw: Mapping[str, Any], key: str, where: str = "", file: str = "config.yaml") -> Any:
    """raw[key], or a ConfigError naming `file` and the dotted path `where.key`."""
    try:
        return raw[key]
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{file}: missing key {where + '.' if where else ''}{key}") from e


def shape(shapes: Mapping[str, tuple[int, ...]], key: str, file: str) -> tuple[int, ...]:
    """The shape of tensor `key` in a checkpoint header, for a dimension upstream hard-codes."""
    try:
        return shapes[key]
    except KeyError as e:
        raise ConfigError(f"{file} lacks {key}: cannot derive the dimension upstream hard-codes") from e


def load_yaml(path: Path) -> dict[str, Any]:
    """Parse config.yaml; a missing or malformed file is a ConfigError naming it."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw

