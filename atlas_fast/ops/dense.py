"""The atlas ops, defined once with torch.library so torch.compile sees one op per call.

    atlas_fast::atlas_linear / ..._backward   y = x (W0 + Σ c τ)ᵀ + (b0 + Σ c' τ')
    atlas_fast::atlas_conv2d / ..._backward   the same for a 2-D convolution weight
    atlas_fast::merge_blocks / ..._backward   [θ0_b + Σ c τ_b] for a list of small blocks

Backward math, for one block with weight gradient G (never needed as a whole by the fused backends):
    dx       = dy · W(c)                      (input gradient, on the merged weight)
    dc[t, k] = Σ_{i : k(i) = k} τ_t[i] G[i]   with G = dyᵀx for a linear weight, Σ_n dy_n for a bias
θ0 and τ are frozen: the ops give gradients for the input and the coefficients only.
The `backend` argument ("torch", "triton", "cuda", "auto") picks the implementation at run time.

Quantised weights (atlas_fast.bank.quant): the functional entry points take a QuantizedBlock wherever a weight's
task vectors go; the ops receive its data as tau_w with scale_w and group_w (int4's columns per scale), and
hand the backend the QuantizedBlock again. Bias task vectors are 1-D and always float. Lists of blocks with
quantised ones go through atlas_fast::merge_blocks_quant (a list of optional scales has no default in a schema).
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..backends import resolve
from ..bank import lowrank, quant

_EMPTY = (0,)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(_EMPTY) if t is None else t


def _tau(tau: Tensor, scale: Optional[Tensor], group: int, theta0: Tensor):
    """The task vectors a backend receives: the tensor itself, or the QuantizedBlock of (data, scale)."""
    return tau if scale is None else quant.QuantizedBlock(tau, scale, group, (tau.shape[0], *theta0.shape))


# ---------------------------------------------------------------- linear

@torch.library.custom_op("atlas_fast::atlas_linear", mutates_args=())
def _atlas_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], tau_w: Tensor, tau_b: Optional[Tensor],
            coef_w: Tensor, coef_b: Optional[Tensor], key_w: int, key_b: int, backend: str,
            scale_w: Optional[Tensor] = None, group_w: int = 0) -> Tensor:
    tau = _tau(tau_w, scale_w, group_w, weight)
    return resolve(backend, x.device, coef_w.dtype).atlas_linear(x, weight, bias, tau, tau_b, coef_w, coef_b,
                                                                 key_w, key_b)


@_atlas_linear.register_fake
def _(x, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, backend, scale_w=None, group_w=0):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("atlas_fast::atlas_linear_backward", mutates_args=())
def _atlas_linear_backward(grad_out: Tensor, x: Tensor, weight: Tensor, tau_w: Tensor, tau_b: Optional[Tensor],
                     coef_w: Tensor, key_w: int, key_b: int, needs_input_grad: bool,
                     backend: str, scale_w: Optional[Tensor] = None, group_w: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    tau = _tau(tau_w, scale_w, group_w, weight)
    dx, dcw, dcb = resolve(backend, x.device, coef_w.dtype).atlas_linear_backward(
        grad_out, x, weight, tau, tau_b, coef_w, key_w, key_b, needs_input_grad)
    return _or_empty(dx, x), dcw, _or_empty(dcb, coef_w)


@_atlas_linear_backward.register_fake
def _(grad_out, x, weight, tau_w, tau_b, coef_w, key_w, key_b, needs_input_grad, backend, scale_w=None, group_w=0):
    dx = torch.empty_like(x) if needs_input_grad else x.new_empty(_EMPTY)
    dcb = torch.empty_like(coef_w) if tau_b is not None else coef_w.new_empty(_EMPTY)
    return dx, torch.empty_like(coef_w), dcb


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
    conv = (tuple(stride), tuple(padding), tuple(dilation), groups)
    tau = _tau(tau_w, scale_w, group_w, weight)
    return resolve(backend, x.device, coef_w.dtype).atlas_conv2d(x, weight, bias, tau, tau_b, coef_w, coef_b,
                                                                 key_w, key_b, conv)


def _conv_out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@_atlas_conv2d.register_fake
def _(x, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, stride, padding, dilation, groups, backend,
      scale_w=None, group_w=0):
    h, w = (_conv_out_size(x.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], dilation[i]) for i in (0, 1))
    return x.new_empty((x.shape[0], weight.shape[0], h, w))


@torch.library.custom_op("atlas_fast::atlas_conv2d_backward", mutates_args=())
def _atlas_conv2d_backward(grad_out: Tensor, x: Tensor, weight: Tensor, tau_w: Tensor, tau_b: Optional[Tensor],
                     coef_w: Tensor, key_w: int, key_b: int, stride: List[int], padding: List[int],
                     dilation: List[int], groups: int, needs_input_grad: bool,
                     backend: str, scale_w: Optional[Tensor] = None, group_w: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    conv = (tuple(stride), tuple(padding), tuple(dilation), groups)
    tau = _tau(tau_w, scale_w, group_w, weight)
    dx, dcw, dcb = resolve(backend, x.device, coef_w.dtype).atlas_conv2d_backward(
        grad_out, x, weight, tau, tau_b, coef_w, key_w, key_b, conv, needs_input_grad)
    return _or_empty(dx, x), dcw, _or_empty(dcb, coef_w)


@_atlas_conv2d_backward.register_fake
def _(grad_out, x, weight, tau_w, tau_b, coef_w, key_w, key_b, stride, padding, dilation, groups,
      needs_input_grad, backend, scale_w=None, group_w=0):
    dx = torch.empty_like(x) if needs_input_grad else x.new_empty(_EMPTY)
    dcb = torch.empty_like(coef_w) if tau_b is not None else coef_w.new_empty(_EMPTY)
    return dx, torch.empty_like(coef_w), dcb


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


def _taus(theta0, tau, scales, groups):
    return [_tau(t, s, g, t0) for t0, t, s, g in zip(theta0, tau, scales, groups)]


@torch.library.custom_op("atlas_fast::merge_blocks_quant", mutates_args=())
def _merge_blocks_quant(theta0: List[Tensor], tau: List[Tensor], scales: List[Optional[Tensor]], groups: List[int],
                        coef: Tensor, keys: List[int], backend: str) -> List[Tensor]:
    taus = _taus(theta0, tau, scales, groups)
    return resolve(backend, coef.device, coef.dtype).merge_blocks(theta0, taus, coef, keys)


@_merge_blocks_quant.register_fake
def _(theta0, tau, scales, groups, coef, keys, backend):
    return [torch.empty_like(t) for t in theta0]


@torch.library.custom_op("atlas_fast::merge_blocks_quant_backward", mutates_args=())
def _merge_blocks_quant_backward(grads: List[Tensor], tau: List[Tensor], scales: List[Optional[Tensor]],
                                 groups: List[int], keys: List[int], partitions: int, backend: str) -> Tensor:
    taus = _taus(grads, tau, scales, groups)   # each gradient has its θ0's shape
    return resolve(backend, tau[0].device, grads[0].dtype).merge_blocks_backward(grads, taus, keys, partitions)


@_merge_blocks_quant_backward.register_fake
def _(grads, tau, scales, groups, keys, partitions, backend):
    return tau[0].new_empty((tau[0].shape[0], len(tau), partitions), dtype=torch.float32)


def _save_taus(ctx, tau, scales):
    """Save a list of task-vector data and their optional scales for a backward (restored by _saved_taus)."""
    ctx.quantized = [s is not None for s in scales]
    ctx.save_for_backward(*tau, *[s for s in scales if s is not None])


def _saved_taus(ctx):
    """(tau, scales) saved by _save_taus, and the gradient to return for the scales input: torch.library matches
    it to the inputs' pytree, where a list holding a None is one leaf."""
    saved = list(ctx.saved_tensors)
    n = len(ctx.quantized)
    rest = iter(saved[n:])
    scales = [next(rest) if q else None for q in ctx.quantized]
    return saved[:n], scales, None if None in scales else [None] * n


def _merge_quant_setup(ctx, inputs, output):
    _, tau, scales, groups, coef, keys, backend = inputs
    _save_taus(ctx, tau, scales)
    ctx.extra = (groups, keys, coef.shape[2], backend)


def _merge_quant_grad(ctx, grads):
    groups, keys, partitions, backend = ctx.extra
    tau, scales, no_scales = _saved_taus(ctx)
    dc = torch.ops.atlas_fast.merge_blocks_quant_backward(list(grads), tau, scales, groups, keys, partitions, backend)
    return [None] * len(tau), [None] * len(tau), no_scales, None, dc, None, None


_merge_blocks_quant.register_autograd(_merge_quant_grad, setup_context=_merge_quant_setup)


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
    if not quant.is_quantized(tau) and tau.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"{what}: task vectors must be float32, bfloat16 or float16 (int8 and int4 as a "
                         f"quant.QuantizedBlock), got {tau.dtype}")
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
    if quant.is_quantized(tau_b):
        raise ValueError("bias: task vectors of a bias are 1-D and stay float (only weights are quantised)")
    check_block("bias", bias, tau_b, coef_b)
    if coef_b.shape != coef_w.shape:
        raise ValueError(f"bias: coef_b of shape {tuple(coef_b.shape)} differs from coef_w {tuple(coef_w.shape)}")


def atlas_linear(x, weight, bias, tau_w, tau_b, coef_w, coef_b=None, key_w=0, key_b=0, backend="auto"):
    """y = x (W0 + Σ_t c_w[t, k] τ_w,t)ᵀ + (b0 + Σ_t c_b[t, k] τ_b,t); coef (T, K), keys from block_key()."""
    _check_block("weight", weight, tau_w, coef_w)
    _check_bias(bias, tau_b, coef_b, coef_w)
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x of shape {tuple(x.shape)} does not match weight {tuple(weight.shape)}")
    if lowrank.is_lowrank(tau_w):
        return torch.ops.atlas_fast.atlas_linear_lowrank(_autocast(x), weight, _lowrank_bias(bias, tau_b, coef_b, key_b,
                                                                                             coef_w, backend),
                                                         tau_w.a, tau_w.bt, coef_w)
    data, scale, group = quant.unpack(tau_w)
    return torch.ops.atlas_fast.atlas_linear(_autocast(x), weight, bias, data, tau_b, coef_w, coef_b, key_w, key_b,
                                       backend, scale, group)


def atlas_conv2d(x, weight, bias, tau_w, tau_b, coef_w, coef_b=None, key_w=0, key_b=0, stride=(1, 1),
                 padding=(0, 0), dilation=(1, 1), groups=1, backend="auto"):
    """F.conv2d on the merged weight and bias; padding as two ints (resolve 'same'/'valid' before)."""
    _check_block("weight", weight, tau_w, coef_w)
    _check_bias(bias, tau_b, coef_b, coef_w)
    if weight.dim() != 4 or x.dim() != 4 or x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"x of shape {tuple(x.shape)} does not match conv weight {tuple(weight.shape)}, "
                         f"groups={groups}")
    if lowrank.is_lowrank(tau_w):
        w = torch.ops.atlas_fast.merge_lowrank(weight, tau_w.a, tau_w.bt, coef_w)
        b = _lowrank_bias(bias, tau_b, coef_b, key_b, coef_w, backend)
        return torch.nn.functional.conv2d(x, w, b, tuple(stride), tuple(padding), tuple(dilation), groups)
    data, scale, group = quant.unpack(tau_w)
    return torch.ops.atlas_fast.atlas_conv2d(_autocast(x), weight, bias, data, tau_b, coef_w, coef_b, key_w, key_b,
                                       list(stride), list(padding), list(dilation), groups, backend, scale, group)


def merge_blocks(theta0, tau, coef, keys, backend="auto"):
    """[θ0_b + Σ_t coef[t, b, k] τ_b,t] for lists of blocks; coef (T, B, K) float32. A block's task vectors may
    be a quant.QuantizedBlock or a lowrank.LowRankBlock."""
    if not (len(theta0) == len(tau) == len(keys) == coef.shape[1]):
        raise ValueError(f"merge_blocks: {len(theta0)} blocks, {len(tau)} task-vector stacks, {len(keys)} keys, "
                         f"coefficients for {coef.shape[1]}")
    for b, (t0, tv) in enumerate(zip(theta0, tau)):
        _check_block(f"block {b}", t0, tv, coef[:, b])
    factored = [b for b, t in enumerate(tau) if lowrank.is_lowrank(t)]
    if factored:
        for b in factored:
            _check_lowrank(f"block {b}", coef[:, b])
        return _merge_factored_apart(
            tau, factored, lambda b: torch.ops.atlas_fast.merge_lowrank(theta0[b], tau[b].a, tau[b].bt, coef[:, b]),
            lambda rest: merge_blocks([theta0[b] for b in rest], [tau[b] for b in rest], coef[:, rest],
                                      [keys[b] for b in rest], backend))
    if not any(quant.is_quantized(t) for t in tau):
        return torch.ops.atlas_fast.merge_blocks(list(theta0), list(tau), coef, list(keys), backend)
    data, scales, groups = zip(*map(quant.unpack, tau))
    return torch.ops.atlas_fast.merge_blocks_quant(list(theta0), list(data), list(scales), list(groups), coef,
                                                   list(keys), backend)


def _check_lowrank(what, coef):
    if coef.shape[1] != 1:
        raise ValueError(f"{what}: low-rank task vectors take one coefficient per task vector (partitions=1), got "
                         f"coefficients of shape {tuple(coef.shape)}: partitions mask τ element by element, which a "
                         f"factored τ = B·A cannot do without forming it")


def _lowrank_bias(bias, tau_b, coef_b, key_b, coef_w, backend):
    """The merged bias of a layer with a low-rank weight (its task vectors are dense: 1-D), differentiable."""
    _check_lowrank("weight", coef_w)
    if tau_b is None:
        return bias
    return merge_blocks([bias], [tau_b], coef_b[:, None], [key_b], backend)[0]


def _merge_factored_apart(tau, factored, merge_factored, merge_rest):
    """A merge of a list of blocks with low-rank ones (indices `factored`): merge_factored(b) for each of those,
    one merge_rest(indices) (a list) for the others; the merged blocks in block order."""
    out = {b: merge_factored(b) for b in factored}
    rest = [b for b in range(len(tau)) if b not in out]
    if rest:
        out.update(zip(rest, merge_rest(rest)))
    return [out[b] for b in range(len(tau))]
