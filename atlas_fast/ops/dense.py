"""The atlas ops, defined once with torch.library so torch.compile sees one op per call.

    atlas_fast::atlas_linear / ..._backward   y = x (W0 + Σ c τ)ᵀ + (b0 + Σ c' τ')
    atlas_fast::atlas_conv2d / ..._backward   the same for a 2-D convolution weight
    atlas_fast::merge_blocks / ..._backward   [θ0_b + Σ c τ_b] for a list of small blocks

Backward math, for one block with weight gradient G (never needed as a whole by the fused backends):
    dx       = dy · W(c)                      (input gradient, on the merged weight)
    dc[t, k] = Σ_{i : k(i) = k} τ_t[i] G[i]   with G = dyᵀx for a linear weight, Σ_n dy_n for a bias
θ0 and τ are frozen: the ops give gradients for the input and the coefficients only.
The `backend` argument ("torch", "triton", "cuda", "auto") picks the implementation at run time: the op bodies
hand the resolved backend the block's arguments as one backends.Block (the schemas stay flat).

Quantised weights (atlas_fast.bank.quant): the functional entry points take a QuantizedBlock wherever a weight's
task vectors go; the ops receive its data as tau_w with scale_w and group_w (int4's columns per scale), and
hand the backend the QuantizedBlock again. Bias task vectors are 1-D and always float. Lists of blocks with
quantised ones go through atlas_fast::merge_blocks_quant (a list of optional scales has no default in a schema).
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..backends import Block, resolve
from ..backends.im2col import out_size
from ..bank import lowrank, quant
from .common import (
    autocast,
    backward_fakes,
    check_bias,
    check_block,
    check_lowrank,
    conv_args,
    merge_factored_apart,
    or_empty,
    save_taus,
    saved_taus,
    task_vector_list,
    task_vectors,
)

# ---------------------------------------------------------------- linear

@torch.library.custom_op("atlas_fast::atlas_linear", mutates_args=())
def _atlas_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], tau_w: Tensor, tau_b: Optional[Tensor],
            coef_w: Tensor, coef_b: Optional[Tensor], key_w: int, key_b: int, backend: str,
            scale_w: Optional[Tensor] = None, group_w: int = 0) -> Tensor:
    block = Block(weight, bias, task_vectors(tau_w, scale_w, group_w, weight), tau_b, coef_w, coef_b, key_w, key_b)
    return resolve(backend, x.device, coef_w.dtype).atlas_linear(x, block)


@_atlas_linear.register_fake
def _(x, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, backend, scale_w=None, group_w=0):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("atlas_fast::atlas_linear_backward", mutates_args=())
def _atlas_linear_backward(grad_out: Tensor, x: Tensor, weight: Tensor, tau_w: Tensor, tau_b: Optional[Tensor],
                     coef_w: Tensor, key_w: int, key_b: int, needs_input_grad: bool,
                     backend: str, scale_w: Optional[Tensor] = None, group_w: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    block = Block(weight, None, task_vectors(tau_w, scale_w, group_w, weight), tau_b, coef_w, None, key_w, key_b)
    dx, dcw, dcb = resolve(backend, x.device, coef_w.dtype).atlas_linear_backward(grad_out, x, block,
                                                                                  needs_input_grad)
    return or_empty(dx, x), dcw, or_empty(dcb, coef_w)


@_atlas_linear_backward.register_fake
def _(grad_out, x, weight, tau_w, tau_b, coef_w, key_w, key_b, needs_input_grad, backend, scale_w=None, group_w=0):
    return backward_fakes(x, coef_w, tau_b, needs_input_grad)


def _atlas_linear_setup(ctx, inputs, output):
    x, weight, _, tau_w, tau_b, coef_w, _, key_w, key_b, backend, scale_w, group_w = inputs
    ctx.save_for_backward(x, weight, tau_w, tau_b, coef_w, scale_w)
    ctx.extra = (key_w, key_b, backend, group_w)


def _atlas_linear_grad(ctx, grad):
    x, weight, tau_w, tau_b, coef_w, scale_w = ctx.saved_tensors
    key_w, key_b, backend, group_w = ctx.extra
    need = ctx.needs_input_grad
    dx, dcw, dcb = torch.ops.atlas_fast.atlas_linear_backward(grad, x, weight, tau_w, tau_b, coef_w, key_w, key_b,
                                                        need[0], backend, scale_w, group_w)
    return (dx if need[0] else None, None, None, None, None, dcw if need[5] else None,
            dcb if need[6] and tau_b is not None else None, None, None, None, None, None)


_atlas_linear.register_autograd(_atlas_linear_grad, setup_context=_atlas_linear_setup)


# ---------------------------------------------------------------- conv2d

@torch.library.custom_op("atlas_fast::atlas_conv2d", mutates_args=())
def _atlas_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], tau_w: Tensor, tau_b: Optional[Tensor],
            coef_w: Tensor, coef_b: Optional[Tensor], key_w: int, key_b: int, stride: List[int],
            padding: List[int], dilation: List[int], groups: int, backend: str,
            scale_w: Optional[Tensor] = None, group_w: int = 0) -> Tensor:
    block = Block(weight, bias, task_vectors(tau_w, scale_w, group_w, weight), tau_b, coef_w, coef_b, key_w, key_b)
    return resolve(backend, x.device, coef_w.dtype).atlas_conv2d(x, block, conv_args(stride, padding, dilation,
                                                                                     groups))


@_atlas_conv2d.register_fake
def _(x, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, stride, padding, dilation, groups, backend,
      scale_w=None, group_w=0):
    return x.new_empty((x.shape[0], weight.shape[0],
                        *out_size(conv_args(stride, padding, dilation, groups), weight, x)))


@torch.library.custom_op("atlas_fast::atlas_conv2d_backward", mutates_args=())
def _atlas_conv2d_backward(grad_out: Tensor, x: Tensor, weight: Tensor, tau_w: Tensor, tau_b: Optional[Tensor],
                     coef_w: Tensor, key_w: int, key_b: int, stride: List[int], padding: List[int],
                     dilation: List[int], groups: int, needs_input_grad: bool,
                     backend: str, scale_w: Optional[Tensor] = None, group_w: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    block = Block(weight, None, task_vectors(tau_w, scale_w, group_w, weight), tau_b, coef_w, None, key_w, key_b)
    dx, dcw, dcb = resolve(backend, x.device, coef_w.dtype).atlas_conv2d_backward(
        grad_out, x, block, conv_args(stride, padding, dilation, groups), needs_input_grad)
    return or_empty(dx, x), dcw, or_empty(dcb, coef_w)


@_atlas_conv2d_backward.register_fake
def _(grad_out, x, weight, tau_w, tau_b, coef_w, key_w, key_b, stride, padding, dilation, groups,
      needs_input_grad, backend, scale_w=None, group_w=0):
    return backward_fakes(x, coef_w, tau_b, needs_input_grad)


def _atlas_conv2d_setup(ctx, inputs, output):
    (x, weight, _, tau_w, tau_b, coef_w, _, key_w, key_b, stride, padding, dilation, groups, backend, scale_w,
     group_w) = inputs
    ctx.save_for_backward(x, weight, tau_w, tau_b, coef_w, scale_w)
    ctx.extra = (key_w, key_b, stride, padding, dilation, groups, backend, group_w)


def _atlas_conv2d_grad(ctx, grad):
    x, weight, tau_w, tau_b, coef_w, scale_w = ctx.saved_tensors
    key_w, key_b, stride, padding, dilation, groups, backend, group_w = ctx.extra
    need = ctx.needs_input_grad
    dx, dcw, dcb = torch.ops.atlas_fast.atlas_conv2d_backward(grad, x, weight, tau_w, tau_b, coef_w, key_w, key_b,
                                                        stride, padding, dilation, groups, need[0], backend,
                                                        scale_w, group_w)
    return (dx if need[0] else None, None, None, None, None, dcw if need[5] else None,
            dcb if need[6] and tau_b is not None else None) + (None,) * 9


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


@torch.library.custom_op("atlas_fast::merge_blocks_quant", mutates_args=())
def _merge_blocks_quant(theta0: List[Tensor], tau: List[Tensor], scales: List[Optional[Tensor]], groups: List[int],
                        coef: Tensor, keys: List[int], backend: str) -> List[Tensor]:
    taus = task_vector_list(theta0, tau, scales, groups)
    return resolve(backend, coef.device, coef.dtype).merge_blocks(theta0, taus, coef, keys)


@_merge_blocks_quant.register_fake
def _(theta0, tau, scales, groups, coef, keys, backend):
    return [torch.empty_like(t) for t in theta0]


@torch.library.custom_op("atlas_fast::merge_blocks_quant_backward", mutates_args=())
def _merge_blocks_quant_backward(grads: List[Tensor], tau: List[Tensor], scales: List[Optional[Tensor]],
                                 groups: List[int], keys: List[int], partitions: int, backend: str) -> Tensor:
    taus = task_vector_list(grads, tau, scales, groups)   # each gradient has its θ0's shape
    return resolve(backend, tau[0].device, grads[0].dtype).merge_blocks_backward(grads, taus, keys, partitions)


@_merge_blocks_quant_backward.register_fake
def _(grads, tau, scales, groups, keys, partitions, backend):
    return tau[0].new_empty((tau[0].shape[0], len(tau), partitions), dtype=torch.float32)


def _merge_quant_setup(ctx, inputs, output):
    _, tau, scales, groups, coef, keys, backend = inputs
    save_taus(ctx, tau, scales)
    ctx.extra = (groups, keys, coef.shape[2], backend)


def _merge_quant_grad(ctx, grads):
    groups, keys, partitions, backend = ctx.extra
    tau, scales, no_scales = saved_taus(ctx)
    dc = torch.ops.atlas_fast.merge_blocks_quant_backward(list(grads), tau, scales, groups, keys, partitions, backend)
    return [None] * len(tau), [None] * len(tau), no_scales, None, dc, None, None


_merge_blocks_quant.register_autograd(_merge_quant_grad, setup_context=_merge_quant_setup)


# ---------------------------------------------------------------- functional entry points

def atlas_linear(x, weight, bias, tau_w, tau_b, coef_w, coef_b=None, key_w=0, key_b=0, backend="auto"):
    """y = x (W0 + Σ_t c_w[t, k] τ_w,t)ᵀ + (b0 + Σ_t c_b[t, k] τ_b,t); coef (T, K), keys from block_key()."""
    check_block("weight", weight, tau_w, coef_w)
    check_bias(bias, tau_b, coef_b, coef_w)
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x of shape {tuple(x.shape)} does not match weight {tuple(weight.shape)}")
    if lowrank.is_lowrank(tau_w):
        b = _lowrank_bias(bias, tau_b, coef_b, key_b, coef_w, backend)
        return torch.ops.atlas_fast.atlas_linear_lowrank(autocast(x), weight, b, tau_w.a, tau_w.bt, coef_w)
    data, scale, group = quant.unpack(tau_w)
    return torch.ops.atlas_fast.atlas_linear(autocast(x), weight, bias, data, tau_b, coef_w, coef_b, key_w, key_b,
                                             backend, scale, group)


def atlas_conv2d(x, weight, bias, tau_w, tau_b, coef_w, coef_b=None, key_w=0, key_b=0, stride=(1, 1),
                 padding=(0, 0), dilation=(1, 1), groups=1, backend="auto"):
    """F.conv2d on the merged weight and bias; padding as two ints (resolve 'same'/'valid' before)."""
    check_block("weight", weight, tau_w, coef_w)
    check_bias(bias, tau_b, coef_b, coef_w)
    if weight.dim() != 4 or x.dim() != 4 or x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"x of shape {tuple(x.shape)} does not match conv weight {tuple(weight.shape)}, "
                         f"groups={groups}")
    if lowrank.is_lowrank(tau_w):
        w = torch.ops.atlas_fast.merge_lowrank(weight, tau_w.a, tau_w.bt, coef_w)
        b = _lowrank_bias(bias, tau_b, coef_b, key_b, coef_w, backend)
        return torch.nn.functional.conv2d(x, w, b, tuple(stride), tuple(padding), tuple(dilation), groups)
    data, scale, group = quant.unpack(tau_w)
    return torch.ops.atlas_fast.atlas_conv2d(autocast(x), weight, bias, data, tau_b, coef_w, coef_b, key_w, key_b,
                                             list(stride), list(padding), list(dilation), groups, backend, scale,
                                             group)


def merge_blocks(theta0, tau, coef, keys, backend="auto"):
    """[θ0_b + Σ_t coef[t, b, k] τ_b,t] for lists of blocks; coef (T, B, K) float32. A block's task vectors may
    be a quant.QuantizedBlock or a lowrank.LowRankBlock."""
    if not (len(theta0) == len(tau) == len(keys) == coef.shape[1]):
        raise ValueError(f"merge_blocks: {len(theta0)} blocks, {len(tau)} task-vector stacks, {len(keys)} keys, "
                         f"coefficients for {coef.shape[1]}")
    for b, (t0, tv) in enumerate(zip(theta0, tau)):
        check_block(f"block {b}", t0, tv, coef[:, b])
    factored = [b for b, t in enumerate(tau) if lowrank.is_lowrank(t)]
    if factored:
        for b in factored:
            check_lowrank(f"block {b}", coef[:, b])
        return merge_factored_apart(
            tau, factored, lambda b: torch.ops.atlas_fast.merge_lowrank(theta0[b], tau[b].a, tau[b].bt, coef[:, b]),
            lambda rest: merge_blocks([theta0[b] for b in rest], [tau[b] for b in rest], coef[:, rest],
                                      [keys[b] for b in rest], backend))
    if not any(quant.is_quantized(t) for t in tau):
        return torch.ops.atlas_fast.merge_blocks(list(theta0), list(tau), coef, list(keys), backend)
    data, scales, groups = zip(*map(quant.unpack, tau))
    return torch.ops.atlas_fast.merge_blocks_quant(list(theta0), list(data), list(scales), list(groups), coef,
                                                   list(keys), backend)


def _lowrank_bias(bias, tau_b, coef_b, key_b, coef_w, backend):
    """The merged bias of a layer with a low-rank weight (its task vectors are dense: 1-D), differentiable."""
    check_lowrank("weight", coef_w)
    if tau_b is None:
        return bias
    return merge_blocks([bias], [tau_b], coef_b[:, None], [key_b], backend)[0]
