"""The partition hash of "aTLAS xK", shared bit for bit by every backend.

Element i (flat, row-major index inside its block) of block b belongs to partition

    k(b, i) = fmix32(i XOR key_b) mod K,      key_b = block_key(seed, b)

where fmix32 is MurmurHash3's 32-bit finaliser. The key is computed once on the host; kernels
only evaluate fmix32 on uint32 arithmetic (Triton: tl.uint32, CUDA: uint32_t). No mask is stored.
"""
import torch

MASK32 = 0xFFFFFFFF
FMIX_C1 = 0x85EBCA6B
FMIX_C2 = 0xC2B2AE35
GOLDEN = 0x9E3779B9


def fmix32(h: int) -> int:
    """MurmurHash3 finaliser on a Python int (host side)."""
    h &= MASK32
    h ^= h >> 16
    h = (h * FMIX_C1) & MASK32
    h ^= h >> 13
    h = (h * FMIX_C2) & MASK32
    h ^= h >> 16
    return h


def block_key(seed: int, block: int) -> int:
    """The 32-bit key of block `block` under `seed`."""
    return fmix32((seed * GOLDEN + fmix32(block + 1)) & MASK32)


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    # (h * c) mod 2^32 on int64 without overflow: split c into 16-bit halves (products < 2^48).
    lo = h * (c & 0xFFFF)
    hi = ((h * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def fmix32_tensor(h: torch.Tensor) -> torch.Tensor:
    """fmix32 elementwise on an int64 tensor holding uint32 values."""
    h = h ^ (h >> 16)
    h = _mul32(h, FMIX_C1)
    h = h ^ (h >> 13)
    h = _mul32(h, FMIX_C2)
    return h ^ (h >> 16)


def partition_index(numel: int, key: int, partitions: int, device=None) -> torch.Tensor:
    """int64 tensor (numel,): the partition of every flat element of a block with this key."""
    if numel > MASK32:
        raise ValueError(f"a block of {numel} elements exceeds the 32-bit partition hash")
    i = torch.arange(numel, dtype=torch.int64, device=device)
    return fmix32_tensor(i ^ key) % partitions
