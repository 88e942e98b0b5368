"""Daemon benchmark: N concurrent WebSocket clients, time to first audio, throughput, cancel latency.

    python bench/bench_daemon.py --url ws://127.0.0.1:8765 --clients 8
    python bench/bench_daemon.py --spawn --checkpoints CKPT --clients 1,4,8,16 --device cpu
    python bench/bench_daemon.py --random-full --clients 1,4 --max-mel-tokens 25   # real sizes, random weights

`--clients` is a comma-separated list of client counts: one table row per count, against the same
daemon. In each round every client opens its own connection (the `ttsd.clients` library),
registers the same reference audio and, after one warm-up request, sends `--requests` requests
back to back, all clients at once. Time to first audio is measured at the client, from sending `Synthesize` to the
first `Audio` frame (the server's own `Done.first_audio_ms` is reported beside it). Throughput is
the audio seconds all clients received per wall-clock second. Cancel latency is the time from
sending `Cancel` (right after a request's first audio frame) to the `cancelled` error.

`--random-full` (or `--random tiny`) spawns `ttsd serve --random-weights PRESET`: the architecture
with seeded random weights (written to a temporary directory and loaded like a checkpoint), no
checkpoints needed. A random model never emits the stop token, so every segment decodes exactly
`--max-mel-tokens` codes (default RANDOM_MAX_MEL_TOKENS): the real cost without real weights."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ttsd.api.options import SynthesisOptions
from ttsd.api.protocol import Audio, Done
from ttsd.clients.client import Cancelled, Client
from ttsd.daemon.config import DaemonConfig
from ttsd.tools.ports import free_port
from ttsd.tools.tiny import synthetic_voice

TEXT = "The quick brown fox jumps over the lazy dog, and then it runs all the way back home again."
CANCEL_TEXT = " ".join([TEXT] * 6)  # long enough to still be running when the cancel arrives
SPAWN_TIMEOUT_S = 900.0  # loading full-size weights on a slow disk / CPU can take minutes
RANDOM_MAX_MEL_TOKENS = 50  # codes per segment for random models when --max-mel-tokens is not given (1 s audio)


@dataclass(frozen=True, kw_only=True, slots=True)
class Result:
    first_audio_s: float  # client side: Synthesize sent → first Audio frame
    server_first_audio_ms: float | None
    total_s: float
    audio_s: float


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def one_request(client: Client, voice: str, text: str, options: dict[str, Any]) -> Result:
    syn = client.synthesize(text, voice=voice, **options)
    t0 = time.perf_counter()
    await syn.start()
    first: float | None = None
    done: Done | None = None
    async for event in syn:
        if isinstance(event, Audio) and first is None:
            first = time.perf_counter() - t0
        elif isinstance(event, Done):
            done = event
    total = time.perf_counter() - t0
    return Result(
        first_audio_s=first if first is not None else total,
        server_first_audio_ms=None if done is None else done.first_audio_ms,
        total_s=total,
        audio_s=0.0 if done is None else done.audio_s,
    )


async def one_cancel(client: Client, voice: str, options: dict[str, Any]) -> float:
    """Seconds from sending Cancel (after the first audio frame) to the request's `cancelled` error."""
    syn = client.synthesize(CANCEL_TEXT, voice=voice, **options)
    sent: float | None = None
    try:
        async for event in syn:
            if isinstance(event, Audio) and sent is None:
                sent = time.perf_counter()
                await syn.cancel()
    except Cancelled:
        return time.perf_counter() - (sent if sent is not None else time.perf_counter())
    return float("nan")  # finished before the cancel took effect


async def client_run(url: str, token: str | None, audio: bytes, text: str, n: int, options: dict[str, Any],
                     start: asyncio.Event, ready: asyncio.Queue[str]) -> list[Result]:
    async with Client(url, token) as client:
        voice = await client.register_voice(audio)
        await one_request(client, voice, text, options)  # warm-up: voice and code paths hot
        await ready.put(voice)
        await start.wait()
        return [await one_request(client, voice, text, options) for _ in range(n)]


async def one_round(args: argparse.Namespace, url: str, audio: bytes, options: dict[str, Any],
                    clients: int) -> tuple[list[Result], float]:
    """`clients` connections at once, `--requests` each → (results, wall seconds of the timed part)."""
    start, ready = asyncio.Event(), asyncio.Queue[str]()
    tasks = [asyncio.create_task(client_run(url, args.token, audio, args.text, args.requests, options, start, ready))
             for _ in range(clients)]
    for _ in range(clients):
        await ready.get()
    t0 = time.perf_counter()
    start.set()
    results = [r for rs in await asyncio.gather(*tasks) for r in rs]
    return results, time.perf_counter() - t0


async def bench(args: argparse.Namespace, url: str) -> None:
    audio = args.voice.read_bytes() if args.voice is not None else synthetic_voice(args.voice_s)
    options: dict[str, Any] = {"seed": 0}
    for name in ("max_mel_tokens", "num_beams", "diffusion_steps", "chunk_codes", "chunk_overlap", "first_chunk_codes"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.versus_whole:
        await versus_whole(args, url, audio, options)
        return
    rounds = [(n, *await one_round(args, url, audio, options, n)) for n in args.clients]

    cancels: list[float] = []
    async with Client(url, args.token) as client:
        voice = await client.register_voice(audio)
        for _ in range(args.cancels):
            cancels.append(await one_cancel(client, voice, options))

    print(f"url: {url}")
    if args.spawn:
        model = args.checkpoints if args.random is None else f"random {args.random} (seed {args.random_seed})"
        print(f"spawned: ttsd serve, model {model}, device {args.device}, dtype {args.dtype}, "
              f"max_batch_rows {args.max_batch_rows}")
    print(f"requests per client: {args.requests}  options: {options}  text: {len(args.text)} chars")
    print()
    print("| clients | requests | ttfa_p50_s | ttfa_p95_s | server_ttfa_p50_ms | audio_s | wall_s "
          "| audio_s_per_wall_s | ttfa_p50 / 1 client | throughput / 1 client |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base: tuple[float, float] | None = None
    for clients, results, wall in rounds:
        ttfa = [r.first_audio_s for r in results]
        server = [r.server_first_audio_ms for r in results if r.server_first_audio_ms is not None]
        audio_total = sum(r.audio_s for r in results)
        p50, rate = percentile(ttfa, 50), audio_total / wall
        if clients == 1:
            base = (p50, rate)
        ratios = f"{p50 / base[0]:.2f} | {rate / base[1]:.2f}" if base is not None else "— | —"
        print(
            f"| {clients} | {len(results)} | {p50:.3f} | {percentile(ttfa, 95):.3f} "
            f"| {statistics.median(server) if server else float('nan'):.0f} | {audio_total:.2f} | {wall:.2f} "
            f"| {rate:.3f} | {ratios} |"
        )
    ok_cancels = [c for c in cancels if c == c]
    print()
    print(f"cancel latency (Cancel sent → `cancelled`, one client): samples {len(ok_cancels)}, "
          f"p50 {1000 * statistics.median(ok_cancels) if ok_cancels else float('nan'):.0f} ms, "
          f"max {1000 * max(ok_cancels) if ok_cancels else float('nan'):.0f} ms")
    if len(ok_cancels) < len(cancels):
        print(f"{len(cancels) - len(ok_cancels)} request(s) finished before their cancel arrived")


async def versus_whole(args: argparse.Namespace, url: str, audio: bytes, options: dict[str, Any]) -> None:
    """One client alternating chunked requests with whole-segment ones (chunk_codes 0) on the same
    daemon, `--requests` pairs after one warm-up of each, so both modes see the same machine load."""
    whole = {**options, "chunk_codes": 0}
    async with Client(url, args.token) as client:
        voice = await client.register_voice(audio)
        for o in (options, whole):
            await one_request(client, voice, args.text, o)  # warm-up
        pairs = []
        for _ in range(args.requests):
            pairs.append((await one_request(client, voice, args.text, options),
                          await one_request(client, voice, args.text, whole)))
    print(f"url: {url}")
    print(f"pairs: {args.requests}  options: {options}  text: {len(args.text)} chars")
    print()
    print("| mode | ttfa_p50_s | server_ttfa_p50_ms | total_p50_s | audio_s | rtf | first audio earlier |")
    print("|---|---|---|---|---|---|---|")
    whole_ttfa = statistics.median(w.first_audio_s for _, w in pairs)
    for name, k in (("whole segment", 1), ("chunked", 0)):
        rs = [p[k] for p in pairs]
        ttfa = statistics.median(r.first_audio_s for r in rs)
        server = [r.server_first_audio_ms for r in rs if r.server_first_audio_ms is not None]
        total = statistics.median(r.total_s for r in rs)
        audio_s = statistics.median(r.audio_s for r in rs)
        earlier = "" if k else f"{whole_ttfa / ttfa:.1f}×"
        print(f"| {name} | {ttfa:.3f} | {statistics.median(server) if server else float('nan'):.0f} | {total:.3f} "
              f"| {audio_s:.2f} | {total / audio_s if audio_s else float('nan'):.2f} | {earlier} |")


@contextlib.contextmanager
def spawned(args: argparse.Namespace) -> Iterator[str]:
    """Run `ttsd serve` on a free loopback port until the block ends; yields its WebSocket URL."""
    port = free_port()
    if args.random is not None:
        weights = ["--random-weights", args.random, "--random-seed", str(args.random_seed)]
    else:
        weights = ["--checkpoints", str(args.checkpoints)]
    cmd = [sys.executable, "-m", "ttsd.daemon", "serve", *weights,
           "--port", str(port), "--device", args.device, "--dtype", args.dtype,
           "--max-concurrent-requests", str(max(args.clients)), "--max-batch-rows", str(args.max_batch_rows),
           "--max-num-beams", str(args.num_beams or SynthesisOptions().num_beams),
           "--log-level", "warning", *([] if args.compile else ["--no-torch-compile"])]
    proc = subprocess.Popen(cmd, env={**os.environ, "TTSD_TOKEN": ""})

    def stop() -> None:
        proc.send_signal(signal.SIGTERM)  # graceful drain, as systemd would stop it
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def on_sigterm(signum: int, _frame: object) -> None:
        # A bench stopped with SIGTERM (kill, timeout) stops its daemon too. Python's default action
        # skips the `finally` below, and an exception raised here can be swallowed by the client
        # library's handlers, so the daemon is stopped here and the bench exits at once.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop()
        os._exit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ttsd serve exited with {proc.returncode} during start-up")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError("ttsd serve did not become healthy in time")
            time.sleep(0.5)
        print(f"bench_daemon: ttsd serve (pid {proc.pid}) is healthy on port {port}", file=sys.stderr, flush=True)
        yield f"ws://127.0.0.1:{port}"
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a SIGTERM now must not cut the clean-up short
        stop()
        signal.signal(signal.SIGTERM, previous)


def _counts(text: str) -> list[int]:
    counts = [int(c) for c in text.split(",") if c.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("client counts are positive integers, e.g. 1,4,8,16")
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="ws://127.0.0.1:8765", help="daemon URL (ignored with --spawn)")
    ap.add_argument("--token", default=os.environ.get("TTSD_TOKEN") or None, help="bearer token ($TTSD_TOKEN)")
    ap.add_argument("--spawn", action="store_true", help="start `ttsd serve` for the run (needs --checkpoints)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoints", type=Path, help="converted checkpoint directory for --spawn")
    src.add_argument("--random-full", action="store_true", help="spawn with the full-size model, seeded random weights")
    src.add_argument("--random", choices=["tiny", "full"], help="spawn with random weights of a make-tiny preset")
    ap.add_argument("--random-seed", type=int, default=0, help="weights seed of --random models")
    ap.add_argument("--device", default="cpu", help="--spawn: torch device")
    ap.add_argument("--dtype", default="float32", help="--spawn: GPT dtype")
    ap.add_argument("--clients", type=_counts, default=[4],
                    help="concurrent connections: one count, or a comma-separated list (one round each)")
    ap.add_argument("--requests", type=int, default=2, help="timed requests per client, back to back")
    ap.add_argument("--cancels", type=int, default=3, help="cancel-latency samples")
    ap.add_argument("--text", default=TEXT, help="text of every timed request (default: one sentence)")
    ap.add_argument("--voice", type=Path, help="reference audio (default: a synthetic voiced signal)")
    ap.add_argument("--voice-s", type=float, default=6.0, help="length of the synthetic reference (seconds)")
    ap.add_argument("--max-mel-tokens", type=int,
                    help=f"codes per segment (server default otherwise; {RANDOM_MAX_MEL_TOKENS} for --random models)")
    ap.add_argument("--num-beams", type=int)
    ap.add_argument("--diffusion-steps", type=int)
    ap.add_argument("--chunk-codes", type=int, help="render segments in chunks of this many codes (default 0: off)")
    ap.add_argument("--chunk-overlap", type=int, help="codes each chunk repeats of the one before")
    ap.add_argument("--first-chunk-codes", type=int, help="codes in a segment's first chunk")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="--spawn: compile the decode step on CUDA (--no-compile: graphs of the eager step)")
    ap.add_argument("--max-batch-rows", type=int,
                    help="--spawn: decode batch rows (default: the daemon's, or every client's beams if more)")
    ap.add_argument("--versus-whole", action="store_true",
                    help="with --chunk-codes: one client alternates chunked and whole-segment requests "
                    "(--requests pairs)")
    args = ap.parse_args(argv)
    if args.versus_whole and not args.chunk_codes:
        ap.error("--versus-whole needs --chunk-codes")
    if args.versus_whole:
        args.clients = [1]
    if args.max_batch_rows is None:
        args.max_batch_rows = max(DaemonConfig().max_batch_rows,
                                  max(args.clients) * (args.num_beams or SynthesisOptions().num_beams))
    if args.random_full:
        args.random = "full"
    if args.random is not None:
        args.spawn = True
        if args.max_mel_tokens is None:
            args.max_mel_tokens = RANDOM_MAX_MEL_TOKENS  # the stop token never comes: cap every segment
    if args.spawn and args.checkpoints is None and args.random is None:
        ap.error("--spawn needs --checkpoints, --random-full or --random PRESET")
    if args.spawn:
        with spawned(args) as url:
            asyncio.run(bench(args, url))
    else:
        asyncio.run(bench(args, args.url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
