"""The torch backend: reference-grade CPU/GPU path built from stock torch ops.

Memory discipline: a linear forward merges its one weight, uses it and frees it; the backward merges it
again for the input gradient, forms the layer-sized weight gradient G = dyᵀx once, and reduces it against
all T task vectors in one matrix-vector product (fp32 banks) or T dot products (half banks, no T-sized
upcast). No model-sized buffer exists at any time.
"""
import torch
import torch.nn.functional as F

from ..hashing import partition_index
from .base import Backend


def merge_block(theta0, tau, coef, key):
    """θ0 + Σ_t c[t, k(i)] τ_t[i] as a new tensor shaped like θ0, in coef's dtype (float32; float64 for
    gradcheck). coef: (T, K)."""
    T, K = coef.shape
    out = theta0.to(coef.dtype, copy=True)
    flat = out.view(-1)
    taus = tau.reshape(T, -1)
    if K == 1 and taus.dtype == coef.dtype:
        flat.addmv_(taus.t(), coef[:, 0])
    elif K == 1:
        for t in range(T):
            flat.addcmul_(taus[t], coef[t, 0])
    else:
        part = partition_index(flat.numel(), key, K, flat.device)
        for t in range(T):
            flat.addcmul_(taus[t], coef[t][part])
    return out


def reduce_block(tau, g, key, partitions, acc=torch.float32):
    """dc (T, K) in dtype acc: dc[t, k] = Σ_{i : k(i) = k} τ_t[i] g[i]."""
    T = tau.shape[0]
    taus = tau.reshape(T, -1)
    gf = g.reshape(-1).to(acc)
    if partitions == 1:
        if taus.dtype == acc:
            return torch.mv(taus, gf).unsqueeze(1)
        return torch.stack([torch.dot(taus[t].to(acc), gf) for t in range(T)]).unsqueeze(1)
    part = partition_index(gf.numel(), key, partitions, gf.device)
    out = gf.new_zeros(T, partitions)
    for t in range(T):
        out[t].index_add_(0, part, taus[t].to(acc) * gf)
    return out


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
        grad_x = None
        if needs_input_grad:
            w = merge_block(weight, tau_w, coef_w, key_w).to(grad_out.dtype)
            grad_x = (gy @ w).view(x.shape)
            del w
        g_weight = gy.t() @ x.reshape(-1, x.shape[-1])
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
        w = merge_block(weight, tau_w, coef_w, key_w).to(grad_out.dtype)
        grad_x, g_weight, _ = torch.ops.aten.convolution_backward(
            grad_out, x, w, None, list(stride), list(padding), list(dilation), False, [0, 0], groups,
            [needs_input_grad, True, False])
        del w
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
