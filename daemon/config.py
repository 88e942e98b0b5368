"""Daemon configuration: one frozen dataclass, loaded from a TOML file and overridden by flags.

Precedence, lowest first: field defaults, the TOML file (`--config`, top-level keys named exactly
as the fields), `TTSD_TOKEN` from the environment (so a systemd EnvironmentFile can hold the secret
without it showing in `ps`), then command-line flags. Every field has a flag, generated from the
field list so none can be forgotten. Every limit carries its unit in its name."""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Final, get_type_hints

from ttsd.pipeline.errors import ConfigError

DEFAULT_PORT: Final = 8765
TOKEN_ENV: Final = "TTSD_TOKEN"
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
# ttsd.pipeline.tiny.PRESETS, named here because importing that module imports torch.
RANDOM_WEIGHT_PRESETS: Final = ("tiny", "full")


@dataclass(frozen=True, kw_only=True, slots=True)
class DaemonConfig:
    host: str = "127.0.0.1"              # bind address; anything but loopback requires `token`
    port: int = DEFAULT_PORT             # TCP port; 0 picks a free one (tests)
    checkpoints: Path | None = None      # converted checkpoint directory (ttsd-convert output)
    random_weights: str | None = None    # instead of checkpoints: seeded random `tiny` or `full` model (benchmarks)
    random_seed: int = 0                 # seed of the random_weights model
    device: str = "auto"                 # torch device: auto (cuda if available), cpu, cuda, cuda:1
    dtype: str = "auto"                  # GPT dtype: auto (= float32), float32, bfloat16, float16 (CUDA)
    cuda_graphs: bool = True             # CUDA: compile the GPT decode step into CUDA graphs
    max_frame_bytes: int = 16 * 2**20    # largest client frame; reference audio travels in one frame
    max_text_chars: int = 5_000          # per request (incremental: all chunks together)
    max_reference_audio_s: float = 30.0  # per reference audio file (upstream uses the first 15 s)
    max_concurrent_requests: int = 4     # requests the worker interleaves, daemon-wide
    max_num_beams: int = 4               # beams one request may ask for (each beam is a decode batch row)
    max_batch_rows: int = 16             # decode batch rows (beams of all segments decoding at once); GPU memory ∝ rows
    watchdog_s: float = 300.0            # one engine step taking longer means a wedged device: 503, exit 1 (0 = off)
    max_requests_per_connection: int = 4  # live requests one connection may hold; more get `busy`
    max_queued_requests: int = 16        # requests waiting for a turn beyond those; more get `busy`
    max_voices: int = 64                 # registered voices kept on the device (LRU)
    idle_timeout_s: float = 300.0        # close a connection with no live request that sends nothing
    drain_timeout_s: float = 10.0        # on SIGTERM: time in-flight requests get to finish
    stall_timeout_s: float = 30.0        # a request parked this long on an unread client is cancelled
    token: str | None = None             # bearer token clients must present (Authorization header)
    log_level: str = "info"              # debug, info, warning, error
    # Other interfaces on the same worker, voices, limits and token (docs/interfaces.md). Ports:
    # absent = off, 0 = any free port (tests).
    http_port: int | None = None         # OpenAI-compatible HTTP API and /metrics, on `host`
    wyoming_port: int | None = None      # Wyoming TTS server for Home Assistant (usually 10200)
    wyoming_host: str = "127.0.0.1"      # Wyoming has no authentication: bind beyond loopback only on a trusted LAN
    voices_dir: Path | None = None       # voice presets: NAME.wav/.flac/.ogg/.mp3 (+ NAME.toml options)

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
            (self.idle_timeout_s > 0, "idle_timeout_s must be > 0"),
            (self.drain_timeout_s >= 0, "drain_timeout_s must be >= 0"),
            (self.stall_timeout_s > 0, "stall_timeout_s must be > 0"),
            (self.token is None or len(self.token) >= 16, "token must be at least 16 characters"),
            (self.log_level in LOG_LEVELS, f"log_level must be one of {', '.join(LOG_LEVELS)}"),
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


def add_flags(ap: argparse.ArgumentParser) -> None:
    """One flag per DaemonConfig field (`max_text_chars` → `--max-text-chars`), default None = unset."""
    ap.add_argument("--config", type=Path, help="TOML file with DaemonConfig keys (flags override it)")
    defaults = DaemonConfig()
    for f in fields(DaemonConfig):
        kind = _TYPES[f.name]
        if kind is bool:
            # --cuda-graphs / --no-cuda-graphs; absent = unset, so the TOML value or default stands.
            ap.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"default: {getattr(defaults, f.name)!r}",
            )
            continue
        parse: Any = {int: int, int | None: int, float: float, Path | None: Path}.get(kind, str)
        ap.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=parse,
            default=None,
            metavar=f.name.upper(),
            help=f"default: {getattr(defaults, f.name)!r}" if f.name != "token" else f"default: ${TOKEN_ENV}",
        )


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
