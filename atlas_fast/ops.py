"""The atlas ops, defined once with torch.library so torch.compile sees one op per call.

    atlas_fast::atlas_linear / ..._backward   y = x (W0 + Σ c τ)ᵀ + (b0 + Σ c' τ')
    atlas_fast::atlas_conv2d / ..._backward   the same for a 2-D convolution weight
    atlas_fast::merge_blocks / ..._backward   [θ0_b + Σ c τ_b] for a list of small blocks

Backward math, for one block with weight gradient G (never needed as a whole by the fused backends):
    dx       = dy · W(c)                      (input gradient, on the merged weight)
    dc[t, k] = Σ_{i : k(i) = k} τ_t[i] G[i]   with G = dyᵀx for a linear weight, Σ_n dy_n for a bias
θ0 and τ are frozen: the ops give gradients for the input and the coefficients only.
The `backend` argument ("torch", "triton", "cuda", "auto") picks the implementation at run time.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .backends import resolve

_EMPTY = (0,)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(_EMPTY) if t is None else t


# ---------------------------------------------------------------- linear

@torch.library.custom_op("atlas_fast::atlas_linear", mutates_args=())
def _atlas_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], tau_w: Tensor, tau_b: Optional[Tensor],
            coef_w: Tensor, coef_b: Optional[Tensor], key_w: int, key_b: int, backend: str) -> Tensor:
    return resolve(backend, x.device, coef_w.dtype).atlas_linear(x, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b)


@_atlas_linear.register_fake
def _(x, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, backend):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("atlas_fast::atlas_linear_backward", mutates_args=())
def _atlas_linear_backward(grad_out: Tensor, x: Tensor, weight: Tensor, tau_w: Tensor, tau_b: Optional[Tensor],
                     coef_w: Tensor, key_w: int, key_b: int, needs_input_grad: bool,
                     backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    dx, dcw, dcb = resolve(backend, x.device, coef_w.dtype).atlas_linear_backward(grad_out, x, weight, tau_w, tau_b, coef_w, key_w,
                                                              key_b, needs_input_grad)
    return _or_empty(dx, x), dcw, _or_empty(dcb, coef_w)


@_atlas_linear_backward.register_fake
def _(grad_out, x, weight, tau_w, tau_b, coef_w, key_w, key_b, needs_input_grad, backend):
    dx = torch.empty_like(x) if needs_input_grad else x.new_empty(_EMPTY)
    dcb = torch.empty_like(coef_w) if tau_b is not None else coef_w.new_empty(_EMPTY)
    return dx, torch.empty_like(coef_w), dcb


def _atlas_linear_setup(ctx, inputs, output):
    x, weight, _, tau_w, tau_b, coef_w, _, key_w, key_b, backend = inputs
    ctx.save_for_backward(x, weight, tau_w, tau_b, coef_w)
    ctx.extra = (key_w, key_b, backend)


def _atlas_linear_grad(ctx, grad):
    x, weight, tau_w, tau_b, coef_w = ctx.saved_tensors
    key_w, key_b, backend = ctx.extra
    need = ctx.needs_input_grad
    dx, dcw, dcb = torch.ops.atlas_fast.atlas_linear_backward(grad, x, weight, tau_w, tau_b, coef_w, key_w, key_b,
                                                        need[0], backend)
    return (dx if need[0] else None, None, None, None, None, dcw if need[5] else None,
            dcb if need[6] and tau_b is not None else None, None, None, None)


_atlas_linear.register_autograd(_atlas_linear_grad, setup_context=_atlas_linear_setup)


# ---------------------------------------------------------------- conv2d

@torch.library.custom_op("atlas_fast::atlas_conv2d", mutates_args=())
def _atlas_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], tau_w: Tensor, tau_b: Optional[Tensor],
            coef_w: Tensor, coef_b: Optional[Tensor], key_w: int, key_b: int, stride: List[int],
            padding: List[int], dilation: List[int], groups: int, backend: str) -> Tensor:
    conv = (tuple(stride), tuple(padding), tuple(dilation), groups)
    return resolve(backend, x.device, coef_w.dtype).atlas_conv2d(x, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, conv)


def _conv_out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@_atlas_conv2d.register_fake
def _(x, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, stride, padding, dilation, groups, backend):
    h, w = (_conv_out_size(x.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], dilation[i]) for i in (0, 1))
    return x.new_empty((x.shape[0], weight.shape[0], h, w))


@torch.library.custom_op("atlas_fast::atlas_conv2d_backward", mutates_args=())
def _atlas_conv2d_backward(grad_out: Tensor, x: Tensor, weight: Tensor, tau_w: Tensor, tau_b: Optional[Tensor],
                     coef_w: Tensor, key_w: int, key_b: int, stride: List[int], padding: List[int],
                     dilation: List[int], groups: int, needs_input_grad: bool,
                     backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    conv = (tuple(stride), tuple(padding), tuple(dilation), groups)
    dx, dcw, dcb = resolve(backend, x.device, coef_w.dtype).atlas_conv2d_backward(grad_out, x, weight, tau_w, tau_b, coef_w, key_w,
                                                              key_b, conv, needs_input_grad)
    return _or_empty(dx, x), dcw, _or_empty(dcb, coef_w)


@_atlas_conv2d_backward.register_fake
def _(grad_out, x, weight, tau_w, tau_b, coef_w, key_w, key_b, stride, padding, dilation, groups,
      needs_input_grad, backend):
    dx = torch.empty_like(x) if needs_input_grad else x.new_empty(_EMPTY)
    dcb = torch.empty_like(coef_w) if tau_b is not None else coef_w.new_empty(_EMPTY)
    return dx, torch.empty_like(coef_w), dcb


def _atlas_conv2d_setup(ctx, inputs, output):
    x, weight, _, tau_w, tau_b, coef_w, _, key_w, key_b, stride, padding, dilation, groups, backend = inputs
    ctx.save_for_backward(x, weight, tau_w, tau_b, coef_w)
    ctx.extra = (key_w, key_b, stride, padding, dilation, groups, backend)


def _atlas_conv2d_grad(ctx, grad):
    x, weight, tau_w, tau_b, coef_w = ctx.saved_tensors
    key_w, key_b, stride, padding, dilation, groups, backend = ctx.extra
    need = ctx.needs_input_grad
    dx, dcw, dcb = torch.ops.atlas_fast.atlas_conv2d_backward(grad, x, weight, tau_w, tau_b, coef_w, key_w, key_b,
                                                        stride, padding, dilation, groups, need[0], backend)
    return (dx if need[0] else None, None, None, None, None, dcw if need[5] else None,
            dcb if need[6] and tau_b is not None else None) + (None,) * 7


_atlas_conv2d.register_autograd(_atlas_conv2d_grad, setup_context=_atlas_conv2d_setup)


# ---------------------------------------------------------------- merge_blocks

@torch.library.custom_op("atlas_fast::merge_blocks", mutates_args=())
def _merge_blocks(theta0: List[Tensor], tau: List[Tensor], coef: Tensor, keys: List[int],
                  backend: str) -> List[Tensor]:
    return resolve(backend, coef.device, coef.dtype).merge_blocks(theta0, tau, coef, keys)


@_merge_blocks.register_fake
def _(theta0, tau, coef, keys, backend):
    return [torch.empty_like(t) for t in theta0]


@torch.library.custom_op("atlas_fast::merge_blocks_backward", mutates_args=())
def _merge_blocks_backward(grads: List[Tensor], tau: List[Tensor], keys: List[int], partitions: int,
                           backend: str) -> Tensor:
    return resolve(backend, tau[0].device, grads[0].dtype).merge_blocks_backward(grads, tau, keys, partitions)


@_merge_blocks_backward.register_fake
def _(grads, tau, keys, partitions, backend):
    return tau[0].new_empty((tau[0].shape[0], len(tau), partitions), dtype=torch.float32)


def _merge_setup(ctx, inputs, output):
    _, tau, coef, keys, backend = inputs
    ctx.save_for_backward(*tau)
    ctx.extra = (keys, coef.shape[2], backend)


def _merge_grad(ctx, grads):
    keys, partitions, backend = ctx.extra
    tau = list(ctx.saved_tensors)
    dc = torch.ops.atlas_fast.merge_blocks_backward(list(grads), tau, keys, partitions, backend)
    return [None] * len(tau), [None] * len(tau), dc, None, None


_merge_blocks.register_autograd(_merge_grad, setup_context=_merge_setup)


# ---------------------------------------------------------------- functional entry points

def _autocast(x: Tensor) -> Tensor:
    """Custom ops are not autocast by torch: cast the activation to the autocast dtype here."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind) and x.is_floating_point():
        return x.to(torch.get_autocast_dtype(kind))
    return x


def _check_block(what: str, theta0: Tensor, tau: Tensor, coef: Tensor):
    if tau.dim() != theta0.dim() + 1 or tuple(tau.shape[1:]) != tuple(theta0.shape):
        raise ValueError(f"{what}: task vectors of shape {tuple(tau.shape)} do not stack (T, *{tuple(theta0.shape)})")
    if coef.dim() != 2 or coef.shape[0] != tau.shape[0]:
        raise ValueError(f"{what}: coefficients of shape {tuple(coef.shape)}, expected (T={tau.shape[0]}, K)")
    if coef.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{what}: coefficients must be float32 (float64 for gradcheck), got {coef.dtype}")
    if tau.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"{what}: task vectors must be float32, bfloat16 or float16, got {tau.dtype}")
    if theta0.requires_grad or tau.requires_grad:
        raise ValueError(f"{what}: θ0 and the task vectors are frozen; only the coefficients take gradients")
    if not (theta0.device == tau.device == coef.device):
        raise ValueError(f"{what}: θ0 on {theta0.device}, task vectors on {tau.device}, coefficients on "
                         f"{coef.device}; move them to one device")


def _check_bias(bias, tau_b, coef_b, coef_w, check_block=_check_block):
    """The bias arguments go together; check_block validates the bias block (per-group for grouped ops)."""
    if tau_b is None:
        if coef_b is not None:
            raise ValueError("bias: coef_b given without tau_b")
        return
    if bias is None or coef_b is None:
        raise ValueError("bias: tau_b needs both bias and coef_b")
    check_block("bias", bias, tau_b, coef_b)
    if coef_b.shape != coef_w.shape:
        raise ValueError(f"bias: coef_b of shape {tuple(coef_b.shape)} differs from coef_w {tuple(coef_w.shape)}")


def atlas_linear(x, weight, bias, tau_w, tau_b, coef_w, coef_b=None, key_w=0, key_b=0, backend="auto"):
    """y = x (W0 + Σ_t c_w[t, k] τ_w,t)ᵀ + (b0 + Σ_t c_b[t, k] τ_b,t); coef (T, K), keys from block_key()."""
    _check_block("weight", weight, tau_w, coef_w)
    _check_bias(bias, tau_b, coef_b, coef_w)
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x of shape {tuple(x.shape)} does not match weight {tuple(weight.shape)}")
    return torch.ops.atlas_fast.atlas_linear(_autocast(x), weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b,
                                       backend)


def atlas_conv2d(x, weight, bias, tau_w, tau_b, coef_w, coef_b=None, key_w=0, key_b=0, stride=(1, 1),
                 padding=(0, 0), dilation=(1, 1), groups=1, backend="auto"):
    """F.conv2d on the merged weight and bias; padding as two ints (resolve 'same'/'valid' before)."""
    _check_block("weight", weight, tau_w, coef_w)
    _check_bias(bias, tau_b, coef_b, coef_w)
    if weight.dim() != 4 or x.dim() != 4 or x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"x of shape {tuple(x.shape)} does not match conv weight {tuple(weight.shape)}, "
                         f"groups={groups}")
    return torch.ops.atlas_fast.atlas_conv2d(_autocast(x), weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b,
                                       list(stride), list(padding), list(dilation), groups, backend)


def merge_blocks(theta0, tau, coef, keys, backend="auto"):
    """[θ0_b + Σ_t coef[t, b, k] τ_b,t] for lists of blocks; coef (T, B, K) float32."""
    if not (len(theta0) == len(tau) == len(keys) == coef.shape[1]):
        raise ValueError(f"merge_blocks: {len(theta0)} blocks, {len(tau)} task-vector stacks, {len(keys)} keys, "
                         f"coefficients for {coef.shape[1]}")
    for b, (t0, tv) in enumerate(zip(theta0, tau)):
        _check_block(f"block {b}", t0, tv, coef[:, b])
    return torch.ops.atlas_fast.merge_blocks(list(theta0), list(tau), coef, list(keys), backend)
