"""The torch backend's grouped calls: how samples are grouped, which strategy a linear block takes, and the
strategies that need no merged weight (the per-group merges walk the bank in torch_backend.py).

The torch backend chooses per call between two ways of computing a grouped linear block (contract: base.py):
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
group, no weight gradient formed. Low-rank task vectors take the torch backend on every device (stock GEMMs, as the
ungrouped low-rank ops), and so does an empty batch. The generic blocks (merge_blocks_grouped: one (G, T)·(T, numel)
GEMM per block) run here on whatever device the tensors are, for every backend.

int8 and int4 banks (quant.QuantizedBlock): the per-group merges walk the bank with the ungrouped chunk walk, and
where a strategy needs a task vector on its own ("rowscale", the generic blocks) it dequantises that one task vector
of that one block, as transient as a merged weight, never the bank.
"""
import torch
import torch.nn.functional as F

from ..bank import lowrank
from ..bank.quant import is_quantized
from ..ops.hashing import cached_partition_index

# The cost ratio of a merge multiply-add (it streams its bank element from memory) to a GEMM multiply-add (it
# reuses its operands from cache), measured with the torch backend on a 2-core CPU. One 3072×768 layer,
# T = 8, 4 groups: "rowscale" 3-6x faster at 8 rows per group, "merge" faster for both bank dtypes at 128. The
# whole ViT-B/32, T = 4, 16 groups of one image (50 rows each): "rowscale" 3.2x (float32 bank) and 4x (bfloat16)
# faster; 4 groups of 100 rows: within noise of each other. Not measured on a GPU.
ROWS_PER_MERGE = 128


def groups_of(index, G):
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


def take(t, samples):
    """The samples of one group (a slice or an index tensor from groups_of) of t."""
    return t[samples] if isinstance(samples, slice) else t.index_select(0, samples)


def put(t, samples, value):
    """t[samples] = value for the samples of one group."""
    if isinstance(samples, slice):
        t[samples] = value
    else:
        t.index_copy_(0, samples, value)


def row_groups(index, rows_per_sample):
    """The group of every row when each sample has rows_per_sample rows."""
    return index.repeat_interleave(rows_per_sample) if rows_per_sample != 1 else index


def rows_per_sample(x, rows):
    """How many rows of a (rows, in) view each of x's samples has."""
    return rows // x.shape[0] if x.shape[0] else 1


def linear_strategy(rows_total, groups_present, partitions, tau=None):
    """"rowscale", "factored" (low-rank tau) or "merge" for a grouped linear call (see the module docstring)."""
    if lowrank.is_lowrank(tau):
        return "factored" if lowrank.factored(rows_total / max(groups_present, 1), tau.rows, tau.cols) else "merge"
    if partitions == 1 and rows_total < ROWS_PER_MERGE * groups_present:
        return "rowscale"
    return "merge"


def task_vector(tau, t, dtype):
    """τ_t of a block, shaped like the block, in dtype: a view of a float bank's, or a quantised bank's t-th task
    vector dequantised on its own."""
    if is_quantized(tau):
        return tau.index_select(0, torch.tensor([t], device=tau.device)).dequantize(dtype)[0]
    return tau[t].to(dtype)


# ---------------------------------------------------------------- per-row strategies of a linear block (P = 1)

def linear_rows(strategy, x2, row_group, block):
    """y (M, out) of rows x2 (M, in), row m in group row_group[m], by "rowscale" or "factored"."""
    if strategy == "factored":
        c = lowrank.term_coefficients(block.tau_w, block.coef_w, x2.dtype).index_select(0, row_group)  # (M, T·r)
        y = lowrank.linear_rows(x2, block.weight, _bias(block, x2.dtype), block.tau_w, c)
    else:
        c = block.coef_w[:, :, 0].index_select(0, row_group).to(x2.dtype)          # (M, T)
        y = F.linear(x2, block.weight.to(x2.dtype), _bias(block, x2.dtype))
        for t in range(block.tau_w.shape[0]):
            y.addcmul_(c[:, t:t + 1], F.linear(x2, task_vector(block.tau_w, t, x2.dtype)))
    if block.tau_b is not None:  # y += Σ_t c_b[g(m), t] τ'_t on every row m
        y.addmm_(block.coef_b[:, :, 0].index_select(0, row_group).to(y.dtype), block.tau_b.to(y.dtype))
    return y


def _bias(block, dtype):
    return block.bias.to(dtype) if block.bias is not None else None


def linear_rows_backward(strategy, gy, x2, row_group, block, needs_input_grad):
    """(dx (M, in) or None, dc_w (G, T, 1), dc_b (G, T, 1) or None) of linear_rows."""
    G, T, _ = block.coef_w.shape
    acc = block.coef_w.dtype
    if strategy == "factored":
        c = lowrank.term_coefficients(block.tau_w, block.coef_w, gy.dtype).index_select(0, row_group)
        grad_x, grad_cw = lowrank.linear_rows_backward(gy, x2, block.weight, block.tau_w, c, row_group, G, acc,
                                                       needs_input_grad)
    else:
        c = block.coef_w[:, :, 0].index_select(0, row_group).to(gy.dtype)
        grad_x = gy @ block.weight.to(gy.dtype) if needs_input_grad else None
        per_row = torch.empty(x2.shape[0], T, dtype=acc, device=x2.device)
        for t in range(T):
            tau = task_vector(block.tau_w, t, gy.dtype)
            per_row[:, t] = (F.linear(x2, tau) * gy).sum(1, dtype=acc)
            if needs_input_grad:
                grad_x.addmm_(gy * c[:, t:t + 1], tau)
        grad_cw = per_row.new_zeros(G, T).index_add_(0, row_group, per_row).unsqueeze(2)
    grad_cb = None
    if block.tau_b is not None:
        per_row = (gy @ block.tau_b.to(gy.dtype).t()).to(acc)
        grad_cb = per_row.new_zeros(G, block.tau_b.shape[0]).index_add_(0, row_group, per_row).unsqueeze(2)
    return (grad_x if needs_input_grad else None), grad_cw, grad_cb


# ---------------------------------------------------------------- generic blocks

def merge_grouped_block(theta0, tau, coef, key):
    """θ0 + Σ_t coef[g, t, k(i)] τ_t[i] for every group, (G, numel) in coef's dtype; coef (G, T, P)."""
    G, T, P = coef.shape
    out = theta0.reshape(1, -1).to(coef.dtype).repeat(G, 1)
    if P == 1 and not is_quantized(tau):
        return out.addmm_(coef[:, :, 0], tau.reshape(T, -1).to(coef.dtype))
    part = cached_partition_index(out.shape[1], key, P, out.device).long() if P > 1 else None
    for t in range(T):  # one (G, numel) product per task vector: no (T·P, numel) one-hot bank
        tv = task_vector(tau, t, coef.dtype).reshape(-1)
        if part is None:
            out.addr_(coef[:, t, 0], tv)
        else:
            out.addcmul_(coef[:, t].index_select(1, part), tv)
    return out


def reduce_grouped_block(grad, tau, key, partitions, acc):
    """dc (G, T, P) in dtype acc: dc[g, t, k] = Σ_{i : k(i) = k} τ_t[i] grad[g, i]; grad (G, numel)."""
    G, T = grad.shape[0], tau.shape[0]
    grad = grad.reshape(G, -1).to(acc)
    if partitions == 1 and not is_quantized(tau):
        return (grad @ tau.reshape(T, -1).to(acc).t()).unsqueeze(2)
    part = cached_partition_index(grad.shape[1], key, partitions, grad.device).long() if partitions > 1 else None
    dc = grad.new_zeros(G, T, partitions)
    for t in range(T):
        tv = task_vector(tau, t, acc).reshape(-1)
        if part is None:
            dc[:, t, 0] = grad @ tv
        else:
            dc[:, t].index_add_(1, part, grad * tv)
    return dc


def merge_blocks_grouped(theta0, tau, coef, keys):
    """base.Backend.merge_blocks_grouped: one GEMM per block (P = 1) or one (G, numel) product per task vector,
    meant for the small generic blocks, whose G merged copies are small."""
    return [merge_grouped_block(t0, tv, coef[:, :, b], key).to(t0.dtype).view(coef.shape[0], *t0.shape)
            for b, (t0, tv, key) in enumerate(zip(theta0, tau, keys))]


def merge_blocks_grouped_backward(grads, tau, keys, partitions):
    """base.Backend.merge_blocks_grouped_backward: float32 (float64 when the gradients are)."""
    acc = torch.float64 if grads[0].dtype == torch.float64 else torch.float32
    return torch.stack([reduce_grouped_block(g, tv, key, partitions, acc) for g, tv, key in zip(grads, tau, keys)],
                       dim=2)
