"""The low-rank atlas ops: task vectors kept as factors τ_t = B_t A_t (atlas_fast.bank.lowrank).

    atlas_fast::atlas_linear_lowrank / ..._backward   y = x (W0 + Σ_t c_t B_t A_t)ᵀ + bias
    atlas_fast::merge_lowrank / ..._backward          θ0 + Σ_t c_t B_t A_t for one block
    atlas_fast::merge_lowrank_grouped / ..._backward  the same for G coefficient sets (G, T, 1): (G, *θ0.shape)

The factors travel as a (T, r, cols) and bt (T, r, rows); the coefficients are (T, 1). The bias reaching
atlas_linear_lowrank is merged already (by merge_blocks, whose backward reduces its gradient), and a conv weight
is merged by merge_lowrank before F.conv2d: the functional entry points in dense.py put these together. Every
device runs the same stock GEMMs of inner size T·r; no backend has kernels of its own for them. Grouped linear and
conv calls on low-rank weights are the grouped ops of grouped.py, given the factors.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..bank import lowrank
from .common import EMPTY, or_empty


def _block(a: Tensor, bt: Tensor, theta0_shape) -> lowrank.LowRankBlock:
    return lowrank.LowRankBlock(a, bt, (a.shape[0], *theta0_shape))


# ---------------------------------------------------------------- linear

@torch.library.custom_op("atlas_fast::atlas_linear_lowrank", mutates_args=())
def _linear_lowrank(x: Tensor, weight: Tensor, bias: Optional[Tensor], a: Tensor, bt: Tensor,
                    coef: Tensor) -> Tensor:
    return lowrank.linear(x, weight, bias, _block(a, bt, weight.shape), coef)


@_linear_lowrank.register_fake
def _(x, weight, bias, a, bt, coef):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("atlas_fast::atlas_linear_lowrank_backward", mutates_args=())
def _linear_lowrank_backward(grad_out: Tensor, x: Tensor, weight: Tensor, a: Tensor, bt: Tensor, coef: Tensor,
                             needs_input_grad: bool) -> Tuple[Tensor, Tensor]:
    dx, dc = lowrank.linear_backward(grad_out, x, weight, _block(a, bt, weight.shape), coef, needs_input_grad)
    return or_empty(dx, x), dc


@_linear_lowrank_backward.register_fake
def _(grad_out, x, weight, a, bt, coef, needs_input_grad):
    return (torch.empty_like(x) if needs_input_grad else x.new_empty(EMPTY)), torch.empty_like(coef)


def _linear_setup(ctx, inputs, output):
    x, weight, bias, a, bt, coef = inputs
    ctx.save_for_backward(x, weight, a, bt, coef)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _linear_grad(ctx, grad):
    x, weight, a, bt, coef = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dc = torch.ops.atlas_fast.atlas_linear_lowrank_backward(grad, x, weight, a, bt, coef, need[0])
    dbias = None
    if ctx.bias_dtype is not None and need[2]:
        dbias = grad.reshape(-1, grad.shape[-1]).sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return dx if need[0] else None, None, dbias, None, None, dc if need[5] else None


_linear_lowrank.register_autograd(_linear_grad, setup_context=_linear_setup)


# ---------------------------------------------------------------- one merged block

@torch.library.custom_op("atlas_fast::merge_lowrank", mutates_args=())
def _merge_lowrank(theta0: Tensor, a: Tensor, bt: Tensor, coef: Tensor) -> Tensor:
    return lowrank.merge(theta0, _block(a, bt, theta0.shape), coef).to(theta0.dtype)


@_merge_lowrank.register_fake
def _(theta0, a, bt, coef):
    return torch.empty_like(theta0)


@torch.library.custom_op("atlas_fast::merge_lowrank_backward", mutates_args=())
def _merge_lowrank_backward(grad: Tensor, a: Tensor, bt: Tensor, coef: Tensor) -> Tensor:
    return lowrank.reduce(_block(a, bt, grad.shape), grad, coef.dtype)


@_merge_lowrank_backward.register_fake
def _(grad, a, bt, coef):
    return torch.empty_like(coef)


def _merge_setup(ctx, inputs, output):
    _, a, bt, coef = inputs
    ctx.save_for_backward(a, bt, coef)


def _merge_grad(ctx, grad):
    a, bt, coef = ctx.saved_tensors
    dc = torch.ops.atlas_fast.merge_lowrank_backward(grad, a, bt, coef) if ctx.needs_input_grad[3] else None
    return None, None, None, dc


_merge_lowrank.register_autograd(_merge_grad, setup_context=_merge_setup)


@torch.library.custom_op("atlas_fast::merge_lowrank_grouped", mutates_args=())
def _merge_lowrank_grouped(theta0: Tensor, a: Tensor, bt: Tensor, coef: Tensor) -> Tensor:
    return lowrank.merge_grouped(theta0, _block(a, bt, theta0.shape), coef).to(theta0.dtype)


@_merge_lowrank_grouped.register_fake
def _(theta0, a, bt, coef):
    return theta0.new_empty((coef.shape[0], *theta0.shape))


@torch.library.custom_op("atlas_fast::merge_lowrank_grouped_backward", mutates_args=())
def _merge_lowrank_grouped_backward(grad: Tensor, a: Tensor, bt: Tensor, coef: Tensor) -> Tensor:
    return lowrank.reduce_grouped(_block(a, bt, grad.shape[1:]), grad, coef.dtype)


@_merge_lowrank_grouped_backward.register_fake
def _(grad, a, bt, coef):
    return torch.empty_like(coef)


def _merge_grouped_grad(ctx, grad):
    a, bt, coef = ctx.saved_tensors
    dc = torch.ops.atlas_fast.merge_lowrank_grouped_backward(grad, a, bt, coef) if ctx.needs_input_grad[3] else None
    return None, None, None, dc


_merge_lowrank_grouped.register_autograd(_merge_grouped_grad, setup_context=_merge_setup)
