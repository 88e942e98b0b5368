#!/usr/bin/env bash
# Create .venv and install ttsd with its client, http, wyoming and dev extras (CI tests them
# all). The CPU torch wheel is pinned first: an unpinned torch pulls several GB of CUDA
# packages. On a GPU host set TTSD_TORCH to the torch requirement you want (for example
# "torch==2.13.0" from the CUDA index).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "${TTSD_TORCH:-torch==2.13.0}"
python -m pip install -q -e '.[dev,client,http,wyoming]'
