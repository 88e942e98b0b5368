"""The voice library: every registered voice's conditioning on disk, under `voices_store`, so that
it survives a restart and every daemon pointed at the same directory (same host, or a shared
volume behind a load balancer) can use a voice registered on any of them.

Layout: `voices_store/<model key>/<voice id>.safetensors`. The voice id is the content hash of
the reference audio that already names voices on the wire; the model key names the weights the
conditioning was computed with (from the checkpoint's manifest.json, or the random-weights preset
and seed), so daemons serving different models may share a directory without mixing voices. One
file per voice: the tensors of `Voice` and a few metadata strings in the safetensors header
(pipeline/voice.py writes and checks the bytes, with a checksum; this module only moves files).

Writes are atomic: a temporary file in the same directory, fsync, rename. A reader sees a whole
entry or none; two daemons writing the same voice write the same bytes. An entry that cannot be
read back (truncated, altered, another format) is refused with a log line and removed, so the
next registration of that audio writes it again.

Limits: at most `voices_store_max_voices` entries and `voices_store_max_bytes` bytes; beyond
either, the least recently used entries are removed when a voice is stored. "Used" is the file's
mtime, which loading and (at most every TOUCH_EVERY_S) synthesising with a voice refresh, so the
order is shared by every daemon on the directory. The worker's in-memory LRU (`max_voices`,
daemon/worker.py) sits on top: a voice is read from disk once per process until it is evicted.

A voice deleted from the library (by any daemon) stops being usable on every daemon: the one that
deletes it forgets it at once, the others within TOUCH_EVERY_S, when they next find its file gone.

Nothing here imports torch: the Pipeline facade turns a Voice into bytes and back."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from ttsd.api.errors import ConfigError
from ttsd.pipeline.errors import VoiceFileError

if TYPE_CHECKING:
    from ttsd.pipeline import Voice

    from .config import DaemonConfig

log = logging.getLogger(__name__)

SUFFIX: Final = ".safetensors"
TEMP_PREFIX: Final = ".tmp-"                # files being written; never listed or loaded
STALE_TEMP_S: Final = 3600.0                # a temporary file this old was left by a writer that died
TOUCH_EVERY_S: Final = 10.0                 # how often a voice in use refreshes its mtime (and is seen deleted)
MODEL_KEY_CHARS: Final = 16                 # hex characters of the model key
_VOICE_ID: Final = re.compile(r"[0-9a-f]{32}")  # worker.VOICE_ID_BYTES of blake2b, as hex


class VoiceCodec(Protocol):
    """What the store needs from the Pipeline facade (pipeline/voice.py does the work)."""

    def voice_to_bytes(self, voice: Voice, metadata: dict[str, str]) -> bytes: ...

    def voice_from_bytes(self, data: bytes) -> tuple[Voice, dict[str, str]]: ...


@dataclass(frozen=True, slots=True)
class StoredVoice:
    voice_id: str
    size_bytes: int
    last_used: float        # Unix time: the file's mtime (written, loaded, or used for synthesis)


def model_key(config: DaemonConfig) -> str:
    """The name of the weights a daemon serves, as the store's subdirectory. ConfigError when the
    checkpoint has no manifest.json (ttsd-convert and ttsd fetch write one): without it two different
    models would read each other's voices."""
    if config.random_weights is not None:
        return f"random-{config.random_weights}-seed{config.random_seed}"
    if config.checkpoints is None:
        raise ConfigError("voices_store needs checkpoints (or random_weights) to name the model")
    manifest = config.checkpoints / "manifest.json"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"voices_store needs {manifest} (written by ttsd-convert) to name the model: {e}") from None
    # The checksums of the weights, not the path: two hosts with one checkpoint share voices.
    h = hashlib.blake2b(json.dumps(files, sort_keys=True).encode(), digest_size=MODEL_KEY_CHARS // 2)
    return h.hexdigest()


class VoiceStore:
    """One model's voice library directory. Thread-safe (the voice thread stores, the loop loads)."""

    def __init__(self, directory: Path, codec: VoiceCodec, *, max_voices: int, max_bytes: int) -> None:
        self.directory = directory
        self.codec = codec
        self.max_voices = max_voices
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._touched: dict[str, float] = {}   # voice id → time.monotonic() its file was last seen (ours)
        self.loads = 0                         # voices read from disk (metrics)
        self.refused = 0                       # entries refused as corrupt and removed
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"voices_store {directory}: {e.strerror or e}") from None
        self._remove_stale_temps()

    @classmethod
    def open(cls, config: DaemonConfig, codec: VoiceCodec) -> VoiceStore | None:
        """The store of `config.voices_store` for the model `config` names, or None without one."""
        if config.voices_store is None:
            return None
        store = cls(config.voices_store / model_key(config), codec, max_voices=config.voices_store_max_voices,
                    max_bytes=config.voices_store_max_bytes)
        log.info("voice store dir=%s voices=%d max_voices=%d max_bytes=%d", store.directory, len(store.list()),
                 store.max_voices, store.max_bytes)
        return store

    def path(self, voice_id: str) -> Path | None:
        """Where `voice_id` is stored; None for a string that is not a voice id (nothing to look up)."""
        return self.directory / f"{voice_id}{SUFFIX}" if _VOICE_ID.fullmatch(voice_id) else None

    def save(self, voice_id: str, voice: Voice, audio_s: float) -> bool:
        """Store a voice (atomically), then remove the least recently used entries beyond the limits.
        False when it was not stored: larger than max_bytes on its own, or the disk refused (logged)."""
        path = self.path(voice_id)
        if path is None:
            raise ValueError(f"not a voice id: {voice_id!r}")
        data = self.codec.voice_to_bytes(voice, {"voice_id": voice_id, "audio_s": repr(audio_s)})
        if len(data) > self.max_bytes:
            log.warning("voice not stored voice=%s bytes=%d max_bytes=%d", voice_id, len(data), self.max_bytes)
            return False
        # Unique per writer: daemons on several hosts may write the same voice at once.
        tmp = self.directory / f"{TEMP_PREFIX}{voice_id}-{secrets.token_hex(8)}{SUFFIX}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic: readers see the old entry, or none, or this whole one
        except OSError as e:
            log.error("voice not stored voice=%s dir=%s error=%r", voice_id, self.directory, e.strerror or str(e))
            with contextlib.suppress(OSError):
                tmp.unlink()
            return False
        self._sync_directory()
        with self._lock:
            self._touched[voice_id] = time.monotonic()
        log.info("voice stored voice=%s bytes=%d", voice_id, len(data))
        self._enforce_limits(keep=voice_id)
        return True

    def load(self, voice_id: str) -> tuple[Voice, float] | None:
        """(voice, reference audio seconds) from disk, or None when it is not stored. An entry that
        does not read back is logged, removed, and None."""
        path = self.path(voice_id)
        if path is None:
            return None
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.error("voice store read failed voice=%s error=%r", voice_id, e.strerror or str(e))
            return None
        try:
            voice, meta = self.codec.voice_from_bytes(data)
            if meta.get("voice_id") != voice_id:
                raise VoiceFileError(f"the entry is voice {meta.get('voice_id')!r}")
            audio_s = float(meta["audio_s"])
        except (VoiceFileError, KeyError, ValueError) as e:
            log.error("voice store entry corrupt, removed voice=%s file=%s error=%r", voice_id, path, str(e))
            self.refused += 1
            self._forget(voice_id, path)
            return None
        self.loads += 1
        self.touch(voice_id, force=True)
        log.info("voice loaded from store voice=%s bytes=%d", voice_id, len(data))
        return voice, audio_s

    def exists(self, voice_id: str) -> bool:
        path = self.path(voice_id)
        return path is not None and path.is_file()

    def touch(self, voice_id: str, *, force: bool = False) -> bool:
        """Mark a voice this process stored or loaded as used (its mtime), at most every TOUCH_EVERY_S
        unless `force`. False when its file is gone: the voice was deleted from the library (or
        evicted from it) by some daemon. True for a voice this process never stored."""
        now = time.monotonic()
        with self._lock:
            seen = self._touched.get(voice_id)
            if seen is None and not force:
                return True
            if not force and seen is not None and now - seen < TOUCH_EVERY_S:
                return True
            self._touched[voice_id] = now
        path = self.path(voice_id)
        try:
            if path is not None:
                os.utime(path)
            return True
        except FileNotFoundError:
            with self._lock:
                self._touched.pop(voice_id, None)
            return False
        except OSError as e:  # a read-only mount: the order of use is lost, the voice is not
            log.debug("voice store touch failed voice=%s error=%r", voice_id, e.strerror)
            return True

    def delete(self, voice_id: str) -> bool:
        """Remove a voice from the library; False when it was not there."""
        path = self.path(voice_id)
        if path is None:
            return False
        existed = self._forget(voice_id, path)
        if existed:
            log.info("voice deleted from store voice=%s", voice_id)
        return existed

    def list(self) -> list[StoredVoice]:
        """Every entry, most recently used first."""
        entries = []
        try:
            names = os.listdir(self.directory)
        except OSError as e:
            log.error("voice store list failed dir=%s error=%r", self.directory, e.strerror)
            return []
        for name in names:
            voice_id = name.removesuffix(SUFFIX)
            if not name.endswith(SUFFIX) or not _VOICE_ID.fullmatch(voice_id):
                continue
            try:
                st = os.stat(self.directory / name)
            except FileNotFoundError:  # deleted by another daemon meanwhile
                continue
            entries.append(StoredVoice(voice_id, st.st_size, st.st_mtime))
        entries.sort(key=lambda e: e.last_used, reverse=True)
        return entries

    def _forget(self, voice_id: str, path: Path) -> bool:
        with self._lock:
            self._touched.pop(voice_id, None)
        try:
            path.unlink()
            return True
        except FileNotFoundError:
            return False

    def _enforce_limits(self, keep: str) -> None:
        entries = self.list()
        total = sum(e.size_bytes for e in entries)
        count = len(entries)
        for e in reversed(entries):  # least recently used first
            if count <= self.max_voices and total <= self.max_bytes:
                return
            if e.voice_id == keep:
                continue
            path = self.path(e.voice_id)
            assert path is not None  # listed entries are voice ids
            if self._forget(e.voice_id, path):
                log.info("voice evicted from store voice=%s bytes=%d", e.voice_id, e.size_bytes)
            count -= 1
            total -= e.size_bytes

    def _sync_directory(self) -> None:
        # The rename is durable once the directory is synced; some network file systems refuse.
        try:
            fd = os.open(self.directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _remove_stale_temps(self) -> None:
        now = time.time()
        for tmp in self.directory.glob(f"{TEMP_PREFIX}*"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > STALE_TEMP_S:
                    tmp.unlink()
                    log.info("voice store removed stale temporary file=%s", tmp)
