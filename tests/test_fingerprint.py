"""The bank fingerprint (fingerprint.py) against float64 values computed here, and each of its parts pinned: a
bank changed in its norm alone, its sum alone, its sampled values alone, in the order of two same-shape blocks or
in the order of its task vectors is refused, naming the block, the task vector and the part; the same bank in
another dtype, from moved files (other source names) or mapped from its file is accepted. Older coefficient files
(atlas_fast.coefficients/1 and /2) still load."""
import copy
import json

import pytest
import torch
import torch.nn as nn

import atlas_fast
from atlas_fast.bank import fingerprint, lowrank, quant
from atlas_fast.ops.hashing import block_key, fmix32

T = 3


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 5), nn.Linear(5, 5), nn.LayerNorm(5))


def _bank(net, seed=1):
    return atlas_fast.synthetic_task_vectors(net, T, rel_scale=0.1, seed=seed)


def _saved(tmp_path, net, bank):
    atlas = atlas_fast.compose(copy.deepcopy(net), bank)
    with torch.no_grad():
        atlas.coefficients.uniform_(-0.5, 0.5)
    path = tmp_path / "coef.safetensors"
    atlas.save_coefficients(path)
    return path, atlas.coefficients.detach().clone()


def _load(net, bank, path, **kw):
    other = atlas_fast.compose(copy.deepcopy(net), bank)
    other.load_coefficients(path, **kw)
    return other.coefficients


def _with_block(bank, name, t, values):
    vectors = {k: v.clone() for k, v in bank.vectors.items()}
    vectors[name][t] = values.view_as(vectors[name][t])
    return atlas_fast.TaskVectors(vectors, sources=bank.sources)


def _unsampled(numel):
    sampled = set(fingerprint.positions(numel).tolist())
    return [i for i in range(numel) if i not in sampled]


# ---------------------------------------------------------------- the values


def test_positions_are_the_hash_of_the_block_size():
    """fmix32(j XOR key(n)) mod n, computed here on Python ints: the same on every machine and torch version."""
    for n in (1, 7, 30, 1000, 2 ** 31 + 5):
        key = block_key(0x5EED, n)
        assert fingerprint.positions(n).tolist() == [fmix32(j ^ key) % n for j in range(fingerprint.SAMPLES)]


@pytest.mark.parametrize("fmt", [None, "bfloat16", "int8", "int4", "lowrank"])
def test_block_fingerprint_against_float64(monkeypatch, fmt):
    """Norm, sum and the sampled values of each task vector, against float64 ones computed here from the values
    the block stands for (int4 dequantised here from its nibbles and group scales); chunks of 50 elements, so the
    pass crosses many chunk borders."""
    monkeypatch.setattr(fingerprint, "_CHUNK", 50)
    torch.manual_seed(3)
    dense = torch.randn(T, 37, 11)
    if fmt is None or fmt == "bfloat16":
        block = dense.to(torch.bfloat16) if fmt else dense
        ref = block.double()
    elif fmt == "lowrank":
        b, a = torch.randn(T, 37, 2), torch.randn(T, 2, 11)
        block = lowrank.LowRankBlock.from_factors(b, a, (T, 37, 11))
        ref = torch.einsum("tir,trj->tij", b.double(), a.double())
    elif fmt == "int8":
        block = quant.quantize(dense, "int8")
        ref = block.data.double() * block.scale.double()[:, :, None]
    else:
        block = quant.quantize(dense, "int4", 4)
        low, high = (block.data & 15).long() - 8, (block.data >> 4).long() - 8
        q = torch.stack([low, high], -1).reshape(T, 37, -1)[..., :11]
        ref = q.double() * block.scale.double().repeat_interleave(4, dim=2)[..., :11]
    flat = ref.reshape(T, -1)
    got = fingerprint.block_fingerprint(block)
    assert got.dtype == torch.float64 and got.shape == (T, 2 + fingerprint.SAMPLES)
    torch.testing.assert_close(got[:, 0], flat.norm(dim=1), rtol=1e-12, atol=0)
    torch.testing.assert_close(got[:, 1], flat.sum(1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[:, 2:], flat[:, fingerprint.positions(37 * 11)], rtol=1e-12, atol=1e-15)


def test_bank_fingerprint_is_in_block_and_task_order():
    net = _net()
    bank = _bank(net)
    atlas = atlas_fast.compose(copy.deepcopy(net), bank)
    fp = atlas.bank_fingerprint()
    assert fp.shape == (T, len(atlas.block_names), 2 + fingerprint.SAMPLES)
    for b, name in enumerate(atlas.block_names):
        flat = bank[name].double().reshape(T, -1)
        torch.testing.assert_close(fp[:, b, 0], flat.norm(dim=1), rtol=1e-12, atol=0)
    torch.testing.assert_close(bank.fingerprint(atlas.block_names), fp, rtol=0, atol=0)


# ---------------------------------------------------------------- each part refuses what only it tells apart


def test_norm_alone(tmp_path):
    """x_i + d and x_j − d at two unsampled positions: the sum and the samples stay, the norm grows."""
    net, name = _net(), "2.weight"
    bank = _bank(net)
    path, _ = _saved(tmp_path, net, bank)
    v = bank[name][1].flatten().clone()
    i, j = _unsampled(v.numel())[:2]
    d = float(v.norm())
    v[i] += d
    v[j] -= d
    changed = _with_block(bank, name, 1, v)
    with pytest.raises(ValueError, match=r"saved for another bank: block '2.weight' of task vector 1 "
                                         r"\('synthetic\[1\]'\) holds other values \(norm .*--allow-bank-mismatch"):
        _load(net, changed, path)


def test_sum_alone(tmp_path):
    """An unsampled element negated: the norm and the samples stay, the sum moves by twice it."""
    net, name = _net(), "2.weight"
    bank = _bank(net)
    path, _ = _saved(tmp_path, net, bank)
    v = bank[name][2].flatten().clone()
    free = _unsampled(v.numel())
    i = max(free, key=lambda k: abs(float(v[k])))
    v[i] = -v[i]
    changed = _with_block(bank, name, 2, v)
    with pytest.raises(ValueError, match=r"block '2.weight' of task vector 2 \('synthetic\[2\]'\) holds other "
                                         r"values \(sum "):
        _load(net, changed, path)


def test_sampled_values_alone(tmp_path):
    """A sampled element swapped with an unsampled one: the norm and the sum stay, the samples differ."""
    net, name = _net(), "3.weight"
    bank = _bank(net)
    path, _ = _saved(tmp_path, net, bank)
    v = bank[name][0].flatten().clone()
    pos, free = fingerprint.positions(v.numel()).tolist(), _unsampled(v.numel())
    i, j = max(((p, f) for p in pos for f in free), key=lambda pf: abs(float(v[pf[0]] - v[pf[1]])))
    v[i], v[j] = v[j].clone(), v[i].clone()
    changed = _with_block(bank, name, 0, v)
    with pytest.raises(ValueError, match=r"block '3.weight' of task vector 0 \('synthetic\[0\]'\) holds other "
                                         r"values \(sampled values "):
        _load(net, changed, path)


@pytest.mark.parametrize("fmt", [None, "int8", "int4", "lowrank"])
def test_block_order(tmp_path, fmt):
    """Two blocks of one shape swapped (in every task vector): each block's norm, sum and samples move with it, so
    only the fingerprint's order of blocks tells the banks apart."""
    net = _net()
    bank = _bank(net)
    swapped = {**bank.vectors, "2.weight": bank["3.weight"], "3.weight": bank["2.weight"]}
    swapped = atlas_fast.TaskVectors(swapped, sources=bank.sources)
    if fmt == "lowrank":
        bank, swapped = bank.low_rank(rank=2), swapped.low_rank(rank=2)
    elif fmt is not None:
        kind = torch.int8 if fmt == "int8" else "int4"
        bank, swapped = bank.to(dtype=kind, group_size=None if fmt == "int8" else 2), \
            swapped.to(dtype=kind, group_size=None if fmt == "int8" else 2)
    path, saved = _saved(tmp_path, net, bank)
    assert torch.equal(_load(net, bank, path), saved)
    with pytest.raises(ValueError, match=r"block '2.weight' of task vector 0 .* holds other values"):
        _load(net, swapped, path)
    assert torch.equal(_load(net, swapped, path, allow_bank_mismatch=True), saved)


def test_task_vector_order(tmp_path):
    """Task vectors 0 and 2 swapped under the same source names: only the order of task vectors tells."""
    net = _net()
    bank = _bank(net)
    path, _ = _saved(tmp_path, net, bank)
    order = [2, 1, 0]
    reordered = atlas_fast.TaskVectors({k: v[order] for k, v in bank.vectors.items()}, sources=bank.sources)
    with pytest.raises(ValueError, match=r"block '0.weight' of task vector 0 \('synthetic\[0\]'\) holds other values"):
        _load(net, reordered, path)


# ---------------------------------------------------------------- the same bank is accepted


def test_same_bank_moved_recast_or_mapped(tmp_path):
    net = _net()
    bank = _bank(net)
    path, saved = _saved(tmp_path, net, bank)
    moved = atlas_fast.TaskVectors(bank.vectors, sources=[f"/elsewhere/ft{t}.pt" for t in range(T)])
    assert torch.equal(_load(net, moved, path), saved)
    assert torch.equal(_load(net, bank.to(dtype=torch.bfloat16), path), saved)
    bank.save(tmp_path / "bank.safetensors")
    mapped = atlas_fast.TaskVectors.load(tmp_path / "bank.safetensors", mmap=True)
    assert torch.equal(mapped.fingerprint(), bank.fingerprint())
    assert torch.equal(_load(net, mapped, path), saved)


# ---------------------------------------------------------------- older coefficient files


def _old_file(path, atlas, fmt, with_fingerprint):
    """A coefficient file as atlas_fast.coefficients/1 or /2 wrote it: metadata only, /2 with [‖τ_t‖, Σ τ_t] of
    each task vector over all blocks (float64, computed here)."""
    from safetensors.torch import save_file
    meta = {"format": fmt, "block_names": json.dumps(atlas.block_names), "granularity": "block", "partitions": "1",
            "seed": "0", "num_tasks": str(T), "sources": json.dumps(atlas.sources)}
    if with_fingerprint:
        flat = torch.cat([tau.double().reshape(T, -1) for _, _, tau in atlas._theta0_and_tau()], 1)
        meta["fingerprint"] = json.dumps([[float(n), float(s)] for n, s in zip(flat.norm(dim=1), flat.sum(1))])
    save_file({"coefficients": atlas.coefficients.detach().clone()}, str(path), metadata=meta)


def test_older_coefficient_files_load(tmp_path):
    net = _net()
    bank = _bank(net)
    atlas = atlas_fast.compose(copy.deepcopy(net), bank)
    with torch.no_grad():
        atlas.coefficients.uniform_(-0.5, 0.5)
    v1, v2 = tmp_path / "v1.safetensors", tmp_path / "v2.safetensors"
    _old_file(v1, atlas, "atlas_fast.coefficients/1", False)
    _old_file(v2, atlas, "atlas_fast.coefficients/2", True)
    for path in (v1, v2):
        assert torch.equal(_load(net, bank, path), atlas.coefficients.detach())
    other = _bank(net, seed=9)
    assert torch.equal(_load(net, other, v1), atlas.coefficients.detach())   # /1 records no bank
    with pytest.raises(ValueError, match=r"v2.safetensors: saved for another bank: task vector 0 "
                                         r"\('synthetic\[0\]'\) holds other values \(norm"):
        _load(net, other, v2)
