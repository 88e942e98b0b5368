#!/usr/bin/env bash
# Create .venv and install ttsd with the extras the README's commands and CI use: server (torch and
# the model's runtime: ttsd serve, ttsd synth), client (ttsd-say), convert (ttsd-convert, ttsd fetch,
# ttsd make-tiny), http and wyoming (the other interfaces) and dev (tests, linters). A machine that
# only runs ttsd-say needs none of them: `pip install ttsd` is the torch-free client set.
#
# torch is installed first, pinned, from PyTorch's CPU wheel index: PyPI's Linux wheel of the same
# version is the CUDA build and pulls several GB of nvidia-* packages. On a GPU host choose the
# CUDA build instead by naming its index (cu126, cu128, ... : the one your driver supports):
#   TTSD_TORCH_INDEX=https://download.pytorch.org/whl/cu128 bash scripts/setup.sh
# (PIP_EXTRA_INDEX_URL=<that index> works too: pip reads it itself, and it then replaces the CPU
# index.) TTSD_TORCH overrides the requirement itself (default torch==2.13.0). To switch an
# existing .venv to another build, remove .venv first (pip keeps an installed torch that satisfies
# the pin).
set -euo pipefail
cd "$(dirname "$0")/.."
TTSD_TORCH="${TTSD_TORCH:-torch==2.13.0}"
if [ -n "${TTSD_TORCH_INDEX:-}" ] || [ -z "${PIP_EXTRA_INDEX_URL:-}" ]; then
    torch_index=(--extra-index-url "${TTSD_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}")
else
    torch_index=()  # pip takes the index from $PIP_EXTRA_INDEX_URL
fi
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# An extra index, not a replacement: torch's own dependencies still come from PyPI. One retry, so a
# machine that cannot reach the PyTorch index (but has the wheel locally) is not held up for long.
python -m pip install -q --retries 1 "${torch_index[@]}" "$TTSD_TORCH"
# The text normaliser's graphs (read at run time, checked by SHA-256): WeTextProcessing 1.0.4.1, the version
# upstream's uv.lock pins. pynini is not needed to run them; the dev extra adds it (pinned 2.1.6, as upstream).
python -m pip install -q --no-deps "WeTextProcessing==1.0.4.1"
python -m pip install -q -e '.[server,dev,client,convert,http,wyoming]'
python - <<'PY'
import torch
cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
print(f"setup: torch {torch.__version__} ({cuda}); GPU visible: {torch.cuda.is_available()}")
PY
