"""Deployment: `ttsd fetch` (against a local stand-in, never the network), the systemd unit, and
the daemon's sd_notify messages on a NOTIFY_SOCKET the test owns."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ttsd.api.errors import ConfigError
from ttsd.pipeline import download
from ttsd.pipeline.download import RELEASE, FetchError, RemoteFile

from .conftest import REPO, FixtureSet

CONVERTED_FILES = {
    "config.yaml", "tokenizer.json", "gpt.safetensors", "s2mel.safetensors", "w2v_bert.json",
    "w2v_bert.safetensors", "w2v_stats.safetensors", "semantic_codec.safetensors",
    "campplus.safetensors", "bigvgan.json", "bigvgan.safetensors", "emotion.safetensors",
}


class StandIn:
    """A Downloader that copies release files from the fixture's official directory, recording calls."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[RemoteFile] = []

    def __call__(self, rf: RemoteFile, dest: Path) -> None:
        self.calls.append(rf)
        shutil.copyfile(self.root / rf.dest, dest)


# --- ttsd fetch -------------------------------------------------------------------------------


def test_fetch_lays_out_and_converts(fx: FixtureSet, tmp_path: Path) -> None:
    """Every release file is requested once from its repository, laid out officially, and converted."""
    stand_in = StandIn(fx.ckpt)
    manifest = download.fetch_and_convert(tmp_path / "ckpt", stand_in, progress=False)

    assert sorted((rf.repo_id, rf.filename) for rf in stand_in.calls) == sorted(
        (rf.repo_id, rf.filename) for rf in RELEASE)
    repos = {rf.repo_id for rf in stand_in.calls}
    assert repos == {"IndexTeam/IndexTTS-2", "facebook/w2v-bert-2.0", "amphion/MaskGCT", "funasr/campplus",
                     "nvidia/bigvgan_v2_22khz_80band_256x"}
    official = tmp_path / "ckpt.official"  # beside the converted directory, never inside it
    for rf in RELEASE:
        assert (official / rf.dest).read_bytes() == (fx.ckpt / rf.dest).read_bytes(), rf.dest
    assert manifest == tmp_path / "ckpt" / "manifest.json"
    assert set(json.loads(manifest.read_text())["files"]) == CONVERTED_FILES
    record = json.loads((official / "fetch.json").read_text())
    gpt = record["gpt.pth"]
    assert gpt["repo_id"] == "IndexTeam/IndexTTS-2"
    assert gpt["sha256"] == hashlib.sha256((fx.ckpt / "gpt.pth").read_bytes()).hexdigest()


def test_fetch_resumes_without_downloading_valid_files(fx: FixtureSet, tmp_path: Path) -> None:
    """A second fetch keeps files that verify and downloads only the one that went missing."""
    download.fetch(tmp_path, StandIn(fx.ckpt))
    (tmp_path / "feat2.pt").unlink()
    again = StandIn(fx.ckpt)
    download.fetch(tmp_path, again)
    assert [rf.dest for rf in again.calls] == ["feat2.pt"]


@pytest.mark.parametrize("bad", [b"version https://git-lfs.github.com/spec/v1\noid sha256:00\n",
                                 b"<!DOCTYPE html><html>502 Bad Gateway</html>", b""])
def test_fetch_rejects_error_pages_and_lfs_pointers(fx: FixtureSet, tmp_path: Path, bad: bytes) -> None:
    """A download that left an LFS pointer, an HTML page or nothing fails verification before conversion."""
    stand_in = StandIn(fx.ckpt)

    def broken(rf: RemoteFile, dest: Path) -> None:
        stand_in(rf, dest)
        if rf.dest == "s2mel.pth":
            dest.write_bytes(bad)

    with pytest.raises(FetchError, match="s2mel.pth"):
        download.fetch_and_convert(tmp_path / "ckpt", broken, progress=False)
    assert not (tmp_path / "ckpt").exists()


def test_fetch_checks_pinned_sha256(fx: FixtureSet, tmp_path: Path) -> None:
    """A pinned SHA-256 that differs from the downloaded bytes is an error naming both digests."""
    pinned = RemoteFile(repo_id="IndexTeam/IndexTTS-2", filename="feat1.pt", dest="feat1.pt", kind="torch",
                        sha256="0" * 64)
    with pytest.raises(FetchError, match="0{64}"):
        download.fetch(tmp_path, StandIn(fx.ckpt), files=[pinned])


def test_hub_downloader_verifies_lfs_blob_digest(fx: FixtureSet, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub downloader hard-links a cache blob whose name is its SHA-256 and rejects one that is not."""
    import huggingface_hub

    blobs = tmp_path / "cache"
    blobs.mkdir()
    data = (fx.ckpt / "feat1.pt").read_bytes()
    good = blobs / hashlib.sha256(data).hexdigest()
    good.write_bytes(data)
    corrupt = blobs / ("f" * 64)
    corrupt.write_bytes(data)
    served = {"feat1.pt": good, "feat2.pt": corrupt}
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda *, repo_id, filename, **kw: str(served[filename]))

    dl = download.hub_downloader(cache_dir=blobs)
    rf = RemoteFile(repo_id="IndexTeam/IndexTTS-2", filename="feat1.pt", dest="feat1.pt", kind="torch")
    dl(rf, tmp_path / "feat1.pt")
    assert (tmp_path / "feat1.pt").read_bytes() == data
    bad = RemoteFile(repo_id="IndexTeam/IndexTTS-2", filename="feat2.pt", dest="feat2.pt", kind="torch")
    with pytest.raises(FetchError, match="differs from the hub"):
        dl(bad, tmp_path / "feat2.pt")


def test_fetch_cli_from_directory(fx: FixtureSet, tmp_path: Path) -> None:
    """`ttsd fetch --from-dir` verifies, lays out and converts a local official directory, exit 0."""
    from ttsd.daemon.cli import main as ttsd

    assert ttsd(["fetch", "--dst", str(tmp_path / "ckpt"), "--from-dir", str(fx.ckpt), "--no-emo-text"]) == 0
    assert (tmp_path / "ckpt.official" / "hf_cache" / "bigvgan" / "bigvgan_generator.pt").is_file()
    assert set(json.loads((tmp_path / "ckpt" / "manifest.json").read_text())["files"]) == CONVERTED_FILES


def test_fetch_refuses_a_converted_destination_before_downloading(fx: FixtureSet, tmp_path: Path) -> None:
    """A second `ttsd fetch` into a finished checkpoint downloads nothing and exits 2 naming --force."""
    download.fetch_and_convert(tmp_path / "ckpt", StandIn(fx.ckpt), progress=False)
    again = StandIn(fx.ckpt)
    with pytest.raises(ConfigError, match="not empty; pass --force"):
        download.fetch_and_convert(tmp_path / "ckpt", again, progress=False)
    assert again.calls == []


def test_fetch_cli_reports_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A stand-in directory lacking a release file gives exit 2 and a one-line message naming it."""
    (tmp_path / "src").mkdir()
    assert download.main(["--dst", str(tmp_path / "ckpt"), "--from-dir", str(tmp_path / "src")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ttsd fetch: IndexTeam/IndexTTS-2/config.yaml: not in")


# --- systemd unit -----------------------------------------------------------------------------

UNIT = REPO / "systemd" / "ttsd.service"


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit (ExecStart pointed at this install's ttsd)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed on this machine")
    ttsd = Path(sys.executable).parent / "ttsd"
    if not ttsd.is_file():
        pytest.skip(f"the ttsd console script is not installed at {ttsd}")
    # verify checks that ExecStart's binary exists, so point it at the one installed here.
    unit = tmp_path / "ttsd.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/ttsd", str(ttsd)))
    proc = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "ttsd.service" not in proc.stderr, proc.stderr


def test_unit_settings_match_the_daemon() -> None:
    """The unit is Type=notify, restarts on failure, runs the config file, and outlasts the drain."""
    from ttsd.daemon.config import DaemonConfig

    s = _unit_settings()
    assert s["Type"] == ["notify"]
    assert s["Restart"] == ["on-failure"]
    assert s["ExecStart"][0].split()[1:4] == ["serve", "--config", "/etc/ttsd/ttsd.toml"]
    assert s["EnvironmentFile"] == ["-/etc/ttsd/ttsd.env"]
    assert "MemoryDenyWriteExecute" not in s and "PrivateDevices" not in s
    assert {"NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp"} <= s.keys()
    from ttsd.daemon.server import CANCEL_GRACE_S
    from ttsd.daemon.session import CLOSE_TIMEOUT_S, FLUSH_ON_CLOSE_S

    stop_s = float(s["TimeoutStopSec"][0].removesuffix("s"))
    # The longest a SIGTERM can take whatever clients do (server.py's module docstring).
    worst_s = DaemonConfig().drain_timeout_s + 2 * CANCEL_GRACE_S + FLUSH_ON_CLOSE_S + 2 * CLOSE_TIMEOUT_S
    assert stop_s > worst_s


def test_example_toml_names_every_config_field() -> None:
    """systemd/ttsd.toml documents every DaemonConfig field (token commented out) and the daemon loads it."""
    import dataclasses
    import re
    from dataclasses import replace

    from ttsd.daemon.config import DaemonConfig, load_toml

    path = REPO / "systemd" / "ttsd.toml"
    values = load_toml(path)
    # TOML has no null, so optional secrets appear as a commented-out `#key = ...` line.
    commented = set(re.findall(r"^#(\w+) = ", path.read_text(), flags=re.M))
    assert set(values) | commented == {f.name for f in dataclasses.fields(DaemonConfig)}
    replace(DaemonConfig(), **values).validated()


# --- sd_notify --------------------------------------------------------------------------------
