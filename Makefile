# make bench        install into .venv (once) and run `atlas-fast bench` on its embedded default
# make test         install into .venv (once) and run the test suite (what CI runs)
# make lint         ruff (pyflakes and import order, pyproject.toml [tool.ruff]) over the whole tree
# make gpu-check-dry  benchmarks/gpu_check.sh as a dry run: every part on the CPU at tiny sizes against an install
#                   of the package (what CI runs, so that the GPU run does not fail on a path, flag or import)
# make cuda-check   compile every source in csrc/ with nvcc, compile-only, for sm_80 and sm_90 (the .cpp once,
#                   it has no device code) with the flags torch's extension builder uses; objects go to a
#                   temporary directory. Needs nvcc and the venv's torch headers, no GPU. Fails on any error.

VENV ?= .venv
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

CUDA_HOME ?= /usr/local/cuda
NVCC ?= $(CUDA_HOME)/bin/nvcc
PYTHON ?= $(VENV)/bin/python
CUDA_ARCHS ?= 80 90

SITE = $(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
PY_INCLUDE = $(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_paths()['include'])")

TORCH_INCLUDES = -I$(SITE)/torch/include -I$(SITE)/torch/include/torch/csrc/api/include -I$(PY_INCLUDE)
NVCC_FLAGS := -O3 -std=c++17 --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
              -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ -Xcompiler -Wall
CXX_FLAGS = -O2 -std=c++20 -Xcompiler -Wall,-fPIC $(TORCH_INCLUDES)

CU_SOURCES := $(wildcard csrc/*.cu)
CPP_SOURCES := $(wildcard csrc/*.cpp)

.PHONY: install bench test lint cuda-check gpu-check-dry
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q $(TORCH_PINS)
	$(PYTHON) -m pip install -q -e ".[dev]"
	touch $@

bench: $(VENV)/.installed
	$(VENV)/bin/atlas-fast bench

# PYTHONSAFEPATH: the working directory stays off sys.path (in every child process too), so the repository's
# kernels/ folder cannot shadow the `kernels` package transformers imports.
test: $(VENV)/.installed
	PYTHONSAFEPATH=1 $(PYTHON) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

gpu-check-dry: $(VENV)/.installed
	GPU_CHECK_DRY_RUN=1 PYTHON=$(PYTHON) OUT=$${OUT:-$$(mktemp -d)/gpu_check} bash benchmarks/gpu_check.sh

# torch's CUDA 13 wheels take the CUDA headers they were built with from the nvidia/cu13 package (CPATH).
cuda-check: $(VENV)/.installed
	@set -e; out=$$(mktemp -d); trap 'rm -rf "$$out"' EXIT; \
	export CPATH="$(SITE)/nvidia/cu13/include$${CPATH:+:$$CPATH}"; \
	for src in $(CU_SOURCES); do for arch in $(CUDA_ARCHS); do \
		echo "nvcc sm_$$arch $$src"; \
		$(NVCC) $(NVCC_FLAGS) -gencode arch=compute_$$arch,code=sm_$$arch -c $$src -o $$out/$$(basename $$src).sm_$$arch.o; \
	done; done; \
	for src in $(CPP_SOURCES); do \
		echo "nvcc (host) $$src"; \
		$(NVCC) $(CXX_FLAGS) -c $$src -o $$out/$$(basename $$src).o; \
	done; \
	echo "cuda-check: all of csrc/ compiles"
