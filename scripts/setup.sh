#!/usr/bin/env bash
# Create .venv and install ttsd with its client and dev extras. The CPU torch wheel is pinned
# first: an unpinned torch pulls several GB of CUDA packages. On a GPU host set TTSD_TORCH to
# the torch requirement you want (for example "torch==2.13.0" from the CUDA index).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "${TTSD_TORCH:-torch==2.13.0}"
# The text normaliser's graphs (read at run time, checked by SHA-256); pynini is not needed to run them.
python -m pip install -q --no-deps "WeTextProcessing==1.2.0"
python -m pip install -q -e '.[dev,client]'
