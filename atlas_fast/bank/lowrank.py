"""Low-rank task vectors: τ_t = B_t A_t, kept as the factors and never formed.

A block of parameter shape (rows, *rest) is treated as the matrix (rows, cols), cols = prod(rest), as a linear
weight or the im2col view of a conv weight. For T stacked task vectors of rank r (a task vector of lower rank
is padded with zero factors, which add nothing):

    a   (T, r, cols)    A_t
    bt  (T, r, rows)    B_tᵀ: both factors rank-major, so the T·r rank-one terms of the bank are one (T·r, ·)
                        matrix of each factor, a view: a_cat = a.reshape(T·r, cols), bt_cat likewise

With c_rep the T coefficients each repeated r times (one per rank-one term):

    merged     θ0 + bt_catᵀ diag(c_rep) a_cat                       one GEMM of inner size T·r
    dc         dc_t = Σ_{j ∈ t} Σ_col (bt_cat G)[j, col] a_cat[j, col]  for a block gradient G
    linear     y  = x W0ᵀ + ((x a_catᵀ) ⊙ c_rep) bt_cat             never forms τ nor the merged weight
               dc = Σ_j∈t Σ_m U[m, j] V[m, j]  with U = x a_catᵀ, V = dy bt_catᵀ: never forms G = dyᵀx
               dx = dy W0 + (V ⊙ c_rep) a_cat

Grouped (G coefficient sets, row m in group g(m); c_rep becomes C (M, T·r), row m's terms' coefficients):

    linear     y  = x W0ᵀ + ((x a_catᵀ) ⊙ C) bt_cat                  (linear_rows: one call for every group)
               dc[g] = Σ_{m ∈ g} per-row terms of U ⊙ V              (linear_rows_backward)
    merged     θ0 + bt_catᵀ diag(c_rep[g]) a_cat for every g         (merge_grouped, reduce_grouped)

Every device runs these as stock GEMMs of inner size T·r; the bank is r·(rows + cols) values per task vector
instead of rows·cols. Partitions (K > 1) mask τ element by element and do not factor: low-rank blocks take one
coefficient per task vector and block.
"""
import math

import torch

from .stacked import StackedBlock


def is_lowrank(tau):
    return isinstance(tau, LowRankBlock)


def factorable(shape):
    """Whether a parameter of this shape is factored in a low-rank bank (two or more dimensions)."""
    return len(shape) >= 2 and math.prod(shape) > 0


class LowRankBlock(StackedBlock):
    """T stacked task vectors of one block as factors, shaped (T, *shape) like the dense tensor it replaces."""

    __slots__ = ("a", "bt", "shape")
    _what = "low-rank task vectors"

    def __init__(self, a, bt, shape):
        shape = torch.Size(shape)
        if len(shape) < 3:
            raise ValueError(f"low-rank task vectors of shape {tuple(shape)}: only blocks of two or more "
                             f"dimensions are factored")
        T, rows, cols = shape[0], shape[1], math.prod(shape[2:])
        if a.dim() != 3 or bt.dim() != 3 or a.shape[0] != T or bt.shape[:2] != a.shape[:2] \
                or a.shape[2] != cols or bt.shape[2] != rows:
            raise ValueError(f"low-rank task vectors of shape {tuple(shape)}: factors a {tuple(a.shape)} and bt "
                             f"{tuple(bt.shape)}, expected ({T}, r, {cols}) and ({T}, r, {rows})")
        if a.dtype != bt.dtype or a.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"low-rank task vectors: factors of dtypes {a.dtype} and {bt.dtype}, expected one "
                             f"float dtype")
        if a.device != bt.device:
            raise ValueError(f"low-rank task vectors: factors on {a.device} and {bt.device}")
        self.a, self.bt, self.shape = a, bt, shape

    @classmethod
    def from_factors(cls, b, a, shape):
        """From B (T, rows, r) and A (T, r, cols) with τ_t = (B_t A_t).reshape(shape[1:])."""
        return cls(a, b.transpose(1, 2).contiguous(), shape)

    @property
    def rank(self):
        return self.a.shape[1]

    @property
    def dtype(self):
        return self.a.dtype

    @property
    def device(self):
        return self.a.device

    @property
    def nbytes(self):
        return (self.a.numel() + self.bt.numel()) * self.a.element_size()

    def a_cat(self, dtype):
        """(T·r, cols) of `dtype`: the rank-one terms' right factors, a view when the dtype matches."""
        return self.a.reshape(-1, self.cols).to(dtype)

    def bt_cat(self, dtype):
        """(T·r, rows) of `dtype`: the rank-one terms' left factors."""
        return self.bt.reshape(-1, self.rows).to(dtype)

    def _with_shape(self, shape):
        return LowRankBlock(self.a, self.bt, shape)

    def to(self, device=None, dtype=None):
        return LowRankBlock(self.a.to(device=device, dtype=dtype), self.bt.to(device=device, dtype=dtype),
                            self.shape)

    def index_select(self, dim, index):
        """The task vectors at `index` (dim 0 only)."""
        if dim != 0:
            raise ValueError(f"low-rank task vectors select along the task axis (dim 0), not dim {dim}")
        return LowRankBlock(self.a.index_select(0, index), self.bt.index_select(0, index),
                            (len(index), *self.shape[1:]))

    def dense(self, dtype=torch.float32):
        """The (T, *shape) tensor of the task vectors (tests, conversions; the ops never form it)."""
        return torch.bmm(self.bt.transpose(1, 2).to(dtype), self.a.to(dtype)).view(self.shape)

    def __repr__(self):
        return f"LowRankBlock(rank {self.rank}, shape={tuple(self.shape)}, {self.dtype}, {self.device})"


def stack(parts, shape):
    """One LowRankBlock of per-task (B, A) pairs (None: a zero task vector), ranks padded with zero factors to
    the largest; shape: the block's parameter shape."""
    rows, cols = shape[0], math.prod(shape[1:])
    given = [p[1] for p in parts if p is not None]   # the A factors
    r = max([1] + [a.shape[0] for a in given])
    dtype, device = (given[0].dtype, given[0].device) if given else (torch.float32, None)
    a = torch.zeros(len(parts), r, cols, dtype=dtype, device=device)
    bt = torch.zeros(len(parts), r, rows, dtype=dtype, device=device)
    for t, p in enumerate(parts):
        if p is not None:
            b_t, a_t = p
            a[t, :a_t.shape[0]] = a_t.reshape(a_t.shape[0], cols)
            bt[t, :b_t.shape[1]] = b_t.t()
    return LowRankBlock(a, bt, (len(parts), *shape))


def truncate(tau, rank=None, energy=None):
    """The truncated SVD of one task vector tau (rows, *rest) as (B (rows, r), A (r, cols), energy kept): rank r
    given (at most τ's numerical rank), or the smallest r keeping `energy` of ‖τ‖² (Σ σ_kept² / Σ σ²). float32
    factors, computed in float64."""
    if (rank is None) == (energy is None):
        raise ValueError("truncate: give rank= or energy=, one of them")
    m = tau.detach().reshape(tau.shape[0], -1).to(torch.float64)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    sq = s.square()
    total = float(sq.sum())
    if rank is None:
        if not 0 < energy <= 1:
            raise ValueError(f"truncate: energy={energy}, expected a fraction in (0, 1]")
        kept = torch.cumsum(sq, 0) / total if total > 0 else torch.ones_like(sq)
        rank = min(len(s), int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype))) + 1)
    elif not isinstance(rank, int) or rank < 1:
        raise ValueError(f"truncate: rank={rank!r}, expected an int >= 1")
    # Beyond the numerical rank the factors would be rounding noise: never keep more terms than that.
    numerical = int((s > s[0] * max(m.shape) * torch.finfo(torch.float64).eps).sum()) if len(s) else 0
    r = min(rank, max(1, numerical))
    frac = float(sq[:r].sum()) / total if total > 0 else 1.0
    return (u[:, :r] * s[:r]).to(torch.float32), vh[:r].to(torch.float32), frac


# ---------------------------------------------------------------- the computations

def term_coefficients(block, coef, dtype):
    """(..., T·r) the coefficient of each rank-one term; coef (T, 1), or (G, T, 1) for G sets."""
    if coef.dim() not in (2, 3) or tuple(coef.shape[-2:]) != (block.shape[0], 1):
        raise ValueError(f"low-rank task vectors {tuple(block.shape)}: coefficients of shape {tuple(coef.shape)}, "
                         f"expected ({block.shape[0]}, 1): partitions do not apply to a factored τ")
    return coef[..., 0].to(dtype).repeat_interleave(block.rank, dim=-1)


def merge(theta0, block, coef):
    """θ0 + Σ_t c_t B_t A_t shaped like θ0, in coef's dtype. coef (T, 1)."""
    dtype = coef.dtype
    a = block.a_cat(dtype) * term_coefficients(block, coef, dtype)[:, None]
    merged = torch.addmm(theta0.reshape(block.rows, -1).to(dtype), block.bt_cat(dtype).t(), a)
    return merged.view(theta0.shape)


def reduce(block, g, acc=torch.float32):
    """dc (T, 1) in dtype acc: dc_t = ⟨B_t A_t, g⟩ for a block gradient g shaped like the block."""
    p = block.bt_cat(acc) @ g.reshape(block.rows, -1).to(acc)            # (T·r, cols)
    per_term = (p * block.a_cat(acc)).sum(1)
    return per_term.view(block.shape[0], block.rank).sum(1, keepdim=True)


def merge_grouped(theta0, block, coef):
    """(G, *θ0.shape): θ0 + Σ_t c[g, t] B_t A_t for every group g, in coef's dtype. coef (G, T, 1)."""
    dtype = coef.dtype
    a = block.a_cat(dtype) * term_coefficients(block, coef, dtype)[:, :, None]       # (G, T·r, cols)
    merged = torch.matmul(block.bt_cat(dtype).t(), a).add_(theta0.reshape(block.rows, -1).to(dtype))
    return merged.view(coef.shape[0], *theta0.shape)


def reduce_grouped(block, g, acc=torch.float32):
    """dc (G, T, 1) in dtype acc: dc[g, t] = ⟨B_t A_t, g[g]⟩ for block gradients g (G, *block shape)."""
    p = torch.matmul(block.bt_cat(acc), g.reshape(g.shape[0], block.rows, -1).to(acc))   # (G, T·r, cols)
    per_term = (p * block.a_cat(acc)).sum(2)
    return per_term.view(g.shape[0], block.shape[0], block.rank).sum(2, keepdim=True)


def factored(m, rows, cols):
    """Whether a linear forward of m input rows adds Σ c (x Aᵀ) Bᵀ (m·Tr·(rows + cols) multiply-adds) rather
    than merging its weight first (Tr·rows·cols, then the one GEMM it needs anyway)."""
    return m * (rows + cols) <= rows * cols


def linear(x, weight, bias, block, coef):
    """y = x (W0 + Σ_t c_t B_t A_t)ᵀ + bias (bias merged already)."""
    x2 = x.reshape(-1, x.shape[-1])
    bias = None if bias is None else bias.to(x.dtype)
    if not factored(x2.shape[0], block.rows, block.cols):
        return torch.nn.functional.linear(x, merge(weight, block, coef).to(x.dtype), bias)
    y = linear_rows(x2, weight, bias, block, term_coefficients(block, coef, x.dtype))
    return y.view(*x.shape[:-1], block.rows)


def linear_rows(x2, weight, bias, block, c_terms):
    """y = x2 W0ᵀ + ((x2 a_catᵀ) ⊙ c_terms) bt_cat + bias for rows x2 (M, cols); c_terms (T·r,) for every row, or
    (M, T·r) a row's own (grouped calls: its group's)."""
    u = x2 @ block.a_cat(x2.dtype).t()
    u.mul_(c_terms)
    y = torch.nn.functional.linear(x2, weight.to(x2.dtype), bias)
    return y.addmm_(u, block.bt_cat(x2.dtype))


def linear_rows_backward(dy, x2, weight, block, c_terms, row_group, groups, acc, needs_input_grad):
    """(dx (M, cols) or None, dc (groups, T, 1) in dtype acc) of linear_rows, with dc[g] summed over the rows
    whose row_group is g (row_group None: every row in group 0 of 1)."""
    u = x2 @ block.a_cat(x2.dtype).t()                                   # (M, T·r)
    v = dy @ block.bt_cat(dy.dtype).t()                                  # (M, T·r)
    per_row = u.to(acc) * v.to(acc)
    per_term = (per_row.sum(0, keepdim=True) if row_group is None
                else per_row.new_zeros(groups, per_row.shape[1]).index_add_(0, row_group, per_row))
    dc = per_term.view(groups, block.shape[0], block.rank).sum(2, keepdim=True)
    if not needs_input_grad:
        return None, dc
    dx = dy @ weight.to(dy.dtype)
    return dx.addmm_(v.mul_(c_terms.to(v.dtype)), block.a_cat(dy.dtype)), dc


def linear_backward(grad_out, x, weight, block, coef, needs_input_grad):
    """(dx or None, dc (T, 1) in coef's dtype) of linear(); dy = grad_out."""
    dy = grad_out.reshape(-1, grad_out.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    # V is at hand: m·Tr·cols to add (V ⊙ c) A, against Tr·rows·cols to merge
    factored_dx = needs_input_grad and x2.shape[0] <= block.rows
    dx, dc = linear_rows_backward(dy, x2, weight, block, term_coefficients(block, coef, dy.dtype), None, 1,
                                  coef.dtype, factored_dx)
    if not needs_input_grad:
        return None, dc[0]
    if not factored_dx:
        dx = dy @ merge(weight, block, coef).to(dy.dtype)
    return dx.view(x.shape), dc[0]


def fingerprint(block):
    """(‖τ_t‖², Σ τ_t) per task vector in float64, from the factors: ‖B A‖² = ⟨BᵀB, A Aᵀ⟩ and 1ᵀ B A 1."""
    a, bt = block.a.to(torch.float64), block.bt.to(torch.float64)
    sq = (torch.bmm(bt, bt.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))).sum((1, 2))
    total = (bt.sum(2) * a.sum(2)).sum(1)
    return sq, total
