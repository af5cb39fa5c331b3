"""The op contract every backend implements, and the record of a block's arguments.

Shapes (T task vectors, K partitions, K = 1 without partitions), held by a Block:
    weight (out, in) · bias (out,) or None · tau_w (T, out, in) · tau_b (T, out) or None
    coef_w, coef_b: float32 (T, K) · key_w, key_b: uint32 block keys of the partition hash
x (..., in) travels beside the block. Outputs have x's dtype; merging and coefficient-gradient reductions
accumulate in float32. Float64 coefficients and banks (for gradcheck) need only be supported by the torch backend.
tau_w may be a quant.QuantizedBlock (int8 or int4 with float32 scales; the ops carry its data and scales and rebuild
it for the backend): every backend dequantises it inside the merge and the dc reduction, never as a whole copy.
A backend overrides what it accelerates; everything else falls back to the torch backend.
How a backend computes a call is its own choice, made per call: the fused backends either rebuild the merged
weight tile by tile inside their kernels or merge one layer into a transient buffer and call a stock GEMM, as
the cost model of plan.py says; dc is the fused reduction either way. A merged buffer outlives its call only
within plan.set_keep_budget (default 0), so by default no buffer larger than one layer exists.

Grouped calls (G groups, S samples): many coefficient sets in one call, one per group of samples.
    x (S, ..., in) · index (S,) int64 in [0, G): sample s runs with coefficients coef[index[s]]
    the block's coef_w, coef_b are (G, T, K) float32 (float64 for gradcheck)
    y[s] = x[s] (W0 + Σ_t coef_w[g, t, k] τ_t)ᵀ + (b0 + Σ_t coef_b[g, t, k] τ'_t),   g = index[s]
Backward: dx[s] = dy[s] W(c[g]);  dc[g, t, k] = Σ_{i : k(i) = k} τ_t[i] G_g[i]  with the weight gradient of group g
G_g = Σ_{s : index[s] = g} dy[s]ᵀ x[s] summed over every row of those samples; groups without samples get dc = 0.
How the torch backend computes them: torch_grouped.py; the segmented kernels of triton and cuda: fused.py.
"""
from typing import NamedTuple, Optional

from torch import Tensor


class BackendUnavailable(RuntimeError):
    """A backend was asked for where it cannot run; the message says why and what to do."""


class Block(NamedTuple):
    """One weight block's arguments as the ops hand them to a backend (the activation aside). A backward's block
    has bias and coef_b None: the gradients do not depend on them. coef_w and coef_b are (T, K), or (G, T, K) in a
    grouped call; tau_w may be a quant.QuantizedBlock or (grouped calls) a lowrank.LowRankBlock. The fields are in
    the order of the Triton launchers' arguments after x (and row_group), so `*block` passes them."""
    weight: Tensor
    bias: Optional[Tensor]
    tau_w: Tensor
    tau_b: Optional[Tensor]
    coef_w: Tensor
    coef_b: Optional[Tensor]
    key_w: int
    key_b: int

    def group(self, g):
        """The block of group g's coefficient set, (T, K), from a grouped block."""
        return self._replace(coef_w=self.coef_w[g], coef_b=None if self.coef_b is None else self.coef_b[g])

    def as_linear(self):
        """A conv block as the linear block of its im2col view: weight (N, C·kh·kw), τ (T, N, C·kh·kw)."""
        N = self.weight.shape[0]
        return self._replace(weight=self.weight.reshape(N, -1), tau_w=self.tau_w.reshape(*self.tau_w.shape[:2], -1))

    def merged_weight(self, merge, dtype):
        """W0 + Σ c τ in dtype, by `merge(θ0, τ, coef, key, dtype)` (a backend's one-block merge)."""
        return merge(self.weight, self.tau_w, self.coef_w, self.key_w, dtype)

    def merged_bias(self, merge, dtype):
        """b0 + Σ c' τ' in dtype by `merge` as in merged_weight; the bias as it is without bias task vectors; None
        without a bias."""
        if self.bias is None:
            return None
        if self.tau_b is None:
            return self.bias.to(dtype)
        return merge(self.bias, self.tau_b, self.coef_b, self.key_b, dtype)


class Backend:
    name = "base"

    def unavailable_reason(self, device):
        """None when this backend can run on `device`, else a sentence saying why not."""
        return None

    def fallback(self):
        """The backend that runs what this one does not accelerate: the torch backend."""
        from . import get_backend
        return get_backend("torch")

    def atlas_linear(self, x, block):
        return self.fallback().atlas_linear(x, block)

    def atlas_linear_backward(self, grad_out, x, block, needs_input_grad):
        """Returns (grad_x or None, grad_coef_w (T, K), grad_coef_b (T, K) or None)."""
        return self.fallback().atlas_linear_backward(grad_out, x, block, needs_input_grad)

    def atlas_conv2d(self, x, block, conv):
        """conv: (stride, padding, dilation, groups) as 2-tuples and an int."""
        return self.fallback().atlas_conv2d(x, block, conv)

    def atlas_conv2d_backward(self, grad_out, x, block, conv, needs_input_grad):
        return self.fallback().atlas_conv2d_backward(grad_out, x, block, conv, needs_input_grad)

    def merge_blocks(self, theta0, tau, coef, keys):
        """[θ0_b + Σ_t c[t, b, k] τ_t,b] for a list of blocks; coef (T, B, K). Outputs in θ0's dtype."""
        return self.fallback().merge_blocks(theta0, tau, coef, keys)

    def merge_blocks_backward(self, grads, tau, keys, partitions):
        """dc (T, B, K) float32 with dc[t, b, k] = Σ_{i in partition k} τ_t,b[i] g_b[i]."""
        return self.fallback().merge_blocks_backward(grads, tau, keys, partitions)

    def atlas_linear_grouped(self, x, index, block):
        """y (S, ..., out): each sample through the layer merged with its group's coefficients."""
        return self.fallback().atlas_linear_grouped(x, index, block)

    def atlas_linear_grouped_backward(self, grad_out, x, index, block, needs_input_grad):
        """Returns (grad_x or None, grad_coef_w (G, T, K), grad_coef_b (G, T, K) or None)."""
        return self.fallback().atlas_linear_grouped_backward(grad_out, x, index, block, needs_input_grad)

    def atlas_conv2d_grouped(self, x, index, block, conv):
        return self.fallback().atlas_conv2d_grouped(x, index, block, conv)

    def atlas_conv2d_grouped_backward(self, grad_out, x, index, block, conv, needs_input_grad):
        return self.fallback().atlas_conv2d_grouped_backward(grad_out, x, index, block, conv, needs_input_grad)

    def merge_blocks_grouped(self, theta0, tau, coef, keys):
        """[(G, *θ0_b.shape) tensors θ0_b + Σ_t coef[g, t, b, k] τ_t,b] for a list of blocks; coef (G, T, B, K)."""
        return self.fallback().merge_blocks_grouped(theta0, tau, coef, keys)

    def merge_blocks_grouped_backward(self, grads, tau, keys, partitions):
        """dc (G, T, B, K) with dc[g, t, b, k] = Σ_{i in partition k} τ_t,b[i] grads_b[g, i]; float32 (float64 when
        the gradients are)."""
        return self.fallback().merge_blocks_grouped_backward(grads, tau, keys, partitions)
