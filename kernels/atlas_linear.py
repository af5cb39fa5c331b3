"""Triton kernels of atlas_linear: y = x (W0 + Σ_t c_t τ_t)ᵀ + (b0 + Σ_t c'_t τ'_t) without a merged weight,
and the merge kernel of the merge-once strategy for large M.

The plain-PyTorch reference of the same op is `atlas_fast.backends.torch_backend` (and the float64 oracle
`atlas_fast.ops.reference.linear_ref`). This file reads top to bottom: shared `@triton.jit` helpers (partition
hash, merged tile) → the forward, input-gradient and coefficient-gradient kernels → the merge kernel →
tile configurations → their launchers.

Shapes: x (M, K) · W0 (N, K) · τ (T, N, K) · c (T, P) float32 · b0 (N,) · τ' (T, N) · c' (T, P).
W0, τ, b0, τ' are row-major contiguous, so element (n, k) of the weight has the flat index n·K + k that the
partition hash of `atlas_fast.ops.hashing` is defined on. Banks may be float32, bfloat16 or float16; activations
float32, bfloat16 or float16. Merging and every reduction accumulate in float32; outputs have x's dtype.

Weight banks may also be quantised (atlas_fast.bank.quant.QuantizedBlock; the constexpr QUANT says which): int8
(T, N, K) with float32 scales (T, N), or int4 packed two a byte (T, N, ⌈K/2⌉) with float32 scales
(T, N, ⌈K/GROUP⌉). The kernels load the int8/int4 tile and its scales and dequantise in registers (tau_tile);
no dequantised τ exists in memory. Bias banks are always float.

Under TRITON_INTERPRET=1 (CPU tests) every kernel runs one fixed tile configuration and upcasts both
tl.dot operands to float32, because the interpreter's tl.dot on bfloat16 operands is wrong.
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

# Backward, for one linear block with W(c) = W0 + Σ_t c[t, k(i)] τ_t[i] and G = dyᵀx (N, K):
#
#     dx            = dy · W(c)                                  (M, N)·(N, K): merged tile, as in the forward
#     dc[t, p]      = Σ_{i : k(i) = p} τ_t[i] · G[i]             G[n, k] = Σ_m dy[m, n] x[m, k]
#     dc'[t, p]     = Σ_{n : k'(n) = p} τ'_t[n] · Σ_m dy[m, n]   (bias; an N-vector, reduced by the launcher)
#
# The dc kernel gives every program one (BLOCK_N × BLOCK_K) tile of G and one slice of the rows m: it
# accumulates its part of G in registers over its rows, reduces it against the matching tile of every τ_t
# and emits T·P partial sums. Because dc is linear in G, the partial sums of all programs add up to dc;
# G itself is never written. Deterministic mode stores the partials in a per-program buffer and sums it in
# a fixed order; atomic mode adds them into dc with tl.atomic_add (order, hence rounding, varies per run).


@triton.jit(do_not_specialize=["key_w", "key_b"])
def atlas_linear_fwd_kernel(
    x_ptr,       # x (M, K), strides (stride_xm, stride_xk), float32/bf16/fp16
    w_ptr,       # W0 (N, K) row-major contiguous
    tau_w_ptr,   # τ (T, N, K) contiguous; int8 (T, N, K) or int4 data (T, N, ⌈K/2⌉) uint8 when QUANT
    scale_w_ptr,  # scales of a quantised τ: (T, N) or (T, N, ⌈K/GROUP⌉) float32; unused when QUANT = 0
    coef_w_ptr,  # c (T, P) float32 contiguous
    b_ptr,       # b0 (N,) contiguous; unused unless HAS_BIAS
    tau_b_ptr,   # τ' (T_B, N) contiguous; unused when T_B = 0
    coef_b_ptr,  # c' (T_B, P) float32 contiguous; unused when T_B = 0
    y_ptr,       # y (M, N), row stride stride_ym, unit column stride, x's dtype
    M, N, K,
    stride_xm, stride_xk, stride_ym,
    key_w, key_b,  # block keys as int32 bit patterns of the uint32 keys
    T: tl.constexpr, T_B: tl.constexpr, P: tl.constexpr, HAS_BIAS: tl.constexpr,
    QUANT: tl.constexpr, GROUP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Axis 0 (the fastest-launched) walks the M tiles, so the programs running together share one
    # N tile and read its T task-vector tiles from L2 rather than from memory.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # The merged tile is loaded transposed, (BLOCK_K, BLOCK_N), indexed by the flat n·K + k.
        flat = offs_n[None, :] * K + offs_k[:, None]
        w = merged_quant_tile(w_ptr, tau_w_ptr, scale_w_ptr, coef_w_ptr, flat, offs_n[None, :], offs_k[:, None],
                               mask_k[:, None] & mask_n[None, :], key_w, N, K, T, P, QUANT, GROUP)
        acc = dot(x, w, acc, UPCAST, PRECISION)
    if HAS_BIAS:
        bias = merged_tile(b_ptr, tau_b_ptr, coef_b_ptr, offs_n, mask_n, key_b, N, T_B, P)
        acc += bias[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["key_w"])
def atlas_linear_dx_kernel(
    dy_ptr,      # dy (M, N), strides (stride_dym, stride_dyn), x's dtype
    w_ptr,       # W0 (N, K) row-major contiguous
    tau_w_ptr,   # τ (T, N, K) contiguous; int8 (T, N, K) or int4 data (T, N, ⌈K/2⌉) uint8 when QUANT
    scale_w_ptr,  # scales of a quantised τ: (T, N) or (T, N, ⌈K/GROUP⌉) float32; unused when QUANT = 0
    coef_w_ptr,  # c (T, P) float32 contiguous
    dx_ptr,      # dx (M, K), row stride stride_dxm, unit column stride, x's dtype
    M, N, K,
    stride_dym, stride_dyn, stride_dxm,
    key_w,       # block key as the int32 bit pattern of the uint32 key
    T: tl.constexpr, P: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Same launch order as the forward: programs running together share one K tile of the bank.
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        flat = offs_n[:, None] * K + offs_k[None, :]
        w = merged_quant_tile(w_ptr, tau_w_ptr, scale_w_ptr, coef_w_ptr, flat, offs_n[:, None], offs_k[None, :],
                               mask_n[:, None] & mask_k[None, :], key_w, N, K, T, P, QUANT, GROUP)
        acc = dot(dy, w, acc, UPCAST, PRECISION)
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_k[None, :])


@triton.jit(do_not_specialize=["key_w"])
def atlas_linear_dc_kernel(
    dy_ptr,      # dy (M, N), strides (stride_dym, stride_dyn), x's dtype
    x_ptr,       # x (M, K), strides (stride_xm, stride_xk), x's dtype
    tau_w_ptr,   # τ (T, N, K) contiguous; int8 (T, N, K) or int4 data (T, N, ⌈K/2⌉) uint8 when QUANT
    scale_w_ptr,  # scales of a quantised τ: (T, N) or (T, N, ⌈K/GROUP⌉) float32; unused when QUANT = 0
    dc_ptr,      # DETERMINISTIC: partials (programs, T, P) float32, one row per program, rows of idle programs
                 # left as they are (zero); else dc (T, P) float32, zeroed, accumulated atomically
    M, N, K, T,
    stride_dym, stride_dyn, stride_xm, stride_xk,
    key_w,       # block key as the int32 bit pattern of the uint32 key
    P: tl.constexpr, DETERMINISTIC: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_M: tl.constexpr,
):
    # Axis 0: the (N, K) tile of G, K tiles fastest; axis 1: which of SPLIT_M slices of the rows m.
    pid_tile = tl.program_id(0)
    pid_split = tl.program_id(1)
    tiles_k = tl.cdiv(K, BLOCK_K)
    offs_n = (pid_tile // tiles_k) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = (pid_tile % tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    rows = tl.cdiv(tl.cdiv(M, BLOCK_M), SPLIT_M) * BLOCK_M
    m_start = pid_split * rows
    m_end = tl.minimum(m_start + rows, M)
    g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        dy_t = tl.load(dy_ptr + offs_m[None, :] * stride_dym + offs_n[:, None] * stride_dyn,
                       mask=mask_n[:, None] & mask_m[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:
            g = tl.dot(dy_t.to(tl.float32), x.to(tl.float32), g, input_precision=PRECISION)
        else:
            g = tl.dot(dy_t, x, g)
    flat = offs_n[:, None] * K + offs_k[None, :]
    mask = mask_n[:, None] & mask_k[None, :]
    if P > 1:
        part = partition(flat, key_w, P)
    if DETERMINISTIC:
        out_ptr = dc_ptr + (pid_split * tl.num_programs(0) + pid_tile).to(tl.int64) * T * P
    else:
        out_ptr = dc_ptr
    tau_ptr, scale_ptr = tau_w_ptr, scale_w_ptr
    tau_stride, scale_stride = task_strides(N, K, QUANT, GROUP)
    for t in range(T):
        prod = tau_tile(tau_ptr, scale_ptr, flat, offs_n[:, None], offs_k[None, :], mask, K, QUANT, GROUP) * g
        for p in tl.static_range(P):
            if P == 1:
                s = tl.sum(prod)
            else:
                s = tl.sum(tl.where(part == p, prod, 0.0))
            if DETERMINISTIC:
                tl.store(out_ptr + t * P + p, s)
            else:
                tl.atomic_add(out_ptr + t * P + p, s)
        tau_ptr += tau_stride
        scale_ptr += scale_stride


# Merge once, for large M (atlas_fast/backends/plan.py decides per call): the fused kernels above rebuild
# every merged tile once per M tile, ⌈M / BLOCK_M⌉ · T · N·K multiply-adds and as many τ re-reads from L2.
# This kernel builds W(c) = θ0 + Σ_t c[t, k(i)] τ_t once, into a transient buffer in the activation dtype,
# for a stock GEMM (y = x W(c)ᵀ, and dx = dy W(c) in the backward). Its gradient with respect to c is the
# dc reduction above (dc[t, p] = Σ_{i : k(i) = p} τ_t[i] G[i]): the same kernel serves both strategies.
@triton.jit(do_not_specialize=["key"])
def atlas_linear_merge_kernel(
    theta_ptr,   # θ0 of the block, contiguous, numel = rows·K elements, float32/bf16/fp16
    tau_ptr,     # τ (T, numel) contiguous, float32/bf16/fp16; int8 or int4 data (module docstring) when QUANT
    scale_ptr,   # scales of a quantised τ (module docstring); unused when QUANT = 0
    coef_ptr,    # c (T, P) float32 contiguous
    out_ptr,     # W(c), numel elements contiguous, in the activation dtype
    numel, K,    # K: the columns of a row (the input dimension; 1 for a float bank, where rows do not matter)
    key,         # block key as the int32 bit pattern of the uint32 key
    T: tl.constexpr, P: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr,
):
    flat = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = flat < numel
    merged = merged_quant_tile(theta_ptr, tau_ptr, scale_ptr, coef_ptr, flat, flat // K, flat % K, mask, key,
                                numel // K, K, T, P, QUANT, GROUP)
    tl.store(out_ptr + flat, merged.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- tile configurations

# Forward and dx tiles for Hopper (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): 64-128 wide, 4-8 warps.
# The T task-vector tiles of a K step are loaded together with the W0 and x tiles, so each pipeline stage
# holds T + 2 tiles in shared memory: the 3-4 stage configurations fit small banks, the 2-stage ones with
# 32-deep K steps a bf16 bank of 21, the single-stage ones any T (see _fits_shared_memory).
HOPPER_GEMM_TILES = [(128, 128, 64, 8, 3), (128, 128, 32, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3),
                     (64, 64, 64, 4, 4), (128, 64, 32, 4, 2), (64, 64, 32, 4, 2), (128, 128, 64, 8, 1),
                     (128, 64, 32, 4, 1)]

# dc tiles for Hopper (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_M, num_warps, num_stages): each program holds a
# (BLOCK_N × BLOCK_K) float32 tile of G; SPLIT_M slices of the rows give enough programs to fill the 132 SMs
# of an H200 when N·K has few tiles, at the price of re-reading the τ tiles once per slice.
HOPPER_DC_TILES = [(64, 128, 128, 1, 8, 3), (64, 128, 128, 4, 8, 3), (64, 64, 128, 4, 4, 3),
                   (64, 128, 64, 8, 4, 3), (32, 64, 64, 8, 4, 4)]


def _gemm_configs(tiles):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in tiles]


def _dc_configs(tiles):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_M": sm}, num_warps=w, num_stages=s)
            for bm, bn, bk, sm, w, s in tiles]


def _fits_shared_memory(configs, named_args, **kwargs):
    """The forward/dx configurations whose pipeline fits in the device's shared memory, so the autotuner
    does not compile the others. Each of the num_stages buffers holds one activation tile (BLOCK_M × the
    reduction tile), one W0 tile and T task-vector tiles (BLOCK_N × BLOCK_K); a single-stage configuration
    buffers nothing of the bank and always fits. The estimate is within about 10% of the sm_90 compiler's
    count; a configuration that still does not fit fails at load and the autotuner skips it."""
    forward = "x_ptr" in named_args
    act = named_args["x_ptr"] if forward else named_args["dy_ptr"]
    w, tau = named_args["w_ptr"], named_args["tau_w_ptr"]
    tau_bytes = tau.element_size() / (2 if kwargs.get("QUANT") == QUANT_INT4 else 1)   # int4: two values a byte
    limit = max_shared_memory(tau.device)
    kept = []
    for config in configs:
        c = config.kwargs
        reduction = c["BLOCK_K"] if forward else c["BLOCK_N"]
        stage = (c["BLOCK_M"] * reduction * act.element_size()
                 + c["BLOCK_N"] * c["BLOCK_K"] * (w.element_size() + kwargs["T"] * tau_bytes))
        if config.num_stages == 1 or config.num_stages * stage <= limit:
            kept.append(config)
    return kept


if INTERPRET:
    # The interpreter's cost is per program and per K step, not per element: wide tiles run fastest. Two
    # slices of the rows in dc, so that tests on the CPU exercise the split and its empty slices.
    _GEMM_CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64})]
    _DC_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_M": 2})]
else:
    _GEMM_CONFIGS = _gemm_configs(HOPPER_GEMM_TILES)
    _DC_CONFIGS = _dc_configs(HOPPER_DC_TILES)

# The merge streams θ0 and the bank once and does T multiply-adds per element: a memory-bound elementwise
# kernel, one configuration. Each program handles MERGE_BLOCK elements (16 per thread with 4 warps on a GPU);
# the interpreter's cost is per program, so it takes wide blocks.
MERGE_BLOCK, MERGE_WARPS = (8192, 4) if INTERPRET else (2048, 4)

# T is part of every key: it sets the bytes read per K step. The dc kernel resets its output before each
# timing run so that atomic mode measures (and leaves) a clean sum.
_PRUNE = {"early_config_prune": _fits_shared_memory}
# QUANT too: an int8/int4 bank reads fewer bytes per tile and dequantises more.
_fwd = triton.autotune(_GEMM_CONFIGS, key=["M", "N", "K", "T", "P", "QUANT"],
                       prune_configs_by=_PRUNE)(atlas_linear_fwd_kernel)
_dx = triton.autotune(_GEMM_CONFIGS, key=["M", "N", "K", "T", "P", "QUANT"],
                      prune_configs_by=_PRUNE)(atlas_linear_dx_kernel)
_dc = triton.autotune(_DC_CONFIGS, key=["M", "N", "K", "T", "P", "DETERMINISTIC", "QUANT"],
                      reset_to_zero=["dc_ptr"])(atlas_linear_dc_kernel)


# ---------------------------------------------------------------- launchers


def forward(x, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w=0, key_b=0, out=None):
    """y (M, N) = x (W0 + Σ c τ)ᵀ + (b0 + Σ c' τ') for x (M, K); `out` an optional preallocated y."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)}: expected (M, K) and (N, K)")
    check_bank("weight", weight, tau_w, coef_w)
    M, K = x.shape
    N = weight.shape[0]
    T, P = coef_w.shape
    T_B = 0
    if tau_b is not None:
        if bias is None or coef_b is None:
            raise ValueError("bias: tau_b needs both bias and coef_b")
        check_bank("bias", bias, tau_b, coef_b)
        if coef_b.shape != coef_w.shape:
            raise ValueError(f"bias: coef_b {tuple(coef_b.shape)} differs from coef_w {tuple(coef_w.shape)}")
        T_B = T
    y = check_out(out, (M, N), x.dtype, x.device)
    if y.numel() == 0:
        return y
    weight, coef_w = weight.contiguous(), coef_w.contiguous()
    tau_w, scale_w, quant, group = bank_args(tau_w)
    b = bias.contiguous() if bias is not None else weight
    tb = tau_b.contiguous() if tau_b is not None else weight
    cb = coef_b.contiguous() if coef_b is not None else coef_w
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    _fwd[grid](x, weight, tau_w, scale_w, coef_w, b, tb, cb, y, M, N, K, x.stride(0), x.stride(1), y.stride(0),
               key32(key_w), key32(key_b), T=T, T_B=T_B, P=P, HAS_BIAS=bias is not None, QUANT=quant, GROUP=group,
               UPCAST=upcast(x), PRECISION=dot_precision())
    return y


def grad_input(grad_out, weight, tau_w, coef_w, key_w=0, out=None):
    """dx (M, K) = dy (W0 + Σ c τ) for dy (M, N); `out` an optional preallocated dx."""
    if grad_out.dim() != 2 or weight.dim() != 2 or grad_out.shape[1] != weight.shape[0]:
        raise ValueError(f"grad_out {tuple(grad_out.shape)} and weight {tuple(weight.shape)}: expected (M, N), (N, K)")
    check_bank("weight", weight, tau_w, coef_w)
    M, N = grad_out.shape
    K = weight.shape[1]
    T, P = coef_w.shape
    dx = check_out(out, (M, K), grad_out.dtype, grad_out.device)
    if dx.numel() == 0:
        return dx
    weight, coef_w = weight.contiguous(), coef_w.contiguous()
    tau_w, scale_w, quant, group = bank_args(tau_w)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_K"]))  # noqa: E731
    _dx[grid](grad_out, weight, tau_w, scale_w, coef_w, dx, M, N, K, grad_out.stride(0), grad_out.stride(1),
              dx.stride(0), key32(key_w), T=T, P=P, QUANT=quant, GROUP=group, UPCAST=upcast(grad_out),
              PRECISION=dot_precision())
    return dx


def _max_programs(N, K):
    return max(triton.cdiv(N, c.kwargs["BLOCK_N"]) * triton.cdiv(K, c.kwargs["BLOCK_K"]) * c.kwargs["SPLIT_M"]
               for c in _DC_CONFIGS)


def grad_coef(grad_out, x, tau_w, partitions, key_w=0, deterministic=True, out=None):
    """dc (T, P) float32 with dc[t, p] = Σ_{i : k(i) = p} τ_t[i] (dyᵀx)[i], for dy (M, N) and x (M, K).

    deterministic=True sums per-program partials in a fixed order (bit-identical across runs);
    False accumulates with atomics (faster when there are many programs, rounding varies per run).
    `out` is an optional preallocated dc; it is overwritten.
    """
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
    dc = check_out(out, (T, partitions), torch.float32, x.device)
    tau_w, scale_w, quant, group = bank_args(tau_w)
    if deterministic:
        # The autotuner picks the tile configuration only at launch, so the buffer has a row for every
        # program of the largest grid any configuration launches; rows no program writes stay zero.
        target = x.new_zeros(_max_programs(N, K), T, partitions, dtype=torch.float32)
    else:
        target = dc.zero_()
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]),  # noqa: E731
                         meta["SPLIT_M"])
    _dc[grid](grad_out, x, tau_w, scale_w, target, M, N, K, T, grad_out.stride(0), grad_out.stride(1), x.stride(0),
              x.stride(1), key32(key_w), P=partitions, DETERMINISTIC=deterministic, QUANT=quant, GROUP=group,
              UPCAST=upcast(x), PRECISION=dot_precision())
    if deterministic:
        torch.sum(target, dim=0, out=dc)
    return dc


def merge(theta0, tau, coef, key=0, dtype=None, out=None):
    """W(c) = θ0 + Σ_t c[t, k(i)] τ_t[i] for a block of any shape (τ float, or a QuantizedBlock of a block with
    two or more dimensions), merged in float32 and stored in `dtype`
    (default θ0's); `out` an optional preallocated result. The merge-once strategy's transient weight."""
    check_bank("merge", theta0, tau, coef)
    dtype = theta0.dtype if dtype is None else dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"merge: the merged block must be float32, bfloat16 or float16, got {dtype}")
    merged = check_out(out, theta0.shape, dtype, theta0.device)
    numel = theta0.numel()
    if numel == 0:
        return merged
    T, P = coef.shape
    cols = tau.cols if is_quantized(tau) else 1
    tau, scale, quant, group = bank_args(tau)
    atlas_linear_merge_kernel[(triton.cdiv(numel, MERGE_BLOCK),)](
        theta0.contiguous(), tau, scale, coef.contiguous(), merged, numel, cols, key32(key), T=T, P=P, QUANT=quant,
        GROUP=group, BLOCK=MERGE_BLOCK, num_warps=MERGE_WARPS)
    return merged
