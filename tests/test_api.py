"""ttsd.api and the clients without torch: they import, parse and check with torch (and the
pipeline and daemon packages) blocked from importing, and no module of theirs imports them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest

from .conftest import REPO

# What a machine with `pip install ttsd` (no `server` extra) lacks, or what clients must not need.
BLOCKED: Final = ("torch", "ttsd.pipeline", "ttsd.daemon")
GUARD_S: Final = 300.0  # a hang guard for the subprocesses, not a timing assertion

# Prepended to the code a subprocess runs: a meta-path finder that makes every blocked module (and
# its submodules) fail as an uninstalled one does, and records each attempt, so an `except
# ImportError` that swallows one still fails the run (exit 99 from `finish_blocked`).
BLOCKER: Final = f"""
import sys
from importlib.abc import MetaPathFinder

class _Blocked(MetaPathFinder):
    names = {BLOCKED!r}
    tried = []

    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in self.names):
            self.tried.append(name)
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
        return None

BLOCKED = _Blocked()
sys.meta_path.insert(0, BLOCKED)

def finish_blocked(rc):
    if BLOCKED.tried:
        print("imported blocked modules:", sorted(set(BLOCKED.tried)), file=sys.stderr)
        return 99
    return rc
"""

# `ttsd-say ARGS` in an interpreter where torch, ttsd.pipeline and ttsd.daemon cannot be imported.
SAY_BLOCKED: Final = BLOCKER + """
from ttsd.clients.say import main
raise SystemExit(finish_blocked(main(sys.argv[1:])))
"""


def say_blocked(*args: str) -> list[str]:
    """argv running ttsd-say with `args` and the blocked modules unimportable."""
    return [sys.executable, "-c", SAY_BLOCKED, *args]


def run_blocked(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, timeout=GUARD_S)


def test_the_blocker_blocks() -> None:
    """The finder makes torch unimportable and reports the attempt, so the other tests can trust it."""
    proc = run_blocked("""
try:
    import torch
except ModuleNotFoundError as e:
    print("blocked", e.name)
raise SystemExit(finish_blocked(0))
""")
    assert proc.stdout.strip() == "blocked torch"
    assert proc.returncode == 99 and "torch" in proc.stderr


def test_api_and_say_work_without_torch(tmp_path: Path) -> None:
    """With torch, ttsd.pipeline and ttsd.daemon blocked: ttsd.api and the clients import, `ttsd-say --help`
    lists the option flags, options are parsed and checked, and protocol messages round-trip."""
    out = tmp_path / "x.wav"
    proc = run_blocked(f"""
import contextlib, io
import ttsd.api, ttsd.api.errors, ttsd.api.options, ttsd.api.pcm, ttsd.api.protocol, ttsd.api.rules
import ttsd.clients, ttsd.clients.playback
from ttsd.api import protocol as p
from ttsd.api.errors import BadOptions
from ttsd.api.options import SynthesisOptions, given_options
from ttsd.clients import say

help_text = io.StringIO()
with contextlib.redirect_stdout(help_text), contextlib.suppress(SystemExit):
    say.main(["--help"])
assert "--temperature" in help_text.getvalue() and "--emo-vector" in help_text.getvalue(), help_text.getvalue()

args = say.build_parser().parse_args(["--voice-id", "v", "--temperature", "0.5", "--greedy", "--out", {str(out)!r},
                                      "hi"])
assert given_options(args) == {{"temperature": 0.5, "do_sample": False}}, given_options(args)
say.check(args)
try:
    SynthesisOptions(top_p=0.0)
    raise AssertionError("top_p=0 was accepted")
except BadOptions as e:
    assert "top_p must be in (0, 1]" in str(e), e
assert say.main(["--voice-id", "v", "--num-beams", "17", "hi"]) == say.EXIT_USAGE

msg = p.Synthesize(id=7, text="hi", voice="v", temperature=0.5)
assert p.decode_client(p.encode(msg)) == msg
audio = p.Audio(id=7, seq=0, pcm=b"\\x01\\x00")
assert p.decode_server(p.encode(audio)) == audio
print("ok")
raise SystemExit(finish_blocked(0))
""")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert "num_beams must be in [1, 16], got 17" in proc.stderr


def _imports(path: Path, package: str) -> set[str]:
    """Every module a file's import statements name, relative ones resolved against `package`."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parent, *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import protocol`
    return names


@pytest.mark.parametrize(("folder", "package", "forbidden"), [
    ("api", "ttsd.api", (*BLOCKED, "ttsd.clients")),
    ("clients", "ttsd.clients", BLOCKED),
])
def test_no_module_imports_torch_or_the_server(folder: str, package: str, forbidden: tuple[str, ...]) -> None:
    """No module of api/ or clients/ imports torch, ttsd.pipeline or ttsd.daemon (api/ not the clients either)."""
    files = sorted((REPO / folder).glob("*.py"))
    assert files
    bad = {
        f"{path.name}: {name}"
        for path in files
        for name in _imports(path, package)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    }
    assert not bad, sorted(bad)
