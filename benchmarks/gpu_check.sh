#!/usr/bin/env bash
# The GPU checks in one pass, in at most 560 s on an H200, against the package as a user installs it: install it
# (pure Python, from a copy of the sources, into a folder of its own), then build the CUDA extension, run the
# gpu-marked tests (the kernels against the float64 reference, the grouped CUDA ops among them; on 8 pytest-xdist
# workers when it is installed, since compiling the Triton kernels dominates), time atlas_linear at the ViT-B/32
# MLP size against its FLOP and byte floors, then each fused backend with the fused and merge-once strategies and
# the cost model's choice at M = 6400, 128, 8, 1, and run `atlas-fast bench` at ViT-B/32, T=21 bf16 bank, batch 128,
# bf16 autocast, then a ViT-B/32 training step with the bank offloaded to host memory against the resident one, then
# online test-time adaptation of S = 8 and 64 streams (T=21 bf16 bank, 4 images per stream) four ways.
# Every part runs under `timeout`, cut to what is left of the script's deadline (GPU_CHECK_SECONDS, 560 s on the GPU),
# so the script always finishes; a part that fails, times out or finds no time left is logged, the next one runs,
# and the script exits non-zero at the end.
#
#   bash benchmarks/gpu_wheels.sh    once, where the package index is reachable: wheels the GPU machine lacks, in .whl/
#   bash benchmarks/gpu_check.sh     on the GPU machine: results under $OUT (absolute; default bench_out/gpu_check)
#   GPU_CHECK_DRY_RUN=1 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh      (make gpu-check-dry; CI runs it)
#                                    every part on the CPU at tiny sizes, Triton under its interpreter, the CUDA
#                                    extension compiled and loaded but not run: an import, flag, path or output
#                                    file that is wrong fails here, not on the GPU
#
# $OUT receives 8 files (all that come back from the GPU machine): gpu_check.log (every part's output, in order),
# layer.json, strategies.json, bench/results.json, bench/bench.png, offload.json and
# bench_tta/results_tta_S{8,64}.json. Wheels in .whl/ (open_clip and its tokenizer's ftfy and wcwidth, which the GPU
# machine's image lacks) are installed first.
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY_RUN:-0}
OUT=${OUT:-$REPO/bench_out/gpu_check}
mkdir -p "$OUT/bench"
LOG=$OUT/gpu_check.log
: >"$LOG"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1
FAILED=()

part() {  # part NAME SECONDS COMMAND...: runs COMMAND under a time limit, appends its output to $LOG
    local name=$1 limit=$2; shift 2
    local start=$SECONDS left=$((DEADLINE - SECONDS))
    echo "==== $name" >>"$LOG"
    if [ "$left" -lt 20 ]; then   # the whole script stays inside one call of the GPU machine
        echo "== $name: skipped, $left s left of the script's $DEADLINE s" | tee -a "$LOG"
        FAILED+=("$name (no time left)")
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$LOG"
    [ "$rc" = 0 ] || FAILED+=("$name")
    return $rc
}

if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1
    DEVICE=cpu
    # A ViT of 32-pixel images with two layers, and the sizes that run in seconds on a CPU.
    MODEL=$WORK/tiny-vit.json
    echo '{"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 1}}' >"$MODEL"
    BENCH_ARGS=(--model "$MODEL" --tasks 3 --batch 2 --warmup 1 --steps 1)
    OFFLOAD_ARGS=(--model "$MODEL" --tasks 3 --batch 2 --warmup 1 --steps 1)
    LAYER_ARGS=(--dry-run)
    TTA_ARGS=(--model "$MODEL" --tasks 3 --batch 2 --warmup 0 --steps 1)
    TTA_STREAMS="1 2"
    BUILD_LIMIT=300 BENCH_LIMIT=600 TTA_LIMIT=300 WORKERS=2   # a loaded 2-core CI machine: checks, not timings
    DEADLINE=${GPU_CHECK_SECONDS:-3600}
else
    DEVICE=cuda
    MODEL=ViT-B-32
    BENCH_ARGS=(--model "$MODEL" --tasks 21 --batch 128 --warmup 2 --steps 8)
    OFFLOAD_ARGS=(--model "$MODEL" --tasks 21 --batch 128)
    LAYER_ARGS=()
    TTA_ARGS=(--model "$MODEL" --tasks 21 --batch 4 --warmup 1 --steps 2)
    TTA_STREAMS="8 64"
    BUILD_LIMIT=100 BENCH_LIMIT=150 TTA_LIMIT=90 WORKERS=8
    DEADLINE=${GPU_CHECK_SECONDS:-560}   # one call of the GPU machine runs 600 s at most
fi

DEPS=
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/deps" .whl/*.whl >>"$LOG" 2>&1 \
        && DEPS=$WORK/deps
fi

# The package as pip installs it, from a copy of what a source distribution holds (a stale build/ of the checkout
# cannot leak in); no CUDA build at install. Every later process imports it from there and nothing from the
# checkout: PYTHONSAFEPATH keeps the working directory and the scripts' folders off sys.path.
mkdir -p "$WORK/src"
cp -r setup.py pyproject.toml README.md atlas_fast kernels csrc "$WORK/src/"
part "install" 60 "$PY" -m pip install --no-deps --no-build-isolation --no-index --no-compile \
    --target "$WORK/site" "$WORK/src"
export PYTHONPATH=$WORK/site${DEPS:+:$DEPS} PYTHONSAFEPATH=1
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
# torch guesses CUDA_HOME from the nvcc on PATH, which may be a link outside the toolkit (its headers not beside it).
[ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda

{
    echo "==== environment"
    date -u
    [ "$DRY" = 1 ] && echo "dry run: CPU, tiny sizes, Triton interpreted"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    timeout 20 "$PY" -c "
import importlib, sys
print('python', sys.version.split()[0])
for name in ('torch triton open_clip torchvision timm ftfy regex huggingface_hub tqdm matplotlib numpy '
             'safetensors pytest xdist pytest_timeout ninja').split():
    try:
        print(name, getattr(importlib.import_module(name), '__version__', 'present'))
    except Exception as e:
        print(name, 'NOT IMPORTABLE:', type(e).__name__, e)
import torch
print('torch cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no device')"
    command -v nvcc && nvcc --version | tail -1
} >>"$LOG" 2>&1

# Every module the parts below import comes from the install, the CUDA sources included.
part "installed package" 60 "$PY" -c "
import importlib, sys
site = sys.argv[1]
from atlas_fast.backends import cuda_backend
for name in ('atlas_fast', 'atlas_fast.kernels', 'atlas_fast.kernels.atlas_linear',
             'atlas_fast.kernels.atlas_linear_grouped', 'atlas_fast.backends.triton_backend', 'atlas_fast.cli'):
    path = importlib.import_module(name).__file__
    print(name, path)
    assert path.startswith(site + '/'), f'{name} imported from {path}, not from the install in {site}'
sources = cuda_backend.source_dir()
print('CUDA sources', sources)
assert sources is not None and str(sources).startswith(site + '/'), f'CUDA sources {sources} not installed in {site}'
" "$WORK/site" || { echo "gpu_check: stopped: the parts below would not test the installed package" | tee -a "$LOG"
                    exit 1; }

# Build the CUDA extension once, so no later process compiles it; on failure the cuda backend is left out and the
# build lock of an interrupted build is removed, so no later process waits on it. The dry run compiles and loads
# it without a device (the ops register; nothing runs).
BACKENDS=naive,finetune,torch,triton,cuda
BUILT=1
if ! part "cuda extension build" "$BUILD_LIMIT" "$PY" -c "
import sys, torch
from atlas_fast.backends import cuda_backend, get_backend
if sys.argv[1] == '1':
    reason = cuda_backend.load_extension()
    assert reason is not None or hasattr(torch.ops.atlas_fast, 'atlas_linear_cuda_forward'), 'ops not registered'
else:
    reason = get_backend('cuda').unavailable_reason(torch.device('cuda'))
print('cuda extension:', reason or 'built and loaded')
sys.exit(0 if reason is None else 1)" "$DRY"; then
    BACKENDS=naive,finetune,torch,triton
    BUILT=0
    lockdir=$("$PY" -c "from atlas_fast.backends.cuda_backend import build_dir; print(build_dir())" 2>/dev/null)
    [ -n "$lockdir" ] && rm -f "$lockdir/lock"
fi
[ "$DRY" = 1 ] && BACKENDS=naive,finetune,torch,triton   # the cuda backend needs a device to run

# Workers compile the Triton kernels in parallel (their on-disk cache is shared); a per-test limit keeps one hung
# test from taking the whole part. Without a built extension one process runs them, so that the build is not
# tried again by every worker in turn. On a CPU every gpu test is collected (imported) and skipped.
PYTEST=("$PY" -m pytest -m gpu -q -rfE -p no:cacheprovider)
[ "$BUILT" = 1 ] && "$PY" -c "import xdist" 2>/dev/null && PYTEST+=(-n "$WORKERS")
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 60)
part "gpu tests" 90 "${PYTEST[@]}" tests
grep -E "^(FAILED|ERROR) | in [0-9.]+s( |$)" "$LOG" | tail -n 25

# One process for both layer timings: the Triton kernels compiled for the roofline serve the strategy rows.
part "atlas_linear roofline and strategies" 85 "$PY" benchmarks/bench_atlas_linear.py "${LAYER_ARGS[@]}" \
    --json "$OUT/layer.json" --strategies-json "$OUT/strategies.json"

part "atlas-fast bench" "$BENCH_LIMIT" "$PY" -m atlas_fast bench --device "$DEVICE" "${BENCH_ARGS[@]}" --bank-dtype bf16 \
    --amp --backends "$BACKENDS" --out "$OUT/bench"

part "offloaded bank" 45 "$PY" benchmarks/bench_offload.py --device "$DEVICE" "${OFFLOAD_ARGS[@]}" \
    --bank-dtype bf16 --json "$OUT/offload.json"

# S streams adapting online in one grouped step against S composed runs in turn, S naive merges in turn and the
# per-sample merge loop (last: the part the script's deadline cuts first).
TTA_FILES=()
for S in $TTA_STREAMS; do
    part "bench tta S=$S" "$TTA_LIMIT" "$PY" -m atlas_fast bench --mode tta --streams "$S" --device "$DEVICE" \
        "${TTA_ARGS[@]}" --bank-dtype bf16 --amp --out "$OUT/bench_tta"
    TTA_FILES+=("bench_tta/results_tta_S$S.json")
done

for f in gpu_check.log layer.json strategies.json bench/results.json bench/bench.png offload.json \
         "${TTA_FILES[@]}"; do
    [ -s "$OUT/$f" ] || { echo "gpu_check: $OUT/$f was not written" | tee -a "$LOG"; FAILED+=("output $f"); }
done
echo "gpu_check: done in $SECONDS s; results in $OUT" | tee -a "$LOG"
if [ ${#FAILED[@]} -gt 0 ]; then
    printf 'gpu_check: failed: %s\n' "${FAILED[@]}" | tee -a "$LOG"
    exit 1
fi
