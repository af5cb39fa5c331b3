"""What the Triton kernels of kernels/atlas_linear.py and kernels/atlas_linear_grouped.py share: the partition hash
in registers, one task vector's tile (float, or int8/int4 dequantised in registers), the merged tile
θ0 + Σ_t c_t τ_t, the dot, and their launchers' checks and bank arguments.

Quantised weight banks (the constexpr QUANT): none (a float bank), int8 (T, N, K) with float32 per-row scales
(T, N), int4 packed two a byte (T, N, ⌈K/2⌉) with float32 scales (T, N, ⌈K/GROUP⌉).
"""
import os

import torch
import triton
import triton.language as tl

from atlas_fast.bank.quant import is_quantized
from atlas_fast.ops.hashing import FMIX_C1, FMIX_C2

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
QUANT_NONE, QUANT_INT8, QUANT_INT4 = 0, 1, 2
_MIX1 = tl.constexpr(FMIX_C1)
_MIX2 = tl.constexpr(FMIX_C2)


def dot_precision():
    """tl.dot precision for float32 operands: TF32 only when torch allows it for matmuls."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def key32(key):
    """A uint32 block key as the int32 with the same bits, so the kernel argument always has one type."""
    key &= 0xFFFFFFFF
    return key - (1 << 32) if key >= 1 << 31 else key


@triton.jit
def partition(flat, key, P: tl.constexpr):
    """Partition of the elements with flat indices `flat`: fmix32(flat ^ key) % P on uint32 (hashing.py)."""
    h = flat.to(tl.uint32) ^ key.to(tl.uint32, bitcast=True)
    h ^= h >> 16
    h *= _MIX1
    h ^= h >> 13
    h *= _MIX2
    h ^= h >> 16
    return (h % P).to(tl.int32)


@triton.jit
def tau_tile(tau_ptr, scale_ptr, flat, row, col, mask, K, QUANT: tl.constexpr, GROUP: tl.constexpr):
    """One task vector's tile in float32 at flat indices `flat` = row·K + col (row and col broadcast to its
    shape). tau_ptr, scale_ptr: that task vector's data and scales (module docstring); masked-off elements
    are 0. int4: the byte of column c is c // 2 of its row, its low nibble the even column; values are
    stored as q + 8."""
    if QUANT == 0:
        return tl.load(tau_ptr + flat, mask=mask, other=0.0).to(tl.float32)
    elif QUANT == 1:
        q = tl.load(tau_ptr + flat, mask=mask, other=0).to(tl.float32)
        return q * tl.load(scale_ptr + row, mask=mask, other=0.0)
    else:
        byte = tl.load(tau_ptr + row * ((K + 1) // 2) + col // 2, mask=mask, other=0).to(tl.int32)
        q = ((byte >> ((col % 2) * 4)) & 15) - 8
        return q.to(tl.float32) * tl.load(scale_ptr + row * tl.cdiv(K, GROUP) + col // GROUP, mask=mask, other=0.0)


@triton.jit
def task_strides(rows, K, QUANT: tl.constexpr, GROUP: tl.constexpr):
    """(data, scale) elements of one task vector of a (rows, K) block: where the next one starts."""
    if QUANT == 2:
        return rows * ((K + 1) // 2), rows * tl.cdiv(K, GROUP)
    return rows * K, rows


@triton.jit
def merged_tile(theta_ptr, tau_ptr, coef_ptr, flat, mask, key, numel, T: tl.constexpr, P: tl.constexpr):
    """merged_quant_tile of a float bank, for a tile of flat indices of a block of `numel` elements (the
    grouped kernels of atlas_linear_grouped.py merge with it)."""
    return merged_quant_tile(theta_ptr, tau_ptr, tau_ptr, coef_ptr, flat, flat, 0, mask, key, numel, 1, T, P, 0, 1)


@triton.jit
def merged_quant_tile(theta_ptr, tau_ptr, scale_ptr, coef_ptr, flat, row, col, mask, key, rows, K,
                       T: tl.constexpr, P: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr):
    """θ0[flat] + Σ_t c[t, k(flat)] τ_t[flat] in float32, for a tile of flat indices flat = row·K + col of a
    (rows, K) block, any tile shape, any bank (float, int8, int4).

    theta_ptr: θ0 of the block, contiguous · tau_ptr: τ (T, rows, K), or its int8/int4 data, contiguous ·
    scale_ptr: the scales of a quantised τ (unused when QUANT = 0) · coef_ptr: c (T, P) float32, contiguous.
    Masked-off elements come out as 0. The loop over the task vectors is unrolled (T is a compile-time
    constant), so the software pipeline of the caller's loop prefetches all T tiles of the next step.
    """
    acc = tl.load(theta_ptr + flat, mask=mask, other=0.0).to(tl.float32)
    if P > 1:
        part = partition(flat, key, P)
    tau_stride, scale_stride = task_strides(rows, K, QUANT, GROUP)
    for t in tl.static_range(T):
        tau = tau_tile(tau_ptr, scale_ptr, flat, row, col, mask, K, QUANT, GROUP)
        if P == 1:
            c = tl.load(coef_ptr + t)
        else:
            c = tl.load(coef_ptr + t * P + part, mask=mask, other=0.0)
        acc += c * tau
        # Advancing the pointers keeps the t-offset in 64-bit pointer arithmetic.
        tau_ptr += tau_stride
        scale_ptr += scale_stride
    return acc


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a·b; b is float32 and goes down to a's dtype (bf16/fp16 tensor cores) unless UPCAST.
    PRECISION ("ieee" or "tf32") applies to float32 operands only."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b, acc, input_precision=PRECISION)
    return tl.dot(a, b.to(a.dtype), acc)


def max_shared_memory(device):
    return triton.runtime.driver.active.utils.get_device_properties(device.index)["max_shared_mem"]


def check_bank(what, theta0, tau, coef):
    if tau.dim() != theta0.dim() + 1 or tau.shape[1:] != theta0.shape:
        raise ValueError(f"{what}: task vectors of shape {tuple(tau.shape)} do not stack (T, *{tuple(theta0.shape)})")
    if theta0.numel() >= 1 << 31:
        raise ValueError(f"{what}: {theta0.numel()} elements; the kernels index a block with int32")
    if coef.dim() != 2 or coef.shape[0] != tau.shape[0] or coef.dtype != torch.float32:
        raise ValueError(f"{what}: coefficients must be float32 (T={tau.shape[0]}, P), got "
                         f"{coef.dtype} {tuple(coef.shape)}")
    if not is_quantized(tau) and tau.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{what}: task vectors must be float32, bfloat16 or float16 (or a QuantizedBlock), "
                         f"got {tau.dtype}")


def bank_args(tau):
    """(data, scales, QUANT, GROUP) for a kernel: a float bank's scales argument is the bank itself, unused.
    Scales go to the kernels as float32 (a .double() model's are float64)."""
    if not is_quantized(tau):
        tau = tau.contiguous()
        return tau, tau, QUANT_NONE, 1
    quant = QUANT_INT8 if tau.format == "int8" else QUANT_INT4
    return tau.data.contiguous(), tau.scale.to(torch.float32).contiguous(), quant, max(1, tau.group)


def check_out(out, shape, dtype, device):
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous {dtype} {tuple(shape)} on {device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device} with strides {out.stride()}")
    return out


def upcast(x):
    return INTERPRET or x.dtype == torch.float32
