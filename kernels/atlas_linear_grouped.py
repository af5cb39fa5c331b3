"""Triton kernels of atlas_linear_grouped: every row of x runs with the coefficients of its own group,
y[m] = x[m] (W0 + Σ_t c[g(m), t] τ_t)ᵀ + (b0 + Σ_t c'[g(m), t] τ'_t), without any merged weight.

The plain-PyTorch path of the same op is the torch backend's (`backends/torch_grouped.py`; per group, the
float64 oracle `atlas_fast.ops.reference.linear_ref`). As multi-adapter serving kernels take an adapter id per
request, these take a group id per row: the launcher sorts the rows into one-group segments (a permutation,
rows are gathered and scattered through it, never copied) and cuts each segment into BLOCK_M tiles, so every
forward/dx program builds the merged tile of exactly one group. This file reads top to bottom: the segment
map → the forward, input-gradient and coefficient-gradient kernels → tile configurations → launchers. The
partition hash, the merged tile and the dot helper are those of kernels/atlas_linear.py.

Shapes: x (M, K) · row_group (M,) int64 in [0, G) · W0 (N, K) · τ (T, N, K) · c (G, T, P) float32 ·
b0 (N,) · τ' (T, N) · c' (G, T, P). Dtypes, accumulation and the int8/int4 weight banks (QUANT, dequantised
in registers) as in kernels/atlas_linear.py.
"""
import torch
import triton
import triton.language as tl

from atlas_fast.bank.quant import is_quantized
from atlas_fast.kernels.common import (
    INTERPRET,
    QUANT_INT4,
    bank_args,
    check_bank,
    check_out,
    dot,
    dot_precision,
    key32,
    max_shared_memory,
    merged_quant_tile,
    merged_tile,
    partition,
    task_strides,
    tau_tile,
    upcast,
)


class Segments:
    """Rows sorted by group and cut into tiles of one group (one host sync to size the grid).

    rows (M,) int32: row indices sorted by group (stable) · seg_start (G + 1,) int32: group g owns
    rows[seg_start[g]:seg_start[g + 1]] · tile_group, tile_start (tiles,) int32: group and first position in
    `rows` of each BLOCK_M tile; a group with m rows has ⌈m / BLOCK_M⌉ tiles, so tiles ≤ ⌈M / BLOCK_M⌉ + G.
    The groups in `skip` (bool (G,)) get no tiles: the forward and dx kernels leave their rows to the caller.
    """

    def __init__(self, row_group, groups, block_m=None, skip=None):
        block_m = BLOCK_M if block_m is None else block_m
        dev = row_group.device
        counts = torch.bincount(row_group, minlength=groups)
        if counts.numel() != groups:
            raise ValueError(f"row_group holds group ids >= {groups}")
        tiles = (counts + block_m - 1) // block_m
        if skip is not None:
            tiles = tiles.masked_fill(skip, 0)
        seg_start = torch.zeros(groups + 1, dtype=torch.int64, device=dev)
        seg_start[1:] = torch.cumsum(counts, 0)
        tile_group = torch.repeat_interleave(torch.arange(groups, device=dev), tiles)
        first_tile = torch.cumsum(tiles, 0) - tiles
        within = torch.arange(tile_group.numel(), device=dev) - first_tile[tile_group]
        self.rows = torch.argsort(row_group, stable=True).to(torch.int32)
        self.seg_start = seg_start.to(torch.int32)
        self.tile_group = tile_group.to(torch.int32)
        self.tile_start = (seg_start[tile_group] + within * block_m).to(torch.int32)
        self.groups, self.block_m = groups, block_m


# Backward, for one linear block and group g with W_g = W0 + Σ_t c[g, t, k(i)] τ_t[i]:
#
#     dx[m]         = dy[m] · W_{g(m)}                                 merged tile of the row tile's group
#     dc[g, t, p]   = Σ_{i : k(i) = p} τ_t[i] · G_g[i]                  G_g = Σ_{m : g(m) = g} dy[m]ᵀ x[m]  (N, K)
#     dc'[g, t, p]  = Σ_{n : k'(n) = p} τ'_t[n] · Σ_{m : g(m) = g} dy[m, n]    (bias; reduced by the launcher)
#
# The dc kernel gives every program one (BLOCK_N × BLOCK_K) tile of G_g for one group: it walks that group's
# segment of rows, accumulates the tile in registers, reduces it against the matching tile of every τ_t and
# stores T·P partial sums in its own slot; the launcher adds the slots of each group in a fixed order
# (deterministic). The bank is read once per group present: G_g differs per group, so its reduction does too.


@triton.jit(do_not_specialize=["key_w", "key_b"])
def atlas_linear_grouped_fwd_kernel(
    x_ptr,           # x (M, K), strides (stride_xm, stride_xk), float32/bf16/fp16
    rows_ptr,        # Segments.rows (M,) int32: rows sorted by group
    seg_start_ptr,   # Segments.seg_start (G + 1,) int32
    tile_group_ptr,  # Segments.tile_group (tiles,) int32
    tile_start_ptr,  # Segments.tile_start (tiles,) int32
    w_ptr,           # W0 (N, K) row-major contiguous
    tau_w_ptr,       # τ (T, N, K) contiguous; int8 (T, N, K) or int4 data (T, N, ⌈K/2⌉) uint8 when QUANT
    scale_w_ptr,     # scales of a quantised τ: (T, N) or (T, N, ⌈K/GROUP⌉) float32; unused when QUANT = 0
    coef_w_ptr,      # c (G, T, P) float32 contiguous
    b_ptr,           # b0 (N,) contiguous; unused unless HAS_BIAS
    tau_b_ptr,       # τ' (T_B, N) contiguous; unused when T_B = 0
    coef_b_ptr,      # c' (G, T_B, P) float32 contiguous; unused when T_B = 0
    y_ptr,           # y (M, N), row stride stride_ym, unit column stride, x's dtype
    N, K,
    stride_xm, stride_xk, stride_ym,
    key_w, key_b,    # block keys as int32 bit patterns of the uint32 keys
    T: tl.constexpr, T_B: tl.constexpr, P: tl.constexpr, HAS_BIAS: tl.constexpr,
    QUANT: tl.constexpr, GROUP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Axis 0 walks the row tiles (sorted by group), so programs running together mostly share a group and
    # read the same bank tiles from L2.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.load(tile_group_ptr + pid_m)
    pos = tl.load(tile_start_ptr + pid_m) + tl.arange(0, BLOCK_M)
    mask_m = pos < tl.load(seg_start_ptr + g + 1)
    rows = tl.load(rows_ptr + pos, mask=mask_m, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    coef_w = coef_w_ptr + g * (T * P)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        flat = offs_n[None, :] * K + offs_k[:, None]
        w = merged_quant_tile(w_ptr, tau_w_ptr, scale_w_ptr, coef_w, flat, offs_n[None, :], offs_k[:, None],
                               mask_k[:, None] & mask_n[None, :], key_w, N, K, T, P, QUANT, GROUP)
        acc = dot(x, w, acc, UPCAST, PRECISION)
    if HAS_BIAS:
        bias = merged_tile(b_ptr, tau_b_ptr, coef_b_ptr + g * (T_B * P), offs_n, mask_n, key_b, N, T_B, P)
        acc += bias[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["key_w"])
def atlas_linear_grouped_dx_kernel(
    dy_ptr,          # dy (M, N), strides (stride_dym, stride_dyn), x's dtype
    rows_ptr,        # Segments.rows (M,) int32
    seg_start_ptr,   # Segments.seg_start (G + 1,) int32
    tile_group_ptr,  # Segments.tile_group (tiles,) int32
    tile_start_ptr,  # Segments.tile_start (tiles,) int32
    w_ptr,           # W0 (N, K) row-major contiguous
    tau_w_ptr,       # τ (T, N, K) contiguous; int8 (T, N, K) or int4 data (T, N, ⌈K/2⌉) uint8 when QUANT
    scale_w_ptr,     # scales of a quantised τ: (T, N) or (T, N, ⌈K/GROUP⌉) float32; unused when QUANT = 0
    coef_w_ptr,      # c (G, T, P) float32 contiguous
    dx_ptr,          # dx (M, K), row stride stride_dxm, unit column stride, x's dtype
    N, K,
    stride_dym, stride_dyn, stride_dxm,
    key_w,           # block key as the int32 bit pattern of the uint32 key
    T: tl.constexpr, P: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    g = tl.load(tile_group_ptr + pid_m)
    pos = tl.load(tile_start_ptr + pid_m) + tl.arange(0, BLOCK_M)
    mask_m = pos < tl.load(seg_start_ptr + g + 1)
    rows = tl.load(rows_ptr + pos, mask=mask_m, other=0).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    coef_w = coef_w_ptr + g * (T * P)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        flat = offs_n[:, None] * K + offs_k[None, :]
        w = merged_quant_tile(w_ptr, tau_w_ptr, scale_w_ptr, coef_w, flat, offs_n[:, None], offs_k[None, :],
                               mask_n[:, None] & mask_k[None, :], key_w, N, K, T, P, QUANT, GROUP)
        acc = dot(dy, w, acc, UPCAST, PRECISION)
    tl.store(dx_ptr + rows[:, None] * stride_dxm + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_k[None, :])


@triton.jit(do_not_specialize=["key_w"])
def atlas_linear_grouped_dc_kernel(
    dy_ptr,          # dy (M, N), strides (stride_dym, stride_dyn), x's dtype
    x_ptr,           # x (M, K), strides (stride_xm, stride_xk), x's dtype
    rows_ptr,        # Segments.rows (M,) int32
    seg_start_ptr,   # Segments.seg_start (G + 1,) int32
    tau_w_ptr,       # τ (T, N, K) contiguous; int8 (T, N, K) or int4 data (T, N, ⌈K/2⌉) uint8 when QUANT
    scale_w_ptr,     # scales of a quantised τ: (T, N) or (T, N, ⌈K/GROUP⌉) float32; unused when QUANT = 0
    partial_ptr,     # partials (G, tiles of G, T, P) float32: one slot per program, every slot written
    N, K, T,
    stride_dym, stride_dyn, stride_xm, stride_xk,
    key_w,           # block key as the int32 bit pattern of the uint32 key
    P: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Axis 0: the (N, K) tile of G_g, K tiles fastest; axis 1: the group g.
    pid_tile = tl.program_id(0)
    g = tl.program_id(1)
    tiles_k = tl.cdiv(K, BLOCK_K)
    offs_n = (pid_tile // tiles_k) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = (pid_tile % tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    seg_lo = tl.load(seg_start_ptr + g)
    seg_hi = tl.load(seg_start_ptr + g + 1)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for p0 in range(seg_lo, seg_hi, BLOCK_M):
        pos = p0 + tl.arange(0, BLOCK_M)
        mask_m = pos < seg_hi
        rows = tl.load(rows_ptr + pos, mask=mask_m, other=0).to(tl.int64)
        dy_t = tl.load(dy_ptr + rows[None, :] * stride_dym + offs_n[:, None] * stride_dyn,
                       mask=mask_n[:, None] & mask_m[None, :], other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(dy_t.to(tl.float32), x.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(dy_t, x, acc)
    flat = offs_n[:, None] * K + offs_k[None, :]
    mask = mask_n[:, None] & mask_k[None, :]
    if P > 1:
        part = partition(flat, key_w, P)
    out_ptr = partial_ptr + (g * tl.num_programs(0) + pid_tile).to(tl.int64) * T * P
    tau_ptr, scale_ptr = tau_w_ptr, scale_w_ptr
    tau_stride, scale_stride = task_strides(N, K, QUANT, GROUP)
    for t in range(T):
        prod = tau_tile(tau_ptr, scale_ptr, flat, offs_n[:, None], offs_k[None, :], mask, K, QUANT, GROUP) * acc
        for p in tl.static_range(P):
            if P == 1:
                s = tl.sum(prod)
            else:
                s = tl.sum(tl.where(part == p, prod, 0.0))
            tl.store(out_ptr + t * P + p, s)
        tau_ptr += tau_stride
        scale_ptr += scale_stride


# ---------------------------------------------------------------- tile configurations

# One configuration per kernel, not autotuned: the segment map depends on BLOCK_M, so BLOCK_M is fixed before
# the launch. On a GPU (BLOCK_M, BLOCK_N, BLOCK_K) = (64, 64, 32) with 4 warps: a row tile of a small group
# wastes at most 63 rows, and the T + 2 tiles of a K step stay small enough for two pipeline stages of a bf16
# bank of 21 (one stage when they do not fit, see _stages). The interpreter's cost is per program: wide tiles.
if INTERPRET:
    BLOCK_M, BLOCK_N, BLOCK_K, WARPS = 32, 64, 64, 4
    DC_BLOCK_M, DC_BLOCK_N, DC_BLOCK_K = 32, 64, 64
else:
    BLOCK_M, BLOCK_N, BLOCK_K, WARPS = 64, 64, 32, 4
    DC_BLOCK_M, DC_BLOCK_N, DC_BLOCK_K = 64, 64, 64


def _stages(act, w, tau, T, quant):
    """2 pipeline stages when their buffers (activation, W0 and T task-vector tiles per stage) fit in shared
    memory, else 1. tau: the kernel's bank data (int4: two values a byte)."""
    if INTERPRET:
        return 1
    tau_bytes = tau.element_size() / (2 if quant == QUANT_INT4 else 1)
    stage = BLOCK_M * BLOCK_K * act.element_size() + BLOCK_N * BLOCK_K * (w.element_size() + T * tau_bytes)
    return 2 if 2 * stage <= max_shared_memory(tau.device) else 1


# ---------------------------------------------------------------- launchers

def _check_groups(what, row_group, M, coef, bank):
    if row_group.dim() != 1 or row_group.shape[0] != M or row_group.dtype != torch.int64:
        raise ValueError(f"{what}: row_group must be int64 ({M},), got {row_group.dtype} {tuple(row_group.shape)}")
    if coef.dim() != 3 or coef.shape[1] != bank.shape[0] or coef.dtype != torch.float32:
        raise ValueError(f"{what}: coefficients must be float32 (G, T={bank.shape[0]}, P), got {coef.dtype} "
                         f"{tuple(coef.shape)}")


def forward(x, row_group, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w=0, key_b=0, segments=None, out=None):
    """y (M, N) with row m computed on the coefficients coef_w[row_group[m]] (G, T, P); `out` optional. Rows of
    the groups `segments` skips are not written."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)}: expected (M, K) and (N, K)")
    _check_groups("forward", row_group, x.shape[0], coef_w, tau_w)
    check_bank("weight", weight, tau_w, coef_w[0])
    M, K = x.shape
    N = weight.shape[0]
    G, T, P = coef_w.shape
    T_B = 0
    if tau_b is not None:
        if bias is None or coef_b is None or coef_b.shape != coef_w.shape:
            raise ValueError("bias: tau_b needs bias and coef_b shaped like coef_w")
        check_bank("bias", bias, tau_b, coef_b[0])
        T_B = T
    y = check_out(out, (M, N), x.dtype, x.device)
    if y.numel() == 0:
        return y
    seg = Segments(row_group, G) if segments is None else segments
    if seg.tile_group.numel() == 0:
        return y
    weight, coef_w = weight.contiguous(), coef_w.contiguous()
    tau_w, scale_w, quant, group = bank_args(tau_w)
    b = bias.contiguous() if bias is not None else weight
    tb = tau_b.contiguous() if tau_b is not None else weight
    cb = coef_b.contiguous() if coef_b is not None else coef_w
    grid = (seg.tile_group.numel(), triton.cdiv(N, BLOCK_N))
    atlas_linear_grouped_fwd_kernel[grid](
        x, seg.rows, seg.seg_start, seg.tile_group, seg.tile_start, weight, tau_w, scale_w, coef_w, b, tb, cb, y,
        N, K, x.stride(0), x.stride(1), y.stride(0), key32(key_w), key32(key_b), T=T, T_B=T_B, P=P,
        HAS_BIAS=bias is not None, QUANT=quant, GROUP=group, UPCAST=upcast(x), PRECISION=dot_precision(),
        BLOCK_M=seg.block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=WARPS,
        num_stages=_stages(x, weight, tau_w, T, quant))
    return y


def grad_input(grad_out, row_group, weight, tau_w, coef_w, key_w=0, segments=None, out=None):
    """dx (M, K) with row m = dy[m] W(coef_w[row_group[m]]); `out` optional. Rows of the groups `segments`
    skips are not written."""
    if grad_out.dim() != 2 or weight.dim() != 2 or grad_out.shape[1] != weight.shape[0]:
        raise ValueError(f"grad_out {tuple(grad_out.shape)} and weight {tuple(weight.shape)}: expected (M, N), (N, K)")
    _check_groups("grad_input", row_group, grad_out.shape[0], coef_w, tau_w)
    check_bank("weight", weight, tau_w, coef_w[0])
    M, N = grad_out.shape
    K = weight.shape[1]
    G, T, P = coef_w.shape
    dx = check_out(out, (M, K), grad_out.dtype, grad_out.device)
    if dx.numel() == 0:
        return dx
    seg = Segments(row_group, G) if segments is None else segments
    if seg.tile_group.numel() == 0:
        return dx
    weight, coef_w = weight.contiguous(), coef_w.contiguous()
    tau_w, scale_w, quant, group = bank_args(tau_w)
    grid = (seg.tile_group.numel(), triton.cdiv(K, BLOCK_K))
    atlas_linear_grouped_dx_kernel[grid](
        grad_out, seg.rows, seg.seg_start, seg.tile_group, seg.tile_start, weight, tau_w, scale_w, coef_w, dx, N,
        K, grad_out.stride(0), grad_out.stride(1), dx.stride(0), key32(key_w), T=T, P=P, QUANT=quant, GROUP=group,
        UPCAST=upcast(grad_out), PRECISION=dot_precision(), BLOCK_M=seg.block_m, BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K, num_warps=WARPS, num_stages=_stages(grad_out, weight, tau_w, T, quant))
    return dx


def grad_coef(grad_out, x, row_group, tau_w, groups, partitions, key_w=0, segments=None):
    """dc (G, T, P) float32: dc[g, t, p] = Σ_{i : k(i) = p} τ_t[i] G_g[i], G_g the dyᵀx of group g's rows.
    Deterministic: per-program partial sums added in a fixed order."""
    if grad_out.dim() != 2 or x.dim() != 2 or grad_out.shape[0] != x.shape[0] or grad_out.dtype != x.dtype:
        raise ValueError(f"grad_out {grad_out.dtype} {tuple(grad_out.shape)} and x {x.dtype} {tuple(x.shape)}: "
                         f"expected (M, N) and (M, K) of one dtype")
    M, N = grad_out.shape
    K = x.shape[1]
    T = tau_w.shape[0]
    if tuple(tau_w.shape) != (T, N, K) or not (is_quantized(tau_w) or tau_w.dtype in (torch.float32, torch.bfloat16,
                                                                                        torch.float16)):
        raise ValueError(f"task vectors {tau_w.dtype} {tuple(tau_w.shape)}: expected float32/bfloat16/float16 "
                         f"(or a QuantizedBlock) (T, {N}, {K})")
    if row_group.dim() != 1 or row_group.shape[0] != M or row_group.dtype != torch.int64:
        raise ValueError(f"row_group must be int64 ({M},), got {row_group.dtype} {tuple(row_group.shape)}")
    seg = Segments(row_group, groups) if segments is None else segments
    tiles = triton.cdiv(N, DC_BLOCK_N) * triton.cdiv(K, DC_BLOCK_K)
    partials = torch.empty(groups, tiles, T, partitions, dtype=torch.float32, device=x.device)
    if M == 0:
        return partials.new_zeros(groups, T, partitions)
    tau_w, scale_w, quant, group = bank_args(tau_w)
    atlas_linear_grouped_dc_kernel[(tiles, groups)](
        grad_out, x, seg.rows, seg.seg_start, tau_w, scale_w, partials, N, K, T, grad_out.stride(0),
        grad_out.stride(1), x.stride(0), x.stride(1), key32(key_w), P=partitions, QUANT=quant, GROUP=group,
        UPCAST=upcast(x), PRECISION=dot_precision(), BLOCK_M=DC_BLOCK_M, BLOCK_N=DC_BLOCK_N, BLOCK_K=DC_BLOCK_K,
        num_warps=WARPS)
    return partials.sum(1)
