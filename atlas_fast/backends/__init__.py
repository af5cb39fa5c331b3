"""Backend registry. Every backend implements the op contract of `base.Backend`, grouped calls included, and
takes a block's arguments as one `base.Block`.

    base.py            the contract, Block, the torch fallback of every method
    torch_backend.py   "torch": stock torch ops, the chunked walk of a bank (cpu_native.py: the walk compiled)
    torch_grouped.py   the torch backend's grouped strategies and the generic blocks' grouped merge
    fused.py           what triton and cuda share: convs on the im2col view (im2col.py), grouped calls on
                       segmented kernels
    triton_backend.py  "triton": the Triton kernels of kernels/
    cuda_backend.py    "cuda": the CUDA C++ kernels of csrc/
    plan.py            the cost model: fuse the merge into the GEMM or merge once

"torch" is the reference path and runs everywhere; "triton" and "cuda" are imported only when first
asked for, so importing atlas_fast never touches CUDA or compiles anything; "auto" picks by the tensors'
device: on a GPU triton, else cuda; on a CPU torch.

Every backend takes quantised banks (int8, int4: atlas_fast.bank.quant), dequantised inside its merges and
coefficient-gradient reductions.
"""
import importlib

from .base import Backend, BackendUnavailable, Block

BACKENDS = ("torch", "triton", "cuda")
_MODULES = {"torch": ".torch_backend", "triton": ".triton_backend", "cuda": ".cuda_backend"}
_loaded = {}


def get_backend(name: str) -> Backend:
    """The backend object `name` (one of BACKENDS), imported on first use."""
    if name not in _MODULES:
        raise ValueError(f"backend={name!r}: expected one of {BACKENDS + ('auto',)}")
    if name not in _loaded:
        _loaded[name] = importlib.import_module(_MODULES[name], __name__).BACKEND
    return _loaded[name]


def resolve(name: str, device, dtype=None) -> Backend:
    """The backend to run on `device` for the requested name; raises BackendUnavailable with the reason.
    "auto" takes the torch backend for float64 coefficients (gradcheck), which only it supports."""
    device = torch_device(device)
    if name == "auto" and str(dtype) == "torch.float64":
        return get_backend("torch")
    if name == "auto":
        if device.type == "cuda":
            # Triton first: autotuned for Hopper and ready without a build; the CUDA extension compiles for
            # minutes on its first use.
            for candidate in ("triton", "cuda"):
                if get_backend(candidate).unavailable_reason(device) is None:
                    return get_backend(candidate)
        return get_backend("torch")
    backend = get_backend(name)
    reason = backend.unavailable_reason(device)
    if reason is not None:
        raise BackendUnavailable(f"backend={name!r} cannot run on {device}: {reason}")
    return backend


def torch_device(device):
    import torch
    return device if isinstance(device, torch.device) else torch.device(device)


__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "Block", "get_backend", "resolve"]
