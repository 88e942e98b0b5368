"""Strict loading, conversion round-trip and checkpoint corruption handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ttsd.pipeline.convert import S2MEL_PARTS, S2MEL_PARTS_V25, convert, sha256_file, verify
from ttsd.pipeline.errors import CheckpointError, CheckpointMismatch
from ttsd.pipeline.weights import load_module, read_shapes

from .conftest import FixtureSet


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.register_buffer("table", torch.zeros(5), persistent=False)

    def build_buffers(self, device: torch.device) -> None:
        self.table = torch.arange(5, dtype=torch.float32, device=device)


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


def _good() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in _Tiny().state_dict().items()}


def test_load_module_strict_roundtrip(tmp_path: Path) -> None:
    """A matching file loads every tensor, builds non-persistent buffers and leaves nothing on meta."""
    state = _good()
    m = load_module(_Tiny, _save(tmp_path / "ok.safetensors", state), "cpu")
    for k, v in state.items():
        assert torch.equal(m.state_dict()[k], v)
    assert torch.equal(m.table, torch.arange(5, dtype=torch.float32))
    assert not any(t.is_meta for t in [*m.parameters(), *m.buffers()])


def test_mismatch_lists_everything_at_once(tmp_path: Path) -> None:
    """One error names the missing, the unexpected and the mis-shaped key together."""
    state = _good()
    del state["proj.bias"]
    state["proj.extra"] = torch.zeros(2)
    state["norm.weight"] = torch.zeros(7)
    with pytest.raises(CheckpointMismatch) as ei:
        load_module(_Tiny, _save(tmp_path / "bad.safetensors", state), "cpu")
    e = ei.value
    assert e.missing == ["proj.bias"]
    assert e.unexpected == ["proj.extra"]
    assert len(e.misshaped) == 1 and e.misshaped[0].startswith("norm.weight:")
    text = str(e)
    assert "proj.bias" in text and "proj.extra" in text and "norm.weight" in text


def test_skip_and_prefix(tmp_path: Path) -> None:
    """Keys under a prefix load into the module; skipped keys must exist but are not loaded."""
    state = {f"sub.{k}": v for k, v in _good().items()}
    state["sub.unused.weight"] = torch.ones(2)
    path = _save(tmp_path / "pref.safetensors", state)
    load_module(_Tiny, path, "cpu", prefix="sub.", skip=lambda k: k.startswith("unused."))
    with pytest.raises(CheckpointMismatch) as ei:
        load_module(_Tiny, path, "cpu", prefix="sub.")
    assert ei.value.unexpected == ["unused.weight"]


@pytest.mark.parametrize("keep", [0, 5, 40, -3])
def test_truncated_file_is_a_clear_error(tmp_path: Path, keep: int) -> None:
    """A safetensors file cut short raises CheckpointError saying it is truncated or corrupt."""
    path = _save(tmp_path / "full.safetensors", _good())
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        read_shapes(cut)
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        load_module(_Tiny, cut, "cpu")


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    """Loading from a path that does not exist names the path."""
    with pytest.raises(CheckpointError, match="not found"):
        load_module(_Tiny, tmp_path / "nope.safetensors", "cpu")


@pytest.mark.model_versions("2", "2.5")
def test_convert_keeps_every_tensor(fx: FixtureSet, converted: Path) -> None:
    """ttsd-convert changes only the container: every official tensor arrives with its key and value."""
    official = torch.load(fx.ckpt / "gpt.pth", map_location="cpu", weights_only=True)
    if "model" in official:
        official = official["model"]
    mine = load_file(str(converted / "gpt.safetensors"))
    assert mine.keys() == official.keys()
    for k, v in official.items():
        assert torch.equal(mine[k], v), k
    s2 = torch.load(fx.ckpt / "s2mel.pth", map_location="cpu", weights_only=True)["net"]
    mine_s2 = load_file(str(converted / "s2mel.safetensors"))
    parts = S2MEL_PARTS if fx.version == "2" else S2MEL_PARTS_V25  # 2.5's s2mel has no gpt_layer
    want = {f"{part}.{k}" for part in parts for k in s2[part]}
    assert mine_s2.keys() == want
    big = torch.load(fx.ckpt / "hf_cache" / "bigvgan" / "bigvgan_generator.pt", map_location="cpu", weights_only=True)
    mine_big = load_file(str(converted / "bigvgan.safetensors"))
    assert mine_big.keys() == big["generator"].keys()
    emo = load_file(str(converted / "emotion.safetensors"))
    assert torch.equal(emo["spk_matrix"], torch.load(fx.ckpt / "feat1.pt", weights_only=True))
    assert torch.equal(emo["emo_matrix"], torch.load(fx.ckpt / "feat2.pt", weights_only=True))


@pytest.mark.model_versions("2", "2.5")
def test_manifest_hashes_and_verify(converted: Path, tmp_path: Path) -> None:
    """The manifest lists a correct SHA-256 for every file, and verify() catches a modified file."""
    manifest = json.loads((converted / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in converted.iterdir() if p.name != "manifest.json"}
    for name, entry in manifest["files"].items():
        assert sha256_file(converted / name) == entry["sha256"]
    verify(converted)
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in converted.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    data = bytearray((copy / "emotion.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "emotion.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        verify(copy)


@pytest.mark.model_versions("2", "2.5")
def test_convert_reports_missing_official_file(fx: FixtureSet, tmp_path: Path) -> None:
    """A source directory lacking gpt.pth fails with an error naming the file."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.yaml").write_bytes((fx.ckpt / "config.yaml").read_bytes())
    with pytest.raises(CheckpointError, match="not found"):
        convert(src, tmp_path / "dst", progress=False)
