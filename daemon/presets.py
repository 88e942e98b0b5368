"""Voice presets: reference clips in `voices_dir`, registered through the worker when the daemon
starts, so that clients which cannot upload audio (OpenAI-compatible HTTP, Wyoming) can name a voice.

Every `NAME.wav`, `.flac`, `.ogg` or `.mp3` file is one preset called NAME. A `NAME.toml` beside it
may hold synthesis options for that preset, by their WebSocket `synthesize` names (for example
`num_beams = 1`, `emo_vector = [...]`, `emo_voice = "other-preset"`); a request's own options
override them. A preset holds its prepared Voice itself, so the voice cache's LRU eviction never
takes a preset away. A file that cannot be used is logged and skipped: one bad clip must not keep
the daemon from serving the others."""

from __future__ import annotations

import asyncio
import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from ttsd.api import protocol as p
from ttsd.api.errors import BadAudio, ConfigError, TtsdError, UnknownVoice

from .core import OptionError, options_from
from .worker import VoiceResult

if TYPE_CHECKING:
    from ttsd.pipeline import Voice

    from .worker import Worker

log = logging.getLogger(__name__)

AUDIO_SUFFIXES: Final = (".wav", ".flac", ".ogg", ".mp3")
OPTIONS_SUFFIX: Final = ".toml"


@dataclass(frozen=True, slots=True)
class Preset:
    name: str                       # the file name without its suffix
    voice_id: str                   # the id a WebSocket client would get for the same clip
    voice: Voice
    audio_s: float                  # duration of the reference clip
    options: dict[str, object]      # synthesis options from NAME.toml (checked at load)


class Presets:
    """Presets by name; `resolve` also accepts any registered voice id."""

    def __init__(self, presets: list[Preset] | None = None) -> None:
        self.by_name = {preset.name: preset for preset in presets or []}

    def __len__(self) -> int:
        return len(self.by_name)

    @property
    def names(self) -> list[str]:
        return sorted(self.by_name)

    def resolve(self, worker: Worker, name: str) -> tuple[Voice, dict[str, object]]:
        """A preset's voice and options, else a registered voice id's voice and no options, else UnknownVoice."""
        preset = self.by_name.get(name)
        if preset is not None:
            return preset.voice, preset.options
        try:
            return worker.voice(name), {}
        except UnknownVoice:
            known = ", ".join(self.names) or "none"
            message = f"voice {p.quote(name)} is neither a preset ({known}) nor a registered voice id"
            raise UnknownVoice(message) from None


async def load_presets(directory: Path, worker: Worker, max_file_bytes: int) -> Presets:
    """Register every clip in `directory` (sorted by name, one at a time) → Presets. A missing
    directory is a ConfigError; an unusable clip or options file is logged and skipped."""
    if not directory.is_dir():
        raise ConfigError(f"voices_dir {directory} is not a directory")
    presets = []
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() not in AUDIO_SUFFIXES or not path.is_file():
            continue
        try:
            presets.append(await _load(path, worker, max_file_bytes))
        except (TtsdError, OptionError, OSError, tomllib.TOMLDecodeError) as e:
            log.error("voice preset skipped name=%s file=%s error=%r", path.stem, path, str(e))
    log.info("voice presets loaded dir=%s presets=%d names=%s", directory, len(presets),
             ",".join(pr.name for pr in presets) or "-")
    return Presets(presets)


async def _load(path: Path, worker: Worker, max_file_bytes: int) -> Preset:
    if len(path.stem) > p.MAX_VOICE_ID_CHARS:
        raise ConfigError(f"a preset name has at most {p.MAX_VOICE_ID_CHARS} characters")
    if path.stat().st_size > max_file_bytes:
        raise BadAudio(f"the clip is larger than max_frame_bytes ({max_file_bytes} bytes)")
    options: dict[str, object] = {}
    options_path = path.with_suffix(OPTIONS_SUFFIX)
    if options_path.is_file():
        options = tomllib.loads(options_path.read_text(encoding="utf-8"))
        options_from(options)  # checked now, so a typo shows at start rather than at each request
    audio = path.read_bytes()
    loop = asyncio.get_running_loop()
    done: asyncio.Future[VoiceResult | TtsdError] = loop.create_future()
    worker.register_voice(audio, None, done.set_result)
    result = await done
    if isinstance(result, TtsdError):
        raise result
    entry = worker.voices.lookup(result.voice_id)
    if entry is None:  # evicted between registration and here: only if max_voices is tiny and clients raced
        raise UnknownVoice("the voice was evicted from the cache while loading; raise max_voices")
    log.info("voice preset name=%s voice=%s audio_s=%.2f options=%s", path.stem, result.voice_id, result.audio_s,
             ",".join(options) or "-")
    return Preset(path.stem, result.voice_id, entry[0], result.audio_s, options)
