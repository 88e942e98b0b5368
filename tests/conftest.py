"""Shared test fixtures: the fixture sets in ../shared/fixtures, golden tensors, the parity rule.

Every fixture set directory named `indextts2-*` under the shared fixtures folder is picked up
(override with TTSD_FIXTURES=dir1:dir2), so other seeds and configs run the same tests."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"
VARIANTS = ("base", "emo_vector", "emo_audio")
REL_TOL = 1e-4  # max|a-b| <= REL_TOL * max(1, max|golden|)  (float32 CPU parity rule)


def fixture_dirs() -> list[Path]:
    env = os.environ.get("TTSD_FIXTURES")
    if env:
        return [Path(p) for p in env.split(os.pathsep) if p]
    return sorted(p for p in SHARED_FIXTURES.glob("indextts2-*") if (p / "golden" / "manifest.json").is_file())


@dataclass
class FixtureSet:
    """One fixture set: an official-format checkpoint, inputs and golden tensors."""

    root: Path

    @property
    def ckpt(self) -> Path:
        return self.root / "ckpt"

    @property
    def golden_dir(self) -> Path:
        return self.root / "golden"

    @cached_property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.golden_dir / "manifest.json").read_text(encoding="utf-8"))

    def variant(self, name: str) -> dict[str, Any]:
        return self.manifest["variants"][name]

    def golden(self, variant: str, stage: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.golden_dir / variant / f"{stage}.safetensors"))

    def input_path(self, name: str) -> Path:
        return self.golden_dir / name

    @property
    def text(self) -> str:
        return str(self.manifest["inputs"]["text"])

    @property
    def settings(self) -> dict[str, Any]:
        return self.manifest["settings"]


def max_abs_err(actual: torch.Tensor, golden: torch.Tensor) -> float:
    return float((actual.detach().double().cpu() - golden.double()).abs().max()) if golden.numel() else 0.0


def assert_close(actual: torch.Tensor, golden: torch.Tensor, name: str = "tensor") -> None:
    """The parity rule: same shape, and max|a-b| <= 1e-4 * max(1, max|golden|)."""
    assert tuple(actual.shape) == tuple(golden.shape), (
        f"{name}: shape {tuple(actual.shape)} != golden {tuple(golden.shape)}"
    )
    scale = max(1.0, float(golden.double().abs().max())) if golden.numel() else 1.0
    err = max_abs_err(actual, golden)
    assert err <= REL_TOL * scale, f"{name}: max abs err {err:.3e} > {REL_TOL:.0e} * {scale:.3g}"


def assert_equal(actual: torch.Tensor, golden: torch.Tensor, name: str = "tensor") -> None:
    """Exact equality for ids and codes."""
    assert tuple(actual.shape) == tuple(golden.shape), (
        f"{name}: shape {tuple(actual.shape)} != golden {tuple(golden.shape)}"
    )
    assert torch.equal(actual.cpu().to(golden.dtype), golden), f"{name}: values differ from golden"


EDITS = ("removed", "renamed", "reshaped")


def edit_checkpoint(src: Path, dst: Path, how: str, key: str) -> Path:
    """Copy safetensors `src` to `dst` with tensor `key` removed, renamed (`key_renamed`) or given one extra row."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    if how == "removed":
        del tensors[key]
    elif how == "renamed":
        tensors[key + "_renamed"] = tensors.pop(key)
    elif how == "reshaped":
        tensors[key] = torch.cat([tensors[key], tensors[key][:1]])
    else:
        raise ValueError(how)
    save_file(tensors, str(dst))
    return dst


def assert_names_edit(err: Any, how: str, name: str) -> None:
    """The CheckpointMismatch for an edit_checkpoint edit lists exactly that tensor, under its module name."""
    if how == "removed":
        assert err.missing == [name] and not err.unexpected and not err.misshaped, err
    elif how == "renamed":
        assert err.missing == [name] and err.unexpected == [name + "_renamed"] and not err.misshaped, err
    else:
        assert len(err.misshaped) == 1 and err.misshaped[0].startswith(name + ":") and not err.missing, err
    assert name in str(err)


@pytest.fixture(scope="session", params=fixture_dirs(), ids=lambda p: p.name)
def fx(request: pytest.FixtureRequest) -> FixtureSet:
    return FixtureSet(request.param)


@pytest.fixture(scope="session")
def converted(fx: FixtureSet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture's official checkpoint converted with ttsd-convert (once per session)."""
    from ttsd.pipeline.convert import convert

    out = tmp_path_factory.mktemp(f"ckpt-{fx.root.name}")
    convert(fx.ckpt, out, progress=False)
    return out


@pytest.fixture(scope="session")
def pipeline(converted: Path) -> Any:
    """One Pipeline on CPU for the whole session (tests that need their own load it themselves)."""
    from ttsd.pipeline.pipeline import Pipeline

    return Pipeline.load(converted, device="cpu")


@pytest.fixture(params=VARIANTS)
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no CUDA device on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
