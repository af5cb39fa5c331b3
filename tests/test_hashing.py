"""The partition hash pinned to fixed numbers: hashing.py (ints and tensors), the Triton kernels' in-kernel hash
and the CUDA sources must all give the values below, which follow MurmurHash3's published fmix32:

    fmix32(h): h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35; h ^= h >> 16   (mod 2^32)
    key_b = fmix32((seed · 0x9E3779B9 + fmix32(b + 1)) mod 2^32),   k(b, i) = fmix32(i XOR key_b) mod K

The table is literal, so a change to a constant anywhere (hashing.py, which the Triton kernels import, or
csrc/) fails here even when every backend changes together.
"""
import re
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from atlas_fast.kernels import atlas_linear as kernels
from atlas_fast.ops import hashing
from atlas_fast.ops.reference import merge_ref
from conftest import DEVICE

_kernel_partition = kernels.partition
CSRC = Path(__file__).resolve().parent.parent / "csrc"
MASK32 = 0xFFFFFFFF

# MurmurHash3_x86_32 of the empty string is fmix32(seed): published test vectors.
PUBLISHED_FMIX32 = [(0, 0), (1, 0x514E28B7), (0xFFFFFFFF, 0x81F16F39)]

# (seed, block) -> key_b
BLOCK_KEYS = [(0, 0, 0x2FEF5C8F), (3, 1, 0x519B501D), (12345, 151, 0xDE143254), (2 ** 31 - 1, 2, 0x982A112D),
              (2 ** 40 + 7, 4, 0xEE8B8CAE), (7, 0, 0x1A7C4390), (0, 1, 0xB5D455E1), (3, 0, 0x9D03E637),
              (1, 7, 0xE09770D6)]

# (seed, block, flat index, K) -> k(b, i)
PARTITIONS = [(0, 0, 0, 3, 0), (0, 0, 1, 3, 2), (0, 1, 37, 2, 0), (3, 0, 1000, 5, 0), (3, 1, 12345, 7, 5),
              (1, 7, 2 ** 31 + 5, 16, 8), (12345, 151, 2 ** 32 - 1, 3, 2), (2 ** 31 - 1, 2, 999, 1000, 677),
              (2 ** 40 + 7, 4, 70, 5, 1), (7, 0, 65535, 2, 1)]

# k(1, i) for i = 0 .. 47 under seed 3, K = 5: a whole block's partition.
BLOCK_3_1_K5 = [2, 2, 3, 2, 4, 0, 4, 2, 4, 0, 0, 3, 4, 4, 2, 0, 2, 0, 1, 2, 2, 1, 2, 4, 3, 4, 1, 3, 0, 4, 1, 2,
                3, 0, 2, 3, 2, 2, 2, 0, 2, 3, 4, 3, 3, 4, 2, 1]

# The finaliser as a list of steps: ("xorshift", n) is h ^= h >> n, ("mul", c) is h = h * c mod 2^32.
FMIX32_STEPS = [("xorshift", 16), ("mul", 0x85EBCA6B), ("xorshift", 13), ("mul", 0xC2B2AE35), ("xorshift", 16)]


def _apply(steps, h):
    h &= MASK32
    for op, v in steps:
        h = h ^ (h >> v) if op == "xorshift" else (h * v) & MASK32
    return h


def _key(steps, seed, block):
    return _apply(steps, (seed * 0x9E3779B9 + _apply(steps, block + 1)) & MASK32)


def test_the_pinned_table_follows_the_published_definition():
    """Guards the literals themselves: the spec above reproduces MurmurHash3's vectors and every entry."""
    assert [_apply(FMIX32_STEPS, h) for h, _ in PUBLISHED_FMIX32] == [v for _, v in PUBLISHED_FMIX32]
    assert [_key(FMIX32_STEPS, s, b) for s, b, _ in BLOCK_KEYS] == [v for *_, v in BLOCK_KEYS]
    assert [_apply(FMIX32_STEPS, i ^ _key(FMIX32_STEPS, s, b)) % K for s, b, i, K, _ in PARTITIONS] == \
        [v for *_, v in PARTITIONS]
    assert [_apply(FMIX32_STEPS, i ^ _key(FMIX32_STEPS, 3, 1)) % 5 for i in range(48)] == BLOCK_3_1_K5


def test_host_functions():
    assert [hashing.fmix32(h) for h, _ in PUBLISHED_FMIX32] == [v for _, v in PUBLISHED_FMIX32]
    assert [hashing.block_key(s, b) for s, b, _ in BLOCK_KEYS] == [v for *_, v in BLOCK_KEYS]
    assert [hashing.fmix32(i ^ hashing.block_key(s, b)) % K for s, b, i, K, _ in PARTITIONS] == \
        [v for *_, v in PARTITIONS]


def test_tensor_path():
    h = torch.tensor([h for h, _ in PUBLISHED_FMIX32], dtype=torch.int64, device=DEVICE)
    assert hashing.fmix32_tensor(h).tolist() == [v for _, v in PUBLISHED_FMIX32]
    mixed = torch.tensor([i ^ hashing.block_key(s, b) for s, b, i, _, _ in PARTITIONS], device=DEVICE)
    K = torch.tensor([K for *_, K, _ in PARTITIONS], device=DEVICE)
    assert (hashing.fmix32_tensor(mixed) % K).tolist() == [v for *_, v in PARTITIONS]
    # partition_index over whole blocks, where the flat index is small enough to materialise
    for s, b, i, K, v in PARTITIONS:
        if i < 1 << 17:
            assert hashing.partition_index(i + 1, hashing.block_key(s, b), K, DEVICE)[i].item() == v
    assert hashing.partition_index(48, BLOCK_KEYS[1][2], 5, DEVICE).tolist() == BLOCK_3_1_K5


def test_reference_merge_uses_the_pinned_partition():
    """merge_ref (the oracle of every other test) with c[0, k] = k and τ = 1 returns each element's partition."""
    theta0 = torch.zeros(6, 8, dtype=torch.float64)
    coef = torch.arange(5, dtype=torch.float64).view(1, 5)
    merged = merge_ref(theta0, torch.ones(1, 6, 8), coef, key=BLOCK_KEYS[1][2])
    assert merged.flatten().tolist() == [float(k) for k in BLOCK_3_1_K5]


@triton.jit(do_not_specialize=["key"])
def _probe_partition(flat_ptr, out_ptr, key, n, P: tl.constexpr, BLOCK: tl.constexpr):
    """out[j] = the kernels' partition of flat index flat[j] (int64) under `key` (int32 bits of the uint32 key)."""
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    flat = tl.load(flat_ptr + offs, mask=mask, other=0)
    tl.store(out_ptr + offs, _kernel_partition(flat, key, P), mask=mask)


def test_triton_in_kernel_hash():
    def run(flat, key, P):
        out = torch.full((len(flat),), -1, dtype=torch.int32, device=DEVICE)
        flat = torch.tensor(flat, dtype=torch.int64, device=DEVICE)
        _probe_partition[(1,)](flat, out, kernels.key32(key), len(flat), P=P, BLOCK=64)
        return out.tolist()

    # keys from the specification, not from hashing.py: this checks the in-kernel hash alone
    for s, b, i, K, v in PARTITIONS:
        assert run([i], _key(FMIX32_STEPS, s, b), K) == [v], (s, b, i, K)
    assert run(list(range(48)), BLOCK_KEYS[1][2], 5) == BLOCK_3_1_K5


def _cuda_fmix32_steps():
    """The steps of csrc's device fmix32, parsed from its source."""
    sources = {p.name: p.read_text() for p in sorted(CSRC.glob("*.cu*"))}
    defs = {name: re.findall(r"uint32_t\s+fmix32\s*\(\s*uint32_t\s+h\s*\)\s*\{(.*?)\}", text, re.S)
            for name, text in sources.items()}
    found = [(name, body) for name, bodies in defs.items() for body in bodies]
    assert len(found) == 1, f"expected one device fmix32 in csrc/, found {[n for n, _ in found]}"
    steps = []
    for stmt in (s.strip() for s in found[0][1].split(";")):
        if not stmt or stmt.startswith("return"):
            continue
        m = re.fullmatch(r"h\s*\^=\s*h\s*>>\s*(\d+)", stmt) or re.fullmatch(r"h\s*\*=\s*(0x[0-9A-Fa-f]+)[uU]?", stmt)
        assert m, f"unexpected statement in csrc fmix32: {stmt!r}"
        steps.append(("xorshift" if "^" in stmt else "mul", int(m.group(1), 0)))
    return steps, sources


def test_cuda_sources_hash():
    """csrc's fmix32, evaluated step by step, gives the pinned numbers; the partition is fmix32(i ^ key) % P and
    every kernel takes its partition from that one helper."""
    steps, sources = _cuda_fmix32_steps()
    assert steps == FMIX32_STEPS
    assert [_apply(steps, h) for h, _ in PUBLISHED_FMIX32] == [v for _, v in PUBLISHED_FMIX32]
    assert [_apply(steps, i ^ _key(FMIX32_STEPS, s, b)) % K for s, b, i, K, _ in PARTITIONS] == \
        [v for *_, v in PARTITIONS]
    common = sources["atlas_common.cuh"]
    body = re.search(r"int\s+partition_of\s*\(\s*uint32_t\s+i\s*,\s*uint32_t\s+key\s*,\s*int\s+P\s*\)\s*\{(.*?)\}",
                     common, re.S)
    assert body and re.search(r"fmix32\s*\(\s*i\s*\^\s*key\s*\)\s*%\s*static_cast<uint32_t>\(P\)", body.group(1))
    users = [name for name, text in sources.items() if "partition_of(" in text and name != "atlas_common.cuh"]
    assert sorted(users) == ["atlas_linear.cu", "merge_blocks.cu"]
    for name, text in sources.items():
        assert not re.search(r"0x85EBCA6B|0xC2B2AE35", text, re.I) or name == "atlas_common.cuh", name


@pytest.mark.parametrize("numel", [0, 1, 37, 1000])
def test_partition_index_shape_and_range(numel):
    part = hashing.partition_index(numel, hashing.block_key(5, 2), 7, DEVICE)
    assert part.shape == (numel,) and part.dtype == torch.int64
    assert numel == 0 or (0 <= part.min() and part.max() < 7)
