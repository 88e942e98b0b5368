"""Live playback of the daemon's PCM stream through sounddevice (PortAudio).

Chunks arrive from the network in bursts (one segment at a time), so they go into a small
jitter buffer that the PortAudio callback drains. Playback starts on the first chunk; if the
buffer ever runs dry before the stream has ended, the callback plays silence and waits until
`jitter_ms` of audio is queued again, so a late segment causes one gap instead of many clicks.

PCM is s16le mono at the daemon's rate (22050 Hz).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

import numpy as np

from ttsd.api.protocol import SAMPLE_RATE_HZ

log = logging.getLogger(__name__)

JITTER_MS = 200             # audio queued again before resuming after an underrun
BLOCK_FRAMES = 1024         # frames per PortAudio callback (~46 ms at 22.05 kHz)


class NoAudioDevice(RuntimeError):
    """PortAudio is missing or there is no usable output device; the message says which."""


def _sounddevice() -> Any:
    # Imported lazily: sounddevice loads the PortAudio shared library at import time and
    # raises OSError when it is absent, which must become a clear message, not a traceback.
    try:
        import sounddevice
    except OSError as e:
        raise NoAudioDevice(f"no audio output device: PortAudio library not available ({e})") from e
    except ImportError as e:
        raise NoAudioDevice("no audio output device: sounddevice is not installed "
                            "(pip install 'ttsd[client]')") from e
    return sounddevice


def output_device_name(device: int | str | None = None) -> str:
    """Name of the output device that `Player(device=...)` would use; raises NoAudioDevice."""
    sd = _sounddevice()
    try:
        info = sd.query_devices(device, kind="output")
    except (sd.PortAudioError, ValueError) as e:
        which = "no default output device" if device is None else f"output device {device!r} not found"
        raise NoAudioDevice(f"no audio output device: PortAudio reports {which} ({e})") from e
    if int(info["max_output_channels"]) < 1:
        raise NoAudioDevice(f"no audio output device: {info['name']!r} has no output channels")
    return str(info["name"])


class Player:
    """Plays s16le mono PCM chunks as they arrive.

    `write()` never blocks (it only queues); `drain()` blocks until everything queued has been
    played; `abort()` stops at once, dropping what is queued. Use as a context manager."""

    def __init__(self, sample_rate_hz: int = SAMPLE_RATE_HZ, *, device: int | str | None = None,
                 jitter_ms: int = JITTER_MS) -> None:
        self.sample_rate_hz = sample_rate_hz
        self.device = device
        self.jitter_frames = sample_rate_hz * jitter_ms // 1000
        self.underruns = 0                       # callbacks that found the buffer empty mid-stream
        self._chunks: deque[np.ndarray] = deque()
        self._queued_frames = 0
        self._offset = 0                         # frames of _chunks[0] already played
        self._buffering = False                  # true after an underrun until jitter_frames are queued
        self._ended = False                      # no more chunks will come
        self._lock = threading.Lock()            # the queue, shared with PortAudio's callback thread
        self._stream_lock = threading.Lock()     # stream start/stop/abort/close, from any thread
        self._aborted = False
        self._empty = threading.Event()          # set when ended and everything has been played
        self._stream: Any = None
        self._sd = _sounddevice()
        output_device_name(device)               # fail before the first chunk, with a clear message

    def __enter__(self) -> Player:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, pcm: bytes) -> None:
        """Queue s16le mono PCM; the first call starts the output stream."""
        if not pcm or self._aborted:
            return
        frames = np.frombuffer(pcm, dtype="<i2").astype(np.int16, copy=False)
        with self._lock:
            self._chunks.append(frames)
            self._queued_frames += len(frames)
        with self._stream_lock:
            if self._stream is None and not self._aborted:
                self._open()

    def _open(self) -> None:
        sd = self._sd
        try:
            self._stream = sd.OutputStream(samplerate=self.sample_rate_hz, channels=1, dtype="int16",
                                           device=self.device, blocksize=BLOCK_FRAMES,
                                           callback=self._callback, finished_callback=self._finished)
            self._stream.start()
        except sd.PortAudioError as e:
            self._stream = None
            raise NoAudioDevice(f"no audio output device: cannot open output stream: {e}") from e
        log.debug("playback started device=%s rate_hz=%d", self.device, self.sample_rate_hz)

    def _callback(self, out: np.ndarray, frames: int, time: Any, status: Any) -> None:
        # Runs on PortAudio's thread: no allocation beyond slicing, no logging.
        out.fill(0)
        with self._lock:
            if self._buffering and self._queued_frames < self.jitter_frames and not self._ended:
                return
            self._buffering = False
            pos = 0
            while pos < frames and self._chunks:
                head = self._chunks[0]
                n = min(frames - pos, len(head) - self._offset)
                out[pos:pos + n, 0] = head[self._offset:self._offset + n]
                pos += n
                self._offset += n
                self._queued_frames -= n
                if self._offset == len(head):
                    self._chunks.popleft()
                    self._offset = 0
            if pos < frames:
                if self._ended:
                    self._empty.set()
                else:
                    self.underruns += 1
                    self._buffering = True

    def _finished(self) -> None:
        self._empty.set()

    def end(self) -> None:
        """No more chunks will be written."""
        with self._lock:
            self._ended = True
            if self._queued_frames == 0 and self._stream is None:
                self._empty.set()

    def drain(self, timeout_s: float | None = None) -> bool:
        """Mark the end, wait until everything queued has played, stop. False on timeout.

        Safe to call from a worker thread while another thread may call `abort()`."""
        self.end()
        done = self._empty.wait(timeout_s)
        with self._stream_lock:
            if done and not self._aborted and self._stream is not None:
                self._stream.stop()   # returns once the device has played its own buffers
        return done

    def abort(self) -> None:
        """Stop now, dropping queued audio; a `drain()` waiting elsewhere returns."""
        with self._lock:
            self._chunks.clear()
            self._queued_frames = 0
            self._ended = True
        with self._stream_lock:
            self._aborted = True
            if self._stream is not None:
                self._stream.abort()
        self._empty.set()

    def close(self) -> None:
        with self._stream_lock:
            if self._stream is not None:
                self._stream.close()
                self._stream = None
        self._empty.set()
