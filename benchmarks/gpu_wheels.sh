#!/usr/bin/env bash
# Stages in .whl/ the wheels of the packages that the GPU machine's image lacks (open_clip, and ftfy and wcwidth,
# which its tokenizer imports), at the versions of this checkout's .venv, for that machine's Python 3.12 on
# x86-64 Linux. gpu_check.sh installs whatever .whl/ holds before it runs; .whl/ is not tracked.
#
#   bash benchmarks/gpu_wheels.sh
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
specs=()
for name in open_clip_torch ftfy wcwidth; do
    version=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null || true)
    specs+=("$name${version:+==$version}")
done
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${specs[@]}"
ls -l .whl
