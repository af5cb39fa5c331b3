"""The torch backend: the CPU path, built from stock torch ops (and a reference-grade path on a GPU).

Memory discipline: no model-sized buffer exists at any time. A linear forward merges its one weight, uses it
and frees it. The backward forms the layer-sized weight gradient G = dyᵀx, then walks the layer's bank once:
each chunk of the T task vectors is merged into the weight (for dx) and reduced against G (for dc) while it
is in cache, so a training step reads the bank from memory twice (forward and backward), not three times.

A chunk is a range of flat elements [s, e) of every τ_t, a (T, n) view of CHUNK_BYTES in the compute dtype.
Half-precision banks are upcast one chunk at a time into a reused buffer, never as a T-sized fp32 copy. With
partitions (K > 1) a chunk merges as D = cᵀτ (K, n), keeping D[k(i), i], and reduces as τ · (g ⊙ onehot(k))ᵀ
(T, K): no per-task gather, and the partition index k(i) is hashed once per block and cached as uint8
(hashing.cached_partition_index).

On a CPU the walk runs compiled (cpu_native: csrc/cpu_walk.c, built on first use when a C compiler is there) for
float32, bfloat16 and float16 banks, and with AVX-512 for int8 and int4 ones: each element is read once, widened or
dequantised in registers, merged and reduced against its partition's coefficients in the same pass; the stock-op
walk below is the fallback and the path on other devices and for float64.

Quantised banks (quant.QuantizedBlock, int8 or int4) go through the same walk: each chunk, a whole number of
rows, is dequantised into the reused buffer (QuantizedBlock.dequantize_rows) where a half-precision chunk is
upcast, so the merge and the reduction read the int8/int4 bank and never a dequantised copy of a layer.

Grouped calls (a coefficient set per group of samples) are methods of the same TorchBackend: a group's samples run
as an ungrouped call on its coefficients ("merge"), or all rows at once by a per-row strategy of torch_grouped.py,
which also holds the strategy rule and the generic blocks' grouped merge.
"""
import torch
import torch.nn.functional as F

from ..bank import lowrank
from ..bank.quant import is_quantized
from ..ops.hashing import cached_partition_index
from . import cpu_native, torch_grouped
from .base import Backend
from .im2col import out_size

# Bytes of one chunk of the bank in the compute dtype. Large enough that a chunk costs a handful of BLAS calls
# (each call is an OpenMP region, which stalls when the cores are shared), small enough to stay in the last
# level cache between the merge and the reduction, and below glibc's largest mmap threshold (32 MiB), so the
# upcast buffer of a half-precision bank is reused from the heap instead of being faulted in on every call.
CHUNK_BYTES = 16 << 20


def _flat(tau):
    """τ as (T, numel) rows of flat elements: a view of a tensor; a QuantizedBlock as it is (_walk reads it)."""
    return tau if is_quantized(tau) else tau.reshape(tau.shape[0], -1)


def _walk(taus, key, acc, coef=None, merged=None, g=None, dc=None, base=None):
    """One pass over taus (T, numel) (a tensor, or a QuantizedBlock dequantised a chunk at a time), chunk by
    chunk: merged += Σ_t coef[t, k(i)] τ_t[i] when merged is given (merged = base + ... when base is given: the
    compiled walk reads θ0 as it goes, no separate copy); dc[t, k] += Σ_{i: k(i) = k} τ_t[i] g[i] when g is given.
    merged, base, dc are in dtype acc; g in any float dtype. Work buffers are allocated once per call and
    reused by every chunk: a fresh multi-megabyte tensor per chunk would be faulted in page by page and cost
    more than the arithmetic."""
    T, numel = taus.shape[0], taus.numel() // max(1, taus.shape[0])
    K = (coef if coef is not None else dc).shape[1]
    if cpu_native.takes(taus, acc, K):
        part = cached_partition_index(numel, key, K, taus.device) if K > 1 else None
        cpu_native.walk(taus, part, K, coef, merged, g, dc, base)
        return
    if base is not None:
        merged.copy_(base)
    n = min(numel, max(1, CHUNK_BYTES // (T * torch.finfo(acc).bits // 8)))
    quantized = is_quantized(taus)
    if quantized:  # whole rows: each row has its scales
        cols = taus.cols
        n = min(numel, max(cols, n // cols * cols))
    device = taus.device
    upcast = None if not quantized and taus.dtype == acc else torch.empty(T, n, dtype=acc, device=device)
    if K > 1:
        part = cached_partition_index(numel, key, K, device)
        positions = torch.arange(n, device=device)
        flat_index = torch.empty(n, dtype=torch.int64, device=device)
        work = torch.empty(K * n, dtype=acc, device=device)
    for s in range(0, numel, n):
        e = min(s + n, numel)
        if quantized:
            tc = taus.dequantize_rows(s // cols, e // cols, upcast[:, :e - s])
        else:
            tc = taus[:, s:e] if upcast is None else upcast[:, :e - s].copy_(taus[:, s:e])
        if K > 1:
            m = e - s
            # k(i)·m + i: where element i's own entry sits in a row-major (K, m) matrix
            idx = flat_index[:m].copy_(part[s:e]).mul_(m).add_(positions[:m])
            w = work[:K * m].view(K, m)
        if merged is not None:
            if K == 1:
                merged[s:e].addmv_(tc.t(), coef[:, 0])
            else:
                torch.mm(coef.t(), tc, out=w)  # w[k, i] = Σ_t c[t, k] τ_t[i], then keep k = k(i)
                merged[s:e] += w.view(-1).index_select(0, idx)
        if g is not None:
            gc = g[s:e].to(acc)
            if K == 1:
                dc[:, 0].addmv_(tc, gc)
            else:
                w.zero_().view(-1).index_copy_(0, idx, gc)  # w[k, i] = g[i] if k = k(i) else 0
                dc.addmm_(tc, w.t())


def merge_block(theta0, tau, coef, key):
    """θ0 + Σ_t c[t, k(i)] τ_t[i] as a new tensor shaped like θ0, in coef's dtype (float32; float64 for
    gradcheck). coef: (T, K); (T, 1) for a lowrank.LowRankBlock."""
    if lowrank.is_lowrank(tau):
        return lowrank.merge(theta0, tau, coef)
    T, K = coef.shape
    taus = _flat(tau)
    if K == 1 and not is_quantized(taus) and taus.dtype == coef.dtype:  # one BLAS call reads the bank once
        return torch.addmv(theta0.reshape(-1).to(coef.dtype), taus.t(), coef[:, 0]).view(theta0.shape)
    merged, base = _merge_target(theta0, coef.dtype)
    _walk(taus, key, coef.dtype, coef=coef, merged=merged, base=base)
    return merged.view(theta0.shape)


def _merge_target(theta0, dtype):
    """(merged, base) for a walk that writes θ0 + Σ c τ: an empty tensor and θ0 itself when θ0 is a contiguous
    tensor of the accumulation dtype (the walk reads it as it goes), else a converted copy of θ0 and None."""
    flat = theta0.reshape(-1)
    if flat.dtype == dtype and flat.is_contiguous():
        return torch.empty_like(flat), flat
    return flat.to(dtype, copy=True), None


def reduce_block(tau, g, key, partitions, acc=torch.float32):
    """dc (T, K) in dtype acc: dc[t, k] = Σ_{i : k(i) = k} τ_t[i] g[i]."""
    if lowrank.is_lowrank(tau):
        if partitions != 1:
            raise ValueError(f"low-rank task vectors {tuple(tau.shape)}: partitions={partitions}; a factored τ "
                             f"takes one coefficient per task vector")
        return lowrank.reduce(tau, g, acc)
    T = tau.shape[0]
    taus = _flat(tau)
    g = g.reshape(-1)
    if partitions == 1 and not is_quantized(taus) and taus.dtype == acc == g.dtype:
        return torch.mv(taus, g).unsqueeze(1)
    dc = torch.zeros(T, partitions, dtype=acc, device=g.device)
    _walk(taus, key, acc, g=g, dc=dc)
    return dc


def merge_and_reduce(theta0, tau, coef, key, g):
    """(merge_block(θ0, τ, coef, key), reduce_block(τ, g, key, K, coef.dtype)) from one pass over the bank."""
    if lowrank.is_lowrank(tau):
        return lowrank.merge(theta0, tau, coef), reduce_block(tau, g, key, coef.shape[1], coef.dtype)
    T, K = coef.shape
    merged, base = _merge_target(theta0, coef.dtype)
    dc = torch.zeros(T, K, dtype=coef.dtype, device=merged.device)
    _walk(_flat(tau), key, coef.dtype, coef=coef, merged=merged, g=g.reshape(-1), dc=dc, base=base)
    return merged.view(theta0.shape), dc


def merge(theta0, tau, coef, key, dtype):
    """merge_block in dtype: the one-block merge of base.Block.merged_weight and merged_bias."""
    return merge_block(theta0, tau, coef, key).to(dtype)


def _aten_conv_args(conv):
    """stride, padding, dilation, transposed, output_padding, groups as aten.convolution_backward takes them."""
    stride, padding, dilation, groups = conv
    return (list(stride), list(padding), list(dilation), False, [0, 0], groups)


def _conv_grad_weight(grad_out, x, weight, conv):
    """The weight gradient of a conv. It does not depend on the weight's values: θ0 stands in for the merged
    weight, which is built afterwards in the same pass over the bank that reduces it."""
    return torch.ops.aten.convolution_backward(grad_out, x, weight.to(grad_out.dtype), None, *_aten_conv_args(conv),
                                               [False, True, False])[1]


def _conv_grad_input(grad_out, x, w, conv):
    return torch.ops.aten.convolution_backward(grad_out, x, w.to(grad_out.dtype), None, *_aten_conv_args(conv),
                                               [True, False, False])[0]


def _grads(block, g_weight, g_bias, needs_input_grad):
    """(merged weight or None, dc_w, dc_b or None) of one block from its weight gradient and its bias gradient
    Σ_n dy_n: one pass over the weight's bank, which also merges the weight when dx needs it."""
    K = block.coef_w.shape[1]
    acc = block.coef_w.dtype
    w = None
    if needs_input_grad:
        w, grad_cw = merge_and_reduce(block.weight, block.tau_w, block.coef_w, block.key_w, g_weight)
    else:
        grad_cw = reduce_block(block.tau_w, g_weight, block.key_w, K, acc)
    grad_cb = reduce_block(block.tau_b, g_bias, block.key_b, K, acc) if block.tau_b is not None else None
    return w, grad_cw, grad_cb


class TorchBackend(Backend):
    name = "torch"

    def atlas_linear(self, x, block):
        return F.linear(x, block.merged_weight(merge, x.dtype), block.merged_bias(merge, x.dtype))

    def atlas_linear_backward(self, grad_out, x, block, needs_input_grad):
        gy = grad_out.reshape(-1, grad_out.shape[-1])
        g_weight = gy.t() @ x.reshape(-1, x.shape[-1])
        w, grad_cw, grad_cb = _grads(block, g_weight, _bias_sum(block, gy, 0), needs_input_grad)
        del g_weight
        grad_x = (gy @ w.to(grad_out.dtype)).view(x.shape) if needs_input_grad else None
        return grad_x, grad_cw, grad_cb

    def atlas_conv2d(self, x, block, conv):
        stride, padding, dilation, groups = conv
        return F.conv2d(x, block.merged_weight(merge, x.dtype), block.merged_bias(merge, x.dtype), stride, padding,
                        dilation, groups)

    def atlas_conv2d_backward(self, grad_out, x, block, conv, needs_input_grad):
        g_weight = _conv_grad_weight(grad_out, x, block.weight, conv)
        w, grad_cw, grad_cb = _grads(block, g_weight, _bias_sum(block, grad_out, (0, 2, 3)), needs_input_grad)
        del g_weight
        grad_x = _conv_grad_input(grad_out, x, w, conv) if needs_input_grad else None
        return grad_x, grad_cw, grad_cb

    def merge_blocks(self, theta0, tau, coef, keys):
        return [merge_block(t0, tv, coef[:, b], key).to(t0.dtype)
                for b, (t0, tv, key) in enumerate(zip(theta0, tau, keys))]

    def merge_blocks_backward(self, grads, tau, keys, partitions):
        return torch.stack([reduce_block(tv, g, key, partitions) for tv, g, key in zip(tau, grads, keys)], dim=1)

    # Grouped calls: the strategy and the per-row paths are torch_grouped's; "merge" runs each present group's
    # samples as an ungrouped call of this backend on that group's coefficients.

    def atlas_linear_grouped(self, x, index, block):
        x2 = x.reshape(-1, x.shape[-1])
        present = torch_grouped.groups_of(index, block.coef_w.shape[0])
        strategy = torch_grouped.linear_strategy(x2.shape[0], len(present), block.coef_w.shape[2], block.tau_w)
        if strategy != "merge":
            row_group = torch_grouped.row_groups(index, torch_grouped.rows_per_sample(x, x2.shape[0]))
            y = torch_grouped.linear_rows(strategy, x2, row_group, block)
            return y.view(*x.shape[:-1], block.weight.shape[0])
        y = x.new_empty((*x.shape[:-1], block.weight.shape[0]))
        for g, samples in present:
            torch_grouped.put(y, samples, self.atlas_linear(torch_grouped.take(x, samples), block.group(g)))
        return y

    def atlas_linear_grouped_backward(self, grad_out, x, index, block, needs_input_grad):
        gy = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        present = torch_grouped.groups_of(index, block.coef_w.shape[0])
        strategy = torch_grouped.linear_strategy(x2.shape[0], len(present), block.coef_w.shape[2], block.tau_w)
        if strategy != "merge":
            row_group = torch_grouped.row_groups(index, torch_grouped.rows_per_sample(x, x2.shape[0]))
            grad_x, grad_cw, grad_cb = torch_grouped.linear_rows_backward(strategy, gy, x2, row_group, block,
                                                                          needs_input_grad)
            return (grad_x.view(x.shape) if needs_input_grad else None), grad_cw, grad_cb
        return self._per_group_backward(self.atlas_linear_backward, grad_out, x, present, block, needs_input_grad)

    def atlas_conv2d_grouped(self, x, index, block, conv):
        y = None
        for g, samples in torch_grouped.groups_of(index, block.coef_w.shape[0]):
            y_g = self.atlas_conv2d(torch_grouped.take(x, samples), block.group(g), conv)
            if y is None:
                y = y_g.new_empty((x.shape[0], *y_g.shape[1:]))
            torch_grouped.put(y, samples, y_g)
        if y is None:
            y = x.new_empty((0, block.weight.shape[0], *out_size(conv, block.weight, x)))
        return y

    def atlas_conv2d_grouped_backward(self, grad_out, x, index, block, conv, needs_input_grad):
        present = torch_grouped.groups_of(index, block.coef_w.shape[0])
        return self._per_group_backward(lambda gy, x_g, b, need: self.atlas_conv2d_backward(gy, x_g, b, conv, need),
                                        grad_out, x, present, block, needs_input_grad)

    @staticmethod
    def _per_group_backward(backward, grad_out, x, present, block, needs_input_grad):
        """The grouped backward as one ungrouped `backward(grad_out, x, block, needs_input_grad)` per present
        group; the groups without samples keep dc = 0."""
        G, T, P = block.coef_w.shape
        acc = block.coef_w.dtype
        grad_x = torch.empty_like(x) if needs_input_grad else None
        grad_cw = torch.zeros(G, T, P, dtype=acc, device=x.device)
        grad_cb = torch.zeros(G, T, P, dtype=acc, device=x.device) if block.tau_b is not None else None
        for g, samples in present:
            dx, grad_cw[g], dcb = backward(torch_grouped.take(grad_out, samples), torch_grouped.take(x, samples),
                                           block.group(g), needs_input_grad)
            if needs_input_grad:
                torch_grouped.put(grad_x, samples, dx)
            if dcb is not None:
                grad_cb[g] = dcb
        return grad_x, grad_cw, grad_cb

    def merge_blocks_grouped(self, theta0, tau, coef, keys):
        return torch_grouped.merge_blocks_grouped(theta0, tau, coef, keys)

    def merge_blocks_grouped_backward(self, grads, tau, keys, partitions):
        return torch_grouped.merge_blocks_grouped_backward(grads, tau, keys, partitions)


def _bias_sum(block, grad_out, dims):
    """Σ_n dy_n over `dims` in the accumulation dtype: what a bias's dc reduces (None without bias task vectors)."""
    return grad_out.sum(dims, dtype=block.coef_w.dtype) if block.tau_b is not None else None


BACKEND = TorchBackend()
