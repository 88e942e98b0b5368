"""Daemon configuration: one frozen dataclass, loaded from a TOML file and overridden by flags.

Precedence, lowest first: field defaults, the TOML file (`--config`, top-level keys named exactly
as the fields), `TTSD_TOKEN` from the environment (so a systemd EnvironmentFile can hold the secret
without it showing in `ps`), then command-line flags. Every field has a flag, generated from the
field list so none can be forgotten, with the help line and choices its `setting(...)` declares.
Every limit carries its unit in its name; the text and reference-audio limits default to the
ones `ttsd synth` applies too (ttsd.api.rules)."""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import tomllib
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final, get_type_hints

from ttsd.api.errors import ConfigError
from ttsd.api.rules import MAX_REFERENCE_AUDIO_S, MAX_TEXT_CHARS

DEFAULT_PORT: Final = 8765
TOKEN_ENV: Final = "TTSD_TOKEN"
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
DEVICES: Final = "auto (CUDA if available), cpu, cuda, cuda:N"
DTYPES: Final = ("auto", "float32", "bfloat16", "float16")
ACOUSTIC_DTYPES: Final = ("float32", "bfloat16", "float16")
# The presets of ttsd.tools.tiny (named here because importing that module imports torch).
RANDOM_WEIGHT_PRESETS: Final = ("tiny", "full")
_HELP: Final = "ttsd.help"  # field-metadata key: the field's --help line
_CHOICES: Final = "ttsd.choices"  # field-metadata key: the values a string field accepts


def setting(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A DaemonConfig field: its default, the one line `ttsd serve --help` shows, and its choices."""
    return field(default=default, metadata={_HELP: help, _CHOICES: choices})


@dataclass(frozen=True, kw_only=True, slots=True)
class DaemonConfig:
    host: str = setting("127.0.0.1", "bind address; anything but loopback requires a token")
    port: int = setting(DEFAULT_PORT, "TCP port; 0 picks a free one")
    checkpoints: Path | None = setting(None, "converted checkpoint directory (ttsd fetch / ttsd-convert output)")
    random_weights: str | None = setting(
        None, "instead of checkpoints: a seeded RANDOM-weight model of this size (benchmarks; the audio is noise)",
        RANDOM_WEIGHT_PRESETS,
    )
    random_seed: int = setting(0, "seed of the random_weights model")
    device: str = setting("auto", f"torch device: {DEVICES}")
    dtype: str = setting("auto", "GPT dtype: auto (= float32), float32, bfloat16, float16 (CUDA only)", DTYPES)
    acoustic_dtype: str = setting(
        "float32", "DiT/CFM precision: float32 (golden parity), bfloat16, float16 (CUDA only)",
        ACOUSTIC_DTYPES,
    )
    cuda_graphs: bool = setting(True, "CUDA: replay the GPT decode step from CUDA graphs (one per row bucket)")
    torch_compile: bool = setting(
        True, "CUDA: compile the decode step with inductor before graphing it (off: faster start-up, slower steps)"
    )
    emo_text: bool = setting(
        True, "load the checkpoint's emotion-from-text model (QwenEmotion, 0.6B parameters) when it has one; "
              "--no-emo-text saves the memory, and requests asking for emotion text get bad_message"
    )
    max_frame_bytes: int = setting(16 * 2**20, "largest client frame in bytes; reference audio travels in one frame")
    max_text_chars: int = setting(MAX_TEXT_CHARS, "characters per request (incremental: all chunks together)")
    max_reference_audio_s: float = setting(MAX_REFERENCE_AUDIO_S, "seconds per reference audio file")
    max_concurrent_requests: int = setting(4, "requests synthesised at once (they share every model step), daemon-wide")
    max_num_beams: int = setting(4, "beams one request may ask for (each beam is a row of the decode batch)")
    max_batch_rows: int = setting(
        16, "decode batch rows: the beams of every segment decoding at once (GPU memory grows with it)"
    )
    watchdog_s: float = setting(
        300.0, "seconds one worker step may run before the device counts as wedged (503, exit 1); 0 = off"
    )
    max_requests_per_connection: int = setting(4, "live requests one connection may hold; more get `busy`")
    max_queued_requests: int = setting(16, "requests waiting for a turn beyond those; more get `busy`")
    max_voices: int = setting(64, "registered voices kept on the device (the least recently used is evicted)")
    idle_timeout_s: float = setting(300.0, "seconds before a connection that sends nothing and has no request closes")
    drain_timeout_s: float = setting(10.0, "seconds in-flight requests get to finish after SIGTERM")
    stall_timeout_s: float = setting(30.0, "seconds a request may wait on a client that stopped reading")
    token: str | None = setting(None, f"bearer token clients must present, at least 16 characters (or ${TOKEN_ENV})")
    log_level: str = setting("info", "log level", LOG_LEVELS)
    # Other interfaces on the same worker, voices, limits and token (docs/interfaces.md). Ports:
    # absent = off, 0 = any free port.
    http_port: int | None = setting(
        None, "port of the OpenAI-compatible HTTP API and /metrics, on `host` (absent: off)"
    )
    wyoming_port: int | None = setting(
        None, "port of the Wyoming TTS server for Home Assistant, usually 10200 (absent: off)"
    )
    wyoming_host: str = setting(
        "127.0.0.1", "Wyoming bind address; Wyoming has no authentication, so beyond loopback only on a trusted LAN"
    )
    voices_dir: Path | None = setting(None, "voice presets: NAME.wav/.flac/.ogg/.mp3 files (+ NAME.toml options)")
    voices_store: Path | None = setting(
        None, "voice library directory: registered voices persist there, shared by every daemon using it (absent: off)"
    )
    voices_store_max_voices: int = setting(10_000, "voices kept in voices_store (the least recently used is removed)")
    voices_store_max_bytes: int = setting(
        16 * 2**30, "bytes of voices kept in voices_store (a real-model voice is about 6 MB)"
    )

    def validated(self) -> DaemonConfig:
        """Return self if every field is in range and the bind is safe, else raise ConfigError."""
        checks = [
            (0 <= self.port <= 65_535, "port must be in [0, 65535]"),
            (self.http_port is None or 0 <= self.http_port <= 65_535, "http_port must be in [0, 65535]"),
            (self.wyoming_port is None or 0 <= self.wyoming_port <= 65_535, "wyoming_port must be in [0, 65535]"),
            (self.max_frame_bytes >= 1024, "max_frame_bytes must be >= 1024"),
            (self.max_text_chars >= 1, "max_text_chars must be >= 1"),
            (self.max_reference_audio_s > 0, "max_reference_audio_s must be > 0"),
            (self.max_concurrent_requests >= 1, "max_concurrent_requests must be >= 1"),
            (1 <= self.max_num_beams <= 16, "max_num_beams must be in [1, 16]"),
            (1 <= self.max_batch_rows <= 1024, "max_batch_rows must be in [1, 1024]"),
            (self.max_num_beams <= self.max_batch_rows, "max_num_beams must be <= max_batch_rows"),
            (self.watchdog_s >= 0, "watchdog_s must be >= 0"),
            (self.max_requests_per_connection >= 1, "max_requests_per_connection must be >= 1"),
            (self.max_queued_requests >= 0, "max_queued_requests must be >= 0"),
            (self.max_voices >= 1, "max_voices must be >= 1"),
            (self.voices_store_max_voices >= 1, "voices_store_max_voices must be >= 1"),
            (self.voices_store_max_bytes >= 1, "voices_store_max_bytes must be >= 1"),
            (self.idle_timeout_s > 0, "idle_timeout_s must be > 0"),
            (self.drain_timeout_s >= 0, "drain_timeout_s must be >= 0"),
            (self.stall_timeout_s > 0, "stall_timeout_s must be > 0"),
            (self.token is None or len(self.token) >= 16, "token must be at least 16 characters"),
            (self.log_level in LOG_LEVELS, f"log_level must be one of {', '.join(LOG_LEVELS)}"),
            (self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}"),
            (self.acoustic_dtype in ACOUSTIC_DTYPES,
             f"acoustic_dtype must be one of {', '.join(ACOUSTIC_DTYPES)}, got {self.acoustic_dtype!r}"),
            (
                self.random_weights in (None, *RANDOM_WEIGHT_PRESETS),
                f"random_weights must be one of {', '.join(RANDOM_WEIGHT_PRESETS)}, got {self.random_weights!r}",
            ),
            (
                self.random_weights is None or self.checkpoints is None,
                "give either checkpoints or random_weights, not both",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.token is None and not is_loopback(self.host):
            raise ConfigError(f"non-loopback host {self.host!r} needs a token (${TOKEN_ENV} or --token)")
        return self


def is_loopback(host: str) -> bool:
    """True for 'localhost' and loopback IP literals; any other name could resolve off the machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Field types after `from __future__ import annotations` are strings; resolve them once.
_TYPES: Final[dict[str, Any]] = get_type_hints(DaemonConfig)


def _coerce(name: str, value: object) -> object:
    """A TOML value → the field's type, or ConfigError naming the field."""
    kind = _TYPES[name]
    if kind in (Path | None,) and isinstance(value, str):
        return Path(value)
    if kind in (str, str | None) and isinstance(value, str):
        return value
    if kind is bool and isinstance(value, bool):
        return value
    # bool is an int subclass: a TOML `true` must not become port 1.
    if kind in (int, int | None) and type(value) is int:
        return value
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        if math.isfinite(value):
            return float(value)
    raise ConfigError(f"config key {name!r} has the wrong type ({type(value).__name__})")


def load_toml(path: Path) -> dict[str, object]:
    """Read a TOML config file → {field: value}; unknown keys and wrong types name themselves."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    known = {f.name for f in fields(DaemonConfig)}
    unknown = sorted(raw.keys() - known)
    if unknown:
        raise ConfigError(f"config file {path}: unknown key(s) {', '.join(unknown)}")
    return {name: _coerce(name, value) for name, value in raw.items()}


def help_of(f: Field[Any]) -> str:
    """The --help line of a DaemonConfig field: its description, choices and default. (A field
    declared without setting(...) shows its default only; a test requires every field to have one.)"""
    text = str(f.metadata.get(_HELP, ""))
    default = f"${TOKEN_ENV}" if f.name == "token" else repr(f.default)
    return f"{text} (default: {default})".strip().replace("%", "%%")


def add_flags(ap: argparse.ArgumentParser) -> None:
    """One flag per DaemonConfig field (`max_text_chars` → `--max-text-chars`), default None = unset."""
    ap.add_argument("--config", type=Path, help="TOML file with DaemonConfig keys (flags override it)")
    for f in fields(DaemonConfig):
        kind = _TYPES[f.name]
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            # --cuda-graphs / --no-cuda-graphs; absent = unset, so the TOML value or default stands.
            ap.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_of(f))
            continue
        parse: Any = {int: int, int | None: int, float: float, Path | None: Path}.get(kind, str)
        choices = f.metadata.get(_CHOICES)
        ap.add_argument(flag, dest=f.name, type=parse, default=None, choices=choices,
                        metavar="{" + ",".join(choices) + "}" if choices else f.name.upper(), help=help_of(f))


def from_args(args: argparse.Namespace) -> DaemonConfig:
    """Defaults < TOML file < $TTSD_TOKEN < flags, then validated."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None) is not None:
        values.update(load_toml(args.config))
    env_token = os.environ.get(TOKEN_ENV)
    if env_token:
        values["token"] = env_token
    for f in fields(DaemonConfig):
        flag = getattr(args, f.name, None)
        if flag is not None:
            values[f.name] = flag
    # Every key was checked against the field list above (load_toml rejects unknown ones).
    return replace(DaemonConfig(), **values).validated()
