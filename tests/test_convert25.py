"""IndexTTS-2.5 checkpoints: version detection, ttsd-convert's 2.5 file set, `ttsd fetch --model`.

Fetching never touches the network: a stand-in downloader copies from the fixture's official
directory, as in test_systemd."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ttsd.api.errors import ConfigError
from ttsd.pipeline import download
from ttsd.pipeline.convert import SourceLayout, main, tiktoken_source
from ttsd.pipeline.download import (
    INDEXTTS25_REPO,
    QWEN_EMO,
    RELEASE,
    RELEASE_V25,
    FetchError,
    RemoteFile,
    release_files,
)
from ttsd.pipeline.errors import CheckpointError
from ttsd.pipeline.family import source_family

from .conftest import FixtureSet

pytestmark = pytest.mark.model_versions("2.5")

CONVERTED_FILES_V25 = {
    "config.yaml", "tokenizer.tiktoken", "gpt.safetensors", "s2mel.safetensors", "codec.safetensors",
    "w2v_bert.json", "w2v_bert.safetensors", "w2v_stats.safetensors", "campplus.safetensors", "bigvgan.json",
    "bigvgan.safetensors", "emotion.safetensors",
}


class StandIn:
    """A Downloader that copies release files from the fixture's official directory, recording calls."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[RemoteFile] = []

    def __call__(self, rf: RemoteFile, dest: Path) -> None:
        self.calls.append(rf)
        shutil.copyfile(self.root / rf.dest, dest)


def test_convert_writes_the_25_file_set(fx: FixtureSet, converted: Path) -> None:
    """A 2.5 directory converts to codec.safetensors (codec.pth's model dict, same keys and values)
    and a byte copy of the vocabulary, with no tokenizer.json or MaskGCT codec."""
    manifest = json.loads((converted / "manifest.json").read_text(encoding="utf-8"))
    assert set(manifest["files"]) == CONVERTED_FILES_V25
    official = torch.load(fx.ckpt / "codec.pth", map_location="cpu", weights_only=True)["model"]
    mine = load_file(str(converted / "codec.safetensors"))
    assert mine.keys() == official.keys()
    assert all(torch.equal(mine[k], v) for k, v in official.items())
    vocab = fx.ckpt / "multilingual_zh_ja_yue_char_del.tiktoken"
    assert (converted / "tokenizer.tiktoken").read_bytes() == vocab.read_bytes()


def _layout(root: Path, config: dict[str, object], files: list[str]) -> SourceLayout:
    root.mkdir(parents=True, exist_ok=True)
    for name in files:
        (root / name).write_bytes(b"x")
    return SourceLayout(root=root, config=config)


def source_version(src: SourceLayout) -> str:
    return source_family(src.root, src.config).name


def test_source_version_from_config_or_files(tmp_path: Path) -> None:
    """The config's version decides; without one, codec.pth + *.tiktoken and no bpe.model mean 2.5."""
    assert source_version(_layout(tmp_path / "a", {"version": 2.5}, [])) == "2.5"
    assert source_version(_layout(tmp_path / "b", {"version": 2.0}, ["codec.pth", "v.tiktoken"])) == "2"
    assert source_version(_layout(tmp_path / "c", {}, ["codec.pth", "v.tiktoken"])) == "2.5"
    assert source_version(_layout(tmp_path / "d", {}, ["codec.pth", "v.tiktoken", "bpe.model"])) == "2"
    assert source_version(_layout(tmp_path / "e", {}, ["bpe.model"])) == "2"
    assert source_version(_layout(tmp_path / "g", {}, [])) == "2"
    with pytest.raises(ConfigError, match="version 3.0 is not supported"):
        source_version(_layout(tmp_path / "f", {"version": 3.0}, []))


def test_tiktoken_source_prefers_upstream_name(tmp_path: Path) -> None:
    """The vocabulary is upstream's file name, else the only *.tiktoken; two others are ambiguous."""
    one = _layout(tmp_path / "one", {}, ["custom.tiktoken"])
    assert tiktoken_source(one).name == "custom.tiktoken"
    named = _layout(tmp_path / "named", {}, ["a.tiktoken", "multilingual_zh_ja_yue_char_del.tiktoken"])
    assert tiktoken_source(named).name == "multilingual_zh_ja_yue_char_del.tiktoken"
    with pytest.raises(CheckpointError, match=r"found 2 \(a.tiktoken, b.tiktoken\)"):
        tiktoken_source(_layout(tmp_path / "two", {}, ["a.tiktoken", "b.tiktoken"]))
    with pytest.raises(CheckpointError, match="found none"):
        tiktoken_source(_layout(tmp_path / "none", {}, []))


def test_convert_cli_on_a_25_directory(fx: FixtureSet, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ttsd-convert` converts a 2.5 directory (exit 0, manifest verified), and one lacking codec.pth
    fails with exit 2 and a one-line message naming the file."""
    assert main([str(fx.ckpt), str(tmp_path / "out"), "--verify"]) == 0
    assert set(json.loads((tmp_path / "out" / "manifest.json").read_text())["files"]) == CONVERTED_FILES_V25
    src = tmp_path / "src"
    shutil.copytree(fx.ckpt, src, ignore=shutil.ignore_patterns("codec.pth"))
    assert main([str(src), str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ttsd-convert:") and "codec.pth" in err[-1]


def test_config_without_version_still_converts_as_25(fx: FixtureSet, tmp_path: Path) -> None:
    """A 2.5 directory whose config.yaml lacks `version` is recognised from its files and converted."""
    src = tmp_path / "src"
    shutil.copytree(fx.ckpt, src)
    config = yaml.safe_load((src / "config.yaml").read_text(encoding="utf-8"))
    del config["version"]
    (src / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main([str(src), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "codec.safetensors").is_file()


def test_fetch_25_lays_out_and_converts(fx: FixtureSet, tmp_path: Path) -> None:
    """`fetch --model indextts-2.5` requests every 2.5 release file once (no MaskGCT codec, no
    bpe.model), lays them out officially and converts them."""
    stand_in = StandIn(fx.ckpt)
    manifest = download.fetch_and_convert(tmp_path / "ckpt", stand_in,
                                          files=release_files("indextts-2.5", emo_text=False), progress=False)
    assert sorted(rf.filename for rf in stand_in.calls) == sorted(rf.filename for rf in RELEASE_V25)
    assert {rf.repo_id for rf in stand_in.calls} == {
        INDEXTTS25_REPO, "facebook/w2v-bert-2.0", "funasr/campplus", "nvidia/bigvgan_v2_22khz_80band_256x"}
    assert {"codec.pth", "multilingual_zh_ja_yue_char_del.tiktoken"} <= {rf.dest for rf in stand_in.calls}
    assert set(json.loads(manifest.read_text())["files"]) == CONVERTED_FILES_V25


def test_fetch_cli_model_choice(fx: FixtureSet, tmp_path: Path) -> None:
    """`ttsd fetch --model indextts-2.5 --from-dir` verifies, lays out and converts the 2.5 set, exit 0."""
    from ttsd.daemon.cli import main as ttsd

    assert ttsd(["fetch", "--model", "indextts-2.5", "--dst", str(tmp_path / "ckpt"), "--from-dir", str(fx.ckpt),
                 "--no-emo-text"]) == 0
    assert (tmp_path / "ckpt.official" / "codec.pth").is_file()  # the official files beside the converted ones
    assert set(json.loads((tmp_path / "ckpt" / "manifest.json").read_text())["files"]) == CONVERTED_FILES_V25


def test_release_files_per_model_and_revision() -> None:
    """Each model names its own repository's files (plus the emotion-from-text folder unless left out);
    a revision applies to that repository only."""
    assert release_files("indextts-2", emo_text=False) == RELEASE
    assert release_files("indextts-2") == RELEASE + QWEN_EMO
    assert release_files("indextts-2.5") == RELEASE_V25 + QWEN_EMO
    pinned = release_files("indextts-2.5", "v1")
    assert {rf.revision for rf in pinned if rf.repo_id == INDEXTTS25_REPO} == {"v1"}
    assert {rf.revision for rf in pinned if rf.repo_id != INDEXTTS25_REPO} == {None}
    with pytest.raises(FetchError, match="unknown model"):
        release_files("indextts-3")


@pytest.mark.parametrize("bad", [b"<!DOCTYPE html><html>404</html>", b"version https://git-lfs.github.com/spec/v1\n"])
def test_fetch_rejects_a_bad_vocabulary(fx: FixtureSet, tmp_path: Path, bad: bytes) -> None:
    """A vocabulary download that left an error page or an LFS pointer fails verification, naming it."""
    stand_in = StandIn(fx.ckpt)

    def broken(rf: RemoteFile, dest: Path) -> None:
        stand_in(rf, dest)
        if rf.dest.endswith(".tiktoken"):
            dest.write_bytes(bad)

    with pytest.raises(FetchError, match="tiktoken"):
        download.fetch(tmp_path, broken, files=RELEASE_V25)
