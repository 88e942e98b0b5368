#!/usr/bin/env bash
# The GPU checks of a lent CUDA machine, in one run of at most about 8 minutes. Usage:
#
#   python bench/gpu_pack.py .gpu            # here: fixtures and wheels for a machine without a registry
#   bash bench/gpu_check.sh OUTDIR           # there: OUTDIR/run.log (every step's output, in order)
#
# Steps, each time-boxed (GPU_CHECK_SCALE multiplies every limit), most important first: the environment
# (nvidia-smi, torch, CUDA); the CUDA tests (pytest -m cuda); golden parity on CUDA for every fixture
# variant of both model versions (float32, TF32 off); the serving benchmark (bench/gpu_bench.py) on the
# full-size architecture with random weights at 1, 8, 32 concurrent requests in bfloat16 and in float32;
# the daemon benchmark (bench_daemon.py) at 1, 8, 32 clients; the simulated-CUDA harness's own tests. A step that fails or runs out of
# time is logged and the next one runs; the script's status is the number of failed steps.
#
# torch: the machine's own python3 when it has a CUDA build; otherwise scripts/setup.sh installs the
# build for the driver's CUDA version (TTSD_TORCH_INDEX, README "GPU hosts"). ttsd runs from this tree
# (its package names mapped onto the folders), with the wheels from .gpu/whl when present.
set -uo pipefail
out=${1:?usage: bench/gpu_check.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
scale=${GPU_CHECK_SCALE:-1}
export PYTHONUNBUFFERED=1
failed=0
log() { echo "=== gpu_check $(date +%T) $*" | tee -a "$out/run.log"; }
step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    log "start $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout --kill-after=10 "$((limit * scale))" "$@" >>"$out/run.log" 2>&1
    local rc=$?
    log "end $name rc=$rc seconds=$((SECONDS - t0))"
    [ "$rc" = 0 ] || failed=$((failed + 1))
}

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    cu=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: \([0-9]*\)\.\([0-9]\).*/cu\1\2/p' | head -1)
    log "no CUDA torch in $PY; installing the ${cu:-?} build with scripts/setup.sh"
    TTSD_TORCH_INDEX="https://download.pytorch.org/whl/${cu:-cu128}" bash scripts/setup.sh >>"$out/run.log" 2>&1
    PY=.venv/bin/python
fi
site=$(mktemp -d)
if [ -d .gpu/whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" .gpu/whl/*.whl >>"$out/run.log" 2>&1 \
        || log "wheel install failed"
fi
mkdir -p "$site/ttsd"
for d in api pipeline daemon clients tools; do ln -sfn "$PWD/$d" "$site/ttsd/$d"; done
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .gpu/fixtures ]; then
    TTSD_FIXTURES=$(find "$PWD/.gpu/fixtures" -mindepth 1 -maxdepth 1 -type d | sort | paste -sd:)
    export TTSD_FIXTURES
fi
ckpt=$(mktemp -d)/full
pytest=("$PY" -m pytest -q -p no:cacheprovider -o addopts="--strict-markers -ra" -W default)

step env 60 bash -c "nvidia-smi; '$PY' -c 'import torch, sys; print(sys.version); print(torch.__version__, \
torch.version.cuda, torch.backends.cudnn.version(), torch.cuda.get_device_name())'"
step pytest_cuda 180 "${pytest[@]}" -m cuda tests/test_cuda.py tests/test_gpt.py tests/test_daemon.py -k "not golden"
step parity_cuda 120 "${pytest[@]}" -m cuda tests/test_cuda.py -k golden
step random_weights 240 "$PY" -c "from ttsd.tools.tiny import write_converted; write_converted('$ckpt', 'full', 0)"
step bench_bf16 240 "$PY" bench/gpu_bench.py --checkpoints "$ckpt" --dtype bfloat16 --clients 1,8,32 \
    --json "$out/bench_bf16.json"
step bench_fp32 240 "$PY" bench/gpu_bench.py --checkpoints "$ckpt" --dtype float32 --clients 1,8,32 \
    --json "$out/bench_fp32.json"
step bench_daemon 240 "$PY" bench/bench_daemon.py --spawn --checkpoints "$ckpt" --device cuda --dtype bfloat16 \
    --clients 1,8,32 --requests 1 --cancels 2 --num-beams 1 --max-mel-tokens 100 --no-compile
step simcuda 60 "${pytest[@]}" tests/test_simcuda.py
log "done failed_steps=$failed"
exit "$failed"
