"""The acceleration wrappers and device-fault handling, checked on CPU (the CUDA runs are marked `cuda`).

Inductor runs the same graph passes for CPU as for CUDA, so the compiled decode step's treatment of
the KV cache (written in place, never copied) is checked here on CPU."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch._inductor.utils import run_and_get_code

from ttsd.api.errors import BadText
from ttsd.pipeline import pipeline as pipeline_module
from ttsd.pipeline.accel import CompiledOrEager, step_function
from ttsd.pipeline.decode import KVCache, decode_step
from ttsd.pipeline.errors import DeviceFault
from ttsd.pipeline.gpt import UnifiedVoice, load_unified_voice
from ttsd.pipeline.pipeline import Pipeline


@pytest.fixture(scope="module")
def gpt(converted: Path) -> UnifiedVoice:
    return load_unified_voice(converted, yaml.safe_load((converted / "config.yaml").read_text()), "cpu")


@torch.inference_mode()
def test_compiled_decode_step_writes_the_cache_in_place(gpt: UnifiedVoice) -> None:
    """Inductor's code for the decode step writes each layer's K/V in place: no buffer or copy the size of a
    layer's cache appears in it, and the compiled step leaves the same cache and logits as the eager one."""
    cfg = gpt.cfg
    rows, slots = 4, 192  # one layer's K is 4·H·192·Dh: a size no other tensor of the step has
    layer_numel = rows * cfg.heads * slots * cfg.head_dim

    def fresh() -> KVCache:
        cache = KVCache(cfg, rows, slots, torch.device("cpu"), torch.float32, max_rows=rows, max_slots=slots,
                        growable=False)
        cache.buf.normal_(generator=torch.Generator().manual_seed(0))
        return cache

    tokens = torch.tensor([[5], [6], [7], [8]])
    input_pos = torch.tensor([[40], [41], [60], [3]])
    mel_pos = torch.tensor([[2], [3], [9], [2]])
    eager_cache, compiled_cache = fresh(), fresh()
    want = decode_step(gpt, tokens, input_pos, mel_pos, eager_cache.view(0, rows), slots)
    compiled = torch.compile(decode_step, fullgraph=True, dynamic=False)
    got, codes = run_and_get_code(compiled, gpt, tokens, input_pos, mel_pos, compiled_cache.view(0, rows), slots)
    code = "\n".join(codes)
    sizes = [int(n) for n in re.findall(r"\b(\d+)L?\b", code)]
    assert layer_numel not in sizes, "a cache-sized loop or buffer remains in the compiled decode step"
    for shape in re.findall(r"empty_strided\w*\(\(([\d, ]+)\)", code):
        numel = 1
        for d in (int(x) for x in shape.split(",") if x.strip()):
            numel *= d
        assert numel < layer_numel, f"the compiled step allocates a cache-sized buffer ({shape})"
    assert "copy_" not in code
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(compiled_cache.buf, eager_cache.buf)


def test_a_failing_compiled_step_falls_back_to_eager_for_good(
    gpt: UnifiedVoice, caplog: pytest.LogCaptureFixture
) -> None:
    """When the compiled step raises (no C compiler for Triton, say), the step logs one line and runs eagerly
    from then on, giving the eager result."""
    calls = 0

    def broken(*_: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        raise RuntimeError("Triton launcher: no C compiler found\nlong traceback line two")

    step = CompiledOrEager(broken, decode_step)
    cache = KVCache(gpt.cfg, 4, 64, torch.device("cpu"), torch.float32, max_rows=4, max_slots=64, growable=False)
    args = (gpt, torch.zeros(4, 1, dtype=torch.long), torch.zeros(4, 1, dtype=torch.long),
            torch.full((4, 1), 2), cache.view(0, 4), 64)
    with torch.inference_mode():
        first = step(*args)
        second = step(*args)
        want = decode_step(*args)
    assert calls == 1 and step.failed
    torch.testing.assert_close(first, want)
    torch.testing.assert_close(second, want)
    warnings = [r for r in caplog.records if "continuing eagerly" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()


def test_cpu_steps_are_eager_unless_compiling_is_asked_for() -> None:
    """On CPU the decode step is the plain function (graphs are CUDA only); compile wraps it with the fallback."""
    assert step_function(torch.device("cpu"), compile=False) is decode_step
    assert isinstance(step_function(torch.device("cpu"), compile=True), CompiledOrEager)


def test_device_probe_turns_unexplained_failures_into_device_faults(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a plain exception the device is probed: a working device means an ordinary failure, a failing
    probe (a wedged or poisoned device) a DeviceFault; an AcceleratorError is a fault without probing;
    a TtsdError never is."""
    pipeline.check_device(RuntimeError("an ordinary bug"))  # the probe passes: no fault

    def broken_probe(_device: torch.device) -> None:
        raise RuntimeError("CUDA error: unspecified launch failure")

    monkeypatch.setattr(pipeline_module, "probe_device", broken_probe)
    with pytest.raises(DeviceFault, match="probe"):
        pipeline.check_device(RuntimeError("Triton launcher failed"))
    pipeline.check_device(BadText("not a device problem"))
    with pytest.raises(DeviceFault, match="AcceleratorError"):
        pipeline.check_device(torch.AcceleratorError("CUDA error: device-side assert triggered"))
