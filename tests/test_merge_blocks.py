"""merge_blocks (the generic on-the-fly merge of many small blocks) against the float64 reference."""
import pytest
import torch

import atlas_fast
from atlas_fast.ops.hashing import block_key
from atlas_fast.ops.reference import merge_ref
from conftest import DEVICE
from helpers import TOL, assert_rel, random_bank

SHAPES = [(37,), (5, 9), (50, 19), (1,), (3, 4, 5)]
BACKENDS = ["torch", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]


def _blocks(T, dtype, device=DEVICE):
    theta0 = [torch.randn(s, device=device) for s in SHAPES]
    tau = [random_bank(s, T, dtype, 1e-2, device) for s in SHAPES]
    return theta0, tau, [block_key(7, b) for b in range(len(SHAPES))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(backend, T, K, bank_dtype):
    theta0, tau, keys = _blocks(T, bank_dtype)
    coef = (torch.rand(T, len(SHAPES), K, device=DEVICE) * 1.6 - 0.8).requires_grad_()
    merged = atlas_fast.merge_blocks(theta0, tau, coef, keys, backend=backend)
    refs = [merge_ref(t0, tv, coef[:, b], keys[b]) for b, (t0, tv) in enumerate(zip(theta0, tau))]
    grads_out = [torch.randn_like(r) for r in refs]
    for m, r in zip(merged, refs):
        assert m.dtype == torch.float32
        assert_rel(m, r, TOL[torch.float32][0])
    g = torch.autograd.grad(merged, coef, [g.float() for g in grads_out])[0]
    g_ref = torch.autograd.grad(refs, coef, grads_out)[0]
    assert_rel(g, g_ref, TOL[torch.float32][1], "grad coef")


def test_gradcheck_float64():
    d = dict(dtype=torch.float64)
    theta0 = [torch.randn(s, **d) for s in SHAPES]
    tau = [torch.randn(2, *s, **d) for s in SHAPES]
    keys = [block_key(0, b) for b in range(len(SHAPES))]
    for K in (1, 3):
        coef = torch.randn(2, len(SHAPES), K, **d, requires_grad=True)
        assert torch.autograd.gradcheck(lambda c: atlas_fast.merge_blocks(theta0, tau, c, keys, "torch"), (coef,))


def test_opcheck():
    theta0, tau, keys = _blocks(3, torch.float32, "cpu")
    coef = torch.randn(3, len(SHAPES), 2, requires_grad=True)
    torch.library.opcheck(torch.ops.atlas_fast.merge_blocks.default, (theta0, tau, coef, keys, "torch"))
    torch.library.opcheck(torch.ops.atlas_fast.merge_blocks_backward.default,
                          ([torch.randn_like(t) for t in theta0], tau, keys, 2, "torch"))


def test_partition_hash_is_stable():
    """The partition of an element must never change: saved coefficients depend on it."""
    from atlas_fast.ops.hashing import fmix32, partition_index
    assert block_key(0, 0) == fmix32(fmix32(1))
    idx = partition_index(10, block_key(3, 2), 4)
    assert idx.tolist() == [fmix32(i ^ block_key(3, 2)) % 4 for i in range(10)]
    counts = torch.bincount(partition_index(100_000, block_key(0, 5), 4), minlength=4)
    assert counts.min() > 24_000, "partitions must be balanced"


def test_bad_lists():
    theta0, tau, keys = _blocks(2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="5 blocks, 4 task-vector stacks"):
        atlas_fast.merge_blocks(theta0, tau[:4], torch.zeros(2, 5, 1), keys)


@pytest.mark.parametrize("K", [1, 3, 300])
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_chunked_merge_and_reduce(monkeypatch, K, bank_dtype):
    """merge_block, reduce_block and the one-pass merge_and_reduce of the torch backend in chunks of 53
    elements (the last one short) against the float64 reference; K = 300 needs an int16 partition index."""
    from atlas_fast.backends import torch_backend as tb
    T = 4
    monkeypatch.setattr(tb, "CHUNK_BYTES", 53 * T * 4)
    theta0 = torch.randn(31, 17)
    tau = random_bank((31, 17), T, bank_dtype)
    coef = (torch.rand(T, K) * 1.6 - 0.8).requires_grad_()
    g = torch.randn(31, 17)
    ref = merge_ref(theta0, tau, coef, key=block_key(1, 2))
    dc_ref = torch.autograd.grad(ref, coef, g.double())[0]
    merged, dc = tb.merge_and_reduce(theta0, tau, coef.detach(), block_key(1, 2), g)
    assert_rel(tb.merge_block(theta0, tau, coef.detach(), block_key(1, 2)), ref, TOL[torch.float32][0], "merge_block")
    assert_rel(merged, ref, TOL[torch.float32][0], "merge_and_reduce: merged")
    assert_rel(dc, dc_ref, TOL[torch.float32][1], "merge_and_reduce: dc")
    assert_rel(tb.reduce_block(tau, g, block_key(1, 2), K), dc_ref, TOL[torch.float32][1], "reduce_block")
    assert_rel(tb.reduce_block(tau, g.bfloat16(), block_key(1, 2), K), dc_ref, 1e-2, "reduce_block, bf16 gradient")


def test_partition_cache():
    """Cached indices equal the hash bit for bit, in the smallest dtype; the budget bounds the cache."""
    from atlas_fast.ops import hashing
    limit_mb = hashing.partition_cache_info()["limit_bytes"] / 2 ** 20
    hashing.clear_partition_cache()
    try:
        small = hashing.cached_partition_index(1000, block_key(3, 1), 7)
        assert small.dtype == torch.uint8
        assert torch.equal(small.long(), hashing.partition_index(1000, block_key(3, 1), 7))
        assert hashing.cached_partition_index(1000, block_key(3, 1), 7) is small
        assert hashing.partition_cache_info()["entries"] == 1 and hashing.partition_cache_info()["bytes"] == 1000
        wide = hashing.cached_partition_index(999, block_key(3, 2), 1000)
        assert wide.dtype == torch.int16 and torch.equal(wide.long(), hashing.partition_index(999, block_key(3, 2), 1000))
        hashing.set_partition_cache_limit(3000 / 2 ** 20)
        hashing.cached_partition_index(2000, block_key(3, 3), 2)  # over the budget: computed, not stored
        assert hashing.partition_cache_info()["entries"] == 2
        hashing.clear_partition_cache()
        assert hashing.partition_cache_info()["entries"] == 0 and hashing.partition_cache_info()["bytes"] == 0
        with pytest.raises(ValueError, match="megabytes"):
            hashing.set_partition_cache_limit(-1)
    finally:
        hashing.set_partition_cache_limit(limit_mb)
        hashing.clear_partition_cache()
