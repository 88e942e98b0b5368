"""ttsd-say: speak text through a running ttsd daemon, live or into an audio file.

    ttsd-say --voice ref.wav "Hello there. How are you?"           # live playback
    ttsd-say --voice-id 3f2a... --out hello.flac "Hello there."     # wav/flac/ogg (mp3) by extension
    llm-tool | ttsd-say --voice ref.wav                             # stdin, spoken sentence by sentence

Text comes from the arguments, or from stdin when there are none (or the only one is "-"): each
line is sent as soon as it is read, so the daemon speaks every sentence once it is complete, and
end of input flushes the rest. Ctrl-C cancels the request on the daemon and exits with 130.
The synthesis flags are generated from the one option table (ttsd.api.options) and checked
against it before connecting; flags left out take the daemon's defaults, which are upstream's.
Output files follow the same rules as `ttsd synth --out` (ttsd.api.rules).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from ttsd.api.errors import TtsdError
from ttsd.api.options import SynthesisOptions, add_option_flags, given_options
from ttsd.api.protocol import SAMPLE_RATE_HZ, Audio, Done, SegmentStart
from ttsd.api.rules import check_writable, output_format, reference_audio_seconds

from .client import DEFAULT_URL, Cancelled, Client, ClientError, Synthesis

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1       # the daemon or the audio device said no
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130  # 128 + SIGINT, as shells report it
CANCEL_WAIT_S: Final = 10.0  # after Ctrl-C: how long to wait for the daemon to confirm the cancel

log = logging.getLogger("ttsd-say")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ttsd-say", description=__doc__.split("\n\n")[0],
                                 epilog="Exit status: 0 done, 1 daemon/device error, 2 usage, 130 interrupted.")
    ap.add_argument("text", nargs="*", help="text to speak (default: read stdin line by line)")
    voice = ap.add_mutually_exclusive_group(required=True)
    voice.add_argument("--voice", type=Path, metavar="FILE", help="speaker reference audio (registered first)")
    voice.add_argument("--voice-id", metavar="ID", help="a voice id registered earlier")
    ap.add_argument("--emo-audio", type=Path, metavar="FILE", help="emotion reference audio")
    ap.add_argument("--url", default=os.environ.get("TTSD_URL", DEFAULT_URL),
                    help="daemon URL (default: $TTSD_URL or %(default)s)")
    ap.add_argument("--token", default=os.environ.get("TTSD_TOKEN"), help="bearer token (default: $TTSD_TOKEN)")
    ap.add_argument("--out", type=Path, metavar="FILE",
                    help="write audio to FILE instead of playing it; the format follows the extension "
                         "(wav, flac, ogg; mp3 where libsndfile has it)")
    ap.add_argument("--device", default=None, help="audio output device (name or index) for live playback")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each segment and the timings to stderr")
    add_option_flags(ap)
    return ap


class Output:
    """Where audio goes: a soundfile writer or a live player. Opened before connecting, so a bad
    file name or a missing audio device is reported before the daemon does any work."""

    def __init__(self, path: Path | None, device: str | None) -> None:
        self.path = path
        self.samples = 0
        self._closed = False
        self._file: Any = None
        self._player: Any = None
        if path is not None:
            import soundfile

            container, subtype = output_format(path)
            self._file = soundfile.SoundFile(path, "w", samplerate=SAMPLE_RATE_HZ, channels=1, format=container,
                                             subtype=subtype)
        else:
            from .playback import Player

            self._player = Player(device=_device(device))

    def write(self, pcm: bytes) -> None:
        import numpy as np

        if self._closed:
            return  # aborted by Ctrl-C while frames were still arriving
        self.samples += len(pcm) // 2
        if self._file is not None:
            self._file.write(np.frombuffer(pcm, dtype="<i2"))
        else:
            self._player.write(pcm)

    async def finish(self) -> None:
        """Everything has arrived: finish the file, or wait until playback has played it.

        The wait runs in a thread so Ctrl-C during the last seconds of playback still works."""
        if self._closed:
            return
        if self._file is not None:
            self._closed = True
            self._file.close()
            return
        await asyncio.to_thread(self._player.drain)
        if not self._closed:  # abort() may have run meanwhile and closed it
            self._closed = True
            self._player.close()

    def abort(self) -> None:
        """Stop now: keep what was written to the file, silence the speaker."""
        if self._closed:
            return
        self._closed = True
        if self._file is not None:
            self._file.close()
        else:
            self._player.abort()
            self._player.close()


def _device(device: str | None) -> int | str | None:
    return int(device) if device is not None and device.isdigit() else device


@dataclass
class Run:
    """State shared between the request task and the Ctrl-C handler."""

    synthesis: Synthesis | None = None
    interrupted: asyncio.Event = field(default_factory=asyncio.Event)
    done: Done | None = None


def _start_stdin_reader(loop: asyncio.AbstractEventLoop, stream: IO[str]) -> asyncio.Queue[str | None]:
    """Lines of `stream` into an asyncio queue, None at EOF.

    A daemon thread rather than the default executor: a read blocked on a terminal must not keep
    the process alive after Ctrl-C, and regular files cannot be watched by the event loop."""
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def pump() -> None:
        try:
            for line in stream:
                loop.call_soon_threadsafe(lines.put_nowait, line)
        finally:
            loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=pump, name="ttsd-say-stdin", daemon=True).start()
    return lines


async def _feed_stdin(synthesis: Synthesis, lines: asyncio.Queue[str | None]) -> None:
    while (line := await lines.get()) is not None:
        await synthesis.append_text(line)
    await synthesis.flush()


async def _speak(args: argparse.Namespace, out: Output, run: Run) -> None:
    options = given_options(args)
    async with Client(args.url, args.token) as client:
        if client.sample_rate_hz != SAMPLE_RATE_HZ:
            raise ClientError(f"the daemon sends {client.sample_rate_hz} Hz audio; this ttsd-say expects "
                              f"{SAMPLE_RATE_HZ} Hz")
        emo_voice = None
        if args.voice is not None:
            voice = await client.register_voice(args.voice.read_bytes(),
                                                None if args.emo_audio is None else args.emo_audio.read_bytes())
        else:
            voice = args.voice_id
            if args.emo_audio is not None:
                emo_voice = await client.register_voice(args.emo_audio.read_bytes())
        if emo_voice is not None:
            options["emo_voice"] = emo_voice
        from_stdin = not args.text or args.text == ["-"]
        text = "" if from_stdin else " ".join(args.text)
        run.synthesis = synthesis = client.synthesize(text, voice=voice, incremental=from_stdin, **options)
        async with asyncio.TaskGroup() as tg:
            await synthesis.start()
            if from_stdin:
                tg.create_task(_feed_stdin(synthesis, _start_stdin_reader(asyncio.get_running_loop(), sys.stdin)))
            async for event in synthesis:
                match event:
                    case Audio():
                        out.write(event.pcm)
                    case SegmentStart():
                        if args.verbose:
                            print(f"ttsd-say: segment {event.index}: {event.text}", file=sys.stderr, flush=True)
                    case Done():
                        run.done = event
        await out.finish()


async def _main(args: argparse.Namespace, out: Output) -> int:
    run = Run()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, run.interrupted.set)
    task = asyncio.create_task(_speak(args, out, run))
    interrupt = asyncio.create_task(run.interrupted.wait())
    await asyncio.wait({task, interrupt}, return_when=asyncio.FIRST_COMPLETED)
    if run.interrupted.is_set() and not task.done():
        out.abort()  # silence first: the user asked for quiet
        confirmed = False
        if run.synthesis is not None:
            await run.synthesis.cancel()
            try:
                # The request ends with the daemon's `cancelled` (or Done, had it just finished).
                async with asyncio.timeout(CANCEL_WAIT_S):
                    await asyncio.shield(task)
            except (TimeoutError, ClientError, ExceptionGroup) as e:
                confirmed = isinstance(_first(e), Cancelled)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        print("ttsd-say: interrupted" + (", request cancelled by the daemon" if confirmed else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    interrupt.cancel()
    try:
        await task
    except (ClientError, OSError, ExceptionGroup) as e:
        # The request's TaskGroup wraps errors raised while streaming; connect errors come bare.
        error = _first(e)
        if not isinstance(error, ClientError | OSError):
            raise
        print(f"ttsd-say: {error}", file=sys.stderr)
        return EXIT_FAILED
    if args.verbose and run.done is not None:
        d = run.done
        first = "-" if d.first_audio_ms is None else f"{d.first_audio_ms:.0f}"
        print(f"ttsd-say: done segments={d.segments} audio_s={d.audio_s:.2f} first_audio_ms={first} "
              f"total_ms={d.total_ms:.0f}", file=sys.stderr)
    return EXIT_OK


def _first(eg: BaseException) -> BaseException:
    """The first leaf of a (possibly nested) exception group: TaskGroup wraps task errors."""
    e: BaseException = eg
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    return e


def check(args: argparse.Namespace) -> None:
    """What can be wrong before the daemon is contacted: the options (the daemon's own ranges),
    the reference files (present and readable as audio; their length limit is the daemon's to
    apply, it may differ from the default) and the output file (format, writable). Raises
    TtsdError with a one-line message."""
    SynthesisOptions(**given_options(args))  # BadOptions naming a value out of range
    for path, what in ((args.voice, "speaker reference audio"), (args.emo_audio, "emotion reference audio")):
        if path is not None:
            reference_audio_seconds(path, f"{what} {path}")
    if args.out is not None:
        output_format(args.out)
        check_writable(args.out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="ttsd-say: %(levelname)s %(name)s: %(message)s")
    try:
        check(args)
    except TtsdError as e:
        print(f"ttsd-say: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        out = Output(args.out, args.device)
    except OSError as e:
        print(f"ttsd-say: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return EXIT_FAILED
    except RuntimeError as e:
        # NoAudioDevice is a RuntimeError; soundfile raises its own LibsndfileError (a RuntimeError too).
        if args.out is not None:
            print(f"ttsd-say: cannot write {args.out}: {str(e).rsplit(': ', 1)[-1]}", file=sys.stderr)
        else:
            print(f"ttsd-say: {e} (use --out FILE to write a file instead)", file=sys.stderr)
        return EXIT_FAILED
    try:
        return asyncio.run(_main(args, out))
    except KeyboardInterrupt:  # Ctrl-C before the loop's own handler was installed
        out.abort()
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
