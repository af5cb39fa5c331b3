"""Grouped compositions: many coefficient sets in one call, one per group of samples.

Contract (G groups, S samples, T task vectors, P partitions):
    x (S, ..., in) · index (S,) int64 in [0, G): sample s runs with coefficients coef[index[s]]
    coef_w, coef_b (G, T, P) float32 (float64 for gradcheck) · θ0, τ, keys as in base.Backend
    y[s] = x[s] (W0 + Σ_t coef_w[g, t, k] τ_t)ᵀ + (b0 + Σ_t coef_b[g, t, k] τ'_t),   g = index[s]
Backward: dx[s] = dy[s] W(c[g]);  dc[g, t, k] = Σ_{i : k(i) = k} τ_t[i] G_g[i]  with the weight gradient of group g
G_g = Σ_{s : index[s] = g} dy[s]ᵀ x[s] summed over every row of those samples; groups without samples get dc = 0.

The torch implementation chooses per call between two ways of computing a linear block:
    "merge":     for each group present, merge W(c[g]) (one layer, freed at once) and run its rows through one
                 GEMM: G'·T·N·K merge multiply-adds (streaming the bank G' times) + M·N·K GEMM multiply-adds;
    "rowscale":  y = x W0ᵀ + Σ_t c[g(r), t] ⊙ (x τ_tᵀ): (T + 1)·M·N·K GEMM multiply-adds, the bank read once
                 and no merged weight (P = 1 only: with partitions a coefficient varies inside a row of τ_t).
Counted in multiply-adds "merge" always looks cheaper (M ≥ G'), but a merge multiply-add streams one bank
element from memory while a GEMM multiply-add reuses operands from cache. The rule: "rowscale" when P = 1 and
groups average fewer than ROWS_PER_MERGE rows (M < ROWS_PER_MERGE · G'), else "merge". Convolutions and
partitioned blocks always merge per group. Low-rank task vectors (lowrank.LowRankBlock, P = 1) take "factored"
instead of "rowscale": y = x W0ᵀ + ((x A_catᵀ) ⊙ C) B_cat with C each row's group's coefficients (lowrank.linear_rows),
M·T·r·(N + K) multiply-adds and no τ formed, while lowrank.factored holds for the rows per present group, else
"merge" (each group's weight merged from the factors); their dc is the per-row terms of (x Aᵀ) ⊙ (dy Bᵀ) summed per
group, no weight gradient formed. Low-rank task vectors take the torch implementation on every device (stock
GEMMs, as the ungrouped low-rank ops). The triton and cuda implementations (KernelGrouped) run segmented
kernels: kernels/atlas_linear_grouped.py and csrc/atlas_linear.cu (rows sorted into one-group segments; the
merged tile built per tile's group), except for the groups whose own row count the cost model of plan.py would
run merge-once: their layer is merged by the backend's merge kernel and their rows go through a stock GEMM, in
the forward and again for dx; dc is the fused per-group reduction for every group. Convs with groups=1 run the
same kernels on their im2col rows; grouped (depthwise) convs and the generic blocks (merge_blocks_grouped: one
(G, T)·(T, numel) GEMM per block, on whatever device the tensors are) take the torch implementation on every
backend.

int8 and int4 banks (quant.QuantizedBlock): the segmented kernels and the merge-once merges read the quantised
tiles and dequantise them in registers, as the ungrouped kernels do. The torch implementation walks the bank
with the ungrouped torch backend's chunk walk, and where it needs a task vector on its own ("rowscale", the
generic blocks) it dequantises that one task vector of that one block, as transient as a merged weight, never
the bank.
"""
import torch
import torch.nn.functional as F

from ..bank import lowrank
from ..bank.quant import is_quantized, unpack
from ..ops.hashing import cached_partition_index
from . import plan, resolve
from .im2col import out_size, patches, rows, unpatch
from .torch_backend import merge_and_reduce, merge_block, reduce_block

# The cost ratio of a merge multiply-add (it streams its bank element from memory) to a GEMM multiply-add (it
# reuses its operands from cache), measured with the torch implementation on a 2-core CPU. One 3072×768 layer,
# T = 8, 4 groups: "rowscale" 3-6x faster at 8 rows per group, "merge" faster for both bank dtypes at 128. The
# whole ViT-B/32, T = 4, 16 groups of one image (50 rows each): "rowscale" 3.2x (float32 bank) and 4x (bfloat16)
# faster; 4 groups of 100 rows: within noise of each other. Not measured on a GPU.
ROWS_PER_MERGE = 128


def _groups(index, G):
    """[(g, samples of g)] for the groups that have samples: a slice when the index is sorted (AtlasModel sorts
    its samples by group, so every group is a contiguous run and takes no gather), else an index tensor."""
    counts = torch.bincount(index, minlength=G).tolist()
    if index.numel() < 2 or bool((index[1:] >= index[:-1]).all()):
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        return [(g, slice(starts[g], starts[g + 1])) for g in range(G) if counts[g]]
    order = torch.argsort(index, stable=True)
    return [(g, sel) for g, sel in enumerate(order.split(counts)) if counts[g]]


def _take(t, samples):
    return t[samples] if isinstance(samples, slice) else t.index_select(0, samples)


def _put(t, samples, value):
    if isinstance(samples, slice):
        t[samples] = value
    else:
        t.index_copy_(0, samples, value)


def linear_strategy(rows_total, groups_present, partitions, tau=None):
    """"rowscale", "factored" (low-rank tau) or "merge" for a grouped linear call (see the module docstring)."""
    if lowrank.is_lowrank(tau):
        return "factored" if lowrank.factored(rows_total / max(groups_present, 1), tau.rows, tau.cols) else "merge"
    if partitions == 1 and rows_total < ROWS_PER_MERGE * groups_present:
        return "rowscale"
    return "merge"


def _merged_bias(bias, tau_b, coef_b, key_b, dtype):
    if bias is None:
        return None
    return (merge_block(bias, tau_b, coef_b, key_b) if tau_b is not None else bias).to(dtype)


def _row_groups(index, rows_per_sample):
    return index.repeat_interleave(rows_per_sample) if rows_per_sample != 1 else index


def _task_vector(tau, t, dtype):
    """τ_t of a block, shaped like the block, in dtype: a view of a float bank's, or a quantised bank's t-th task
    vector dequantised on its own."""
    if is_quantized(tau):
        return tau.index_select(0, torch.tensor([t], device=tau.device)).dequantize(dtype)[0]
    return tau[t].to(dtype)


class TorchGrouped:
    """The grouped ops from stock torch ops (reference path; CPU)."""

    name = "torch"

    def atlas_linear(self, x, index, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b):
        G, T, P = coef_w.shape
        S = x.shape[0]
        x2 = x.reshape(-1, x.shape[-1])
        R = x2.shape[0] // S if S else 1
        groups_of = _groups(index, G)
        strategy = linear_strategy(x2.shape[0], len(groups_of), P, tau_w)
        if strategy != "merge":
            per_row = self._factored if strategy == "factored" else self._rowscale
            y = per_row(x2, _row_groups(index, R), weight, bias, tau_w, tau_b, coef_w, coef_b)
            return y.view(*x.shape[:-1], weight.shape[0])
        y = x.new_empty((*x.shape[:-1], weight.shape[0]))
        for g, samples in groups_of:
            w = merge_block(weight, tau_w, coef_w[g], key_w).to(x.dtype)
            b = _merged_bias(bias, tau_b, coef_b[g] if coef_b is not None else None, key_b, x.dtype)
            _put(y, samples, F.linear(_take(x, samples), w, b))
            del w
        return y

    @staticmethod
    def _factored(x2, row_group, weight, bias, tau_w, tau_b, coef_w, coef_b):
        c = lowrank.term_coefficients(tau_w, coef_w, x2.dtype).index_select(0, row_group)      # (M, T·r)
        y = lowrank.linear_rows(x2, weight, bias.to(x2.dtype) if bias is not None else None, tau_w, c)
        return TorchGrouped._add_bias_rows(y, row_group, tau_b, coef_b)

    @staticmethod
    def _rowscale(x2, row_group, weight, bias, tau_w, tau_b, coef_w, coef_b):
        c = coef_w[:, :, 0].index_select(0, row_group).to(x2.dtype)          # (M, T)
        y = F.linear(x2, weight.to(x2.dtype), bias.to(x2.dtype) if bias is not None else None)
        for t in range(tau_w.shape[0]):
            y.addcmul_(c[:, t:t + 1], F.linear(x2, _task_vector(tau_w, t, x2.dtype)))
        return TorchGrouped._add_bias_rows(y, row_group, tau_b, coef_b)

    @staticmethod
    def _add_bias_rows(y, row_group, tau_b, coef_b):
        """y += Σ_t c_b[g(m), t] τ'_t on every row m of a P = 1 bias (nothing without bias task vectors)."""
        if tau_b is not None:
            y.addmm_(coef_b[:, :, 0].index_select(0, row_group).to(y.dtype), tau_b.to(y.dtype))
        return y

    def atlas_linear_backward(self, grad_out, x, index, weight, tau_w, tau_b, coef_w, key_w, key_b,
                              needs_input_grad):
        G, T, P = coef_w.shape
        S = x.shape[0]
        gy = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        R = x2.shape[0] // S if S else 1
        groups_of = _groups(index, G)
        acc = coef_w.dtype
        strategy = linear_strategy(x2.shape[0], len(groups_of), P, tau_w)
        if strategy == "factored":
            row_group = _row_groups(index, R)
            c = lowrank.term_coefficients(tau_w, coef_w, gy.dtype).index_select(0, row_group)
            grad_x, grad_cw = lowrank.linear_rows_backward(gy, x2, weight, tau_w, c, row_group, G, acc,
                                                           needs_input_grad)
            return ((grad_x.view(x.shape) if needs_input_grad else None), grad_cw,
                    self._bias_grad(gy, row_group, tau_b, G, acc))
        if strategy == "rowscale":
            row_group = _row_groups(index, R)
            c = coef_w[:, :, 0].index_select(0, row_group).to(gy.dtype)
            grad_x = gy @ weight.to(gy.dtype) if needs_input_grad else None
            per_row = torch.empty(x2.shape[0], T, dtype=acc, device=x.device)
            for t in range(T):
                tau = _task_vector(tau_w, t, gy.dtype)
                per_row[:, t] = (F.linear(x2, tau) * gy).sum(1, dtype=acc)
                if needs_input_grad:
                    grad_x.addmm_(gy * c[:, t:t + 1], tau)
            grad_cw = per_row.new_zeros(G, T).index_add_(0, row_group, per_row).unsqueeze(2)
            grad_cb = self._bias_grad(gy, row_group, tau_b, G, acc)
            return (grad_x.view(x.shape) if needs_input_grad else None), grad_cw, grad_cb
        grad_x = torch.empty_like(x) if needs_input_grad else None
        grad_cw = torch.zeros(G, T, P, dtype=acc, device=x.device)
        grad_cb = torch.zeros(G, T, P, dtype=acc, device=x.device) if tau_b is not None else None
        for g, samples in groups_of:
            gy_g = _take(grad_out, samples).reshape(-1, gy.shape[1])
            x_g = _take(x, samples).reshape(-1, x2.shape[1])
            g_weight = gy_g.t() @ x_g
            if needs_input_grad:
                w, grad_cw[g] = merge_and_reduce(weight, tau_w, coef_w[g], key_w, g_weight)
                del g_weight
                _put(grad_x, samples, (gy_g @ w.to(gy.dtype)).view(-1, *x.shape[1:]))
                del w
            else:
                grad_cw[g] = reduce_block(tau_w, g_weight, key_w, P, acc)
                del g_weight
            if tau_b is not None:
                grad_cb[g] = reduce_block(tau_b, gy_g.sum(0, dtype=acc), key_b, P, acc)
        return grad_x, grad_cw, grad_cb

    @staticmethod
    def _bias_grad(gy, row_group, tau_b, G, acc):
        """dc_b (G, T, 1) of a P = 1 bias from its rows' groups, or None without bias task vectors."""
        if tau_b is None:
            return None
        per_row = (gy @ tau_b.to(gy.dtype).t()).to(acc)
        return per_row.new_zeros(G, tau_b.shape[0]).index_add_(0, row_group, per_row).unsqueeze(2)

    def atlas_conv2d(self, x, index, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, conv):
        stride, padding, dilation, groups = conv
        G = coef_w.shape[0]
        groups_of = _groups(index, G)
        y = None
        for g, samples in groups_of:
            w = merge_block(weight, tau_w, coef_w[g], key_w).to(x.dtype)
            b = _merged_bias(bias, tau_b, coef_b[g] if coef_b is not None else None, key_b, x.dtype)
            y_g = F.conv2d(_take(x, samples), w, b, stride, padding, dilation, groups)
            if y is None:
                y = y_g.new_empty((x.shape[0], *y_g.shape[1:]))
            _put(y, samples, y_g)
        if y is None:
            Ho, Wo = out_size(conv, weight, x)
            y = x.new_empty((0, weight.shape[0], Ho, Wo))
        return y

    def atlas_conv2d_backward(self, grad_out, x, index, weight, tau_w, tau_b, coef_w, key_w, key_b, conv,
                              needs_input_grad):
        stride, padding, dilation, groups = conv
        G, T, P = coef_w.shape
        acc = coef_w.dtype
        args = (list(stride), list(padding), list(dilation), False, [0, 0], groups)
        groups_of = _groups(index, G)
        grad_x = torch.empty_like(x) if needs_input_grad else None
        grad_cw = torch.zeros(G, T, P, dtype=acc, device=x.device)
        grad_cb = torch.zeros(G, T, P, dtype=acc, device=x.device) if tau_b is not None else None
        for g, samples in groups_of:
            gy_g, x_g = _take(grad_out, samples), _take(x, samples)
            # The weight gradient does not depend on the weight's values: θ0 stands in for W(c[g]).
            _, g_weight, _ = torch.ops.aten.convolution_backward(gy_g, x_g, weight.to(gy_g.dtype), None, *args,
                                                                 [False, True, False])
            if needs_input_grad:
                w, grad_cw[g] = merge_and_reduce(weight, tau_w, coef_w[g], key_w, g_weight)
                del g_weight
                dx = torch.ops.aten.convolution_backward(gy_g, x_g, w.to(gy_g.dtype), None, *args,
                                                         [True, False, False])[0]
                _put(grad_x, samples, dx)
                del w
            else:
                grad_cw[g] = reduce_block(tau_w, g_weight, key_w, P, acc)
            if tau_b is not None:
                grad_cb[g] = reduce_block(tau_b, gy_g.sum((0, 2, 3), dtype=acc), key_b, P, acc)
        return grad_x, grad_cw, grad_cb


def _merge_grouped_block(theta0, tau, coef, key):
    """θ0 + Σ_t coef[g, t, k(i)] τ_t[i] for every group, (G, numel) in coef's dtype; coef (G, T, P)."""
    G, T, P = coef.shape
    out = theta0.reshape(1, -1).to(coef.dtype).repeat(G, 1)
    if P == 1 and not is_quantized(tau):
        return out.addmm_(coef[:, :, 0], tau.reshape(T, -1).to(coef.dtype))
    part = cached_partition_index(out.shape[1], key, P, out.device).long() if P > 1 else None
    for t in range(T):  # one (G, numel) product per task vector: no (T·P, numel) one-hot bank
        tv = _task_vector(tau, t, coef.dtype).reshape(-1)
        if part is None:
            out.addr_(coef[:, t, 0], tv)
        else:
            out.addcmul_(coef[:, t].index_select(1, part), tv)
    return out


def _reduce_grouped_block(grad, tau, key, partitions, acc):
    """dc (G, T, P) in dtype acc: dc[g, t, k] = Σ_{i : k(i) = k} τ_t[i] grad[g, i]; grad (G, numel)."""
    G, T = grad.shape[0], tau.shape[0]
    grad = grad.reshape(G, -1).to(acc)
    if partitions == 1 and not is_quantized(tau):
        return (grad @ tau.reshape(T, -1).to(acc).t()).unsqueeze(2)
    part = cached_partition_index(grad.shape[1], key, partitions, grad.device).long() if partitions > 1 else None
    dc = grad.new_zeros(G, T, partitions)
    for t in range(T):
        tv = _task_vector(tau, t, acc).reshape(-1)
        if part is None:
            dc[:, t, 0] = grad @ tv
        else:
            dc[:, t].index_add_(1, part, grad * tv)
    return dc


def merge_blocks_grouped(theta0, tau, coef, keys):
    """[θ0_b + Σ_t coef[g, t, b, k(i)] τ_t,b[i] for every group g] as (G, *θ0_b.shape) tensors in θ0's dtype;
    coef (G, T, B, P). One GEMM per block (P = 1) or one (G, numel) product per task vector: meant for the
    small generic blocks, whose G merged copies are small."""
    return [_merge_grouped_block(t0, tv, coef[:, :, b], key).to(t0.dtype).view(coef.shape[0], *t0.shape)
            for b, (t0, tv, key) in enumerate(zip(theta0, tau, keys))]


def merge_blocks_grouped_backward(grads, tau, keys, partitions):
    """dc (G, T, B, P) with dc[g, t, b, k] = Σ_{i in partition k} τ_t,b[i] grads_b[g, i]; float32 (float64 when
    the gradients are)."""
    acc = torch.float64 if grads[0].dtype == torch.float64 else torch.float32
    return torch.stack([_reduce_grouped_block(g, tv, key, partitions, acc) for g, tv, key in zip(grads, tau, keys)],
                       dim=2)


class KernelGrouped(TorchGrouped):
    """The grouped linear ops of a backend with segmented kernels (rows sorted into one-group segments, each tile
    merged with its group's coefficients); a conv with groups=1 runs them on its im2col view (every patch row in
    its sample's group); grouped convs take the torch implementation. The groups whose own row count the cost
    model of plan.py would run merge-once are left out of the kernels' forward and dx: their layer is merged once
    and their rows go through a stock GEMM. A subclass supplies the kernels: _forward, _backward, _merge,
    _block_m and _check."""

    def _merge_once(self, counts, weight, tau_w, coef_w, dtype, which):
        """bool (G,): the groups whose rows the cost model would run merge-once (`which`: "forward" or "dx")."""
        block_m = self._block_m()
        choice = {m: getattr(plan.for_linear(m, weight, tau_w, coef_w[0], dtype, block_m), which) != "fused"
                  for m in set(counts) if m}
        return torch.tensor([bool(m) and choice[m] for m in counts], dtype=torch.bool, device=coef_w.device)

    def _merged_rows(self, out, a, row_group, merge_groups, weight, tau_w, coef_w, key_w, transpose, bias=None):
        """out[rows of g] = a[rows of g] · W(c[g])ᵀ (+ b(c[g])), or · W(c[g]) when `transpose`, for the merge-once
        groups: one merged layer at a time, freed at once."""
        for g in merge_groups:
            rows_g = (row_group == g).nonzero().squeeze(1)
            w = self._merge(weight, tau_w, coef_w[g], key_w, a.dtype)
            out.index_copy_(0, rows_g, a.index_select(0, rows_g) @ w if transpose
                            else F.linear(a.index_select(0, rows_g), w, bias(g) if bias else None))

    def atlas_linear(self, x, index, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b):
        self._check(x, weight, tau_w, coef_w)
        x2 = x.reshape(-1, x.shape[-1])
        R = x2.shape[0] // x.shape[0] if x.shape[0] else 1
        return self._linear_rows(x2, _row_groups(index, R), weight, bias, tau_w, tau_b, coef_w, coef_b, key_w,
                                 key_b).view(*x.shape[:-1], weight.shape[0])

    def _linear_rows(self, x2, row_group, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b):
        counts = torch.bincount(row_group, minlength=coef_w.shape[0]).tolist()
        skip = self._merge_once(counts, weight, tau_w, coef_w, x2.dtype, "forward")
        y = self._forward(x2, row_group, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, skip)
        merge_groups = skip.nonzero().squeeze(1).tolist()
        if merge_groups:
            bias_g = (lambda g: self._merge(bias, tau_b, coef_b[g], key_b, x2.dtype) if tau_b is not None
                      else bias.to(x2.dtype)) if bias is not None else None
            self._merged_rows(y, x2, row_group, merge_groups, weight, tau_w, coef_w, key_w, False, bias_g)
        return y

    def atlas_linear_backward(self, grad_out, x, index, weight, tau_w, tau_b, coef_w, key_w, key_b,
                              needs_input_grad):
        self._check(x, weight, tau_w, coef_w)
        gy = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        row_group = _row_groups(index, x2.shape[0] // x.shape[0] if x.shape[0] else 1)
        skip, merge_groups = None, []
        if needs_input_grad:
            counts = torch.bincount(row_group, minlength=coef_w.shape[0]).tolist()
            skip = self._merge_once(counts, weight, tau_w, coef_w, gy.dtype, "dx")
            merge_groups = skip.nonzero().squeeze(1).tolist()
        grad_x, grad_cw, grad_cb = self._backward(gy, x2, row_group, weight, tau_w, tau_b, coef_w, key_w, key_b,
                                                  needs_input_grad, skip)
        if needs_input_grad:
            self._merged_rows(grad_x, gy, row_group, merge_groups, weight, tau_w, coef_w, key_w, True)
            grad_x = grad_x.view(x.shape)
        return grad_x, grad_cw, grad_cb

    def atlas_conv2d(self, x, index, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, conv):
        if conv[3] != 1:
            return super().atlas_conv2d(x, index, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, conv)
        self._check(x, weight, tau_w, coef_w)
        N = weight.shape[0]
        Ho, Wo = out_size(conv, weight, x)
        cols = patches(x, weight, conv)
        y = self._linear_rows(cols, _row_groups(index, Ho * Wo), weight.reshape(N, -1), bias,
                              tau_w.reshape(*tau_w.shape[:2], -1), tau_b, coef_w, coef_b, key_w, key_b)
        return y.view(x.shape[0], Ho, Wo, N).permute(0, 3, 1, 2).contiguous()

    def atlas_conv2d_backward(self, grad_out, x, index, weight, tau_w, tau_b, coef_w, key_w, key_b, conv,
                              needs_input_grad):
        if conv[3] != 1:
            return super().atlas_conv2d_backward(grad_out, x, index, weight, tau_w, tau_b, coef_w, key_w, key_b,
                                                 conv, needs_input_grad)
        N = weight.shape[0]
        Ho, Wo = out_size(conv, weight, x)
        cols = patches(x, weight, conv)
        dcols, grad_cw, grad_cb = self.atlas_linear_backward(
            rows(grad_out).view(x.shape[0], Ho * Wo, N), cols.view(x.shape[0], Ho * Wo, -1), index,
            weight.reshape(N, -1), tau_w.reshape(*tau_w.shape[:2], -1), tau_b, coef_w, key_w, key_b,
            needs_input_grad)
        grad_x = unpatch(dcols.reshape(-1, cols.shape[1]), x, weight, conv) if needs_input_grad else None
        return grad_x, grad_cw, grad_cb


class TritonGrouped(KernelGrouped):
    """The kernels of kernels/atlas_linear_grouped.py on their Segments (built in Python); the coefficient
    gradient of the bias reduced by the torch implementation from per-group sums of dy."""

    name = "triton"

    @staticmethod
    def _kernels():
        from atlas_fast.kernels import atlas_linear_grouped
        return atlas_linear_grouped

    def _block_m(self):
        return self._kernels().BLOCK_M

    @staticmethod
    def _merge(weight, tau, coef, key, dtype):
        from atlas_fast.kernels import atlas_linear
        return atlas_linear.merge(weight, tau, coef, key, dtype)

    @staticmethod
    def _check(x, weight, tau_w, coef_w):
        if coef_w.dtype != torch.float32 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"backend='triton' takes float32 coefficients and float32/bfloat16/float16 "
                             f"activations, got {coef_w.dtype} and {x.dtype}; use backend='torch' for float64")

    def _forward(self, x2, row_group, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, skip):
        kernels = self._kernels()
        seg = kernels.Segments(row_group, coef_w.shape[0], skip=skip)
        return kernels.forward(x2, row_group, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, segments=seg)

    def _backward(self, gy, x2, row_group, weight, tau_w, tau_b, coef_w, key_w, key_b, needs_input_grad, skip):
        kernels = self._kernels()
        G, T, P = coef_w.shape
        segments = kernels.Segments(row_group, G)
        grad_x = None
        if needs_input_grad:
            seg_dx = kernels.Segments(row_group, G, skip=skip) if bool(skip.any()) else segments
            grad_x = kernels.grad_input(gy, row_group, weight, tau_w, coef_w, key_w, segments=seg_dx)
        grad_cw = kernels.grad_coef(gy, x2, row_group, tau_w, G, P, key_w, segments=segments)
        grad_cb = None
        if tau_b is not None:
            sums = torch.zeros(G, gy.shape[1], dtype=torch.float32, device=gy.device)
            sums.index_add_(0, row_group, gy.float())
            grad_cb = _reduce_grouped_block(sums, tau_b, key_b, P, torch.float32)
        return grad_x, grad_cw, grad_cb


class CudaGrouped(KernelGrouped):
    """The CUDA C++ kernels of csrc/atlas_linear.cu (torch.ops.atlas_fast.atlas_linear_grouped_cuda_*): the same
    fused forward, dx and dc kernels as the ungrouped op, on rows sorted into one-group segments by the op itself;
    the coefficient gradient of the bias is per-group row sums of dy reduced by the merge_blocks backward kernel.
    The merge-once groups are merged by the one-block merge kernel (atlas_linear_cuda_merge)."""

    name = "cuda"

    @staticmethod
    def _block_m():
        from .cuda_backend import BLOCK_M
        return BLOCK_M

    @staticmethod
    def _merge(weight, tau, coef, key, dtype):
        from .cuda_backend import _merge
        return _merge(weight, tau, coef, key, dtype)

    @staticmethod
    def _check(x, weight, tau_w, coef_w):
        from .cuda_backend import _check_dtypes, _dense
        _check_dtypes(coef_w, x, weight, *_dense([tau_w]))

    def _forward(self, x2, row_group, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, skip):
        data, scale, group = unpack(tau_w)
        return torch.ops.atlas_fast.atlas_linear_grouped_cuda_forward(x2, row_group, weight, bias, data, tau_b,
                                                                      coef_w, coef_b, key_w, key_b, skip, scale, group)

    def _backward(self, gy, x2, row_group, weight, tau_w, tau_b, coef_w, key_w, key_b, needs_input_grad, skip):
        data, scale, group = unpack(tau_w)
        grad_x, grad_cw, grad_cb = torch.ops.atlas_fast.atlas_linear_grouped_cuda_backward(
            gy, x2, row_group, weight, data, tau_b, coef_w, key_w, key_b, needs_input_grad, skip, scale, group)
        return (grad_x if needs_input_grad else None), grad_cw, (grad_cb if tau_b is not None else None)


TORCH, TRITON, CUDA = TorchGrouped(), TritonGrouped(), CudaGrouped()
_KERNELS = {"triton": TRITON, "cuda": CUDA}


def implementation(backend, device, dtype):
    """The grouped implementation for a backend name: the kernels of the backend it resolves to ("triton" or
    "cuda"), else the torch implementation."""
    return _KERNELS.get(resolve(backend, device, dtype).name, TORCH)
