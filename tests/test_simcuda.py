"""The simulated-CUDA harness itself (ttsd.tools.simcuda): for each class of defect it exists to catch —
a device mix, a host sync, a stream race, a value frozen at graph capture, running out of memory — a
deliberately broken snippet is caught, and its corrected twin is not."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest
import torch

from ttsd.tools import simcuda
from ttsd.tools.simcuda import CaptureError, DeviceMismatch, HostSync, StreamRace, SyncRegion


@pytest.fixture(autouse=True)
def sim() -> Iterator[None]:
    """The harness installed for one test, with violations cleared before and after (the broken snippets
    of earlier tests leave tensors behind in reference cycles: collected first)."""
    gc.collect()
    simcuda.clear_violations()
    with simcuda.installed():
        yield
        gc.collect()
    simcuda.clear_violations()


def test_device_tensors_report_cuda_and_compute_on_the_host() -> None:
    """Factories and .to("cuda") give cuda:0 tensors whose values are those the CPU computes."""
    x = torch.arange(6, dtype=torch.float32, device="cuda").view(2, 3)
    y = torch.ones(2, 3).to("cuda")
    assert x.device == torch.device("cuda", 0) and x.is_cuda and y.is_cuda
    z = (x * 2 + y)[1, 1:]
    assert z.cpu().tolist() == [9.0, 11.0]
    assert not z.cpu().is_cuda


def test_device_mix_raises_cudas_error() -> None:
    """A non-scalar host tensor meeting a device tensor raises as on CUDA; a 0-dim host scalar does not."""
    lens = torch.tensor([3, 5])  # host: the length-regulator defect had exactly this shape of bug
    frames = torch.arange(8, device="cuda")
    with pytest.raises(DeviceMismatch, match=r"^Expected all tensors to be on the same device.*cuda:0 and cpu") as e:
        _ = frames[None, :] < lens[:, None]
    assert "test_simcuda.py" in e.value.site
    assert (frames < torch.tensor(4)).sum().item() == 4


def test_host_syncs_are_counted_and_refused_where_forbidden() -> None:
    """item(), tolist(), .cpu(), nonzero, torch.equal, repr and blocking host→device copies count as syncs;
    no_syncs() raises at the first one and names the line."""
    x = torch.ones(4, device="cuda")
    with simcuda.count_syncs() as r:
        x.sum().item()
        x.tolist()
        x.cpu()
        x.nonzero()
        torch.equal(x, x)
        repr(x)
        torch.tensor([1, 2], device="cuda")
    assert isinstance(r, SyncRegion) and r.count == 7, r.events
    with simcuda.count_syncs() as r:
        y = (x * 2).softmax(0)
        upload = torch.tensor([1, 2], pin_memory=True).to("cuda", non_blocking=True)
        host = torch.empty(4, pin_memory=True)
        host.copy_(y, non_blocking=True)
    assert r.count == 0 and upload.is_cuda, r.events
    with pytest.raises(HostSync, match="test_simcuda.py"), simcuda.no_syncs():
        if bool(x.sum() > 0):  # the broken snippet: a device value decides host control flow
            pass


def test_stream_race_is_caught_and_an_event_fixes_it() -> None:
    """Reading on stream B what stream A wrote, with no wait between, is a race; wait_stream orders it."""
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(a):
        t = torch.full((4,), 2.0, device="cuda")
    with torch.cuda.stream(b), pytest.raises(StreamRace, match="reads memory written on stream"):
        _ = t + 1
    simcuda.clear_violations()
    b.wait_stream(a)
    with torch.cuda.stream(b):
        u = t + 1
    torch.cuda.current_stream().wait_stream(b)
    assert u.cpu().tolist() == [3.0] * 4
    assert simcuda.violations() == []


def test_incidental_sync_is_no_hand_over() -> None:
    """A host read that happens to synchronise stream A does not order stream B after A's writes: hand-overs
    between streams must be explicit (strict hand-offs)."""
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(a):
        t = torch.full((4,), 2.0, device="cuda")
        t.sum().item()
    with torch.cuda.stream(b), pytest.raises(StreamRace):
        _ = t * 3


def test_free_without_record_stream_is_reported() -> None:
    """Memory allocated on A, last used on B and dropped without record_stream is reported; with it, not."""
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(a):
        t = torch.ones(16, device="cuda")
    b.wait_stream(a)
    with torch.cuda.stream(b):
        _ = t * 2
    del t
    gc.collect()
    assert [type(v) for v in simcuda.violations()] == [StreamRace]
    assert "was freed while stream" in str(simcuda.violations()[0])
    simcuda.clear_violations()
    with torch.cuda.stream(a):
        t = torch.ones(16, device="cuda")
    b.wait_stream(a)
    with torch.cuda.stream(b):
        _ = t * 2
    t.record_stream(b)
    del t
    gc.collect()
    assert simcuda.violations() == []


def test_graph_capture_freezes_host_values_and_replays_the_same_ops() -> None:
    """A captured graph runs nothing at capture, replays its ops on the same storages, and keeps every
    host value it read at capture (a Python number, a CPU scalar tensor), as a real CUDA graph does."""
    x = torch.zeros(3, device="cuda")
    counter = torch.zeros(1, device="cuda")
    scale, host_scalar = 2.0, torch.tensor(5.0)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = x * scale + host_scalar
        counter.add_(1)
    assert counter.cpu().item() == 0  # nothing ran while capturing
    x.fill_(1.0)
    scale = 100.0  # noqa: F841 - the graph read the old value
    host_scalar.fill_(-1.0)
    g.replay()
    torch.cuda.synchronize()
    assert out.cpu().tolist() == [7.0] * 3 and counter.cpu().item() == 1
    g.replay()
    torch.cuda.synchronize()
    assert counter.cpu().item() == 2


def test_sync_during_capture_raises() -> None:
    """A host read inside capture is refused, as cudaErrorStreamCaptureUnsupported."""
    x = torch.ones(3, device="cuda")
    with pytest.raises(CaptureError, match="captures a graph"), torch.cuda.graph(torch.cuda.CUDAGraph()):
        if x.sum().item() > 0:
            pass


def test_out_of_memory_is_cudas_error() -> None:
    """Going over the simulated budget raises torch.cuda.OutOfMemoryError before the host allocates."""
    simcuda.set_budget(64 << 20)
    try:
        free, total = torch.cuda.mem_get_info()
        assert total == 64 << 20 and free <= total
        with pytest.raises(torch.cuda.OutOfMemoryError, match="CUDA out of memory"):
            torch.zeros(1 << 30, device="cuda")  # 4 GiB: refused from its size alone
        before = torch.cuda.memory_allocated()
        t = torch.zeros(1 << 20, device="cuda")
        assert torch.cuda.memory_allocated() == before + (4 << 20)
        del t
        assert torch.cuda.memory_allocated() == before
    finally:
        simcuda.set_budget(16 << 30)


def test_threads_see_the_simulated_device() -> None:
    """Threads started while the harness is installed make simulated tensors too (a daemon's worker)."""
    seen: list[torch.device] = []
    th = threading.Thread(target=lambda: seen.append(torch.zeros(1, device="cuda").device))
    th.start()
    th.join()
    assert seen == [torch.device("cuda", 0)]


def test_uninstall_restores_the_cpu_build() -> None:
    """After the harness goes, torch reports no CUDA again."""
    simcuda.uninstall()
    try:
        assert not torch.cuda.is_available() and torch.version.cuda is None
    finally:
        simcuda.install()


def test_cost_meter_counts_launches_bytes_and_flops() -> None:
    """An eager matmul is one launch moving its inputs and output with 2·M·K·N FLOPs; a view moves nothing;
    a replayed graph is one launch whose kernels count as graph nodes with the same bytes."""
    a = torch.ones(8, 16, device="cuda")
    b = torch.ones(16, 4, device="cuda")
    with simcuda.meter() as cost:
        _ = a[:, :8].t()  # views only
    assert (cost.launches, cost.bytes) == (0, 0)
    with simcuda.meter() as cost:
        c = a @ b
    assert cost.launches == 1 and cost.graph_nodes == 0
    assert cost.bytes == (a.numel() + b.numel() + c.numel()) * 4
    assert cost.flops_fp32 == 2 * 8 * 16 * 4
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        d = a @ b
    with simcuda.meter() as replayed:
        g.replay()
    assert (replayed.launches, replayed.graph_nodes) == (1, 1)
    assert replayed.bytes == cost.bytes and d.shape == c.shape
    model = simcuda.DeviceModel()
    roofline = max(cost.bytes / model.bandwidth_bps, cost.flops_fp32 / model.fp32_flops)
    assert model.seconds(cost) == pytest.approx(roofline + model.launch_s)
    assert model.seconds(replayed) == pytest.approx(roofline + model.launch_s + model.graph_node_s)


def test_as_replay_books_what_a_replay_of_the_same_work_books() -> None:
    """Work run eagerly under as_replay() is booked as one replay of a graph of exactly those kernels
    (device factories included): the launches, nodes and FLOPs of the captured graph's replay; a host
    sync inside raises, as it would in capture."""
    a = torch.randn(8, 16, device="cuda")
    b = torch.randn(16, 4, device="cuda")

    def work() -> torch.Tensor:
        idx = torch.arange(4, device="cuda")
        return torch.tanh(a @ b).index_select(1, idx) + 1.0

    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = work()
    with simcuda.meter() as replayed:
        g.replay()
    with simcuda.meter() as booked, simcuda.as_replay():
        eager = work()
    assert (booked.launches, booked.graph_nodes) == (replayed.launches, replayed.graph_nodes) == (1, 5)
    assert booked.flops_fp32 == replayed.flops_fp32 > 0
    assert torch.equal(eager.cpu(), captured.cpu())
    with pytest.raises(simcuda.HostSync), simcuda.as_replay():
        a.sum().item()


def test_kv_buckets_cover_every_length() -> None:
    """Every attention length up to the cache's has a bucket within an eighth of it below 1024 slots."""
    from ttsd.pipeline.decode import kv_buckets

    buckets = kv_buckets(2496)
    assert buckets[-1] == 2496 and list(buckets) == sorted(set(buckets))
    for need in range(1, 2497):
        b = next(x for x in buckets if x >= need)
        assert b - need < (64 if need <= 512 else 128 if need <= 1024 else 256)
