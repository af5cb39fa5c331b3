"""Low-rank task vectors τ_t = B_t A_t: the ops against the float64 reference of the task vectors multiplied
out in the test (forward, input and coefficient gradients, both strategies of the linear), compose() on every
backend that runs here, and low-rank banks (truncated SVD, files, conversions)."""
import copy

import pytest
import torch

import atlas_fast
from atlas_fast import TaskVectors, compose, synthetic_task_vectors
from atlas_fast.bank import lowrank
from atlas_fast.ops.hashing import block_key
from atlas_fast.ops.reference import conv2d_ref, linear_ref, merge_ref
from helpers import TOL, assert_rel, random_coef
from test_quant_ops import Mixed, composed_against_reference


def _factors(T, rows, cols, ranks, scale=1e-2, dtype=torch.float32):
    """Per-task (B, A) of the given ranks and the float64 τ (T, rows, cols) they make, multiplied out here."""
    parts = [(torch.randn(rows, r, dtype=dtype) * scale, torch.randn(r, cols, dtype=dtype) / cols ** 0.5)
             for r in ranks]
    dense = torch.stack([torch.einsum("ir,rj->ij", b.double(), a.double()) for b, a in parts])
    return parts, dense


def _linear_case(M, K=37, N=29, T=3, ranks=(2, 5, 3)):
    parts, tau64 = _factors(T, N, K, ranks)
    block = lowrank.stack(parts, (N, K))
    x = torch.randn(M, K)
    w, b = torch.randn(N, K) / K ** 0.5, torch.randn(N) * 0.1
    return x, w, b, block, tau64, torch.randn(T, N) * 1e-3, random_coef(T, 1), random_coef(T, 1)


# ---------------------------------------------------------------- the block

def test_stack_pads_ranks_with_zero_factors():
    parts, dense = _factors(3, 6, 10, (1, 4, 2))
    block = lowrank.stack(parts[:2] + [None], (6, 10))
    assert block.rank == 4 and tuple(block.shape) == (3, 6, 10)
    assert block.nbytes == 4 * 3 * 4 * (6 + 10)
    assert torch.equal(block.a[0, 1:], torch.zeros(3, 10))
    assert_rel(block.dense(torch.float64)[:2], dense[:2], 1e-6)
    assert torch.count_nonzero(block.dense()[2]) == 0


def test_truncate_by_rank_and_by_energy():
    """A task vector of singular values 4, 2, 1: energies 16/21, 20/21, 1."""
    u, _ = torch.linalg.qr(torch.randn(9, 3, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(7, 3, dtype=torch.float64))
    tau = (u * torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)) @ v.t()
    for kwargs, rank, kept in [({"rank": 1}, 1, 16 / 21), ({"energy": 0.9}, 2, 20 / 21), ({"energy": 20 / 21}, 2, 20 / 21),
                               ({"energy": 0.96}, 3, 1.0), ({"rank": 10}, 3, 1.0)]:
        b, a, frac = lowrank.truncate(tau, **kwargs)
        assert b.shape == (9, rank) and a.shape == (rank, 7), kwargs
        assert frac == pytest.approx(kept, rel=1e-9), kwargs
        residual = tau - b.double() @ a.double()
        assert float(residual.square().sum() / tau.square().sum()) == pytest.approx(1 - kept, abs=1e-6), kwargs
    with pytest.raises(ValueError, match="rank= or energy="):
        lowrank.truncate(tau)
    with pytest.raises(ValueError, match="energy=1.5"):
        lowrank.truncate(tau, energy=1.5)


def test_fingerprint_from_factors():
    parts, dense = _factors(3, 8, 5, (2, 2, 1))
    sq, total = lowrank.fingerprint(lowrank.stack(parts, (8, 5)))
    assert_rel(sq, dense.square().sum((1, 2)), 1e-6, "‖τ‖²")
    assert_rel(total, dense.sum((1, 2)), 1e-6, "Σ τ")


# ---------------------------------------------------------------- ops

@pytest.mark.parametrize("M", [3, 200], ids=["factored", "merged"])
def test_linear_torch(M):
    """Both strategies of the forward and of the input gradient (3 rows: factored; 200: merged first)."""
    x, w, b, block, tau64, tb, cw, cb = _linear_case(M)
    assert lowrank.factored(M, 29, 37) == (M == 3)
    xl = x.clone().requires_grad_()
    y = atlas_fast.atlas_linear(xl, w, b, block, tb, cw, cb, 0, block_key(0, 1), backend="torch")
    x64 = x.double().requires_grad_()
    y_ref = linear_ref(x64, w, b, tau64, tb, cw, cb, 0, block_key(0, 1))
    g = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, (xl, cw, cb), g.float())
    grads_ref = torch.autograd.grad(y_ref, (x64, cw, cb), g)
    assert_rel(y, y_ref, TOL[torch.float32][0])
    for name, got, ref in zip(("grad x", "grad coef_w", "grad coef_b"), grads, grads_ref):
        assert_rel(got, ref, TOL[torch.float32][1], name)


def test_linear_bf16_autocast():
    x, w, b, block, tau64, tb, cw, cb = _linear_case(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = atlas_fast.atlas_linear(x[None], w, b, block, tb, cw, cb, backend="torch")
    assert y.dtype == torch.bfloat16 and y.shape == (1, 5, 29)
    assert_rel(y[0].float(), linear_ref(x, w, b, tau64, tb, cw, cb), 2e-2)
    dcw, = torch.autograd.grad(y.float().square().sum(), cw)
    x64 = x.double()
    cw64 = cw.detach().double().requires_grad_()
    dcw_ref, = torch.autograd.grad(linear_ref(x64, w, b, tau64, tb, cw64, cb.detach()).square().sum(), cw64)
    assert_rel(dcw, dcw_ref, 5e-2, "grad coef_w")


def test_conv2d_torch():
    T = 2
    parts, tau64 = _factors(T, 5, 4 * 3 * 3, (2, 3))
    block = lowrank.stack(parts, (5, 4, 3, 3))
    x = torch.randn(2, 4, 7, 9)
    w, b, tb = torch.randn(5, 4, 3, 3) * 0.2, torch.randn(5), torch.randn(T, 5) * 1e-2
    cw, cb = random_coef(T, 1), random_coef(T, 1)
    xl = x.clone().requires_grad_()
    y = atlas_fast.atlas_conv2d(xl, w, b, block, tb, cw, cb, stride=(2, 1), padding=(1, 0), backend="torch")
    x64 = x.double().requires_grad_()
    y_ref = conv2d_ref(x64, w, b, tau64.view(T, 5, 4, 3, 3), tb, cw, cb, stride=(2, 1), padding=(1, 0))
    g = torch.randn_like(y_ref)
    assert_rel(y, y_ref, TOL[torch.float32][0])
    grads = torch.autograd.grad(y, (xl, cw, cb), g.float())
    for name, got, ref in zip(("grad x", "grad coef_w", "grad coef_b"), grads,
                              torch.autograd.grad(y_ref, (x64, cw, cb), g)):
        assert_rel(got, ref, TOL[torch.float32][1], name)


def test_merge_blocks_dense_and_lowrank():
    T = 3
    parts, tau64 = _factors(T, 7, 37, (1, 2, 3))
    theta0 = [torch.randn(7, 37), torch.randn(11), torch.randn(5, 6)]
    taus = [lowrank.stack(parts, (7, 37)), torch.randn(T, 11) * 1e-2, torch.randn(T, 5, 6) * 1e-2]
    coef = torch.randn(T, 3, 1, requires_grad=True)
    keys = [block_key(1, b) for b in range(3)]
    merged = atlas_fast.merge_blocks(theta0, taus, coef, keys, backend="torch")
    c64 = coef.detach().double().requires_grad_()
    refs = [merge_ref(t0, t, c64[:, b], keys[b]) for b, (t0, t) in enumerate(zip(theta0, [tau64] + taus[1:]))]
    grads = [torch.randn_like(r) for r in refs]
    for m, r in zip(merged, refs):
        assert m.dtype == torch.float32
        assert_rel(m, r, TOL[torch.float32][0])
    dc = torch.autograd.grad(merged, coef, [g.float() for g in grads])[0]
    assert_rel(dc, torch.autograd.grad(refs, c64, grads)[0], TOL[torch.float32][1], "dc")


def test_gradcheck_float64():
    d = dict(dtype=torch.float64)
    parts, _ = _factors(2, 6, 7, (2, 1), scale=1.0, dtype=torch.float64)
    block = lowrank.stack(parts, (6, 7))
    w, b, tb = torch.randn(6, 7, **d), torch.randn(6, **d), torch.randn(2, 6, **d)
    for M in (2, 40):
        x = torch.randn(M, 7, **d, requires_grad=True)
        cw, cb = torch.randn(2, 1, **d, requires_grad=True), torch.randn(2, 1, **d, requires_grad=True)
        f = lambda *a: atlas_fast.atlas_linear(a[0], w, b, block, tb, a[1], a[2], backend="torch")  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, cw, cb))
    theta0 = torch.randn(6, 7, **d)
    c = torch.randn(2, 1, 1, **d, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: atlas_fast.merge_blocks([theta0], [block], c, [0])[0], (c,))


def test_opcheck():
    x, w, b, block, _, _, cw, _ = _linear_case(9, K=11, N=7)
    x.requires_grad_()
    torch.library.opcheck(torch.ops.atlas_fast.atlas_linear_lowrank.default, (x, w, b, block.a, block.bt, cw))
    torch.library.opcheck(torch.ops.atlas_fast.atlas_linear_lowrank_backward.default,
                          (torch.randn(9, 7), x.detach(), w, block.a, block.bt, cw.detach(), True))
    torch.library.opcheck(torch.ops.atlas_fast.merge_lowrank.default, (w, block.a, block.bt, cw))
    torch.library.opcheck(torch.ops.atlas_fast.merge_lowrank_backward.default,
                          (torch.randn(7, 11), block.a, block.bt, cw.detach()))


def test_partitions_are_refused():
    x, w, b, block, _, tb, _, _ = _linear_case(4)
    with pytest.raises(ValueError, match=r"weight: low-rank task vectors take one coefficient .*\(3, 2\)"):
        atlas_fast.atlas_linear(x, w, b, block, tb, random_coef(3, 2), random_coef(3, 2), backend="torch")
    model = Mixed()
    bank = synthetic_task_vectors(model, 2).low_rank(rank=2)
    with pytest.raises(ValueError, match=r"compose\(partitions=3\): a low-rank bank takes partitions=1"):
        compose(model, bank, partitions=3)


# ---------------------------------------------------------------- compose

@pytest.mark.parametrize("granularity", ["block", "task"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compose_against_reference(granularity, backend):
    torch.manual_seed(0)
    model, x = Mixed(), torch.randn(4, 3, 5, 5)
    bank = synthetic_task_vectors(model, 3, rel_scale=0.05).low_rank(rank=3)
    assert {type(bank[n]).__name__ for n in ("conv.weight", "lin.weight", "proj", "emb.weight",
                                             "attn.in_proj_weight")} == {"LowRankBlock"}
    dense = {k: v.dense() if lowrank.is_lowrank(v) else v for k, v in bank.vectors.items()}
    atlas, y_ref = composed_against_reference(model, x, bank, dense, granularity, 1, backend)
    assert_rel(atlas.merge()(x), y_ref, TOL[torch.float32][0], "merge()")


def test_composed_model_moves_copies_and_compiles():
    torch.manual_seed(0)
    model, x = Mixed(), torch.randn(2, 3, 5, 5)
    bank = synthetic_task_vectors(model, 2, rel_scale=0.05).low_rank(rank=2)
    atlas = compose(copy.deepcopy(model), bank, backend="torch")
    with torch.no_grad():
        atlas.coefficients.uniform_(-0.5, 0.5)
    y = atlas(x)
    assert not any("tau" in k for k in atlas.state_dict()), "task vectors are not state"
    assert torch.equal(copy.deepcopy(atlas)(x), y)
    dense = TaskVectors({k: v.dense() if lowrank.is_lowrank(v) else v for k, v in bank.vectors.items()})
    twin = compose(model, dense, backend="torch")
    with torch.no_grad():
        twin.coefficients.copy_(atlas.coefficients)
    fp_low, fp_dense = atlas.bank_fingerprint(), twin.bank_fingerprint()
    assert_rel(fp_low, fp_dense, 1e-5, "fingerprint")
    compiled = torch.compile(atlas, fullgraph=True, backend="aot_eager")
    assert_rel(compiled(x), y, 1e-6, "compiled")
    atlas.bfloat16()
    assert atlas.model.lin.tau_weight.dtype == torch.bfloat16
    assert_rel(atlas(x.bfloat16()).float(), y, 3e-2, "bfloat16 model")


# ---------------------------------------------------------------- banks

def _models(T=3, rank=2):
    """A pretrained Mixed model and T fine-tuned ones whose differences are exactly rank `rank` per 2-D block."""
    torch.manual_seed(1)
    base = Mixed()
    tuned = []
    for _ in range(T):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                rows = p.shape[0]
                if p.dim() >= 2:
                    cols = p.numel() // rows
                    p += (torch.randn(rows, rank) @ torch.randn(rank, cols) * 1e-3).view(p.shape)
                else:
                    p += torch.randn_like(p) * 1e-3
        tuned.append(m)
    return base, tuned


def test_bank_of_exact_low_rank_differences():
    base, tuned = _models(rank=2)
    full = TaskVectors.from_models(base, tuned)
    bank = TaskVectors.from_models(base, tuned, energy=0.999999)
    assert bank.format == "lowrank" and bank.dtype == "lowrank" and bank.rank == 2
    for k, v in full.vectors.items():
        if v.dim() > 2:
            assert lowrank.is_lowrank(bank[k]) and bank[k].rank == 2, k
            # The float32 differences carry the rounding of θ (|θ| · 6e-8 against |τ| ~ 1e-3): a relative 1e-4
            # of noise off rank 2, which the truncation drops.
            assert_rel(bank[k].dense(torch.float64), v, 3e-4, k)
            assert bank.lowrank_energy[k] == pytest.approx(1.0, abs=1e-6)
        else:
            assert torch.equal(bank[k], v), k
    assert bank.nbytes < 0.25 * full.nbytes
    assert "lowrank bank (rank 2 to 2)" in bank.quantization_report()


def test_low_rank_of_a_bank_reports_the_energy_it_keeps():
    torch.manual_seed(0)
    model = Mixed()
    full = synthetic_task_vectors(model, 2)
    bank = full.low_rank(rank=3)
    for k, v in full.vectors.items():
        if v.dim() > 2:
            residual = (v.double() - bank[k].dense(torch.float64)).square().sum()
            assert bank.lowrank_energy[k] == pytest.approx(1 - float(residual / v.double().square().sum()), abs=1e-6)
    with pytest.raises(ValueError, match="low_rank: the bank is lowrank"):
        bank.low_rank(rank=2)
    with pytest.raises(ValueError, match="quantize\\(int8\\): the bank is already lowrank"):
        bank.to(dtype=torch.int8)
    with pytest.raises(ValueError, match="dtype=torch.bfloat16 cannot be combined"):
        TaskVectors.from_models(model, [model], dtype=torch.bfloat16, rank=2)


@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_and_convert(tmp_path, mmap):
    base, tuned = _models(rank=2)
    bank = TaskVectors.from_models(base, tuned, rank=1)
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    back = TaskVectors.load(path, mmap=mmap)
    assert back.format == "lowrank" and back.lowrank_energy == pytest.approx(bank.lowrank_energy)
    for k, v in bank.vectors.items():
        w = back[k]
        if lowrank.is_lowrank(v):
            assert torch.equal(w.a, v.a) and torch.equal(w.bt, v.bt) and w.shape == v.shape, k
        else:
            assert torch.equal(w, v), k
    dense = back.to(dtype=torch.float32)
    assert dense.format == "float32"
    assert torch.equal(dense["lin.weight"], bank["lin.weight"].dense())


def test_bad_factors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"factors a \(2, 3, 5\) and bt \(2, 3, 4\), expected \(2, r, 5\) and "
                                         r"\(2, r, 6\)"):
        lowrank.LowRankBlock(torch.zeros(2, 3, 5), torch.zeros(2, 3, 4), (2, 6, 5))
    bank = TaskVectors({"w": lowrank.stack([(torch.ones(4, 1), torch.ones(1, 3))], (4, 3))})
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["w::bt"] = tensors["w::bt"][:, :, :2].contiguous()
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match=f"{path}: block 'w': low-rank task vectors"):
        TaskVectors.load(path)
    tensors["w::bt"] = torch.full((1, 1, 4), float("nan"))
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="block 'w' of task vector 0 .* non-finite"):
        TaskVectors.load(path)
