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
"""
import torch
import torch.nn.functional as F

from ..bank import lowrank
from ..bank.quant import is_quantized
from ..ops.hashing import cached_partition_index
from . import cpu_native
from .base import Backend

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


def _merged_bias(bias, tau_b, coef_b, key_b, dtype):
    if bias is None:
        return None
    merged = merge_block(bias, tau_b, coef_b, key_b) if tau_b is not None else bias
    return merged.to(dtype)


class TorchBackend(Backend):
    name = "torch"

    def atlas_linear(self, x, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b):
        w = merge_block(weight, tau_w, coef_w, key_w).to(x.dtype)
        return F.linear(x, w, _merged_bias(bias, tau_b, coef_b, key_b, x.dtype))

    def atlas_linear_backward(self, grad_out, x, weight, tau_w, tau_b, coef_w, key_w, key_b, needs_input_grad):
        K = coef_w.shape[1]
        gy = grad_out.reshape(-1, grad_out.shape[-1])
        g_weight = gy.t() @ x.reshape(-1, x.shape[-1])
        grad_x = None
        if needs_input_grad:
            w, grad_cw = merge_and_reduce(weight, tau_w, coef_w, key_w, g_weight)
            del g_weight
            grad_x = (gy @ w.to(grad_out.dtype)).view(x.shape)
            del w
        else:
            grad_cw = reduce_block(tau_w, g_weight, key_w, K, coef_w.dtype)
            del g_weight
        grad_cb = reduce_block(tau_b, gy.sum(0, dtype=coef_w.dtype), key_b, K, coef_w.dtype) if tau_b is not None else None
        return grad_x, grad_cw, grad_cb

    def atlas_conv2d(self, x, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, conv):
        stride, padding, dilation, groups = conv
        w = merge_block(weight, tau_w, coef_w, key_w).to(x.dtype)
        return F.conv2d(x, w, _merged_bias(bias, tau_b, coef_b, key_b, x.dtype), stride, padding, dilation, groups)

    def atlas_conv2d_backward(self, grad_out, x, weight, tau_w, tau_b, coef_w, key_w, key_b, conv, needs_input_grad):
        stride, padding, dilation, groups = conv
        K = coef_w.shape[1]
        args = (list(stride), list(padding), list(dilation), False, [0, 0], groups)
        # The weight gradient does not depend on the weight's values: θ0 stands in for the merged weight, which
        # is built afterwards in the same pass over the bank that reduces G.
        _, g_weight, _ = torch.ops.aten.convolution_backward(grad_out, x, weight.to(grad_out.dtype), None, *args,
                                                             [False, True, False])
        grad_x = None
        if needs_input_grad:
            w, grad_cw = merge_and_reduce(weight, tau_w, coef_w, key_w, g_weight)
            del g_weight
            grad_x = torch.ops.aten.convolution_backward(grad_out, x, w.to(grad_out.dtype), None, *args,
                                                         [True, False, False])[0]
            del w
        else:
            grad_cw = reduce_block(tau_w, g_weight, key_w, K, coef_w.dtype)
            del g_weight
        grad_cb = None
        if tau_b is not None:
            grad_cb = reduce_block(tau_b, grad_out.sum((0, 2, 3), dtype=coef_w.dtype), key_b, K, coef_w.dtype)
        return grad_x, grad_cw, grad_cb

    def merge_blocks(self, theta0, tau, coef, keys):
        return [merge_block(t0, tv, coef[:, b], key).to(t0.dtype)
                for b, (t0, tv, key) in enumerate(zip(theta0, tau, keys))]

    def merge_blocks_backward(self, grads, tau, keys, partitions):
        return torch.stack([reduce_block(tv, g, key, partitions) for tv, g, key in zip(tau, grads, keys)], dim=1)


BACKEND = TorchBackend()
