"""The ModelFamily seam: the family is chosen once from the config, and nothing outside the family
modules compares model versions or the types of a family's parts to decide what to do."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from ttsd.api.errors import ConfigError
from ttsd.pipeline import family as family_mod
from ttsd.pipeline.family import family_for, family_named, source_family

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("api", "pipeline", "daemon", "clients", "tools", "bench")
FAMILY_MODULES = {Path("pipeline/family.py"), Path("pipeline/family_v2.py"), Path("pipeline/family_v25.py")}

# Ways the code has told the models apart. Each is a regex over one source line.
VERSION_CHECKS = {
    "a version constant": r"\bV2(_?5)?\b(?!\w)",
    "a model version compared": r"(?<![\w.])version\s*[!=]=|version\s*[!=]=\s*([\"'\d]|V\d)",
    "an identity check on a version": r"\bis\s+(not\s+)?V2",
    "the literal 2.5": r"[\"']2\.5[\"']",
    "a model name compared": r"[!=]=\s*[\"']indextts-|[\"']indextts-[\d.]+[\"']\s*[!=]=",
    "a front end or codec type test": (
        r"isinstance\([^)]*\b(TextFrontEnd25|TextTokenizer|EnhancedCodec|SemanticCodec)\b"
    ),
    "gpt_layer presence as the version": r"\bgpt_layer\s+is\s+(not\s+)?None",
    "campplus presence as the version": r"\bcampplus\s+is\s+(not\s+)?None",
    "the old version reader": r"\bmodel_version\(",
}


def _sources() -> list[Path]:
    return sorted(
        p.relative_to(ROOT)
        for d in SCANNED
        for p in (ROOT / d).rglob("*.py")
        if p.relative_to(ROOT) not in FAMILY_MODULES and ".venv" not in p.parts
    )


def test_no_version_branches_outside_the_family_modules() -> None:
    """No source file outside pipeline/family*.py tells IndexTTS-2 from 2.5 by version, name or part type."""
    found = []
    for rel in _sources():
        for n, line in enumerate((ROOT / rel).read_text(encoding="utf-8").splitlines(), start=1):
            code = line.split("#", 1)[0]
            for what, pattern in VERSION_CHECKS.items():
                if re.search(pattern, code):
                    found.append(f"{rel}:{n}: {what}: {line.strip()}")
    assert not found, "branch on the model family instead:\n" + "\n".join(found)


def test_the_scan_sees_the_patterns() -> None:
    """Each pattern matches the line it was written for (a typo would make the scan pass vacuously)."""
    samples = {
        "a version constant": "if version == V2_5:",
        "a model version compared": 'if server.pipeline.version != "2.5":',
        "an identity check on a version": "if v is V2:",
        "the literal 2.5": 'x = "2.5"',
        "a model name compared": 'if model == "indextts-2.5":',
        "a front end or codec type test": "if isinstance(self.codec, EnhancedCodec):",
        "gpt_layer presence as the version": "if self.gpt_layer is None:",
        "campplus presence as the version": "if cfg.campplus is None:",
        "the old version reader": "v = model_version(config)",
    }
    for what, line in samples.items():
        assert re.search(VERSION_CHECKS[what], line), what
    assert not re.search(VERSION_CHECKS["a model version compared"], "if dist.version != WETEXTPROCESSING_VERSION:")


def test_the_config_version_picks_the_family() -> None:
    """No `version` means IndexTTS-2, 2.0 and 2.5 pick their families, anything else is a ConfigError."""
    assert family_for({}).name == "2"
    assert family_for({"version": 2.0}).name == "2"
    assert family_for({"version": "2.5"}).name == "2.5"
    assert family_named("indextts-2.5") is family_for({"version": 2.5})
    with pytest.raises(ConfigError, match="version 3.0 is not supported"):
        family_for({"version": 3.0})
    with pytest.raises(ValueError, match="unknown model"):
        family_named("indextts-3")


@dataclass(frozen=True, slots=True)
class _ThirdFamily:
    """A stand-in third model: registering it is all a new family needs for the lookup."""

    name: str = "3"
    version: float = 3.0
    model_id: str = "indextts-3"

    def looks_like(self, root: Path) -> bool:
        return (root / "model-3.bin").is_file()


def test_a_registered_third_family_is_what_load_looks_up(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A family registered at run time is picked by the lookup Pipeline.load and ttsd-convert use."""
    family_mod.families()  # the built-in ones registered first, so the copy holds them
    monkeypatch.setattr(family_mod, "FAMILIES", dict(family_mod.FAMILIES))  # the registration ends with the test
    third = _ThirdFamily()
    family_mod.register(third)  # type: ignore[arg-type]  # only the lookup's part of the interface
    assert family_for({"version": 3}) is third
    assert family_named("indextts-3") is third
    (tmp_path / "model-3.bin").write_bytes(b"x")
    assert source_family(tmp_path, {}) is third
    assert source_family(tmp_path, {"version": 2.5}).name == "2.5"
    assert family_for({}).name == "2"  # the others stay registered
