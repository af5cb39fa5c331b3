"""What the backends with fused linear kernels (triton, cuda) share: convs on the im2col view, and the grouped
linear and conv calls on segmented kernels.

A conv2d with groups=1 runs the backend's own atlas_linear and atlas_linear_backward on its im2col view
(im2col.patches); grouped (depthwise) convs take the torch backend.

A grouped linear call runs segmented kernels (rows sorted into one-group segments, each tile merged with its
group's coefficients): kernels/atlas_linear_grouped.py and csrc/atlas_linear.cu. The groups whose own row count the
cost model of plan.py would run merge-once are left out of the kernels' forward and dx: their layer is merged once by
the backend's merge kernel and their rows go through a stock GEMM, in the forward and again for dx; dc is the fused
per-group reduction for every group. A grouped conv with groups=1 runs the same kernels on its im2col rows (every
patch row in its sample's group). int8 and int4 banks (quant.QuantizedBlock): the segmented kernels and the
merge-once merges read the quantised tiles and dequantise them in registers, as the ungrouped kernels do.

A backend built on FusedBackend supplies merge_one, check_dtypes, grouped_block_m, segmented_forward and
segmented_backward (see their docstrings); the rest of the op contract is its own or the torch backend's.
"""
import torch
import torch.nn.functional as F

from . import plan
from .base import Backend
from .im2col import out_size, patches, rows, unpatch
from .torch_grouped import row_groups, rows_per_sample

ACTIVATIONS = (torch.float32, torch.bfloat16, torch.float16)


def check_dtypes(name, coef, *tensors):
    """Float32 coefficients (or none) and float32/bfloat16/float16 activations, θ0, task vectors, gradients: what
    the fused kernels of backend `name` take."""
    if (coef is not None and coef.dtype != torch.float32) or any(t.dtype not in ACTIVATIONS for t in tensors):
        got = ", ".join(str(t.dtype) for t in ((coef,) if coef is not None else ()) + tensors)
        raise ValueError(f"backend={name!r} takes float32 coefficients and float32/bfloat16/float16 tensors, got "
                         f"{got}; use backend='torch' for float64 (gradcheck)")


class FusedBackend(Backend):
    """The im2col convs and the segmented grouped calls of a backend with fused linear kernels."""

    def merge_one(self, theta0, tau, coef, key, dtype):
        """θ0 + Σ c τ of one block, (T, K) coefficients, into a new tensor in dtype (the merge-once buffer)."""
        raise NotImplementedError

    def check_dtypes(self, x, block):
        """Raises a ValueError naming the way out where the kernels do not take these dtypes."""
        raise NotImplementedError

    def grouped_block_m(self):
        """The tile height of the segmented forward and dx kernels, for the cost model."""
        raise NotImplementedError

    def segmented_forward(self, x2, row_group, block, skip):
        """y (M, out) of rows x2 (M, in), row m in group row_group[m], for the groups where skip (G,) bool is
        False; the rows of the skipped groups are left unwritten."""
        raise NotImplementedError

    def segmented_backward(self, gy, x2, row_group, block, needs_input_grad, skip):
        """(dx (M, in) or None with the rows of skipped groups unwritten, dc_w (G, T, K), dc_b or None)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- conv2d on the im2col view

    def atlas_conv2d(self, x, block, conv):
        if conv[3] != 1:
            return super().atlas_conv2d(x, block, conv)
        Ho, Wo = out_size(conv, block.weight, x)
        y = self.atlas_linear(patches(x, block.weight, conv), block.as_linear())
        return y.view(x.shape[0], Ho, Wo, block.weight.shape[0]).permute(0, 3, 1, 2).contiguous()

    def atlas_conv2d_backward(self, grad_out, x, block, conv, needs_input_grad):
        if conv[3] != 1:
            return super().atlas_conv2d_backward(grad_out, x, block, conv, needs_input_grad)
        dcols, grad_cw, grad_cb = self.atlas_linear_backward(rows(grad_out), patches(x, block.weight, conv),
                                                             block.as_linear(), needs_input_grad)
        grad_x = unpatch(dcols, x, block.weight, conv) if needs_input_grad else None
        return grad_x, grad_cw, grad_cb

    # ---------------------------------------------------------------- grouped calls on segmented kernels

    def _merge_once(self, counts, block, dtype, which):
        """bool (G,): the groups whose rows the cost model would run merge-once (`which`: "forward" or "dx")."""
        block_m = self.grouped_block_m()
        choice = {m: getattr(plan.for_linear(m, block.weight, block.tau_w, block.coef_w[0], dtype, block_m), which)
                  != "fused" for m in set(counts) if m}
        return torch.tensor([bool(m) and choice[m] for m in counts], dtype=torch.bool, device=block.coef_w.device)

    def _merged_rows(self, out, a, row_group, merge_groups, block, transpose):
        """out[rows of g] = a[rows of g] · W(c[g])ᵀ + b(c[g]), or a[rows of g] · W(c[g]) when `transpose` (dx), for
        the merge-once groups: one merged layer at a time, freed at once."""
        for g in merge_groups:
            rows_g = (row_group == g).nonzero().squeeze(1)
            block_g = block.group(g)
            w = block_g.merged_weight(self.merge_one, a.dtype)
            a_g = a.index_select(0, rows_g)
            out.index_copy_(0, rows_g, a_g @ w if transpose
                            else F.linear(a_g, w, block_g.merged_bias(self.merge_one, a.dtype)))

    def _grouped_rows(self, x2, row_group, block):
        counts = torch.bincount(row_group, minlength=block.coef_w.shape[0]).tolist()
        skip = self._merge_once(counts, block, x2.dtype, "forward")
        y = self.segmented_forward(x2, row_group, block, skip)
        self._merged_rows(y, x2, row_group, skip.nonzero().squeeze(1).tolist(), block, False)
        return y

    def atlas_linear_grouped(self, x, index, block):
        self.check_dtypes(x, block)
        x2 = x.reshape(-1, x.shape[-1])
        row_group = row_groups(index, rows_per_sample(x, x2.shape[0]))
        return self._grouped_rows(x2, row_group, block).view(*x.shape[:-1], block.weight.shape[0])

    def atlas_linear_grouped_backward(self, grad_out, x, index, block, needs_input_grad):
        self.check_dtypes(x, block)
        gy = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        row_group = row_groups(index, rows_per_sample(x, x2.shape[0]))
        skip, merge_groups = None, []
        if needs_input_grad:
            counts = torch.bincount(row_group, minlength=block.coef_w.shape[0]).tolist()
            skip = self._merge_once(counts, block, gy.dtype, "dx")
            merge_groups = skip.nonzero().squeeze(1).tolist()
        grad_x, grad_cw, grad_cb = self.segmented_backward(gy, x2, row_group, block, needs_input_grad, skip)
        if needs_input_grad:
            self._merged_rows(grad_x, gy, row_group, merge_groups, block, True)
            grad_x = grad_x.view(x.shape)
        return grad_x, grad_cw, grad_cb

    def atlas_conv2d_grouped(self, x, index, block, conv):
        if conv[3] != 1:
            return super().atlas_conv2d_grouped(x, index, block, conv)
        self.check_dtypes(x, block)
        N = block.weight.shape[0]
        Ho, Wo = out_size(conv, block.weight, x)
        y = self._grouped_rows(patches(x, block.weight, conv), row_groups(index, Ho * Wo), block.as_linear())
        return y.view(x.shape[0], Ho, Wo, N).permute(0, 3, 1, 2).contiguous()

    def atlas_conv2d_grouped_backward(self, grad_out, x, index, block, conv, needs_input_grad):
        if conv[3] != 1:
            return super().atlas_conv2d_grouped_backward(grad_out, x, index, block, conv, needs_input_grad)
        N = block.weight.shape[0]
        Ho, Wo = out_size(conv, block.weight, x)
        cols = patches(x, block.weight, conv)
        dcols, grad_cw, grad_cb = self.atlas_linear_grouped_backward(
            rows(grad_out).view(x.shape[0], Ho * Wo, N), cols.view(x.shape[0], Ho * Wo, -1), index,
            block.as_linear(), needs_input_grad)
        grad_x = unpatch(dcols.reshape(-1, cols.shape[1]), x, block.weight, conv) if needs_input_grad else None
        return grad_x, grad_cw, grad_cb
