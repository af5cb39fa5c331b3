#!/usr/bin/env bash
# The GPU checks in one pass, under 8 minutes on an H200: build the CUDA extension, run the gpu-marked tests
# (the kernels against the float64 reference, the grouped CUDA ops among them; on 8 pytest-xdist workers when it
# is installed, since compiling the Triton kernels dominates), time atlas_linear at the ViT-B/32 MLP size against
# its FLOP and byte floors, then each fused backend with the fused and merge-once strategies and the cost model's
# choice at M = 6400, 128, 8, 1, and run `atlas-fast bench` at ViT-B/32, T=21 bf16 bank, batch 128, bf16 autocast,
# then a ViT-B/32 training step with the bank offloaded to host memory against the resident one. Every part runs
# under `timeout`, so the script always finishes; a part that fails or times out is logged and the next one runs.
#
#   bash benchmarks/gpu_wheels.sh    once, where the package index is reachable: wheels the GPU machine lacks, in .whl/
#   bash benchmarks/gpu_check.sh     on the GPU machine: results under $OUT (absolute; default bench_out/gpu_check)
#
# $OUT receives 6 files: gpu_check.log (every part's output, in order), layer.json, strategies.json,
# bench/results.json, bench/bench.png and offload.json. Wheels in .whl/ (open_clip and its tokenizer's ftfy and
# wcwidth, which the GPU machine's image lacks) are installed first.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/bench_out/gpu_check}
mkdir -p "$OUT/bench"
LOG=$OUT/gpu_check.log
: >"$LOG"
export PYTHONUNBUFFERED=1

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
# The package runs from the source tree: an editable install would compile the CUDA extension through setup.py.
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}

part() {  # part NAME SECONDS COMMAND...: runs COMMAND under a time limit, appends its output to $LOG
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "==== $name" >>"$LOG"
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$LOG"
    return $rc
}

{
    echo "==== environment"
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    timeout 20 python3 -c "
import importlib, sys
print('python', sys.version.split()[0])
for name in ('torch triton open_clip torchvision timm ftfy regex huggingface_hub tqdm matplotlib numpy '
             'safetensors pytest ninja').split():
    try:
        print(name, getattr(importlib.import_module(name), '__version__', 'present'))
    except Exception as e:
        print(name, 'NOT IMPORTABLE:', type(e).__name__, e)
import torch
print('torch cuda', torch.version.cuda, torch.cuda.get_device_name())"
    command -v nvcc && nvcc --version | tail -1
} >>"$LOG" 2>&1

# Build the CUDA extension once, so no later process compiles it; on failure the cuda backend is left out and the
# build lock of an interrupted build is removed, so no later process waits on it.
BACKENDS=naive,finetune,torch,triton,cuda
BUILT=1
if ! part "cuda extension build" 100 python3 -c "
import sys, torch
from atlas_fast.backends import get_backend
reason = get_backend('cuda').unavailable_reason(torch.device('cuda'))
print('cuda backend:', reason or 'available')
sys.exit(0 if reason is None else 1)"; then
    BACKENDS=naive,finetune,torch,triton
    BUILT=0
    lockdir=$(python3 -c "from atlas_fast.backends.cuda_backend import build_dir; print(build_dir())" 2>/dev/null)
    [ -n "$lockdir" ] && rm -f "$lockdir/lock"
fi

# Workers compile the Triton kernels in parallel (their on-disk cache is shared); a per-test limit keeps one hung
# test from taking the whole part. Without a built extension one process runs them, so that the build is not
# tried again by every worker in turn.
PYTEST=(python3 -m pytest -m gpu -q -rfE -p no:cacheprovider)
[ "$BUILT" = 1 ] && python3 -c "import xdist" 2>/dev/null && PYTEST+=(-n 8)
python3 -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 60)
part "gpu tests" 90 "${PYTEST[@]}" tests
grep -E "^(FAILED|ERROR) | in [0-9.]+s( |$)" "$LOG" | tail -n 25

# One process for both layer timings: the Triton kernels compiled for the roofline serve the strategy rows.
part "atlas_linear roofline and strategies" 85 python3 benchmarks/bench_atlas_linear.py \
    --json "$OUT/layer.json" --strategies-json "$OUT/strategies.json"

part "atlas-fast bench" 160 python3 -m atlas_fast bench --device cuda --model ViT-B-32 --tasks 21 \
    --bank-dtype bf16 --batch 128 --amp --backends "$BACKENDS" --warmup 2 --steps 8 --out "$OUT/bench"

part "offloaded bank" 45 python3 benchmarks/bench_offload.py --device cuda --tasks 21 \
    --bank-dtype bf16 --batch 128 --json "$OUT/offload.json"

echo "gpu_check: done in $SECONDS s; results in $OUT"
