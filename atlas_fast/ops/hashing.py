"""The partition hash of "aTLAS xK", shared bit for bit by every backend.

Element i (flat, row-major index inside its block) of block b belongs to partition

    k(b, i) = fmix32(i XOR key_b) mod K,      key_b = block_key(seed, b)

where fmix32 is MurmurHash3's 32-bit finaliser. The key is computed once on the host; kernels
only evaluate fmix32 on uint32 arithmetic (Triton: tl.uint32, CUDA: uint32_t). No mask is stored.
"""
import os

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


# ---------------------------------------------------------------- cache of partition indices
# Hashing a block costs about 15 int64 passes over it; a training step needs its partitions three times. The
# torch backend therefore keeps each block's partition index, computed once, in the smallest integer dtype that
# holds K - 1: one byte per parameter for K <= 256 (ViT-B/32: 88 MB, against 700 MB as int64). The cache never
# evicts: once its budget is spent, further blocks are hashed on every call instead (an LRU would miss on every
# block of a model that does not fit, since a step visits the blocks in the same order each time).
_CACHE_LIMIT = int(float(os.environ.get("ATLAS_FAST_PARTITION_CACHE_MB", "256")) * 2 ** 20)
_cache = {}
_cache_bytes = 0


def _index_dtype(partitions):
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if partitions - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def cached_partition_index(numel: int, key: int, partitions: int, device=None) -> torch.Tensor:
    """partition_index(numel, key, partitions, device) in the smallest integer dtype that holds it (uint8 for
    K <= 256), kept per (numel, key, K, device) while the cache's budget lasts. Read-only: do not modify it."""
    device = torch.device("cpu" if device is None else device)
    entry = (numel, key, partitions, device.type, device.index)
    index = _cache.get(entry)
    if index is None:
        global _cache_bytes
        index = partition_index(numel, key, partitions, device).to(_index_dtype(partitions))
        nbytes = index.numel() * index.element_size()
        if _cache_bytes + nbytes <= _CACHE_LIMIT:
            _cache[entry] = index
            _cache_bytes += nbytes
    return index


def clear_partition_cache() -> None:
    """Frees every cached partition index (they are recomputed on demand)."""
    global _cache_bytes
    _cache.clear()
    _cache_bytes = 0


def set_partition_cache_limit(megabytes: float) -> None:
    """The cache's budget in MiB (default 256, or ATLAS_FAST_PARTITION_CACHE_MB); 0 turns caching off. Entries
    already stored stay until clear_partition_cache()."""
    global _CACHE_LIMIT
    if megabytes < 0:
        raise ValueError(f"megabytes must be 0 or more, got {megabytes}")
    _CACHE_LIMIT = int(megabytes * 2 ** 20)


def partition_cache_info() -> dict:
    """{"entries", "bytes", "limit_bytes"} of the partition-index cache."""
    return {"entries": len(_cache), "bytes": _cache_bytes, "limit_bytes": _CACHE_LIMIT}
