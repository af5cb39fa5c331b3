"""The triton backend: the fused kernels of kernels/atlas_linear.py behind the op contract.

Linear blocks run the three kernels directly (forward, dx, dc): neither the merged weight nor the weight
gradient dyᵀx exists in memory. For many rows the cost model of plan.py picks merge-once instead: the merge
kernel writes W(c) into a transient buffer in the activation dtype and torch.matmul runs the product (the
backward merges again for dx, or takes the forward's buffer when plan.set_keep_budget allows); dc stays the
fused reduction at any M. A conv2d with groups=1 runs the same kernels on its im2col view
(im2col.Im2colConv). Grouped convs and merge_blocks are the torch backend's; float64 (gradcheck) is refused.
Quantised weight banks (int8, int4: atlas_fast.bank.quant) take the same kernels, which load their tiles and scales
and dequantise in registers; the cost model counts their bytes.

Coefficient gradients are deterministic by default; `set_deterministic(False)` switches to atomics.
"""
import os

import torch
import torch.nn.functional as F

from . import plan
from .base import Backend
from .im2col import Im2colConv
from .torch_backend import reduce_block

# The forward/dx tile height the cost model assumes for the fused kernels (the Hopper configurations' largest).
BLOCK_M = 128

_deterministic = True


def set_deterministic(flag: bool) -> bool:
    """Choose how the coefficient-gradient kernel sums over its programs; returns the previous setting.

    True (default): per-program partial sums, added in a fixed order: bit-identical across runs.
    False: tl.atomic_add into the result: one pass less, but the rounding varies from run to run.
    """
    global _deterministic
    previous, _deterministic = _deterministic, bool(flag)
    return previous


def is_deterministic() -> bool:
    """Whether coefficient gradients are summed in a fixed order (see set_deterministic)."""
    return _deterministic


def _kernels():
    from atlas_fast.kernels import atlas_linear
    return atlas_linear


_ACTIVATIONS = (torch.float32, torch.bfloat16, torch.float16)


def _check_dtypes(x, coef_w):
    if coef_w.dtype != torch.float32 or x.dtype not in _ACTIVATIONS:
        raise ValueError(f"backend='triton' takes float32 coefficients and float32/bfloat16/float16 activations, "
                         f"got coefficients {coef_w.dtype} and activations {x.dtype}; use backend='torch' for "
                         f"float64 (gradcheck)")


def _bias_grad(tau_b, grad_sum, key_b, partitions):
    """dc' (T, P) from Σ_m dy: an N-vector, reduced by the torch backend's reduction."""
    return reduce_block(tau_b, grad_sum, key_b, partitions) if tau_b is not None else None


def _merged_bias(kernels, bias, tau_b, coef_b, key_b, dtype):
    if bias is None:
        return None
    return kernels.merge(bias, tau_b, coef_b, key_b, dtype) if tau_b is not None else bias.to(dtype)


class TritonBackend(Im2colConv, Backend):
    name = "triton"

    def __init__(self):
        self.kept = plan.KeptWeights()

    def unavailable_reason(self, device):
        try:
            kernels = _kernels()
        except ImportError as err:
            if err.name in ("atlas_fast.kernels", "atlas_fast.kernels.atlas_linear"):
                return (f"{err.name} is not installed: the Triton kernels (kernels/ of the source tree) install as "
                        "atlas_fast.kernels, so run from an install (pip install -e .), not from the source tree "
                        "on PYTHONPATH")
            return f"triton cannot be imported ({err}); install the triton that matches torch"
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            if kernels.INTERPRET and os.environ.get("TRITON_INTERPRET") == "1":
                return None
            return ("Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before triton is "
                    "imported (slow, meant for tests), or use backend='torch' on CPU")
        return f"Triton kernels run on CUDA devices (and on CPU in the interpreter), not on {device.type}"

    def atlas_linear(self, x, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b):
        _check_dtypes(x, coef_w)
        kernels = _kernels()
        x2 = x.reshape(-1, x.shape[-1])
        choice = plan.for_linear(x2.shape[0], weight, tau_w, coef_w, x.dtype, BLOCK_M)
        if choice.forward == "fused":
            y = kernels.forward(x2, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b)
        else:
            w = kernels.merge(weight, tau_w, coef_w, key_w, x.dtype)
            y = F.linear(x2, w, _merged_bias(kernels, bias, tau_b, coef_b, key_b, x.dtype))
            if choice.dx == "keep":
                self.kept.put(self.kept.key(weight, tau_w, coef_w, key_w, x.dtype), w)
        return y.view(*x.shape[:-1], weight.shape[0])

    def atlas_linear_backward(self, grad_out, x, weight, tau_w, tau_b, coef_w, key_w, key_b, needs_input_grad):
        _check_dtypes(x, coef_w)
        kernels = _kernels()
        P = coef_w.shape[1]
        gy = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = None
        if needs_input_grad:
            choice = plan.for_linear(gy.shape[0], weight, tau_w, coef_w, gy.dtype, BLOCK_M)
            if choice.dx == "fused":
                grad_x = kernels.grad_input(gy, weight, tau_w, coef_w, key_w)
            else:
                kept = self.kept.take(self.kept.key(weight, tau_w, coef_w, key_w, gy.dtype))
                w = kept if kept is not None else kernels.merge(weight, tau_w, coef_w, key_w, gy.dtype)
                grad_x = torch.matmul(gy, w)
            grad_x = grad_x.view(x.shape)
        grad_cw = kernels.grad_coef(gy, x2, tau_w, P, key_w, deterministic=_deterministic)
        grad_cb = _bias_grad(tau_b, gy.sum(0, dtype=torch.float32), key_b, P)
        return grad_x, grad_cw, grad_cb


BACKEND = TritonBackend()
