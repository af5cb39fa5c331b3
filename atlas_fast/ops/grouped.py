"""The grouped atlas ops: many compositions in one call, one coefficient set per group of samples.

    atlas_fast::atlas_linear_grouped / ..._backward   y[s] = x[s] W(c[index[s]])ᵀ + b(c[index[s]])
    atlas_fast::atlas_conv2d_grouped / ..._backward   the same for a 2-D convolution weight
    atlas_fast::merge_blocks_grouped / ..._backward   [θ0_b + Σ_t c[g, t, b] τ_t,b for every group g]

x has its samples on dim 0 and index (S,) int64 names each sample's group in [0, G); the coefficients carry a
leading group axis, (G, T, P) per block ((G, T, B, P) for merge_blocks_grouped). Backward math, per block:
    dx[s]       = dy[s] · W(c[index[s]])
    dc[g, t, k] = Σ_{i : k(i) = k} τ_t[i] G_g[i],   G_g the weight gradient of group g's samples alone
The ops dispatch through backends.resolve to the grouped methods of the backend (contract: backends/base.py; the
torch backend's strategies: backends/torch_grouped.py; the segmented kernels: backends/fused.py, with the Triton
kernels in kernels/atlas_linear_grouped.py and the CUDA ones in csrc/atlas_linear.cu). merge_blocks_grouped has no
backend argument and runs the torch backend's on whatever device the tensors are. The checks of the functional
entry points and the quantised task vectors' rebuilding are shared with the dense ops (ops/common.py).

Under torch.func.vmap (AtlasModel runs a grouped forward as a vmap over samples) the linear and conv ops
accept a batched activation with an unbatched index of the vmap's batch size: index[n] is the group of the
n-th vmapped sample, and every row of that sample belongs to it.

Quantised weights (quant.QuantizedBlock) travel as in dense.py: data as tau_w with scale_w and group_w; lists of
blocks with quantised ones go through atlas_fast::merge_blocks_grouped_quant. Low-rank weights
(lowrank.LowRankBlock) travel as their factors, a as tau_w and bt as bt_w, and run the torch backend on every
device (stock GEMMs); a list's low-rank blocks go through atlas_fast::merge_lowrank_grouped (ops/lowrank.py).
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..backends import Block, get_backend, resolve
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


def _as_block(weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, scale_w, group_w, bt_w):
    """The Block a backend receives; its weight's task vectors a LowRankBlock when bt_w is given."""
    if bt_w is not None:
        tau = lowrank.LowRankBlock(tau_w, bt_w, (tau_w.shape[0], *weight.shape))
    else:
        tau = task_vectors(tau_w, scale_w, group_w, weight)
    return Block(weight, bias, tau, tau_b, coef_w, coef_b, key_w, key_b)


def _backend(backend, x, coef_w, bt_w):
    # Low-rank task vectors run stock GEMMs on the factors, which is the torch backend on every device. An empty
    # batch has an empty result and zero coefficient gradients: the torch backend gives them without launching
    # kernels over no rows.
    if bt_w is not None or x.numel() == 0:
        return get_backend("torch")
    return resolve(backend, x.device, coef_w.dtype)


def _check_groups(what, coef):
    if coef.shape[0] == 0:
        raise ValueError(f"{what}: coefficients for 0 groups {tuple(coef.shape)}; a grouped call takes at least "
                         f"one coefficient set")


# ---------------------------------------------------------------- linear

@torch.library.custom_op("atlas_fast::atlas_linear_grouped", mutates_args=())
def _linear_grouped(x: Tensor, index: Tensor, weight: Tensor, bias: Optional[Tensor], tau_w: Tensor,
                    tau_b: Optional[Tensor], coef_w: Tensor, coef_b: Optional[Tensor], key_w: int, key_b: int,
                    backend: str, scale_w: Optional[Tensor] = None, group_w: int = 0,
                    bt_w: Optional[Tensor] = None) -> Tensor:
    block = _as_block(weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, scale_w, group_w, bt_w)
    return _backend(backend, x, coef_w, bt_w).atlas_linear_grouped(x, index, block)


@_linear_grouped.register_fake
def _(x, index, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, backend, scale_w=None, group_w=0,
      bt_w=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("atlas_fast::atlas_linear_grouped_backward", mutates_args=())
def _linear_grouped_backward(grad_out: Tensor, x: Tensor, index: Tensor, weight: Tensor, tau_w: Tensor,
                             tau_b: Optional[Tensor], coef_w: Tensor, key_w: int, key_b: int,
                             needs_input_grad: bool, backend: str, scale_w: Optional[Tensor] = None,
                             group_w: int = 0, bt_w: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    block = _as_block(weight, None, tau_w, tau_b, coef_w, None, key_w, key_b, scale_w, group_w, bt_w)
    dx, dcw, dcb = _backend(backend, x, coef_w, bt_w).atlas_linear_grouped_backward(grad_out, x, index, block,
                                                                                    needs_input_grad)
    return or_empty(dx, x), dcw, or_empty(dcb, coef_w)


@_linear_grouped_backward.register_fake
def _(grad_out, x, index, weight, tau_w, tau_b, coef_w, key_w, key_b, needs_input_grad, backend, scale_w=None,
      group_w=0, bt_w=None):
    return backward_fakes(x, coef_w, tau_b, needs_input_grad)


def _linear_setup(ctx, inputs, output):
    x, index, weight, _, tau_w, tau_b, coef_w, _, key_w, key_b, backend, scale_w, group_w, bt_w = inputs
    ctx.save_for_backward(x, index, weight, tau_w, tau_b, coef_w, scale_w, bt_w)
    ctx.extra = (key_w, key_b, backend, group_w)


def _linear_grad(ctx, grad):
    x, index, weight, tau_w, tau_b, coef_w, scale_w, bt_w = ctx.saved_tensors
    key_w, key_b, backend, group_w = ctx.extra
    need = ctx.needs_input_grad
    dx, dcw, dcb = torch.ops.atlas_fast.atlas_linear_grouped_backward(grad, x, index, weight, tau_w, tau_b, coef_w,
                                                                      key_w, key_b, need[0], backend, scale_w,
                                                                      group_w, bt_w)
    return (dx if need[0] else None, None, None, None, None, None, dcw if need[6] else None,
            dcb if need[7] and tau_b is not None else None) + (None,) * 6


_linear_grouped.register_autograd(_linear_grad, setup_context=_linear_setup)


# ---------------------------------------------------------------- conv2d

@torch.library.custom_op("atlas_fast::atlas_conv2d_grouped", mutates_args=())
def _conv2d_grouped(x: Tensor, index: Tensor, weight: Tensor, bias: Optional[Tensor], tau_w: Tensor,
                    tau_b: Optional[Tensor], coef_w: Tensor, coef_b: Optional[Tensor], key_w: int, key_b: int,
                    stride: List[int], padding: List[int], dilation: List[int], groups: int,
                    backend: str, scale_w: Optional[Tensor] = None, group_w: int = 0,
                    bt_w: Optional[Tensor] = None) -> Tensor:
    block = _as_block(weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, scale_w, group_w, bt_w)
    return _backend(backend, x, coef_w, bt_w).atlas_conv2d_grouped(x, index, block,
                                                                   conv_args(stride, padding, dilation, groups))


@_conv2d_grouped.register_fake
def _(x, index, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, stride, padding, dilation, groups,
      backend, scale_w=None, group_w=0, bt_w=None):
    return x.new_empty((x.shape[0], weight.shape[0],
                        *out_size(conv_args(stride, padding, dilation, groups), weight, x)))


@torch.library.custom_op("atlas_fast::atlas_conv2d_grouped_backward", mutates_args=())
def _conv2d_grouped_backward(grad_out: Tensor, x: Tensor, index: Tensor, weight: Tensor, tau_w: Tensor,
                             tau_b: Optional[Tensor], coef_w: Tensor, key_w: int, key_b: int, stride: List[int],
                             padding: List[int], dilation: List[int], groups: int, needs_input_grad: bool,
                             backend: str, scale_w: Optional[Tensor] = None, group_w: int = 0,
                             bt_w: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    block = _as_block(weight, None, tau_w, tau_b, coef_w, None, key_w, key_b, scale_w, group_w, bt_w)
    dx, dcw, dcb = _backend(backend, x, coef_w, bt_w).atlas_conv2d_grouped_backward(
        grad_out, x, index, block, conv_args(stride, padding, dilation, groups), needs_input_grad)
    return or_empty(dx, x), dcw, or_empty(dcb, coef_w)


@_conv2d_grouped_backward.register_fake
def _(grad_out, x, index, weight, tau_w, tau_b, coef_w, key_w, key_b, stride, padding, dilation, groups,
      needs_input_grad, backend, scale_w=None, group_w=0, bt_w=None):
    return backward_fakes(x, coef_w, tau_b, needs_input_grad)


def _conv_setup(ctx, inputs, output):
    (x, index, weight, _, tau_w, tau_b, coef_w, _, key_w, key_b, stride, padding, dilation, groups, backend,
     scale_w, group_w, bt_w) = inputs
    ctx.save_for_backward(x, index, weight, tau_w, tau_b, coef_w, scale_w, bt_w)
    ctx.extra = (key_w, key_b, stride, padding, dilation, groups, backend, group_w)


def _conv_grad(ctx, grad):
    x, index, weight, tau_w, tau_b, coef_w, scale_w, bt_w = ctx.saved_tensors
    key_w, key_b, stride, padding, dilation, groups, backend, group_w = ctx.extra
    need = ctx.needs_input_grad
    dx, dcw, dcb = torch.ops.atlas_fast.atlas_conv2d_grouped_backward(
        grad, x, index, weight, tau_w, tau_b, coef_w, key_w, key_b, stride, padding, dilation, groups, need[0],
        backend, scale_w, group_w, bt_w)
    return (dx if need[0] else None, None, None, None, None, None, dcw if need[6] else None,
            dcb if need[7] and tau_b is not None else None) + (None,) * 10


_conv2d_grouped.register_autograd(_conv_grad, setup_context=_conv_setup)


# ---------------------------------------------------------------- vmap over samples

def _vmap_rule(op, sample_dims):
    """The batching rule of a grouped op: the vmap axis and x's first `sample_dims` - 1 logical axes are
    flattened into one sample axis; index[n] (unbatched, length = the vmap's batch size) is the group of every
    row of vmapped sample n."""
    def rule(info, in_dims, x, index, *rest):
        if any(d is not None for d in torch.utils._pytree.tree_leaves(list(in_dims[1:]))):
            raise NotImplementedError(f"{op}: under vmap only the activation may be batched; pass the group index "
                                      f"unbatched (one entry per vmapped sample) and the coefficients unbatched")
        B = info.batch_size
        if index.shape != (B,):
            raise ValueError(f"{op}: under vmap the index must have one entry per vmapped sample ({B}), got "
                             f"{tuple(index.shape)}")
        x = x.movedim(in_dims[0], 0) if in_dims[0] is not None else x.expand(B, *x.shape)
        inner = x.shape[1:]
        if x.dim() - 1 >= sample_dims:
            s0 = inner[0]
            flat, idx = x.reshape(B * s0, *inner[1:]), index.repeat_interleave(s0)
        else:
            s0, flat, idx = None, x, index
        y = getattr(torch.ops.atlas_fast, op)(flat, idx, *rest)
        return (y.view(B, s0, *y.shape[1:]) if s0 is not None else y), 0
    return rule


# A linear input has at least (rows, in): a 1-D logical x is one row per sample. A conv input is (S, C, H, W).
torch.library.register_vmap("atlas_fast::atlas_linear_grouped", _vmap_rule("atlas_linear_grouped", 2))
torch.library.register_vmap("atlas_fast::atlas_conv2d_grouped", _vmap_rule("atlas_conv2d_grouped", 4))


# ---------------------------------------------------------------- merge_blocks_grouped

@torch.library.custom_op("atlas_fast::merge_blocks_grouped", mutates_args=())
def _merge_grouped(theta0: List[Tensor], tau: List[Tensor], coef: Tensor, keys: List[int]) -> List[Tensor]:
    return get_backend("torch").merge_blocks_grouped(theta0, tau, coef, keys)


@_merge_grouped.register_fake
def _(theta0, tau, coef, keys):
    return [t.new_empty((coef.shape[0], *t.shape)) for t in theta0]


@torch.library.custom_op("atlas_fast::merge_blocks_grouped_backward", mutates_args=())
def _merge_grouped_backward(grads: List[Tensor], tau: List[Tensor], keys: List[int], partitions: int) -> Tensor:
    return get_backend("torch").merge_blocks_grouped_backward(grads, tau, keys, partitions)


@_merge_grouped_backward.register_fake
def _(grads, tau, keys, partitions):
    acc = torch.float64 if grads[0].dtype == torch.float64 else torch.float32
    return grads[0].new_empty((grads[0].shape[0], tau[0].shape[0], len(tau), partitions), dtype=acc)


def _merge_setup(ctx, inputs, output):
    _, tau, coef, keys = inputs
    ctx.save_for_backward(*tau)
    ctx.extra = (keys, coef.shape[3], coef.dtype)


def _merge_grad(ctx, grads):
    keys, partitions, dtype = ctx.extra
    tau = list(ctx.saved_tensors)
    dc = torch.ops.atlas_fast.merge_blocks_grouped_backward(list(grads), tau, keys, partitions)
    return [None] * len(tau), [None] * len(tau), dc.to(dtype), None


_merge_grouped.register_autograd(_merge_grad, setup_context=_merge_setup)


@torch.library.custom_op("atlas_fast::merge_blocks_grouped_quant", mutates_args=())
def _merge_grouped_quant(theta0: List[Tensor], tau: List[Tensor], scales: List[Optional[Tensor]], groups: List[int],
                         coef: Tensor, keys: List[int]) -> List[Tensor]:
    return get_backend("torch").merge_blocks_grouped(theta0, task_vector_list(theta0, tau, scales, groups), coef,
                                                     keys)


@_merge_grouped_quant.register_fake
def _(theta0, tau, scales, groups, coef, keys):
    return [t.new_empty((coef.shape[0], *t.shape)) for t in theta0]


@torch.library.custom_op("atlas_fast::merge_blocks_grouped_quant_backward", mutates_args=())
def _merge_grouped_quant_backward(grads: List[Tensor], tau: List[Tensor], scales: List[Optional[Tensor]],
                                  groups: List[int], keys: List[int], partitions: int) -> Tensor:
    # each gradient is (G, *θ0.shape): its first entry has θ0's shape
    taus = task_vector_list([g[0] for g in grads], tau, scales, groups)
    return get_backend("torch").merge_blocks_grouped_backward(grads, taus, keys, partitions)


@_merge_grouped_quant_backward.register_fake
def _(grads, tau, scales, groups, keys, partitions):
    acc = torch.float64 if grads[0].dtype == torch.float64 else torch.float32
    return grads[0].new_empty((grads[0].shape[0], tau[0].shape[0], len(tau), partitions), dtype=acc)


def _merge_quant_setup(ctx, inputs, output):
    _, tau, scales, groups, coef, keys = inputs
    save_taus(ctx, tau, scales)
    ctx.extra = (groups, keys, coef.shape[3], coef.dtype)


def _merge_quant_grad(ctx, grads):
    groups, keys, partitions, dtype = ctx.extra
    tau, scales, no_scales = saved_taus(ctx)
    dc = torch.ops.atlas_fast.merge_blocks_grouped_quant_backward(list(grads), tau, scales, groups, keys, partitions)
    return [None] * len(tau), [None] * len(tau), no_scales, None, dc.to(dtype), None


_merge_grouped_quant.register_autograd(_merge_quant_grad, setup_context=_merge_quant_setup)


# ---------------------------------------------------------------- functional entry points

def _check_grouped(what, theta0, tau, coef, G=None):
    if coef.dim() != 3:
        raise ValueError(f"{what}: grouped coefficients must be (G, T, P), got {tuple(coef.shape)}")
    _check_groups(what, coef)
    check_block(what, theta0, tau, coef[0])
    if G is not None and coef.shape[0] != G:
        raise ValueError(f"{what}: coefficients for {coef.shape[0]} groups, expected {G}")


def _check_index(index, S, G, device):
    if index.dtype != torch.int64 or index.dim() != 1 or index.shape[0] != S:
        raise ValueError(f"index must be int64 (S={S},), one group per sample, got {index.dtype} "
                         f"{tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"index on {index.device}, activations on {device}")
    if not torch.compiler.is_compiling() and S and (int(index.min()) < 0 or int(index.max()) >= G):
        raise ValueError(f"index holds group ids outside [0, {G})")


def atlas_linear_grouped(x, index, weight, bias, tau_w, tau_b, coef_w, coef_b=None, key_w=0, key_b=0,
                         backend="auto"):
    """y[s] = x[s] (W0 + Σ_t c_w[g, t, k] τ_w,t)ᵀ + (b0 + Σ_t c_b[g, t, k] τ_b,t), g = index[s].

    x (S, ..., in): samples on dim 0 · index (S,) int64 · coef_w, coef_b (G, T, K)."""
    _check_grouped("weight", weight, tau_w, coef_w)
    check_bias(bias, tau_b, coef_b, coef_w, _check_grouped)
    if weight.dim() != 2 or x.dim() < 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x of shape {tuple(x.shape)} (samples first) does not match weight {tuple(weight.shape)}")
    _check_index(index, x.shape[0], coef_w.shape[0], x.device)
    return call_linear_grouped(x, index, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, backend)


def atlas_conv2d_grouped(x, index, weight, bias, tau_w, tau_b, coef_w, coef_b=None, key_w=0, key_b=0,
                         stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, backend="auto"):
    """F.conv2d of sample s on the weight and bias merged with coefficients coef[index[s]]; x (S, C, H, W)."""
    _check_grouped("weight", weight, tau_w, coef_w)
    check_bias(bias, tau_b, coef_b, coef_w, _check_grouped)
    if weight.dim() != 4 or x.dim() != 4 or x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"x of shape {tuple(x.shape)} does not match conv weight {tuple(weight.shape)}, "
                         f"groups={groups}")
    _check_index(index, x.shape[0], coef_w.shape[0], x.device)
    return call_conv2d_grouped(x, index, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, stride, padding,
                               dilation, groups, backend)


def _unpack(tau_w, coef_w):
    """(data, scale, group, bt) of a weight's task vectors as the grouped ops take them; a low-rank τ takes one
    coefficient per task vector."""
    if lowrank.is_lowrank(tau_w):
        check_lowrank("weight", coef_w[0])
        return tau_w.a, None, 0, tau_w.bt
    return (*quant.unpack(tau_w), None)


def call_linear_grouped(x, index, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, backend):
    """The grouped linear op on float, quantised or low-rank task vectors, without atlas_linear_grouped's checks
    of x against the index: the modules call it under vmap, where x is one sample."""
    data, scale, group, bt = _unpack(tau_w, coef_w)
    return torch.ops.atlas_fast.atlas_linear_grouped(autocast(x), index, weight, bias, data, tau_b, coef_w, coef_b,
                                                     key_w, key_b, backend, scale, group, bt)


def call_conv2d_grouped(x, index, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, stride, padding,
                        dilation, groups, backend):
    """The grouped conv op as call_linear_grouped is the linear one."""
    data, scale, group, bt = _unpack(tau_w, coef_w)
    return torch.ops.atlas_fast.atlas_conv2d_grouped(autocast(x), index, weight, bias, data, tau_b, coef_w, coef_b,
                                                     key_w, key_b, list(stride), list(padding), list(dilation),
                                                     groups, backend, scale, group, bt)


def merge_blocks_grouped(theta0, tau, coef, keys):
    """[(G, *θ0_b.shape) tensors θ0_b + Σ_t coef[g, t, b, k] τ_b,t] for lists of blocks; coef (G, T, B, K)."""
    if coef.dim() != 4 or not (len(theta0) == len(tau) == len(keys) == coef.shape[2]):
        raise ValueError(f"merge_blocks_grouped: {len(theta0)} blocks, {len(tau)} task-vector stacks, {len(keys)} "
                         f"keys, coefficients of shape {tuple(coef.shape)} (expected (G, T, B, K))")
    _check_groups("merge_blocks_grouped", coef)
    for b, (t0, tv) in enumerate(zip(theta0, tau)):
        check_block(f"block {b}", t0, tv, coef[0, :, b])
    factored = [b for b, t in enumerate(tau) if lowrank.is_lowrank(t)]
    if factored:
        for b in factored:
            check_lowrank(f"block {b}", coef[0, :, b])
        return merge_factored_apart(
            tau, factored,
            lambda b: torch.ops.atlas_fast.merge_lowrank_grouped(theta0[b], tau[b].a, tau[b].bt, coef[:, :, b]),
            lambda rest: merge_blocks_grouped([theta0[b] for b in rest], [tau[b] for b in rest], coef[:, :, rest],
                                              [keys[b] for b in rest]))
    if not any(quant.is_quantized(t) for t in tau):
        return torch.ops.atlas_fast.merge_blocks_grouped(list(theta0), list(tau), coef, list(keys))
    data, scales, groups = zip(*map(quant.unpack, tau))
    return torch.ops.atlas_fast.merge_blocks_grouped_quant(list(theta0), list(data), list(scales), list(groups), coef,
                                                           list(keys))
