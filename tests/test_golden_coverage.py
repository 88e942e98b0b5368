"""Every golden tensor in every fixture set's manifest is compared by some test (runs last).

The assert_* helpers of conftest record each golden tensor they compare; this test walks the
manifests and lists any tensor no test compared, for every version and variant. It only judges a
whole run: with tests deselected, files left out or earlier failures it skips, saying why. Under
pytest-xdist (the suite's default) the same check runs in the controller at the end of the session
(conftest.pytest_sessionfinish) over what every worker compared, and fails the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import COMPARED, DESELECTED, INPUT_ONLY, all_sets, coverage_unjudged, missing_golden


@pytest.mark.after_all
def test_every_golden_tensor_is_compared(request: pytest.FixtureRequest) -> None:
    """No tensor of any variant of any fixture set goes unchecked (call arguments aside)."""
    session = request.session
    why = coverage_unjudged(
        session.testsfailed,
        session.config.stash.get(DESELECTED, False),
        {item.path.name for item in session.items},
    )
    if why is not None:
        pytest.skip(why)
    missing = missing_golden(COMPARED)
    assert not missing, f"{len(missing)} golden tensors compared by no test: {missing[:40]}"


def test_the_coverage_check_names_what_was_not_compared() -> None:
    """The check the controller and the serial run share: nothing compared → every tensor listed but
    call arguments; every tensor compared → nothing; one left out → exactly that one."""
    every = {
        (s.root.name, variant, fname.removesuffix(".safetensors"), key)
        for s in all_sets()
        for variant, v in s.manifest["variants"].items()
        for fname, tensors in v["files"].items()
        for key in tensors
    }
    assert every, "no fixture set has golden tensors"
    assert missing_golden(every) == []
    results = sorted(e for e in every if e[3].rsplit(".", 1)[-1] not in INPUT_ONLY)
    left_out = results[len(results) // 2]
    name = f"{left_out[0]}/{left_out[1]}/{left_out[2]}.safetensors:{left_out[3]}"
    assert missing_golden(every - {left_out}) == [name]
    assert len(missing_golden(set())) > len(every) // 2
    assert coverage_unjudged(1, False, set()) is not None
    assert coverage_unjudged(0, True, set()) is not None
    files = {f.name for f in Path(__file__).parent.glob("test_*.py")}
    assert f"not collected: {len(files)}" in (coverage_unjudged(0, False, set()) or "")
    assert "not collected: 1" in (coverage_unjudged(0, False, files - {"test_pcm.py"}) or "")
    assert coverage_unjudged(0, False, files) is None
