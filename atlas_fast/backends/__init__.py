"""Backend registry. Every backend implements the op contract of `base.Backend`.

"torch" is the reference path and runs everywhere; "triton" and "cuda" are imported only when first
asked for, so importing atlas_fast never touches CUDA or compiles anything; "auto" picks by the tensors'
device: on a GPU triton, else cuda; on a CPU torch.

Quantised banks (int8, int4: atlas_fast.quant) are dequantised inside the torch and Triton backends only;
the CUDA backend refuses them with NotImplementedError, and "auto" picks among the other two.
"""
import importlib

from .base import Backend, BackendUnavailable

BACKENDS = ("torch", "triton", "cuda")
QUANTIZED_BACKENDS = ("torch", "triton")
_MODULES = {"torch": ".torch_backend", "triton": ".triton_backend", "cuda": ".cuda_backend"}
_loaded = {}


def get_backend(name: str) -> Backend:
    """The backend object `name` (one of BACKENDS), imported on first use."""
    if name not in _MODULES:
        raise ValueError(f"backend={name!r}: expected one of {BACKENDS + ('auto',)}")
    if name not in _loaded:
        _loaded[name] = importlib.import_module(_MODULES[name], __name__).BACKEND
    return _loaded[name]


def resolve(name: str, device, dtype=None, bank=None) -> Backend:
    """The backend to run on `device` for the requested name; raises BackendUnavailable with the reason.
    "auto" takes the torch backend for float64 coefficients (gradcheck), which only it supports. bank: the
    format of quantised task vectors ("int8", "int4"), None for float ones."""
    device = torch_device(device)
    if bank is not None and name not in QUANTIZED_BACKENDS + ("auto",):
        raise NotImplementedError(f"backend={name!r} does not dequantise {bank} task vectors yet; use "
                                  f"backend='triton' (CUDA) or 'torch', or a float bank (task_vectors.to(dtype=...))")
    if name == "auto" and str(dtype) == "torch.float64":
        return get_backend("torch")
    if name == "auto":
        if device.type == "cuda":
            # Triton first: autotuned for Hopper and ready without a build; the CUDA extension compiles for
            # minutes on its first use.
            for candidate in ("triton", "cuda") if bank is None else ("triton",):
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


__all__ = ["BACKENDS", "QUANTIZED_BACKENDS", "Backend", "BackendUnavailable", "get_backend", "resolve"]
