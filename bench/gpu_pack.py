"""Pack what the GPU checks need into a folder small enough to travel to a lent GPU machine.

    python bench/gpu_pack.py .gpu            # then: device run with carry [".gpu"], bench/gpu_check.sh

A lent machine gets only the repository's working tree (64 MiB at most) and reaches no registry. This
writes, under DIR: `fixtures/<set>/` for every fixture set the tests use — the checkpoint, the inputs,
the manifest and, of the golden stages, only those the CUDA tests read (the joined waveform, and of
the CFM stage only the injected start noise) — and `whl/`, the wheels of ttsd's dependencies that the
machine's image lacks, for its Python (`--python-version`).

The full fixture sets are tracked in tests/fixtures (143 MB), more than a lent machine takes, so a
device run goes from a working tree without them: `git sparse-checkout set --no-cone '/*'
'!/tests/fixtures/'` before the run (`git sparse-checkout disable` after), with this pack carried
instead; bench/gpu_check.sh points the tests at it (TTSD_FIXTURES). Not yet tried on a lent machine."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import fixture_dirs  # noqa: E402 - the test suite's own choice of sets

GOLDEN_STAGES = ("16_output",)  # read whole
NOISE_STAGE = "14_cfm"  # only its `seg{i}.noise` tensors
# Not in the GPU image (checked against its package list): ttsd's run-time needs and the tests' plugin.
WHEELS = ("websockets", "soundfile", "cffi", "pycparser", "soxr", "kaldifst", "pytest-asyncio")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "any")


def pack_fixture(src: Path, dst: Path) -> None:
    shutil.copytree(src / "ckpt", dst / "ckpt", dirs_exist_ok=True)
    if (src / "inputs").is_dir():
        shutil.copytree(src / "inputs", dst / "inputs", dirs_exist_ok=True)
    golden = dst / "golden"
    golden.mkdir(parents=True, exist_ok=True)
    for f in (src / "golden").iterdir():
        if f.is_file():
            shutil.copy2(f, golden / f.name)
    for variant in (src / "golden").iterdir():
        if not variant.is_dir():
            continue
        (golden / variant.name).mkdir(exist_ok=True)
        for stage in GOLDEN_STAGES:
            shutil.copy2(variant / f"{stage}.safetensors", golden / variant.name / f"{stage}.safetensors")
        cfm = load_file(str(variant / f"{NOISE_STAGE}.safetensors"))
        noise = {k: v for k, v in cfm.items() if k.endswith(".noise")}
        save_file(noise, str(golden / variant.name / f"{NOISE_STAGE}.safetensors"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    ap.add_argument("--wetextprocessing", help="its version (default: the one scripts/setup.sh installs)")
    args = ap.parse_args(argv)
    for src in fixture_dirs():
        pack_fixture(src, args.out / "fixtures" / src.name)
    tn = args.wetextprocessing
    if tn is None:
        setup = (ROOT / "scripts" / "setup.sh").read_text()
        tn = setup.split("WeTextProcessing==", 1)[1].split('"', 1)[0].split()[0]
    wheels = args.out / "whl"
    wheels.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", args.python_version, "--implementation", "cp", *platforms, "-d", str(wheels),
                    *WHEELS, f"WeTextProcessing=={tn}"], check=True)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"gpu_pack: {args.out} {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
