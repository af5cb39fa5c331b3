"""The cuda backend: the CUDA C++ kernels of csrc/ behind the op contract.

Linear blocks run fused kernels (csrc/atlas_linear.cu): the forward and the input gradient build the merged
weight tile by tile in shared memory, the coefficient gradient reduces each dyᵀx tile against every τ_t
before it is written; neither the merged weight nor the weight gradient exists in memory. For many rows the
cost model of plan.py picks merge-once instead: atlas_linear_cuda_merge writes W(c) into a transient buffer
in the activation dtype (the one-block kernel of csrc/merge_blocks.cu) and F.linear runs the product on
cuBLAS; the backward merges again for dx (or takes the forward's buffer when plan.set_keep_budget allows)
and keeps the fused dc kernel. A conv2d with groups=1 runs the same kernels on its im2col view (fused.FusedBackend,
shared with the triton backend). Lists of small blocks are merged, and their coefficient gradients reduced, in one
launch per dtype pair (csrc/merge_blocks.cu). Grouped convs fall back to the torch backend; float64 is refused
(gradcheck runs on backend='torch'). Grouped compositions (G coefficient sets, a group per sample) run the same fused
kernels on rows sorted into one-group segments (atlas_linear_grouped_cuda_forward / _backward, behind
segmented_forward / segmented_backward; the rest of the grouped calls is fused.FusedBackend's).

int8 and int4 banks (atlas_fast.bank.quant): the fused kernels read the quantised tiles and their scales and dequantise
in registers (TauView in csrc/atlas_linear.cu). Their merge-once weight and their small blocks go through the torch
backend's walk, which dequantises a chunk of rows at a time into a reused buffer (no dequantised copy of a block's
bank either way).

The kernels are registered as torch.ops.atlas_fast.{atlas_linear_cuda_forward, atlas_linear_cuda_backward,
atlas_linear_cuda_merge, merge_blocks_cuda, merge_blocks_cuda_backward, atlas_linear_grouped_cuda_forward,
atlas_linear_grouped_cuda_backward} by a shared library: the ahead-of-time
build atlas_fast._C (`ATLAS_FAST_BUILD_CUDA=1 pip install --no-build-isolation -e .`) when installed, otherwise
compiled with ninja on first use into ~/.cache/atlas_fast/. Importing this module compiles nothing and touches no GPU.
"""
import importlib.util
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ..bank.quant import is_quantized, unpack
from . import plan, torch_backend
from .fused import FusedBackend, check_dtypes

_EXTENSION = "atlas_fast_cuda"
_load_result = []  # [None] once loaded, [reason] once loading failed: one attempt per process
# The tile height of the fused forward and dx kernels (BM in csrc/atlas_linear.cu), for the cost model.
BLOCK_M = 64


def source_dir():
    """csrc/ as installed: atlas_fast/csrc in a wheel, the repository's csrc/ in a source or editable install."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / "bindings.cpp").is_file():
            return candidate
    return None


def build_dir():
    """Where the JIT build lives: one directory per torch, CUDA and Python version, under the user's cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}-py{sys.version_info[0]}{sys.version_info[1]}"
    return cache / "atlas_fast" / tag.replace("+", "_")


def _sources(directory):
    return sorted(directory.glob("*.cu")) + sorted(directory.glob("*.cpp"))


def _first_error_lines(message, count=3, width=300):
    lines = [line.strip()[:width] for line in str(message).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return " | ".join((errors or lines)[:count])


def _library_includes(cuda_home):
    """torch's CUDA headers include cuSPARSE, cuBLAS, ...; a toolkit without them (nvcc only) takes them from
    the nvidia wheels torch depends on (nvidia/cu13/include for CUDA 13)."""
    if (Path(cuda_home) / "include" / "cusparse.h").is_file():
        return []
    spec = importlib.util.find_spec("nvidia")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec is not None else []
    return sorted(str(d) for root in roots for d in root.glob("*/include") if (d / "cusparse.h").is_file())


def _build_and_load():
    """Compiles csrc/ with ninja (cached) and loads it: None on success, else what is missing or failed."""
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME is None:
        return (f"nvcc was not found: install the CUDA toolkit matching torch's CUDA {torch.version.cuda} and set "
                f"CUDA_HOME, or build ahead of time with ATLAS_FAST_BUILD_CUDA=1")
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja); it builds the CUDA extension"
    sources = source_dir()
    if sources is None:
        return "the CUDA sources (csrc/) are not installed with the package; reinstall atlas_fast"
    target = build_dir()
    target.mkdir(parents=True, exist_ok=True)
    if not (target / f"{_EXTENSION}.so").exists():
        print(f"atlas_fast: compiling the CUDA extension into {target} (first use only, takes minutes)",
              file=sys.stderr, flush=True)
    try:
        cpp_extension.load(name=_EXTENSION, sources=[str(p) for p in _sources(sources)],
                           extra_cflags=["-O3"], extra_cuda_cflags=["-O3"], build_directory=str(target),
                           extra_include_paths=_library_includes(cpp_extension.CUDA_HOME), is_python_module=False)
    except Exception as err:  # a failed build surfaces as RuntimeError, OSError or a subprocess error
        return f"compiling the CUDA extension in {target} failed: {_first_error_lines(err)}"
    return None


def _register_fakes():
    """Shapes of the kernel ops for torch.compile and opcheck, mirroring the C++ implementations."""
    def empty(t):
        return t.new_empty((0,))

    @torch.library.register_fake("atlas_fast::atlas_linear_cuda_forward")
    def _(x, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, scale_w=None, group_w=0):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("atlas_fast::atlas_linear_cuda_backward")
    def _(grad_out, x, weight, tau_w, tau_b, coef_w, key_w, key_b, needs_input_grad, scale_w=None, group_w=0):
        dx = torch.empty_like(x, memory_format=torch.contiguous_format) if needs_input_grad else empty(x)
        dcb = coef_w.new_empty(coef_w.shape) if tau_b is not None else empty(coef_w)
        return dx, coef_w.new_empty(coef_w.shape), dcb

    @torch.library.register_fake("atlas_fast::atlas_linear_cuda_merge")
    def _(weight, tau_w, coef_w, key_w, dtype):
        return weight.new_empty(weight.shape, dtype=dtype)

    @torch.library.register_fake("atlas_fast::merge_blocks_cuda")
    def _(theta0, tau, coef, keys):
        return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in theta0]

    @torch.library.register_fake("atlas_fast::merge_blocks_cuda_backward")
    def _(grads, tau, keys, partitions):
        return tau[0].new_empty((tau[0].shape[0], len(tau), partitions), dtype=torch.float32)

    @torch.library.register_fake("atlas_fast::atlas_linear_grouped_cuda_forward")
    def _(x, row_group, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, skip, scale_w=None, group_w=0):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("atlas_fast::atlas_linear_grouped_cuda_backward")
    def _(grad_out, x, row_group, weight, tau_w, tau_b, coef_w, key_w, key_b, needs_input_grad, skip, scale_w=None,
          group_w=0):
        dx = torch.empty_like(x, memory_format=torch.contiguous_format) if needs_input_grad else empty(x)
        dcb = coef_w.new_empty(coef_w.shape) if tau_b is not None else empty(coef_w)
        return dx, coef_w.new_empty(coef_w.shape), dcb


def _load():
    prebuilt = importlib.util.find_spec("atlas_fast._C")
    problems = []
    if prebuilt is not None and prebuilt.origin:
        try:
            torch.ops.load_library(prebuilt.origin)
            return None
        except OSError as err:
            problems.append(f"the prebuilt {prebuilt.origin} does not load ({_first_error_lines(err)})")
    reason = _build_and_load()
    return None if reason is None else "; ".join(problems + [reason])


def load_extension():
    """Makes the kernel ops available (the prebuilt atlas_fast._C, else compiled now), once per process.
    None on success, else the reason they are not available."""
    if not _load_result:
        reason = _load()
        if reason is None:
            _register_fakes()
        _load_result.append(reason)
    return _load_result[0]


def _dtype_groups(values, tau):
    """Indices of the blocks grouped by (value dtype, task-vector dtype), in first-seen order: one kernel launch
    per group; a group of quantised task vectors (int8 or uint8 data) takes the torch backend's walk."""
    groups = {}
    for b, (v, t) in enumerate(zip(values, tau)):
        groups.setdefault((v.dtype, t.dtype), []).append(b)
    return list(groups.values())


def _or_none(t, present):
    return t if present else None


def _dense(tau):
    """The tensors among these task vectors whose dtype check_dtypes checks (a quantised block's are its own)."""
    return tuple(t for t in tau if not is_quantized(t))


class CudaBackend(FusedBackend):
    name = "cuda"

    def __init__(self):
        self.kept = plan.KeptWeights()

    def unavailable_reason(self, device):
        if device.type != "cuda":
            return f"the CUDA kernels run on CUDA tensors, not on {device.type}; use backend='torch' or 'auto'"
        if torch.version.cuda is None:
            return f"this torch ({torch.__version__}) is built without CUDA"
        if not torch.cuda.is_available():
            return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable CUDA device"
        return load_extension()

    def merge_one(self, theta0, tau, coef, key, dtype):
        if is_quantized(tau):
            return torch_backend.merge(theta0, tau, coef, key, dtype)
        return torch.ops.atlas_fast.atlas_linear_cuda_merge(theta0, tau, coef, key, dtype)

    def check_dtypes(self, x, block):
        check_dtypes(self.name, block.coef_w, x, block.weight, *_dense([block.tau_w]))

    def atlas_linear(self, x, block):
        self.check_dtypes(x, block)
        weight, tau_w, coef_w, key_w = block.weight, block.tau_w, block.coef_w, block.key_w
        choice = plan.for_linear(x.numel() // max(x.shape[-1], 1), weight, tau_w, coef_w, x.dtype, BLOCK_M)
        if choice.forward == "fused":
            data, scale, group = unpack(tau_w)
            return torch.ops.atlas_fast.atlas_linear_cuda_forward(x, weight, block.bias, data, block.tau_b, coef_w,
                                                                  block.coef_b, key_w, block.key_b, scale, group)
        w = block.merged_weight(self.merge_one, x.dtype)
        y = F.linear(x, w, block.merged_bias(self.merge_one, x.dtype))
        if choice.dx == "keep":
            self.kept.put(self.kept.key(weight, tau_w, coef_w, key_w, x.dtype), w)
        return y

    def atlas_linear_backward(self, grad_out, x, block, needs_input_grad):
        self.check_dtypes(x, block)
        weight, tau_w, coef_w, key_w = block.weight, block.tau_w, block.coef_w, block.key_w
        choice = plan.for_linear(x.numel() // max(x.shape[-1], 1), weight, tau_w, coef_w, x.dtype, BLOCK_M)
        fused_dx = needs_input_grad and choice.dx == "fused"
        data, scale, group = unpack(tau_w)
        dx, dcw, dcb = torch.ops.atlas_fast.atlas_linear_cuda_backward(grad_out, x, weight, data, block.tau_b, coef_w,
                                                                       key_w, block.key_b, fused_dx, scale, group)
        if needs_input_grad and not fused_dx:
            # The dx of the fused kernel has x's dtype and shape; so has this one.
            kept = self.kept.take(self.kept.key(weight, tau_w, coef_w, key_w, x.dtype))
            w = kept if kept is not None else block.merged_weight(self.merge_one, x.dtype)
            dx = torch.matmul(grad_out.to(x.dtype), w)
        return _or_none(dx, needs_input_grad), dcw, _or_none(dcb, block.tau_b is not None)

    def merge_blocks(self, theta0, tau, coef, keys):
        check_dtypes(self.name, coef, *theta0, *_dense(tau))
        groups = _dtype_groups(theta0, tau)
        if len(groups) == 1 and not is_quantized(tau[0]):
            return torch.ops.atlas_fast.merge_blocks_cuda(list(theta0), list(tau), coef, list(keys))
        out = [None] * len(theta0)
        for idx in groups:
            args = ([theta0[b] for b in idx], [tau[b] for b in idx], coef[:, idx], [keys[b] for b in idx])
            merged = (torch_backend.BACKEND.merge_blocks(*args) if is_quantized(tau[idx[0]])
                      else torch.ops.atlas_fast.merge_blocks_cuda(*args))
            for b, m in zip(idx, merged):
                out[b] = m
        return out

    def merge_blocks_backward(self, grads, tau, keys, partitions):
        check_dtypes(self.name, None, *grads, *_dense(tau))
        groups = _dtype_groups(grads, tau)
        if len(groups) == 1 and not is_quantized(tau[0]):
            return torch.ops.atlas_fast.merge_blocks_cuda_backward(list(grads), list(tau), list(keys), partitions)
        dc = grads[0].new_empty((tau[0].shape[0], len(tau), partitions), dtype=torch.float32)
        for idx in groups:
            args = ([grads[b] for b in idx], [tau[b] for b in idx], [keys[b] for b in idx], partitions)
            dc[:, idx] = (torch_backend.BACKEND.merge_blocks_backward(*args) if is_quantized(tau[idx[0]])
                          else torch.ops.atlas_fast.merge_blocks_cuda_backward(*args))
        return dc

    # ---------------------------------------------------------------- grouped: the same fused kernels, segmented

    def grouped_block_m(self):
        return BLOCK_M

    def segmented_forward(self, x2, row_group, block, skip):
        """atlas_linear_grouped_cuda_forward: the op sorts the rows into one-group segments itself."""
        data, scale, group = unpack(block.tau_w)
        return torch.ops.atlas_fast.atlas_linear_grouped_cuda_forward(
            x2, row_group, block.weight, block.bias, data, block.tau_b, block.coef_w, block.coef_b, block.key_w,
            block.key_b, skip, scale, group)

    def segmented_backward(self, gy, x2, row_group, block, needs_input_grad, skip):
        """atlas_linear_grouped_cuda_backward; dc_b is per-group row sums of dy reduced by the merge_blocks backward
        kernel."""
        data, scale, group = unpack(block.tau_w)
        grad_x, grad_cw, grad_cb = torch.ops.atlas_fast.atlas_linear_grouped_cuda_backward(
            gy, x2, row_group, block.weight, data, block.tau_b, block.coef_w, block.key_w, block.key_b,
            needs_input_grad, skip, scale, group)
        return _or_none(grad_x, needs_input_grad), grad_cw, _or_none(grad_cb, block.tau_b is not None)


BACKEND = CudaBackend()
