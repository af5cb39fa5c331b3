"""The triton backend: the fused kernels of kernels/atlas_linear.py behind the op contract.

Linear blocks run the three kernels directly (forward, dx, dc): neither the merged weight nor the weight
gradient dyᵀx exists in memory. For many rows the cost model of plan.py picks merge-once instead: the merge
kernel writes W(c) into a transient buffer in the activation dtype and torch.matmul runs the product (the
backward merges again for dx, or takes the forward's buffer when plan.set_keep_budget allows); dc stays the
fused reduction at any M. A conv2d with groups=1 runs the same kernels on its im2col view
(fused.FusedBackend). Grouped convs and merge_blocks are the torch backend's; float64 (gradcheck) is refused.
Grouped compositions run the segmented kernels of kernels/atlas_linear_grouped.py on their Segments (built in
Python), the bias's coefficient gradient reduced by the torch backend from per-group sums of dy; the rest of the
grouped calls is fused.FusedBackend's.
Quantised weight banks (int8, int4: atlas_fast.bank.quant) take the same kernels, which load their tiles and scales
and dequantise in registers; the cost model counts their bytes.

Coefficient gradients are deterministic by default; `set_deterministic(False)` switches to atomics.
"""
import os

import torch
import torch.nn.functional as F

from . import plan
from .fused import FusedBackend, check_dtypes
from .torch_backend import reduce_block
from .torch_grouped import reduce_grouped_block

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


def _grouped_kernels():
    from atlas_fast.kernels import atlas_linear_grouped
    return atlas_linear_grouped


class TritonBackend(FusedBackend):
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

    def merge_one(self, theta0, tau, coef, key, dtype):
        return _kernels().merge(theta0, tau, coef, key, dtype)

    def check_dtypes(self, x, block):
        check_dtypes(self.name, block.coef_w, x)

    def atlas_linear(self, x, block):
        self.check_dtypes(x, block)
        kernels = _kernels()
        weight, tau_w, coef_w, key_w = block.weight, block.tau_w, block.coef_w, block.key_w
        x2 = x.reshape(-1, x.shape[-1])
        choice = plan.for_linear(x2.shape[0], weight, tau_w, coef_w, x.dtype, BLOCK_M)
        if choice.forward == "fused":
            y = kernels.forward(x2, *block)
        else:
            w = block.merged_weight(self.merge_one, x.dtype)
            y = F.linear(x2, w, block.merged_bias(self.merge_one, x.dtype))
            if choice.dx == "keep":
                self.kept.put(self.kept.key(weight, tau_w, coef_w, key_w, x.dtype), w)
        return y.view(*x.shape[:-1], weight.shape[0])

    def atlas_linear_backward(self, grad_out, x, block, needs_input_grad):
        self.check_dtypes(x, block)
        kernels = _kernels()
        weight, tau_w, coef_w, key_w = block.weight, block.tau_w, block.coef_w, block.key_w
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
                grad_x = torch.matmul(gy, kept if kept is not None else block.merged_weight(self.merge_one, gy.dtype))
            grad_x = grad_x.view(x.shape)
        grad_cw = kernels.grad_coef(gy, x2, tau_w, P, key_w, deterministic=_deterministic)
        grad_cb = None
        if block.tau_b is not None:  # dc' (T, P) from Σ_m dy: an N-vector, reduced by the torch backend's reduction
            grad_cb = reduce_block(block.tau_b, gy.sum(0, dtype=torch.float32), block.key_b, P)
        return grad_x, grad_cw, grad_cb

    # ---------------------------------------------------------------- grouped: kernels/atlas_linear_grouped.py

    def grouped_block_m(self):
        return _grouped_kernels().BLOCK_M

    def segmented_forward(self, x2, row_group, block, skip):
        kernels = _grouped_kernels()
        segments = kernels.Segments(row_group, block.coef_w.shape[0], skip=skip)
        return kernels.forward(x2, row_group, *block, segments=segments)

    def segmented_backward(self, gy, x2, row_group, block, needs_input_grad, skip):
        """dx and dc_w by the segmented kernels; dc_b reduced by the torch backend from per-group sums of dy."""
        kernels = _grouped_kernels()
        G, T, P = block.coef_w.shape
        segments = kernels.Segments(row_group, G)
        grad_x = None
        if needs_input_grad:
            seg_dx = kernels.Segments(row_group, G, skip=skip) if bool(skip.any()) else segments
            grad_x = kernels.grad_input(gy, row_group, block.weight, block.tau_w, block.coef_w, block.key_w,
                                        segments=seg_dx)
        grad_cw = kernels.grad_coef(gy, x2, row_group, block.tau_w, G, P, block.key_w, segments=segments)
        grad_cb = None
        if block.tau_b is not None:
            sums = torch.zeros(G, gy.shape[1], dtype=torch.float32, device=gy.device)
            sums.index_add_(0, row_group, gy.float())
            grad_cb = reduce_grouped_block(sums, block.tau_b, block.key_b, P, torch.float32)
        return grad_x, grad_cw, grad_cb


BACKEND = TritonBackend()
