"""The op contract every backend implements.

Shapes (T task vectors, K partitions, K = 1 without partitions):
    x (..., in) · weight (out, in) · bias (out,) or None · tau_w (T, out, in) · tau_b (T, out) or None
    coef_w, coef_b: float32 (T, K) · key_w, key_b: uint32 block keys of the partition hash
Outputs have x's dtype; merging and coefficient-gradient reductions accumulate in float32. Float64
coefficients and banks (for gradcheck) need only be supported by the torch backend. tau_w may be a
quant.QuantizedBlock (int8 or int4 with float32 scales; the ops carry its data and scales and rebuild it for
the backend): every backend dequantises it inside the merge and the dc reduction, never as a whole copy.
A backend overrides what it accelerates; everything else falls back to the torch backend.
How a backend computes a call is its own choice, made per call: the fused backends either rebuild the merged
weight tile by tile inside their kernels or merge one layer into a transient buffer and call a stock GEMM, as
the cost model of plan.py says; dc is the fused reduction either way. A merged buffer outlives its call only
within plan.set_keep_budget (default 0), so by default no buffer larger than one layer exists.
"""


class BackendUnavailable(RuntimeError):
    """A backend was asked for where it cannot run; the message says why and what to do."""


class Backend:
    name = "base"

    def unavailable_reason(self, device):
        """None when this backend can run on `device`, else a sentence saying why not."""
        return None

    def _fallback(self):
        from . import get_backend
        return get_backend("torch")

    def atlas_linear(self, x, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b):
        return self._fallback().atlas_linear(x, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b)

    def atlas_linear_backward(self, grad_out, x, weight, tau_w, tau_b, coef_w, key_w, key_b, needs_input_grad):
        """Returns (grad_x or None, grad_coef_w (T, K), grad_coef_b (T, K) or None)."""
        return self._fallback().atlas_linear_backward(grad_out, x, weight, tau_w, tau_b, coef_w, key_w, key_b,
                                                needs_input_grad)

    def atlas_conv2d(self, x, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, conv):
        """conv: (stride, padding, dilation, groups) as 2-tuples and an int."""
        return self._fallback().atlas_conv2d(x, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, conv)

    def atlas_conv2d_backward(self, grad_out, x, weight, tau_w, tau_b, coef_w, key_w, key_b, conv, needs_input_grad):
        return self._fallback().atlas_conv2d_backward(grad_out, x, weight, tau_w, tau_b, coef_w, key_w, key_b, conv,
                                                needs_input_grad)

    def merge_blocks(self, theta0, tau, coef, keys):
        """[θ0_b + Σ_t c[t, b, k] τ_t,b] for a list of blocks; coef (T, B, K). Outputs in θ0's dtype."""
        return self._fallback().merge_blocks(theta0, tau, coef, keys)

    def merge_blocks_backward(self, grads, tau, keys, partitions):
        """dc (T, B, K) float32 with dc[t, b, k] = Σ_{i in partition k} τ_t,b[i] g_b[i]."""
        return self._fallback().merge_blocks_backward(grads, tau, keys, partitions)
