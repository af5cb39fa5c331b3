"""What the dense and the grouped ops share: the checks of their functional entry points, the task vectors a
backend receives (quantised ones rebuilt from data and scales), saving a list of them for a backward, and the
empty tensors a custom op returns where its schema has an output the call does not need."""
from typing import Optional

import torch
from torch import Tensor

from ..bank import quant

EMPTY = (0,)


def or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    """t, or an empty tensor like `like` in its place (a custom op's outputs cannot be None)."""
    return like.new_empty(EMPTY) if t is None else t


def backward_fakes(x, coef_w, tau_b, needs_input_grad):
    """The (dx, dc_w, dc_b) a backward op's fake returns: empty where the real one returns or_empty."""
    dx = torch.empty_like(x) if needs_input_grad else x.new_empty(EMPTY)
    dcb = torch.empty_like(coef_w) if tau_b is not None else coef_w.new_empty(EMPTY)
    return dx, torch.empty_like(coef_w), dcb


def conv_args(stride, padding, dilation, groups):
    """A conv's (stride, padding, dilation, groups) as the backends take it: 2-tuples and an int."""
    return (tuple(stride), tuple(padding), tuple(dilation), groups)


def task_vectors(tau: Tensor, scale: Optional[Tensor], group: int, theta0: Tensor):
    """The task vectors a backend receives: the tensor itself, or the QuantizedBlock of (data, scale)."""
    return tau if scale is None else quant.QuantizedBlock(tau, scale, group, (tau.shape[0], *theta0.shape))


def task_vector_list(theta0, tau, scales, groups):
    """task_vectors of every block of a list."""
    return [task_vectors(t, s, g, t0) for t0, t, s, g in zip(theta0, tau, scales, groups)]


def save_taus(ctx, tau, scales):
    """Save a list of task-vector data and their optional scales for a backward (restored by saved_taus)."""
    ctx.quantized = [s is not None for s in scales]
    ctx.save_for_backward(*tau, *[s for s in scales if s is not None])


def saved_taus(ctx):
    """(tau, scales) saved by save_taus, and the gradient to return for the scales input: torch.library matches
    it to the inputs' pytree, where a list holding a None is one leaf."""
    saved = list(ctx.saved_tensors)
    n = len(ctx.quantized)
    rest = iter(saved[n:])
    scales = [next(rest) if q else None for q in ctx.quantized]
    return saved[:n], scales, None if None in scales else [None] * n


# ---------------------------------------------------------------- functional entry points

def autocast(x: Tensor) -> Tensor:
    """Custom ops are not autocast by torch: cast the activation to the autocast dtype here."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind) and x.is_floating_point():
        return x.to(torch.get_autocast_dtype(kind))
    return x


def check_block(what: str, theta0: Tensor, tau: Tensor, coef: Tensor):
    if tau.dim() != theta0.dim() + 1 or tuple(tau.shape[1:]) != tuple(theta0.shape):
        raise ValueError(f"{what}: task vectors of shape {tuple(tau.shape)} do not stack (T, *{tuple(theta0.shape)})")
    if coef.dim() != 2 or coef.shape[0] != tau.shape[0]:
        raise ValueError(f"{what}: coefficients of shape {tuple(coef.shape)}, expected (T={tau.shape[0]}, K)")
    if coef.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{what}: coefficients must be float32 (float64 for gradcheck), got {coef.dtype}")
    if not quant.is_quantized(tau) and tau.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"{what}: task vectors must be float32, bfloat16 or float16 (int8 and int4 as a "
                         f"quant.QuantizedBlock), got {tau.dtype}")
    if theta0.requires_grad or tau.requires_grad:
        raise ValueError(f"{what}: θ0 and the task vectors are frozen; only the coefficients take gradients")
    if not (theta0.device == tau.device == coef.device):
        raise ValueError(f"{what}: θ0 on {theta0.device}, task vectors on {tau.device}, coefficients on "
                         f"{coef.device}; move them to one device")


def check_bias(bias, tau_b, coef_b, coef_w, check=check_block):
    """The bias arguments go together; `check` validates the bias block (per-group for grouped ops)."""
    if tau_b is None:
        if coef_b is not None:
            raise ValueError("bias: coef_b given without tau_b")
        return
    if bias is None or coef_b is None:
        raise ValueError("bias: tau_b needs both bias and coef_b")
    if quant.is_quantized(tau_b):
        raise ValueError("bias: task vectors of a bias are 1-D and stay float (only weights are quantised)")
    check("bias", bias, tau_b, coef_b)
    if coef_b.shape != coef_w.shape:
        raise ValueError(f"bias: coef_b of shape {tuple(coef_b.shape)} differs from coef_w {tuple(coef_w.shape)}")


def check_lowrank(what, coef):
    if coef.shape[1] != 1:
        raise ValueError(f"{what}: low-rank task vectors take one coefficient per task vector (partitions=1), got "
                         f"coefficients of shape {tuple(coef.shape)}: partitions mask τ element by element, which a "
                         f"factored τ = B·A cannot do without forming it")


def merge_factored_apart(tau, factored, merge_factored, merge_rest):
    """A merge of a list of blocks with low-rank ones (indices `factored`): merge_factored(b) for each of those,
    one merge_rest(indices) (a list) for the others; the merged blocks in block order."""
    out = {b: merge_factored(b) for b in factored}
    rest = [b for b in range(len(tau)) if b not in out]
    if rest:
        out.update(zip(rest, merge_rest(rest)))
    return [out[b] for b in range(len(tau))]
