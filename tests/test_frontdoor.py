"""The front door, as a new user meets it: `ttsd synth`, `ttsd serve`, `ttsd-say`, `ttsd-convert`
and set-up. Every failure is one line on stderr with a non-zero exit and no traceback, and it
comes before anything expensive (loading weights, contacting a daemon, downloading)."""

from __future__ import annotations

import argparse
import ast
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from ttsd.api import rules
from ttsd.api.errors import ConfigError
from ttsd.clients import say
from ttsd.daemon.cli import build_parser as ttsd_parser
from ttsd.daemon.config import RANDOM_WEIGHT_PRESETS, DaemonConfig
from ttsd.pipeline import synth
from ttsd.pipeline.convert import convert, verify
from ttsd.pipeline.device import CUDA_WHEEL_HINT, resolve_device
from ttsd.pipeline.pipeline import Pipeline, Segment
from ttsd.pipeline.requests import SegmentAudio
from ttsd.tools.ports import free_port

from .conftest import REPO, FixtureSet

TIMEOUT_S = 120  # hang guard for subprocesses that must fail before loading anything


def one_line(err: str) -> str:
    """The single non-empty stderr line of a failed command (no traceback, nothing else)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "TTSD_TOKEN")}
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**clean, **(env or {})})


def wav(path: Path, seconds: float, rate: int = 22_050) -> Path:
    noise = np.random.default_rng(0).uniform(-0.3, 0.3, int(seconds * rate)).astype(np.float32)
    sf.write(str(path), noise, rate, subtype="PCM_16")
    return path


def unavailable_cuda_device() -> str:
    """A CUDA device name this machine cannot use (the whole of CUDA on a CPU-only torch)."""
    return "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


@pytest.fixture
def no_load(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail the test if anything loads a model."""

    def refuse(*args: Any, **kwargs: Any) -> Pipeline:
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(Pipeline, "load", refuse)
    yield


@pytest.fixture
def synth_args(tmp_path: Path) -> list[str]:
    """A `ttsd synth` command line whose every argument is valid (the checkpoint directory exists)."""
    (tmp_path / "ckpt").mkdir()
    return ["--checkpoints", str(tmp_path / "ckpt"), "--voice", str(wav(tmp_path / "voice.wav", 2.0)),
            "--text", "Hello there.", "--out", str(tmp_path / "out.wav"), "--device", "cpu"]


def synth_fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert synth.main(argv) == 2
    return one_line(capsys.readouterr().err)


# --- 1. the device is checked before loading ---------------------------------------------------


def test_resolve_device_names_what_to_install() -> None:
    """auto and cpu resolve; an unusable CUDA name, an unknown type and garbage each give one line."""
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError) as e:
        resolve_device(unavailable_cuda_device())
    if torch.version.cuda is None:
        assert "built without CUDA" in str(e.value) and CUDA_WHEEL_HINT in str(e.value)
    assert "\n" not in str(e.value)
    for name in ("tpu", "mps", "gpu please", "cuda:x"):
        with pytest.raises(ConfigError) as e:
            resolve_device(name)
        assert repr(name) in str(e.value) and "cuda" in str(e.value) and "\n" not in str(e.value), name


def test_synth_and_serve_refuse_an_unusable_device_in_one_line(synth_args: list[str], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               no_load: None) -> None:
    """`ttsd synth --device cuda` and `ttsd serve --device cuda` on a machine without it: one line, non-zero."""
    device = unavailable_cuda_device()
    assert device in synth_fails([*synth_args, "--device", device], capsys)
    proc = run("-m", "ttsd.daemon", "serve", "--checkpoints", str(tmp_path / "ckpt"), "--port", "0",
               "--device", device)
    assert proc.returncode == 2 and device in one_line(proc.stderr)


# --- 2. ttsd synth checks everything before loading ---------------------------------------------


@pytest.mark.parametrize("change, message", [
    (["--voice", "{tmp}/missing.wav"], "no such file: {tmp}/missing.wav"),
    (["--voice", "{tmp}/ckpt"], "no such file: {tmp}/ckpt"),
    (["--voice", "{tmp}/text.wav"], "cannot decode speaker reference audio {tmp}/text.wav"),
    (["--emo-audio", "{tmp}/missing.wav"], "no such file: {tmp}/missing.wav"),
    (["--out", "{tmp}/nodir/out.wav"], "cannot write {tmp}/nodir/out.wav: No such file or directory"),
    (["--out", "{tmp}/text.wav/out.wav"], "cannot write {tmp}/text.wav/out.wav: Not a directory"),
    (["--out", "{tmp}/ckpt"], "output format"),
    (["--out", "{tmp}/out.xyz"], "output format '.xyz' is not supported; use wav, flac, ogg"),
    (["--temperature", "0"], "temperature must be in (0, 100], got 0"),
    (["--emo-vector", "0,0,0,0,0,0,0,2"], "emo_vector weights must be in [0, 1.2]"),
    (["--text", "  "], "text is empty"),
    (["--text", "x" * 5001], "text has 5001 characters; the limit is 5000"),
    (["--checkpoints", "{tmp}/none"], "no such checkpoint directory: {tmp}/none"),
    (["--noise", "{tmp}/none.safetensors"], "no such file: {tmp}/none.safetensors"),
])
def test_synth_checks_every_argument_before_loading(change: list[str], message: str, synth_args: list[str],
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    no_load: None) -> None:
    """Each wrong argument is reported in one line naming it, exit 2, and no model is loaded."""
    (tmp_path / "text.wav").write_text("not audio")
    argv = [*synth_args, *(a.format(tmp=tmp_path) for a in change)]
    assert message.format(tmp=tmp_path) in synth_fails(argv, capsys)
    assert not (tmp_path / "out.wav").exists()  # the writability probe leaves nothing behind


def test_synth_limits_are_the_daemons_unless_raised(synth_args: list[str], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """5000 characters and 30 s of reference by default (as DaemonConfig); the two flags raise them."""
    assert (DaemonConfig().max_text_chars, DaemonConfig().max_reference_audio_s) == (
        rules.MAX_TEXT_CHARS, rules.MAX_REFERENCE_AUDIO_S)
    long_voice = str(wav(tmp_path / "long.wav", rules.MAX_REFERENCE_AUDIO_S + 1))
    long_text = "x" * (rules.MAX_TEXT_CHARS + 1)
    assert "speaker reference audio" in synth_fails([*synth_args, "--voice", long_voice], capsys)
    raised = [*synth_args, "--voice", long_voice, "--text", long_text, "--max-reference-audio-s", "60",
              "--max-text-chars", "6000"]
    job = synth.check(synth.build_parser().parse_args(raised), long_text)
    assert job.text == long_text and job.device == torch.device("cpu")


# --- 3. progress per segment ---------------------------------------------------------------------


def _audio(i: int, n: int, silence: int = 0) -> SegmentAudio:
    seg = Segment(index=i, text_ids=[1], text=f"SENTENCE {i}.")
    return SegmentAudio(seg, np.full(n, float(i), dtype=np.float32), silence)


def test_progress_is_one_log_line_per_segment_off_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    """Off a terminal each finished segment is one log line "segment i/N done ..." as it arrives."""
    segments = [_audio(i, 2205) for i in range(3)]
    report = synth.with_progress(iter(segments), 3, 22_050)
    with caplog.at_level(logging.INFO, logger="ttsd.pipeline.synth"):
        for i, item in enumerate(report, 1):
            assert item is segments[i - 1]
            assert caplog.records[-1].getMessage().startswith(f"segment {i}/3 done audio_s=0.10")
    assert len(caplog.records) == 3


def test_progress_is_a_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                         caplog: pytest.LogCaptureFixture) -> None:
    """On a terminal the per-segment report is a tqdm bar instead of log lines; the stream passes unchanged."""
    pytest.importorskip("tqdm")
    segments = [_audio(i, 10, silence=4 if i else 0) for i in range(3)]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    passed = list(synth.with_progress(iter(segments), 3, 22_050))
    assert passed == segments
    assert "3/3" in capsys.readouterr().err and not caplog.records
    pcm = synth.render(iter(passed))
    assert pcm.tolist() == [0.0] * 10 + [0.0] * 4 + [1.0] * 10 + [0.0] * 4 + [2.0] * 10


# --- 4. ttsd-convert writes all or nothing ----------------------------------------------------------


def test_convert_refuses_a_non_empty_destination_and_the_source(fx: FixtureSet, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A non-empty DST without --force, the source itself, or a folder inside it: one line, exit 2, nothing written."""
    from ttsd.pipeline.convert import main

    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main([str(fx.ckpt), str(dst)]) == 2
    assert "not empty; pass --force" in one_line(capsys.readouterr().err)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    src = tmp_path / "src"
    shutil.copytree(fx.ckpt, src)
    for bad in (src, src / "converted"):
        assert main([str(src), str(bad), "--force"]) == 2
        assert "source" in one_line(capsys.readouterr().err)
    assert not (src / "converted").exists() and not (src / "manifest.json").exists()


def test_failed_convert_leaves_no_destination(fx: FixtureSet, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A conversion that fails half way leaves neither DST nor a temporary directory behind."""
    from ttsd.pipeline import convert as module

    real = module._bigvgan

    def broken(src: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, "_bigvgan", broken)
    with pytest.raises(OSError):
        convert(fx.ckpt, tmp_path / "dst", progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(module, "_bigvgan", real)
    convert(fx.ckpt, tmp_path / "dst", progress=False)
    verify(tmp_path / "dst")


def test_convert_force_replaces_the_destination_whole(fx: FixtureSet, tmp_path: Path) -> None:
    """With --force a non-empty DST is replaced in one rename: stale files are gone, the manifest verifies."""
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "stale.safetensors").write_bytes(b"old")
    manifest = convert(fx.ckpt, dst, progress=False, force=True)
    assert not (dst / "stale.safetensors").exists() and manifest.is_file()
    verify(dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


# --- 5. file errors say what happened -----------------------------------------------------------


def test_say_reports_missing_voice_and_unwritable_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """ttsd-say names a missing voice file and an unwritable --out in one line each, before connecting."""
    (tmp_path / "file").write_text("x")
    closed = f"ws://127.0.0.1:{free_port()}"  # nothing listens: reaching it would be a different error
    assert say.main(["--url", closed, "--voice", str(tmp_path / "none.wav"), "Hi."]) == 2
    assert one_line(capsys.readouterr().err) == f"ttsd-say: no such file: {tmp_path / 'none.wav'}"
    voice = str(wav(tmp_path / "v.wav", 1.0))
    out = tmp_path / "file" / "o.wav"
    assert say.main(["--url", closed, "--voice", voice, "--out", str(out), "Hi."]) == 2
    assert one_line(capsys.readouterr().err) == f"ttsd-say: cannot write {out}: Not a directory"
    assert say.main(["--url", closed, "--voice", voice, "--out", str(tmp_path / "o.wav"), "--top-p", "2",
                     "Hi."]) == 2
    assert "top_p must be in (0, 1]" in one_line(capsys.readouterr().err)


# --- 6. one rule for offline and daemon ---------------------------------------------------------


@pytest.mark.parametrize("ext", sorted(rules.OUTPUT_FORMATS))
def test_synth_and_say_accept_the_same_output_formats(ext: str, synth_args: list[str], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Both CLIs accept an output extension exactly when libsndfile here can write it (mp3 may be absent)."""
    out = tmp_path / f"o{ext}"
    voice = str(wav(tmp_path / "v.wav", 1.0))
    writable = ext in rules.writable_formats()
    for check in (lambda: synth.check(synth.build_parser().parse_args([*synth_args, "--out", str(out)]), "Hi."),
                  lambda: say.check(say.build_parser().parse_args(["--voice", voice, "--out", str(out), "Hi."]))):
        if writable:
            check()
        else:
            with pytest.raises(ConfigError, match="cannot be written by this machine's libsndfile"):
                check()
    if writable:  # and the file the writer makes is in that format
        synth.write(out, np.zeros(2205, dtype=np.float32), 22_050, rules.output_format(out))
        assert sf.info(str(out)).format == rules.OUTPUT_FORMATS[ext][0]


def test_a_format_libsndfile_lacks_is_refused_by_both(synth_args: list[str], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Where libsndfile cannot encode mp3, `ttsd synth` and `ttsd-say` both refuse .mp3 in one line."""
    import soundfile

    monkeypatch.setattr(soundfile, "check_format", lambda fmt, sub=None, endian=None: fmt != "MP3")
    out = str(tmp_path / "o.mp3")
    assert "cannot be written" in synth_fails([*synth_args, "--out", out], capsys)
    assert say.main(["--voice", str(wav(tmp_path / "v.wav", 1.0)), "--out", out, "Hi."]) == 2
    assert "cannot be written" in one_line(capsys.readouterr().err)


# --- 7. ttsd itself ------------------------------------------------------------------------------


def test_version_and_serve_help_describe_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """`ttsd --version` names the version; every serve flag has a description; --random-weights lists its choices."""
    import importlib.metadata

    with pytest.raises(SystemExit) as exit_:
        ttsd_parser().parse_args(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"ttsd {importlib.metadata.version('ttsd')}"
    serve = next(a for a in ttsd_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    actions = {a.dest: a for a in serve._actions}
    for f in fields(DaemonConfig):
        text = str(actions[f.name].help)
        assert not text.startswith("default") and len(text.split("(default")[0].split()) >= 2, f.name
    assert tuple(actions["random_weights"].choices or ()) == RANDOM_WEIGHT_PRESETS
    assert "{tiny,full}" in serve.format_help()
    with pytest.raises(SystemExit):
        ttsd_parser().parse_args(["serve", "--random-weights", "huge"])


def test_serve_checks_the_port_before_loading(tmp_path: Path) -> None:
    """A taken port is reported in one line before the (here unloadable) checkpoint is even opened."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run("-m", "ttsd.daemon", "serve", "--checkpoints", str(tmp_path / "none"), "--port", str(port),
                   "--device", "cpu")
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1 port {port}" in one_line(proc.stderr)


def test_missing_extra_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Without the convert extra (tqdm here), ttsd-convert and ttsd make-tiny say which extra to install."""
    from ttsd.daemon.cli import main as ttsd
    from ttsd.pipeline.convert import main as ttsd_convert

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm → ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "ttsd.tools.tiny", raising=False)  # imported afresh, without tqdm
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.yaml").write_text("gpt_checkpoint: gpt.pth\n")
    assert ttsd_convert([str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    assert "needs the 'convert' extra" in one_line(capsys.readouterr().err)
    assert ttsd(["make-tiny", str(tmp_path / "tiny")]) == 2
    assert one_line(capsys.readouterr().err).startswith("ttsd make-tiny: needs the 'convert' extra (tqdm")
    assert not (tmp_path / "dst").exists() and not (tmp_path / "tiny").exists()


# --- the package layout (issue 11) --------------------------------------------------------------


def _imports(path: Path, package: str) -> set[str]:
    """Modules of `ttsd` a source file imports, at any depth, outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ttsd.")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            if base.startswith("ttsd."):
                found |= {f"{base}.{a.name}" for a in node.names} | {base}
    return found


FOLDERS = {"api": "ttsd.api", "pipeline": "ttsd.pipeline", "daemon": "ttsd.daemon", "clients": "ttsd.clients",
           "tools": "ttsd.tools"}


def _module_graph() -> dict[str, set[str]]:
    modules: dict[str, Path] = {}
    for folder, package in FOLDERS.items():
        for path in (REPO / folder).rglob("*.py"):
            rel = path.relative_to(REPO / folder).with_suffix("")
            name = ".".join([package, *rel.parts]).removesuffix(".__init__")
            modules[name] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = {m for m in _imports(path, package) if m in modules and m != name}
    return graph


def test_runtime_never_imports_the_tools_and_has_no_import_cycle() -> None:
    """No runtime module imports ttsd.tools, except `serve --random-weights` (server) and the opt-in
    simulated device `TTSD_SIMCUDA=1` (cli), both imported only when asked for; no import chain loops back."""
    graph = _module_graph()
    users = sorted(m for m, deps in graph.items() if not m.startswith("ttsd.tools") and any(
        d.startswith("ttsd.tools") for d in deps))
    assert users == ["ttsd.daemon.cli", "ttsd.daemon.server"]
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            assert state.get(d) != 1, f"import cycle: {' -> '.join([*path, m, d])}"
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_convert_tools_are_an_extra_not_a_runtime_dependency() -> None:
    """sentencepiece, protobuf and tqdm are in the convert extra only, and setup.sh installs that extra."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = " ".join(project["dependencies"])
    for name in ("sentencepiece", "protobuf", "tqdm"):
        assert name not in runtime and any(r.startswith(name) for r in project["optional-dependencies"]["convert"])
    installed = re.search(r"-e '\.\[([a-z,]+)\]'", (REPO / "scripts" / "setup.sh").read_text(encoding="utf-8"))
    assert installed and {"dev", "client", "convert"} <= set(installed.group(1).split(","))


# --- 8 and 9. the README and set-up are true ---------------------------------------------------


def test_readme_states_the_limits_formats_and_gpu_install() -> None:
    """The README names every limit, every output format, the log destination and the GPU torch install."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for f in fields(DaemonConfig):
        if f.name.startswith("max_") or f.name.endswith("_timeout_s"):
            assert f"`{f.name}`" in readme, f.name
    for ext in rules.OUTPUT_FORMATS:
        assert ext.lstrip(".") in readme
    for needle in ("journalctl", "libportaudio2", "--max-mel-tokens", "ttsd fetch", "TTSD_TORCH_INDEX"):
        assert needle in readme, needle
    setup = (REPO / "scripts" / "setup.sh").read_text(encoding="utf-8")
    hint_vars = re.findall(r"\b([A-Z_]+)=", CUDA_WHEEL_HINT)  # what the device error tells a GPU user to set
    assert hint_vars and all(v in setup for v in hint_vars), hint_vars


def test_readme_commands_use_real_flags() -> None:
    """Every `--flag` the README gives a ttsd, ttsd-say or ttsd-convert command exists on that command."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    serve = next(a for a in ttsd_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    parsers = {"ttsd serve": serve, "ttsd synth": synth.build_parser(), "ttsd-say": say.build_parser()}
    known = {name: {s for a in ap._actions for s in a.option_strings} for name, ap in parsers.items()}
    checked = 0
    for line in readme.splitlines():
        for name, flags in known.items():
            m = re.search(re.escape(name) + r"\b(.*)", line)
            if m is None:
                continue
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", m.group(1).split("|")[0]):
                assert flag in flags, f"README: {name} has no {flag}: {line}"
                checked += 1
    assert checked >= 10


def test_fetch_layout_in_the_docs_is_the_code() -> None:
    """checkpoints/README.md and the README name the directories ttsd fetch really uses."""
    from ttsd.pipeline.download import DEFAULT_DST, source_dir

    for doc in (REPO / "checkpoints" / "README.md", REPO / "README.md"):
        text = doc.read_text(encoding="utf-8")
        assert str(DEFAULT_DST) in text and str(source_dir(DEFAULT_DST)) in text, doc


# --- a clone tests itself ----------------------------------------------------------------------


def test_repository_carries_the_fixture_sets_and_a_missing_one_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fixture sets are tracked in the repository; without one the run stops at collection."""
    from . import conftest

    tracked = subprocess.run(["git", "ls-files", "tests/fixtures"], cwd=REPO, capture_output=True, text=True)
    if tracked.returncode == 0:  # a source tree without git (an sdist) has nothing to ask
        names = {Path(f).parts[2] for f in tracked.stdout.split() if len(Path(f).parts) > 3}
        assert set(conftest.REQUIRED_SETS) <= names, names
    assert {p.name for p in conftest.fixture_dirs()} >= {"indextts2-tiny-s1", "indextts25-tiny-s1"}
    assert "qwen-emo-tiny-s1" in {p.name for p in conftest.qwen_emo_dirs()}
    monkeypatch.delenv("TTSD_FIXTURES", raising=False)
    monkeypatch.setattr(conftest, "SHARED_FIXTURES", tmp_path / "shared")
    partial = tmp_path / "repo"
    shutil.copytree(conftest.REPO_FIXTURES / "indextts2-tiny-s1" / "golden", partial / "indextts2-tiny-s1" / "golden",
                    ignore=shutil.ignore_patterns("*.safetensors", "*.wav"))
    monkeypatch.setattr(conftest, "REPO_FIXTURES", partial)
    with pytest.raises(conftest.MissingFixtures, match="indextts25-tiny-s1"):
        conftest.fixture_dirs()
    with pytest.raises(conftest.MissingFixtures, match="qwen-emo-tiny-s1"):
        conftest.qwen_emo_dirs()
    monkeypatch.setenv("TTSD_FIXTURES", str(tmp_path / "nowhere"))
    with pytest.raises(conftest.MissingFixtures, match="nowhere"):
        conftest.fixture_dirs()
