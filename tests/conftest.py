"""Shared test fixtures: the fixture sets, golden tensors, the parity rule.

The sets the suite needs live in the repository (tests/fixtures: indextts2-tiny-s1,
indextts25-tiny-s1, qwen-emo-tiny-s1, made by the official implementation), so a clone tests itself.
Every other set directory named `indextts2-*` (IndexTTS-2) or `indextts25-*` (IndexTTS-2.5) in
../shared/fixtures is picked up too (a same-named one there replaces the repository's), so other
seeds and configs run the same tests; TTSD_FIXTURES=dir1:dir2 names the sets instead. A set that is
expected and missing fails the run at collection: a check that skips when its data is missing cannot
fail. Which sets a test runs on is decided at collection:

* `@pytest.mark.model_versions("2", "2.5")` names the model versions the test supports; a test
  without the marker runs on IndexTTS-2 sets only (the whole pipeline, daemon and v2 front end);
* `@pytest.mark.stages("12_codec_decode", ...)` names golden stage files the test reads; it is
  generated only for the (set, variant) pairs that have them, so the test ids say which stage
  runs for which version (2.5 has no 04/11 and has 12_codec_decode instead of 12_s2mel_inputs);
* tests that take `variant` run on every variant in the set's manifest.

`assert_close` / `assert_equal` record which golden tensor they compared; the last test of the
session (tests/test_golden_coverage.py) checks that every tensor in every manifest was compared."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Final

import pytest

# OpenMP threads sleep when they run out of work instead of spinning, in the test process and in every
# process it starts (daemons, CLIs, benchmarks). The suite often runs two torch processes at once (a
# test and its `ttsd serve`), and a daemon runs its worker and voice threads side by side: with the
# default spinning, their parallel regions keep 2 cores busy waiting for preempted threads. Measured
# on the 2-core machine with another process busy, the 8 golden waveforms took 114 s spinning, 48 s
# sleeping (and 48 s with one thread). It must be set before torch (and its OpenMP) is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after the OpenMP setting above)
import yaml  # noqa: E402

# Under pytest-xdist (the suite's default, see pyproject's addopts) the workers share the cores: one
# torch thread each, so two workers on two cores do not fight over them. Processes a test starts
# (daemons, CLIs) keep their own default.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

from ttsd.pipeline.family import family_for

REPO = Path(__file__).resolve().parents[1]
REPO_FIXTURES = REPO / "tests" / "fixtures"
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"
FIXTURE_PATTERNS = ("indextts2-*", "indextts25-*")
# The sets the repository carries; the suite fails (never skips) without them.
REQUIRED_SETS = ("indextts2-tiny-s1", "indextts25-tiny-s1", "qwen-emo-tiny-s1")
DEFAULT_VERSIONS = ("2",)  # tests without a model_versions marker
REL_TOL = 1e-4  # max|a-b| <= REL_TOL * max(1, max|golden|)  (float32 CPU parity rule)

# (fixture set, variant, stage, tensor) of every golden tensor an assert_* helper has compared.
COMPARED: set[tuple[str, str, str, str]] = set()
_LABEL = "_ttsd_golden"  # attribute naming a loaded golden tensor's origin


class MissingFixtures(RuntimeError):
    """An expected fixture set is absent or incomplete: the run stops instead of skipping its tests."""


def _sets(folders: list[Path], patterns: tuple[str, ...]) -> dict[str, Path]:
    """{name: directory} of the sets matching `patterns` in `folders`; later folders win a name."""
    found: dict[str, Path] = {}
    for folder in folders:
        for pattern in patterns:
            for p in sorted(folder.glob(pattern)):
                if p.is_dir():
                    found[p.name] = p
    return found


def _check_set(p: Path, marker: str) -> Path:
    if not (p / marker).is_file():
        raise MissingFixtures(f"fixture set {p} has no {marker}")
    return p


def fixture_dirs() -> list[Path]:
    """The IndexTTS fixture sets every golden test runs on (see the module docstring)."""
    env = os.environ.get("TTSD_FIXTURES")
    if env:
        return [_check_set(Path(p), "golden/manifest.json") for p in env.split(os.pathsep) if p]
    found = _sets([REPO_FIXTURES, SHARED_FIXTURES], FIXTURE_PATTERNS)
    for name in REQUIRED_SETS:
        if name.startswith("indextts") and name not in found:
            raise MissingFixtures(f"fixture set {name} is missing from {REPO_FIXTURES}")
    return sorted((_check_set(p, "golden/manifest.json") for p in found.values()), key=lambda p: p.name)


def qwen_emo_dirs() -> list[Path]:
    """The emotion-from-text fixture sets: the repository's qwen-emo-tiny-s1 and any in ../shared."""
    found = _sets([REPO_FIXTURES, SHARED_FIXTURES], ("qwen-emo-*",))
    if "qwen-emo-tiny-s1" not in found:
        raise MissingFixtures(f"fixture set qwen-emo-tiny-s1 is missing from {REPO_FIXTURES}")
    return sorted(found.values(), key=lambda p: p.name)


@dataclass
class FixtureSet:
    """One fixture set: an official-format checkpoint, inputs and golden tensors."""

    root: Path

    @cached_property
    def version(self) -> str:
        """The model version of the set's checkpoint ("2" or "2.5": its family's name)."""
        return family_for(yaml.safe_load((self.ckpt / "config.yaml").read_text(encoding="utf-8"))).name

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(self.manifest["variants"])

    def has_stages(self, variant: str, stages: tuple[str, ...]) -> bool:
        return all((self.golden_dir / variant / f"{stage}.safetensors").is_file() for stage in stages)

    def stage_name(self, variant: str, number: str) -> str:
        """The stage file starting with `number` (e.g. "12": 12_s2mel_inputs or 12_codec_decode)."""
        found = sorted((self.golden_dir / variant).glob(f"{number}_*.safetensors"))
        assert len(found) == 1, f"{self.root.name}/{variant}: stage {number} files {found}"
        return found[0].stem

    @property
    def ckpt(self) -> Path:
        return self.root / "ckpt"

    @property
    def golden_dir(self) -> Path:
        return self.root / "golden"

    @cached_property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.golden_dir / "manifest.json").read_text(encoding="utf-8"))

    def variant(self, name: str) -> dict[str, Any]:
        return self.manifest["variants"][name]

    def golden(self, variant: str, stage: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        tensors = load_file(str(self.golden_dir / variant / f"{stage}.safetensors"))
        for key, t in tensors.items():
            setattr(t, _LABEL, (self.root.name, variant, stage, key))  # read by _record
        return tensors

    def input_path(self, name: str) -> Path:
        return self.golden_dir / name

    @property
    def text(self) -> str:
        return str(self.manifest["inputs"]["text"])

    @property
    def settings(self) -> dict[str, Any]:
        return self.manifest["settings"]


def golden_part(golden: torch.Tensor, index: Any) -> torch.Tensor:
    """golden[index], still recorded as a comparison of `golden` by the assert_* helpers."""
    part = golden[index]
    if hasattr(golden, _LABEL):
        setattr(part, _LABEL, getattr(golden, _LABEL))
    return part


def _record(golden: torch.Tensor) -> None:
    label = getattr(golden, _LABEL, None)
    if label is not None:
        COMPARED.add(label)


def max_abs_err(actual: torch.Tensor, golden: torch.Tensor) -> float:
    return float((actual.detach().double().cpu() - golden.double()).abs().max()) if golden.numel() else 0.0


def assert_close(actual: torch.Tensor, golden: torch.Tensor, name: str = "tensor") -> None:
    """The parity rule: same shape, and max|a-b| <= 1e-4 * max(1, max|golden|)."""
    assert tuple(actual.shape) == tuple(golden.shape), (
        f"{name}: shape {tuple(actual.shape)} != golden {tuple(golden.shape)}"
    )
    scale = max(1.0, float(golden.double().abs().max())) if golden.numel() else 1.0
    err = max_abs_err(actual, golden)
    assert err <= REL_TOL * scale, f"{name}: max abs err {err:.3e} > {REL_TOL:.0e} * {scale:.3g}"
    _record(golden)


def assert_equal(actual: torch.Tensor, golden: torch.Tensor, name: str = "tensor") -> None:
    """Exact equality for ids and codes."""
    assert tuple(actual.shape) == tuple(golden.shape), (
        f"{name}: shape {tuple(actual.shape)} != golden {tuple(golden.shape)}"
    )
    assert torch.equal(actual.cpu().to(golden.dtype), golden), f"{name}: values differ from golden"
    _record(golden)


EDITS = ("removed", "renamed", "reshaped")


def edit_checkpoint(src: Path, dst: Path, how: str, key: str) -> Path:
    """Copy safetensors `src` to `dst` with tensor `key` removed, renamed (`key_renamed`) or given one extra row."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    if how == "removed":
        del tensors[key]
    elif how == "renamed":
        tensors[key + "_renamed"] = tensors.pop(key)
    elif how == "reshaped":
        tensors[key] = torch.cat([tensors[key], tensors[key][:1]])
    else:
        raise ValueError(how)
    save_file(tensors, str(dst))
    return dst


def assert_names_edit(err: Any, how: str, name: str) -> None:
    """The CheckpointMismatch for an edit_checkpoint edit lists exactly that tensor, under its module name."""
    if how == "removed":
        assert err.missing == [name] and not err.unexpected and not err.misshaped, err
    elif how == "renamed":
        assert err.missing == [name] and err.unexpected == [name + "_renamed"] and not err.misshaped, err
    else:
        assert len(err.misshaped) == 1 and err.misshaped[0].startswith(name + ":") and not err.missing, err
    assert name in str(err)


_SETS = [FixtureSet(p) for p in fixture_dirs()]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize `fx` (and `variant`) with the fixture sets and variants the test applies to."""
    if "fx" not in metafunc.fixturenames:
        assert "variant" not in metafunc.fixturenames, "a test taking `variant` must take `fx` too"
        return
    versions_mark = metafunc.definition.get_closest_marker("model_versions")
    stages_mark = metafunc.definition.get_closest_marker("stages")
    versions = tuple(versions_mark.args) if versions_mark else DEFAULT_VERSIONS
    stages = tuple(stages_mark.args) if stages_mark else ()
    sets = [s for s in _SETS if s.version in versions]
    if "variant" in metafunc.fixturenames:
        pairs = [(s.root, v) for s in sets for v in s.variants if s.has_stages(v, stages)]
        ids = [f"{root.name}-{v}" for root, v in pairs]
        metafunc.parametrize(("fx", "variant"), pairs, indirect=["fx"], ids=ids, scope="session")
    else:
        roots = [s.root for s in sets if any(s.has_stages(v, stages) for v in s.variants)]
        metafunc.parametrize("fx", roots, indirect=True, ids=[r.name for r in roots], scope="session")


@pytest.fixture(scope="session")
def fx(request: pytest.FixtureRequest) -> FixtureSet:
    return next(s for s in _SETS if s.root == request.param)


# Built once per fixture set for the whole session. Pytest keeps one value of a parametrised session
# fixture at a time and rebuilds it whenever the order of tests switches sets, so the value is kept here.
_CONVERTED: dict[Path, Path] = {}
_PIPELINES: dict[Path, Any] = {}


@pytest.fixture(scope="session")
def converted(fx: FixtureSet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture's official checkpoint converted with ttsd-convert (once per session)."""
    from ttsd.pipeline.convert import convert

    out = _CONVERTED.get(fx.root)
    if out is None:
        out = tmp_path_factory.mktemp(f"ckpt-{fx.root.name}")
        convert(fx.ckpt, out, progress=False)
        _CONVERTED[fx.root] = out
    return out


@pytest.fixture(scope="session")
def pipeline(converted: Path) -> Any:
    """One Pipeline on CPU per fixture set for the whole session (tests that need their own load it)."""
    from ttsd.pipeline.pipeline import Pipeline

    pipe = _PIPELINES.get(converted)
    if pipe is None:
        pipe = _PIPELINES[converted] = Pipeline.load(converted, device="cpu")
    return pipe


def reap(proc: subprocess.Popen[Any]) -> None:
    """A test's subprocess at the end of the test: killed if it still runs, waited for, and every pipe
    the test opened to it closed (an open pipe outlives the test as a ResourceWarning)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def all_sets() -> list[FixtureSet]:
    """Every fixture set this session runs on (for the golden coverage check)."""
    return list(_SETS)


# Tensors that record a call argument rather than a result; the tests pass them in (or index with
# them) and compare what they produce instead.
INPUT_ONLY = {
    "inference_cfg_rate": "the CFG rate handed to the CFM sampler",
    "temperature": "the noise scale; the seeded-noise test multiplies by it",
    "est_steps": "which Euler steps the est_* tensors hold; the DiT tests index with it",
    "use_speed": "IndexTTS-2's `use_speed` forward argument (always zero)",
}


def missing_golden(compared: set[tuple[str, str, str, str]]) -> list[str]:
    """`set/variant/stage:tensor` of every golden tensor of every set that `compared` lacks."""
    return [
        f"{s.root.name}/{variant}/{fname}:{key}"
        for s in all_sets()
        for variant, v in s.manifest["variants"].items()
        for fname, tensors in v["files"].items()
        for key in tensors
        if (s.root.name, variant, fname.removesuffix(".safetensors"), key) not in compared
        and key.rsplit(".", 1)[-1] not in INPUT_ONLY
    ]


def coverage_unjudged(testsfailed: int, deselected: bool, collected: set[str]) -> str | None:
    """Why a run cannot judge golden coverage (it only judges a whole, passing run), or None."""
    if testsfailed:
        return "other tests failed, so their comparisons are incomplete"
    if deselected:
        return "tests were deselected: coverage is judged on the whole suite only"
    wanted = {p.name for p in Path(__file__).parent.glob("test_*.py")}
    if not wanted <= collected:
        missing = sorted(wanted - collected)
        return f"coverage is judged on the whole suite; test files not collected: {len(missing)}"
    return None


DESELECTED = pytest.StashKey[bool]()
COLLECTED_FILES = pytest.StashKey[set[str]]()
WORKER_RESULTS: list[dict[str, Any]] = []  # xdist controller: what each worker compared


def pytest_deselected(items: list[pytest.Item]) -> None:
    if items:
        items[0].config.stash[DESELECTED] = True


def _xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _xdist_controller(config: pytest.Config) -> bool:
    return not _xdist_worker(config) and bool(getattr(config.option, "numprocesses", None)) \
        and getattr(config.option, "dist", "no") != "no"


# The files that take longest (seconds of test time on 2 cores, 2026-12-06: 94, 46, 33, 28, 25, 21, 21,
# 20), handed out first: xdist gives each worker the next file in collection order as it runs dry
# (addopts: --dist loadfile --no-loadscope-reorder), so the long ones start early and the short ones
# even out the two workers' ends. A file missing here only runs later; nothing depends on the order.
LONGEST_FILES: Final = ("test_cuda_sim.py", "test_bench.py", "test_text_parity.py", "test_daemon_hostile.py",
                        "test_pipeline.py", "test_deploy.py", "test_daemon.py", "test_chunked.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    config.stash[COLLECTED_FILES] = {item.path.name for item in items}
    # The golden coverage check reads what every other test recorded: it runs last. Under xdist no
    # worker sees every comparison, so the controller judges coverage at the end of the session
    # (pytest_sessionfinish below) from what each worker reports, and the workers drop the test.
    last = [item for item in items if item.get_closest_marker("after_all")]
    first = {name: rank for rank, name in enumerate(LONGEST_FILES)}
    rest = sorted((item for item in items if item not in last), key=lambda item: first.get(item.path.name, len(first)))
    items[:] = rest + ([] if _xdist_worker(config) else last)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no CUDA device on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook sends workeroutput to the controller
def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    if _xdist_worker(config):
        out = config.workeroutput  # type: ignore[attr-defined]
        out["ttsd_compared"] = sorted(COMPARED)
        out["ttsd_deselected"] = config.stash.get(DESELECTED, False)
        out["ttsd_collected"] = sorted(config.stash[COLLECTED_FILES] if COLLECTED_FILES in config.stash else ())
        return
    if not _xdist_controller(config) or session.shouldstop or session.shouldfail:
        return
    terminal = config.pluginmanager.get_plugin("terminalreporter")
    compared = {tuple(c) for r in WORKER_RESULTS for c in r.get("ttsd_compared", [])}
    why = coverage_unjudged(
        session.testsfailed,
        any(r.get("ttsd_deselected") for r in WORKER_RESULTS),
        {f for r in WORKER_RESULTS for f in r.get("ttsd_collected", [])},
    )
    if why is not None:
        if terminal:
            terminal.ensure_newline()
            terminal.write_line(f"golden coverage: not judged ({why})")
        return
    missing = missing_golden(compared)
    if missing:
        if terminal:
            terminal.ensure_newline()
            terminal.write_line(f"golden coverage FAILED: {len(missing)} golden tensors compared by no test: "
                                f"{missing[:40]}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    elif terminal:
        terminal.ensure_newline()
        terminal.write_line(f"golden coverage: every golden tensor compared ({len(compared)} comparisons)")


@pytest.hookimpl(optionalhook=True)  # an xdist hook: the controller collects each worker's record
def pytest_testnodedown(node: Any, error: Any) -> None:
    WORKER_RESULTS.append(dict(getattr(node, "workeroutput", {}) or {}))
