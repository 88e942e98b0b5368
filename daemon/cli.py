"""`ttsd`: the command line. `serve` runs the daemon; `synth`, `emotion`, `fetch` and `make-tiny` hand their
arguments to the pipeline's own command modules, imported only when asked for (so `ttsd serve
--help` does not build torch, and a missing optional extra breaks only its own subcommand).

Logging is plain `level logger: key=value ...` lines without colour. Under systemd ($JOURNAL_STREAM
set) each line starts with a `<N>` syslog priority, which journald strips and stores as the
line's priority, and the timestamp is left to the journal."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import logging
import os
import sys
from collections.abc import Callable
from typing import Final

from ttsd.api.errors import missing_extra

from .config import DaemonConfig, add_flags, from_args

# subcommand → (module whose main(argv) -> int runs it, one-line help)
DELEGATES: Final = {
    "synth": ("ttsd.pipeline.synth", "offline synthesis of one text into an audio file"),
    "emotion": ("ttsd.pipeline.emotion", "emotion weights from text (QwenEmotion), as one JSON line"),
    "fetch": ("ttsd.pipeline.download", "download and convert the official IndexTTS-2 weights"),
    "make-tiny": ("ttsd.tools.tiny", "generate a tiny random-weight model for trying things out"),
}

# logging level → syslog priority (sd-daemon(3) prefixes)
_SYSLOG_PRIORITY: Final = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelno, 6)
        # Continuation lines (tracebacks) carry the prefix too, so journald keeps their priority.
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def setup_logging(level: str) -> None:
    """Plain key=value lines on stderr; syslog priority prefixes when journald reads the stream."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # websockets logs every failed handshake at INFO; our own lines already say what matters.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, root.level))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_serve(config: DaemonConfig) -> int:
    try:
        from .server import serve

        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(serve(config))
    except ModuleNotFoundError as e:
        # `pip install ttsd` is the torch-free client set: the daemon needs the server extra.
        if (missing := missing_extra(e)) is None:
            raise
        print(f"ttsd serve: {missing}", file=sys.stderr)
        return 2


def version() -> str:
    try:
        return importlib.metadata.version("ttsd")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ttsd", description="Streaming IndexTTS2 speech-synthesis daemon.")
    ap.add_argument("--version", action="version", version=f"ttsd {version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = sub.add_parser(
        "serve", help="run the WebSocket daemon",
        description="Run the WebSocket daemon. Every flag is also a key of the --config TOML file; flags win.",
    )
    add_flags(serve)
    for name, (_, help_text) in DELEGATES.items():
        # Listed for --help only; main() hands these argv tails over before argparse sees them.
        sub.add_parser(name, help=help_text, add_help=False)
    return ap


def simulated_cuda() -> None:
    """`TTSD_SIMCUDA=1`: run the CUDA branch on a CPU-only torch, on the simulated device that checks what
    a real one would refuse (ttsd.tools.simcuda, a test tool: imported only when asked for)."""
    if os.environ.get("TTSD_SIMCUDA", "").strip().lower() in ("1", "true", "yes", "on"):
        from ttsd.tools.simcuda import install_from_env

        install_from_env()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    simulated_cuda()
    if argv and argv[0] in DELEGATES:
        name = DELEGATES[argv[0]][0]
        try:
            # The command may import an extra's module only once it runs (synth: torch, after its checks).
            return int(importlib.import_module(name).main(argv[1:]) or 0)
        except ModuleNotFoundError as e:
            missing = missing_extra(e)
            if missing is not None:  # an optional extra that is not installed
                print(f"ttsd {argv[0]}: {missing}", file=sys.stderr)
                return 2
            if e.name != name:
                raise  # the module exists but lacks a dependency: show the real error
            print(f"ttsd {argv[0]}: not available in this installation ({name} is missing)", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    from ttsd.api.errors import ConfigError

    try:
        config = from_args(args)
    except ConfigError as e:
        print(f"ttsd serve: {e}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    return run_serve(config)


if __name__ == "__main__":
    raise SystemExit(main())
