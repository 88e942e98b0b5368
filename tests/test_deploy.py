"""Several daemons behind one front: the systemd template unit (one daemon per GPU), HAProxy in
front of two real `ttsd serve` processes on loopback, and the Kubernetes manifests (schema-checked
offline). HAProxy is a Debian package that .ci/run installs: without it the test fails, naming it."""

from __future__ import annotations

import asyncio
import copy
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ttsd.clients.client import Client, ConnectionLost, ShuttingDown
from ttsd.tools.ports import free_port
from ttsd.tools.tiny import synthetic_voice

from .conftest import REPO

TEMPLATE = REPO / "systemd" / "ttsd@.service"
HAPROXY_CFG = REPO / "deploy" / "haproxy.cfg"
K8S = REPO / "deploy" / "k8s"
START_TIMEOUT_S = 180.0
RUN_TIMEOUT_S = 180.0       # the whole load-balanced run: any client that hangs fails the test here
CLIENTS = 16
FAST = dict(do_sample=False, num_beams=1, max_mel_tokens=12, diffusion_steps=2, seed=3)


# --- systemd: one daemon per GPU ---------------------------------------------------------------


def _settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_template_unit_runs_one_daemon_per_gpu() -> None:
    """ttsd@N serves cuda:N with its own ports, shares the config and voice library, outlasts the drain."""
    s = _settings(TEMPLATE)
    single = _settings(REPO / "systemd" / "ttsd.service")
    exec_start = s["ExecStart"][0].split()
    assert exec_start[1:6] == ["serve", "--config", "/etc/ttsd/ttsd.toml", "--device", "cuda:%i"]
    assert "$TTSD_INSTANCE_ARGS" in exec_start
    assert s["EnvironmentFile"] == ["-/etc/ttsd/ttsd.env", "/etc/ttsd/ttsd@%i.env"]  # ports: required
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in s["Environment"]
    assert s["DynamicUser"] == ["yes"] and s["User"] == ["ttsd"]  # one UID for all: a shared library
    for key in ("Type", "Restart", "TimeoutStopSec", "KillSignal", "StateDirectory", "NoNewPrivileges"):
        assert s[key] == single[key], key


def test_template_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts an instance of the template (ExecStart pointed at this ttsd)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed on this machine")  # as test_systemd's unit check
    ttsd = Path(sys.executable).parent / "ttsd"
    assert ttsd.is_file(), f"the ttsd console script is not installed at {ttsd}"
    (tmp_path / "ttsd@.service").write_text(TEMPLATE.read_text().replace("/usr/local/bin/ttsd", str(ttsd)))
    proc = subprocess.run([tool, "verify", str(tmp_path / "ttsd@1.service")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "ttsd@" not in proc.stderr, proc.stderr


def test_device_cuda_n_names_one_gpu() -> None:
    """`--device cuda:N` is accepted for a GPU that exists and refused, naming it, for one that does not."""
    import torch

    from ttsd.api.errors import ConfigError
    from ttsd.pipeline.device import resolve_device
    from ttsd.tools import simcuda

    with simcuda.installed():  # one simulated GPU
        assert resolve_device("cuda:0") == torch.device("cuda:0")
        with pytest.raises(ConfigError, match="'cuda:1' does not exist"):
            resolve_device("cuda:1")


# --- HAProxy in front of two daemons ------------------------------------------------------------


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    log: Path
    port: int

    def requests_ok(self) -> float:
        """ttsd_requests_total{interface="websocket",code="ok"} from the daemon's /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            text = r.read().decode()
        ok = ('ttsd_requests_total{', 'code="ok"', 'interface="websocket"')
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(ok[0]) and ok[1] in line and ok[2] in line)

    def healthz(self) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except OSError:
            return 0  # gone


def _start_daemons(tmp_path: Path, n: int) -> list[Daemon]:
    ttsd = Path(sys.executable).parent / "ttsd"
    daemons = []
    for i in range(n):
        log = tmp_path / f"ttsd{i}.log"
        cmd = [str(ttsd), "serve", "--random-weights", "tiny", "--port", "0", "--voices-store",
               str(tmp_path / "voices"), "--drain-timeout-s", "5", "--max-concurrent-requests", "8",
               "--max-requests-per-connection", "2"]
        with open(log, "wb") as out:
            env = {**os.environ, "TMPDIR": str(tmp_path)}  # the random checkpoint is written there
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        daemons.append(Daemon(proc, log, 0))
    deadline = time.monotonic() + START_TIMEOUT_S
    for d in daemons:
        while not (ready := re.search(r"ttsd ready url=ws://127\.0\.0\.1:(\d+)", d.log.read_text())):
            assert d.proc.poll() is None, f"daemon exited: {d.log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"daemon not ready: {d.log.read_text()[-2000:]}"
            time.sleep(0.2)
        d.port = int(ready.group(1))
    return daemons


def _haproxy_config(ws_port: int, daemons: list[Daemon]) -> str:
    """deploy/haproxy.cfg as shipped, with the loopback test ports (the HTTP front is left out)."""
    text = HAPROXY_CFG.read_text()
    text = text[: text.index("\nfrontend ttsd_http")] + text[text.index("\nbackend ttsd_websocket"):]
    text = text[: text.index("\nbackend ttsd_http")]
    text = text.replace("bind :8765", f"bind 127.0.0.1:{ws_port}")
    servers = "".join(f"    server gpu{i} 127.0.0.1:{d.port} check\n" for i, d in enumerate(daemons))
    return re.sub(r"(    server gpu\d+ .*\n)+", servers, text)


@pytest.fixture
def haproxy() -> str:
    path = shutil.which("haproxy")
    assert path is not None, "haproxy is not installed (Debian: apt-get install haproxy; .ci/run does it)"
    return path


@pytest.fixture
def cluster(tmp_path: Path, haproxy: str) -> Iterator[tuple[str, list[Daemon]]]:
    """Two `ttsd serve --random-weights tiny` daemons sharing a voice library, HAProxy in front."""
    daemons = _start_daemons(tmp_path, 2)
    port = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(_haproxy_config(port, daemons))
    lb_log = tmp_path / "haproxy.log"
    with open(lb_log, "wb") as out:
        lb = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert lb.poll() is None, lb_log.read_text()
            assert time.monotonic() < deadline, "haproxy does not answer"
            time.sleep(0.2)
        yield f"ws://127.0.0.1:{port}", daemons
    finally:
        lb.terminate()
        lb.wait(10)
        for d in daemons:
            if d.proc.poll() is None:
                d.proc.terminate()
        for d in daemons:
            d.proc.wait(60)


@dataclass
class Outcome:
    opened: float       # time.monotonic() when its connection was opened
    error: BaseException | None


async def test_haproxy_spreads_clients_and_survives_a_replica_stopping(
    cluster: tuple[str, list[Daemon]]
) -> None:
    """16 clients through HAProxy: both daemons serve; after SIGTERM to one, its in-flight requests
    finish or end with shutting_down, every request opened after it began draining succeeds on the
    other, the stopped daemon exits 0, and no client hangs."""
    url, (a, b) = cluster
    wav = synthetic_voice(1.5, seed=7)
    outcomes: list[Outcome] = []
    stop = asyncio.Event()

    async def one_client(i: int) -> None:
        while not stop.is_set():
            opened = time.monotonic()
            try:
                # One connection per request, as a short-lived client would: each is balanced anew,
                # and the voice registered through one daemon is found by the other in the library.
                async with Client(url) as c:
                    voice = await c.register_voice(wav)
                    pcm = await c.synthesize(f"Client {i} says hello.", voice=voice, **FAST).read_pcm()
                assert pcm
                outcomes.append(Outcome(opened, None))
            except (ShuttingDown, ConnectionLost) as e:
                outcomes.append(Outcome(opened, e))

    async with asyncio.timeout(RUN_TIMEOUT_S):
        clients = [asyncio.create_task(one_client(i)) for i in range(CLIENTS)]
        while min(await asyncio.to_thread(a.requests_ok), await asyncio.to_thread(b.requests_ok)) < 4:
            await asyncio.sleep(0.2)  # both replicas serve
        a.proc.send_signal(signal.SIGTERM)
        while await asyncio.to_thread(a.healthz) == 200:
            await asyncio.sleep(0.01)
        draining = time.monotonic()  # from here on a new handshake on `a` is refused (HAProxy retries it)
        served_by_b = await asyncio.to_thread(b.requests_ok)
        while sum(o.opened > draining and o.error is None for o in outcomes) < 2 * CLIENTS:
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*clients)
        assert await asyncio.to_thread(a.proc.wait, 60) == 0

    after = [o for o in outcomes if o.opened > draining]
    assert [o.error for o in after if o.error is not None] == []
    assert await asyncio.to_thread(b.requests_ok) >= served_by_b + len(after)
    # Before the drain, a request caught on `a` ended with shutting_down (or its connection's 1001).
    assert all(isinstance(o.error, ShuttingDown | ConnectionLost) for o in outcomes if o.error is not None)
    log = a.log.read_text()
    assert "shutdown complete" in log
    in_flight = re.search(r"shutdown draining requests=(\d+)", log)
    assert in_flight is not None and int(in_flight.group(1)) > 0, "nothing was in flight on the stopped daemon"


# --- Kubernetes ---------------------------------------------------------------------------------

K8S_VERSION = "1.33.0"   # schemas bundled with kubernetes-validate: no cluster, no network


def _manifests() -> dict[str, dict[str, Any]]:
    import yaml

    docs = [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def test_k8s_manifests_validate_against_the_schemas() -> None:
    """Every manifest validates strictly (unknown fields refused); a misspelled field is caught."""
    import kubernetes_validate

    manifests = _manifests()
    assert set(manifests) == {
        "ConfigMap/ttsd-config", "Deployment/ttsd", "Service/ttsd", "HorizontalPodAutoscaler/ttsd",
        "PersistentVolumeClaim/ttsd-checkpoints", "PersistentVolumeClaim/ttsd-voice-store",
    }
    for doc in manifests.values():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    broken = copy.deepcopy(manifests["Deployment/ttsd"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/healthz"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_k8s_deployment_matches_the_daemon() -> None:
    """One GPU per pod; readiness on /healthz; weights and voice library on the claimed volumes; the
    grace period covers preStop plus the daemon's worst drain; the config loads; the Service selects
    the pods; the HPA scales the Deployment on a metric the daemon exports."""
    from dataclasses import replace

    from ttsd.daemon.config import DaemonConfig, load_toml
    from ttsd.daemon.metrics import Metrics
    from ttsd.daemon.server import CANCEL_GRACE_S
    from ttsd.daemon.session import CLOSE_TIMEOUT_S, FLUSH_ON_CLOSE_S

    m = _manifests()
    deployment = m["Deployment/ttsd"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"

    config_map = m["ConfigMap/ttsd-config"]["data"]["ttsd.toml"]
    toml = Path(tempfile.mkdtemp()) / "ttsd.toml"
    toml.write_text(config_map)
    config = replace(DaemonConfig(), **load_toml(toml), token="x" * 16).validated()  # the token: a Secret
    assert config.device == "cuda:0" and config.voices_store is not None and config.checkpoints is not None
    mounts = {v["mountPath"]: v["name"] for v in container["volumeMounts"]}
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    assert claims[mounts[str(config.checkpoints)]] == "ttsd-checkpoints"
    assert claims[mounts[str(config.voices_store)]] == "ttsd-voice-store"
    assert "ReadWriteMany" in m["PersistentVolumeClaim/ttsd-voice-store"]["spec"]["accessModes"]
    assert mounts["/etc/ttsd"] == "config" and container["args"][-1] == "/etc/ttsd/ttsd.toml"

    worst_drain_s = config.drain_timeout_s + 2 * CANCEL_GRACE_S + FLUSH_ON_CLOSE_S + 2 * CLOSE_TIMEOUT_S
    pre_stop_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + worst_drain_s

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == config.port

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = m["Service/ttsd"]["spec"]
    assert service["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["ports"]} <= {p["name"] for p in container["ports"]}

    hpa = m["HorizontalPodAutoscaler/ttsd"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ttsd"}
    (metric,) = hpa["metrics"]
    assert f"# TYPE {metric['pods']['metric']['name']} gauge" in _exported_metrics(Metrics)


def _exported_metrics(metrics_type: Any) -> str:
    """The /metrics text of a daemon's Metrics watching an idle worker stand-in (gauges included)."""
    from ttsd.daemon.worker import VoiceCache

    class IdleWorker:
        live_jobs = running_jobs = batch_rows_in_use = 0
        voices = VoiceCache(1)
        store = None

    metrics = metrics_type()
    metrics.watch(IdleWorker(), 16)
    return str(metrics.render().decode())
