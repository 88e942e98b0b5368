"""Every golden tensor in every fixture set's manifest is compared by some test (runs last).

The assert_* helpers of conftest record each golden tensor they compare; this test walks the
manifests and lists any tensor no test compared, for every version and variant. It only judges a
whole run: with tests deselected, files left out or earlier failures it skips, saying why."""

from __future__ import annotations

import pytest

from .conftest import COMPARED, DESELECTED, all_sets

# Tensors that record a call argument rather than a result; the tests pass them in (or index with
# them) and compare what they produce instead.
INPUT_ONLY = {
    "inference_cfg_rate": "the CFG rate handed to the CFM sampler",
    "temperature": "the noise scale; the seeded-noise test multiplies by it",
    "est_steps": "which Euler steps the est_* tensors hold; the DiT tests index with it",
    "use_speed": "IndexTTS-2's `use_speed` forward argument (always zero)",
}


@pytest.mark.after_all
def test_every_golden_tensor_is_compared(request: pytest.FixtureRequest) -> None:
    """No tensor of any variant of any fixture set goes unchecked (call arguments aside)."""
    session = request.session
    if session.testsfailed:
        pytest.skip("other tests failed, so their comparisons are incomplete")
    if session.config.stash.get(DESELECTED, False):
        pytest.skip("tests were deselected: coverage is judged on the whole suite only")
    collected = {item.path.name for item in session.items}
    wanted = {p.name for p in request.path.parent.glob("test_*.py")}
    if not wanted <= collected:
        pytest.skip(f"run the whole suite to check coverage (not collected: {sorted(wanted - collected)})")
    missing = [
        f"{s.root.name}/{variant}/{fname}:{key}"
        for s in all_sets()
        for variant, v in s.manifest["variants"].items()
        for fname, tensors in v["files"].items()
        for key in tensors
        if (s.root.name, variant, fname.removesuffix(".safetensors"), key) not in COMPARED
        and key.rsplit(".", 1)[-1] not in INPUT_ONLY
    ]
    assert not missing, f"{len(missing)} golden tensors compared by no test: {missing[:40]}"
