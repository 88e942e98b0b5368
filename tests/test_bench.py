"""The benchmark scripts still run end to end on the tiny fixture (smallest settings) and print their tables."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import reap

REPO = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_bench_pipeline_prints_its_table(converted: Path) -> None:
    """bench_pipeline.py on the converted fixture prints a per-stage table with the device line."""
    out = run_bench(
        "bench_pipeline.py", "--checkpoints", str(converted), "--device", "cpu", "--texts", "short",
        "--codes", "6", "--num-beams", "1", "--diffusion-steps", "2", "--warmup", "0", "--voice-s", "1",
        "--concurrency", "1,2",
    )
    assert "| text | segments | codes |" in out
    assert "| short |" in out
    assert "| requests | rows | codes |" in out and "| 2 | 2 |" in out


@pytest.mark.slow
def test_bench_precision_prints_its_table(converted: Path) -> None:
    """bench_precision.py compares the bfloat16 GPT, acoustic and both modes with float32, a row per segment."""
    out = run_bench(
        "bench_precision.py", "--checkpoints", str(converted), "--device", "cpu", "--dtypes", "bfloat16",
        "--codes", "8", "--diffusion-steps", "2", "--text", "Hello there.",
    )
    assert "| mode | segment | codes |" in out
    for mode in ("gpt", "acoustic", "both"):
        assert f"| {mode} bfloat16 | 0 |" in out


@pytest.mark.slow
def test_bench_daemon_prints_its_table(converted: Path) -> None:
    """bench_daemon.py spawns a daemon on the converted fixture, runs 1 then 2 clients and prints both rows."""
    out = run_bench(
        "bench_daemon.py", "--spawn", "--checkpoints", str(converted), "--device", "cpu", "--clients", "1,2",
        "--requests", "1", "--cancels", "1", "--max-mel-tokens", "6", "--num-beams", "1",
        "--diffusion-steps", "2", "--voice-s", "1",
    )
    assert "| clients | requests |" in out
    assert "\n| 1 | 1 |" in out and "\n| 2 | 2 |" in out and "| 1.00 | 1.00 |" in out


@pytest.mark.slow
def test_bench_daemon_stopped_with_sigterm_stops_its_daemon(converted: Path) -> None:
    """SIGTERM to bench_daemon.py (a kill, a timeout) ends the daemon it spawned too: none is left running."""
    bench = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "bench_daemon.py"), "--spawn", "--checkpoints", str(converted),
         "--device", "cpu", "--clients", "1", "--requests", "50", "--cancels", "0", "--max-mel-tokens", "6",
         "--num-beams", "1", "--diffusion-steps", "2", "--voice-s", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        assert bench.stderr is not None
        pid = None
        for line in bench.stderr:  # the bench says when its daemon is up, then runs 50 requests
            if m := re.match(r"bench_daemon: ttsd serve \(pid (\d+)\) is healthy", line):
                pid = int(m.group(1))
                break
        assert pid is not None, "the bench never reported its daemon healthy"
        daemon = Path(f"/proc/{pid}")
        assert daemon.exists()
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=90) == 128 + signal.SIGTERM
        assert not daemon.exists() or "zombie" in (daemon / "status").read_text(), "the daemon outlived its bench"
    finally:
        reap(bench)


@pytest.mark.slow
def test_bench_daemon_alternates_chunked_and_whole_requests(converted: Path) -> None:
    """--versus-whole: one client alternates chunked and whole-segment requests on one daemon and prints a row
    for each mode, the chunked one with how much earlier its first audio came."""
    out = run_bench(
        "bench_daemon.py", "--spawn", "--checkpoints", str(converted), "--device", "cpu", "--requests", "1",
        "--cancels", "0", "--max-mel-tokens", "12", "--num-beams", "1", "--diffusion-steps", "2", "--voice-s", "1",
        "--chunk-codes", "6", "--chunk-overlap", "2", "--first-chunk-codes", "3", "--versus-whole",
    )
    assert "| mode | ttfa_p50_s |" in out
    whole = next(line for line in out.splitlines() if line.startswith("| whole segment |"))
    chunked = next(line for line in out.splitlines() if line.startswith("| chunked |"))
    assert whole.rstrip().endswith("|  |") and chunked.rstrip().endswith("× |")


def test_gpu_cost_counts_graphed_steps() -> None:
    """gpu_cost.py (the CUDA branch on the simulated device, random tiny weights) counts a steady decode
    step of one-row requests as graph replays with no host sync, a CFM step as one replay and the acoustic
    prep's second pass as graph nodes with no host sync, and ends with its machine-readable line (defect:
    the selection ran as ~22 eager kernels per step and every CFM step launched each of its ~1000
    kernels)."""
    out = run_bench("gpu_cost.py", "--random", "tiny", "--rows", "6", "--live-slots", "80", "--codes", "40",
                    "--diffusion-steps", "3")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| ") and not line.startswith("| work")}
    greedy = rows["decode step, 6 rows greedy"]
    assert int(greedy[0]) <= 2 and int(greedy[1]) > 0 and int(greedy[4]) == 0  # launches, nodes, syncs
    cfm = rows["one CFM step (DiT × CFG)"]
    assert int(cfm[0]) == 1 and int(cfm[1]) > 0
    prep = rows["acoustic prep, 4 segments"]
    assert int(prep[1]) > 0 and int(prep[4]) == 0  # the second pass replayed from a graph; nothing read back
    last = out.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in last.removeprefix("modelled h100: ").split())
    assert set(fields) == {"streams", "first_audio_ms", "step_ms", "step_bytes_ratio", "step_launches", "step_syncs"}
    assert int(fields["step_launches"]) <= 2 and int(fields["step_syncs"]) == 0
