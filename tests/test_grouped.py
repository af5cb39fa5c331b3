"""Grouped compositions: G coefficient sets in one call against G separate compositions.

Op level: atlas_linear_grouped, atlas_conv2d_grouped and merge_blocks_grouped on both backends (the torch
implementation's two strategies each) against the float64 reference applied sample by sample with that
sample's group's coefficients; odd shapes, a group without samples, groups spanning several row tiles.
Model level: a tiny open_clip ViT run with AtlasModel.groups against a separately composed model per group,
per-sample coefficients from a router against a float64 per-sample loop, and torch.compile against eager.
"""
import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

import atlas_fast
from atlas_fast.backends import torch_grouped
from atlas_fast.bank import lowrank, quant
from atlas_fast.ops.grouped import atlas_conv2d_grouped, atlas_linear_grouped, merge_blocks_grouped
from atlas_fast.ops.hashing import block_key
from atlas_fast.ops.reference import conv2d_ref, linear_ref, merge_ref
from conftest import DEVICE
from helpers import TOL, assert_rel, compile_for_sm90, merged_reference, random_bank, reference_call, tiny_vit

T = 3
KEY_W, KEY_B = block_key(7, 1), block_key(7, 2)


def _coefs(G, P, dtype=torch.float32):
    return (torch.rand(G, T, P, dtype=dtype) * 1.6 - 0.8).requires_grad_()


def _device(backend):
    """Triton runs on the GPU where there is one (else on the CPU under the interpreter); torch on the CPU."""
    return DEVICE if backend == "triton" else "cpu"


def _to(device, *tensors):
    """The tensors on `device`, leaves that required gradients still leaves requiring them."""
    return [t if t is None else t.detach().to(device).requires_grad_(t.requires_grad) for t in tensors]


@pytest.fixture
def strategy(request, monkeypatch):
    """Forces the torch implementation's linear strategy ("rowscale" or "merge") through its threshold."""
    monkeypatch.setattr(torch_grouped, "ROWS_PER_MERGE", 10 ** 9 if request.param == "rowscale" else 0)
    return request.param


def _reference_grads(fn, inputs, grad_out):
    """Float64 outputs of fn and the gradients of Σ grad_out · fn with respect to every input."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out.double())
    return out.detach(), grads


# ---------------------------------------------------------------- linear

# S samples of R rows each; group 1 of G = 4 gets no sample; group 0 gets enough rows for several row tiles.
INDEX = [0, 2, 0, 3, 0, 2, 0]


def _linear_case(bias, bank_dtype, P, S_rows=5, N=70, K=37, device="cpu"):
    x = torch.randn(len(INDEX), S_rows, K)
    weight = torch.randn(N, K) / K ** 0.5
    b = torch.randn(N) if bias else None
    tau_w = random_bank((N, K), T, bank_dtype, scale=0.05)
    tau_b = random_bank((N,), T, bank_dtype, scale=0.05) if bias else None
    cw, cb = _coefs(4, P), (_coefs(4, P) if bias else None)
    return _to(device, x, torch.tensor(INDEX), weight, b, tau_w, tau_b, cw, cb)


def _linear_ref(x, weight, bias, tau_w, tau_b, cw, cb, index):
    return torch.stack([linear_ref(x[s], weight, bias, tau_w, tau_b, cw[g], cb[g] if cb is not None else None,
                                   KEY_W, KEY_B) for s, g in enumerate(index.tolist())])


def _in_format(tau, fmt, group=16):
    """(the bank the op gets, the float64 one the reference gets): an int8 / int4 QuantizedBlock of tau and its
    dequantised values; for "lowrank" a rank-3 LowRankBlock of random factors shaped like tau and the task
    vectors they make, multiplied out here in float64; or tau twice when fmt is None."""
    if fmt is None:
        return tau, tau
    if fmt == "lowrank":
        T_, rows = tau.shape[:2]
        b = torch.randn(T_, rows, 3, device=tau.device) * 0.05
        a = torch.randn(T_, 3, tau[0].numel() // rows, device=tau.device) / 3 ** 0.5
        dense = torch.einsum("tir,trj->tij", b.double(), a.double()).reshape(tau.shape)
        return lowrank.LowRankBlock.from_factors(b, a, tau.shape), dense
    q = quant.quantize(tau.float(), fmt, group)
    return q, q.dequantize(torch.float64)


def _check_linear(backend, bias, bank_dtype, P, tol=TOL[torch.float32], fmt=None):
    x, index, weight, b, tau_w, tau_b, cw, cb = _linear_case(bias, bank_dtype, P, device=_device(backend))
    x.requires_grad_()
    tau_op, tau_w = _in_format(tau_w, fmt)
    y = atlas_linear_grouped(x, index, weight, b, tau_op, tau_b, cw, cb, KEY_W, KEY_B, backend=backend)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, cw] + ([cb] if bias else []), dy)
    y_ref, ref = _reference_grads(lambda x_, cw_, cb_: _linear_ref(x_, weight, b, tau_w, tau_b, cw_, cb_, index),
                                  [x, cw, cb], dy)
    assert_rel(y, y_ref, tol[0], "output")
    for name, g, r in zip(("dx", "dc_w", "dc_b"), grads, ref):
        assert_rel(g, r, tol[1], name)
    assert grads[1][1].abs().max() == 0, "a group without samples got a coefficient gradient"
    for g in (0, 2, 3):   # each group's own gradient, so that one small group cannot hide in the norm of all
        assert_rel(grads[1][g], ref[1][g], tol[1], f"dc_w of group {g}")


@pytest.mark.parametrize("strategy", ["rowscale", "merge"], indirect=True)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("P", [1, 3])
def test_linear_torch(strategy, bias, P):
    _check_linear("torch", bias, torch.float32, P)


@pytest.mark.parametrize("bias,bank_dtype,P", [(True, torch.float32, 1), (True, torch.bfloat16, 3),
                                               (False, torch.float32, 2)])
def test_linear_triton(bias, bank_dtype, P):
    _check_linear("triton", bias, bank_dtype, P)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("backend,strategy", [("torch", "rowscale"), ("torch", "merge"), ("triton", "merge")],
                         indirect=["strategy"])
@pytest.mark.parametrize("P", [1, 3])
def test_linear_in_format(fmt, backend, strategy, P):
    """int8 / int4 weights (K = 37: an odd int4 width, groups of 16 with a short last one) against the float64
    reference of the dequantised bank: the torch implementation's two strategies, and the segmented Triton
    kernels dequantising in registers."""
    _check_linear(backend, True, torch.float32, P, fmt=fmt)


@pytest.mark.parametrize("factored", [True, False])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_lowrank(monkeypatch, factored, backend, bias):
    """Low-rank weights (factors never multiplied out by the op) on the torch implementation, whatever the backend:
    "factored" (per-row coefficients on x Aᵀ) and "merge" (a weight per group) against the float64 reference."""
    monkeypatch.setattr(lowrank, "factored", lambda m, rows, cols: factored)
    _check_linear(backend, bias, torch.float32, 1, fmt="lowrank")


def test_linear_lowrank_refuses_partitions():
    x, index, weight, b, tau_w, tau_b, cw, cb = _linear_case(True, torch.float32, 2)
    with pytest.raises(ValueError, match="one coefficient per task vector"):
        atlas_linear_grouped(x, index, weight, b, _in_format(tau_w, "lowrank")[0], tau_b, cw, cb, backend="torch")


@pytest.fixture
def merge_once(request, monkeypatch):
    """Makes the cost model choose merge-once for every group ("all") or for groups of at most 10 rows
    ("mixed": groups 2 and 3 of INDEX merged, group 0 fused)."""
    from atlas_fast.backends import plan
    real = plan.for_linear

    def for_linear(M, *args):
        choice = "merge_once" if request.param == "all" or M <= 10 else "fused"
        return dataclasses.replace(real(M, *args), forward=choice, dx=choice)
    monkeypatch.setattr(plan, "for_linear", for_linear)
    return request.param


@pytest.mark.parametrize("merge_once", ["all", "mixed"], indirect=True)
@pytest.mark.parametrize("bias,P", [(True, 1), (False, 3)])
def test_linear_triton_merge_once(merge_once, bias, P):
    _check_linear("triton", bias, torch.float32, P)


@pytest.mark.parametrize("merge_once", ["mixed"], indirect=True)
@pytest.mark.parametrize("fmt,P", [("int8", 1), ("int4", 3)])
def test_linear_triton_merge_once_in_format(merge_once, fmt, P):
    """The merge kernel dequantises the merge-once groups' layer; the segmented kernels the others'."""
    _check_linear("triton", True, torch.float32, P, fmt=fmt)


@pytest.mark.parametrize("factored", [True, False])
def test_linear_lowrank_gradcheck(monkeypatch, factored):
    monkeypatch.setattr(lowrank, "factored", lambda m, rows, cols: factored)
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([1, 0, 1])
    weight, bias = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    low = lowrank.LowRankBlock.from_factors(torch.randn(T, 4, 2, dtype=torch.float64),
                                            torch.randn(T, 2, 5, dtype=torch.float64), (T, 4, 5))
    tau_b = torch.randn(T, 4, dtype=torch.float64)
    cw, cb = _coefs(2, 1, torch.float64), _coefs(2, 1, torch.float64)
    fn = lambda x_, cw_, cb_: atlas_linear_grouped(x_, index, weight, bias, low, tau_b, cw_, cb_,  # noqa: E731
                                                    KEY_W, KEY_B, backend="torch")
    assert torch.autograd.gradcheck(fn, (x, cw, cb))


@pytest.mark.parametrize("strategy", ["rowscale", "merge"], indirect=True)
def test_linear_gradcheck(strategy):
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([1, 0, 1])
    weight, bias = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    tau_w, tau_b = torch.randn(T, 4, 5, dtype=torch.float64), torch.randn(T, 4, dtype=torch.float64)
    cw, cb = _coefs(2, 1, torch.float64), _coefs(2, 1, torch.float64)
    fn = lambda x_, cw_, cb_: atlas_linear_grouped(x_, index, weight, bias, tau_w, tau_b, cw_, cb_,  # noqa: E731
                                                    KEY_W, KEY_B, backend="torch")
    assert torch.autograd.gradcheck(fn, (x, cw, cb))


def test_triton_kernels_write_every_row():
    """Launchers given NaN-filled outputs: rows of every group, across tiles, are overwritten."""
    from atlas_fast.kernels import atlas_linear_grouped as kernels
    x, index, weight, b, tau_w, tau_b, cw, cb = _linear_case(True, torch.float32, 1, S_rows=9, device=DEVICE)
    x2, rows = x.reshape(-1, x.shape[-1]), index.repeat_interleave(9)
    y = kernels.forward(x2, rows, weight, b, tau_w, tau_b, cw.detach(), cb.detach(), KEY_W, KEY_B,
                        out=torch.full((x2.shape[0], weight.shape[0]), float("nan"), device=x.device))
    assert_rel(y, _linear_ref(x, weight, b, tau_w, tau_b, cw, cb, index).reshape(y.shape), 1e-5, "output")
    dy = torch.randn_like(y)
    dx = kernels.grad_input(dy, rows, weight, tau_w, cw.detach(), KEY_W, out=torch.full_like(x2, float("nan")))
    w_rows = torch.stack([merge_ref(weight, tau_w, cw[g].detach(), KEY_W) for g in rows.tolist()])
    assert_rel(dx, torch.einsum("mn,mnk->mk", dy.double(), w_rows), 1e-5, "dx")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_under_vmap(backend):
    """An unbatched index under vmap names the group of each vmapped sample, all of whose rows (here two
    sub-batches of five) belong to it."""
    x, index, weight, b, tau_w, tau_b, cw, cb = _linear_case(True, torch.float32, 1, device=_device(backend))
    x = x.view(len(INDEX), 1, 5, -1).expand(-1, 2, -1, -1) * torch.tensor([1.0, -2.0], device=x.device).view(1, 2, 1, 1)
    op = torch.ops.atlas_fast.atlas_linear_grouped
    y = torch.func.vmap(lambda xs: op(xs, index, weight, b, tau_w, tau_b, cw, cb, KEY_W, KEY_B, backend))(x)
    ref = torch.stack([_linear_ref(x[:, i], weight, b, tau_w, tau_b, cw, cb, index) for i in range(2)], 1)
    assert_rel(y, ref, TOL[torch.float32][0], "output under vmap")


def test_linear_checks():
    x, index, weight, b, tau_w, tau_b, cw, cb = _linear_case(True, torch.float32, 1)
    with pytest.raises(ValueError, match="outside"):
        atlas_linear_grouped(x, index + 4, weight, b, tau_w, tau_b, cw, cb, backend="torch")
    with pytest.raises(ValueError, match="one group per sample"):
        atlas_linear_grouped(x, index[:-1], weight, b, tau_w, tau_b, cw, cb, backend="torch")
    with pytest.raises(ValueError, match=r"\(G, T, P\)"):
        atlas_linear_grouped(x, index, weight, b, tau_w, tau_b, cw[0], cb, backend="torch")


def test_opcheck():
    x, index, weight, b, tau_w, tau_b, cw, cb = _linear_case(True, torch.float32, 1, S_rows=2, N=6, K=5)
    torch.library.opcheck(torch.ops.atlas_fast.atlas_linear_grouped,
                          (x, index, weight, b, tau_w, tau_b, cw, cb, KEY_W, KEY_B, "torch"))
    xc = torch.randn(3, 2, 6, 6)
    wc, tc = torch.randn(4, 2, 3, 3), random_bank((4, 2, 3, 3), T)
    torch.library.opcheck(torch.ops.atlas_fast.atlas_conv2d_grouped,
                          (xc, torch.tensor([1, 0, 1]), wc, None, tc, None, _coefs(2, 1), None, 0, 0, [1, 1],
                           [1, 1], [1, 1], 1, "torch"))
    torch.library.opcheck(torch.ops.atlas_fast.merge_blocks_grouped,
                          ([weight, b], [tau_w, tau_b], torch.randn(3, T, 2, 2, requires_grad=True), [KEY_W, KEY_B]))
    q, qc = quant.quantize(tau_w, "int4", 4), quant.quantize(tc, "int8")
    torch.library.opcheck(torch.ops.atlas_fast.atlas_linear_grouped,
                          (x, index, weight, b, q.data, tau_b, cw, cb, KEY_W, KEY_B, "torch", q.scale, q.group))
    torch.library.opcheck(torch.ops.atlas_fast.atlas_conv2d_grouped,
                          (xc, torch.tensor([1, 0, 1]), wc, None, qc.data, None, _coefs(2, 1), None, 0, 0, [1, 1],
                           [1, 1], [1, 1], 1, "torch", qc.scale, qc.group))
    torch.library.opcheck(torch.ops.atlas_fast.merge_blocks_grouped_quant,
                          ([weight, b], [q.data, tau_b], [q.scale, None], [q.group, 0],
                           torch.randn(3, T, 2, 2, requires_grad=True), [KEY_W, KEY_B]))
    low, low_c = _in_format(tau_w, "lowrank")[0], _in_format(tc, "lowrank")[0]
    torch.library.opcheck(torch.ops.atlas_fast.atlas_linear_grouped,
                          (x, index, weight, b, low.a, tau_b, cw, cb, KEY_W, KEY_B, "torch", None, 0, low.bt))
    torch.library.opcheck(torch.ops.atlas_fast.atlas_conv2d_grouped,
                          (xc, torch.tensor([1, 0, 1]), wc, None, low_c.a, None, _coefs(2, 1), None, 0, 0, [1, 1],
                           [1, 1], [1, 1], 1, "torch", None, 0, low_c.bt))
    torch.library.opcheck(torch.ops.atlas_fast.merge_lowrank_grouped, (weight, low.a, low.bt, _coefs(3, 1)))


# ---------------------------------------------------------------- conv2d

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("patchify", [True, False])
@pytest.mark.parametrize("fmt", [None, "int4", "lowrank"])
def test_conv2d(backend, patchify, fmt):
    S, C, N = 5, 3, 7
    x = torch.randn(S, C, 13, 11, requires_grad=True)
    index = torch.tensor([2, 0, 2, 2, 0])
    k, stride, padding = (4, (4, 4), (0, 0)) if patchify else (3, (2, 1), (1, 1))
    weight, bias = torch.randn(N, C, k, k) / (C * k * k) ** 0.5, torch.randn(N)
    tau_w, tau_b = random_bank(weight.shape, T, scale=0.05), random_bank((N,), T, scale=0.05)
    P = 1 if fmt == "lowrank" else 2
    cw, cb = _coefs(3, P), _coefs(3, P)
    x, index, weight, bias, tau_w, tau_b, cw, cb = _to(_device(backend), x, index, weight, bias, tau_w, tau_b, cw, cb)
    tau_op, tau_w = _in_format(tau_w, fmt)
    y = atlas_conv2d_grouped(x, index, weight, bias, tau_op, tau_b, cw, cb, KEY_W, KEY_B, stride, padding,
                             backend=backend)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, cw, cb], dy)

    def ref(x_, cw_, cb_):
        return torch.cat([conv2d_ref(x_[s:s + 1], weight, bias, tau_w, tau_b, cw_[g], cb_[g], KEY_W, KEY_B, stride,
                                     padding) for s, g in enumerate(index.tolist())])
    y_ref, ref_grads = _reference_grads(ref, [x, cw, cb], dy)
    tol = TOL[torch.float32]
    assert_rel(y, y_ref, tol[0], "output")
    for name, g, r in zip(("dx", "dc_w", "dc_b"), grads, ref_grads):
        assert_rel(g, r, tol[1], name)
    assert grads[1][1].abs().max() == 0


# ---------------------------------------------------------------- merge_blocks_grouped

@pytest.mark.parametrize("P,fmt", [(1, None), (4, None), (1, "int8"), (4, "int8"), (1, "lowrank")])
def test_merge_blocks_grouped(P, fmt):
    """bf16 blocks, or int8 / low-rank ones where a block has two or more dimensions (the 1-D one stays float)."""
    shapes = [(37,), (5, 13), (3, 2, 7)]
    theta0 = [torch.randn(s) for s in shapes]
    tau = [random_bank(s, T, torch.bfloat16) for s in shapes]
    ops_tau = [_in_format(t, fmt if len(s) > 1 else None) for t, s in zip(tau, shapes)]
    tau = [ref for _, ref in ops_tau]
    keys = [block_key(3, b) for b in range(len(shapes))]
    coef = torch.randn(2, T, len(shapes), P, requires_grad=True)
    merged = merge_blocks_grouped(theta0, [op for op, _ in ops_tau], coef, keys)
    grads_out = [torch.randn_like(m) for m in merged]
    dc, = torch.autograd.grad(merged, coef, grads_out)

    def ref(c):
        return torch.cat([merge_ref(t0, tv, c[g, :, b], key).reshape(-1)
                          for g in range(2) for b, (t0, tv, key) in enumerate(zip(theta0, tau, keys))])
    flat_grad = torch.cat([g_out[g].reshape(-1) for g in range(2) for g_out in grads_out])
    out_ref, (dc_ref,) = _reference_grads(ref, [coef], flat_grad)
    assert_rel(torch.cat([m[g].reshape(-1) for g in range(2) for m in merged]), out_ref, 1e-6, "merged")
    assert_rel(dc, dc_ref, 1e-5, "coefficient gradient")


# ---------------------------------------------------------------- a tiny open_clip ViT

@pytest.fixture(scope="module")
def vit():
    return tiny_vit()


@pytest.fixture(scope="module")
def bank(vit):
    return atlas_fast.synthetic_task_vectors(vit, T, rel_scale=1e-2, seed=2)


@pytest.fixture(scope="module")
def lowrank_banks(bank):
    """(a rank-2 low-rank bank of the ViT, {name: its task vectors multiplied out here in float64})."""
    factored = bank.low_rank(rank=2)
    return factored, {k: torch.einsum("tri,trj->tij", v.bt.double(), v.a.double()).reshape(v.shape)
                      if lowrank.is_lowrank(v) else v.double() for k, v in factored.vectors.items()}


def _banks(fmt, bank, lowrank_banks):
    """(the bank composed, the bank of the float64 reference)."""
    return lowrank_banks if fmt == "lowrank" else (bank, bank)


def _compose(vit, bank, backend="torch", granularity="block", partitions=1):
    device = _device(backend)
    return atlas_fast.compose(copy.deepcopy(vit).to(device), bank.to(device), granularity, partitions,
                              backend=backend, seed=5)


def _separate_runs(model, coef, index, images, weight, input_grad=False):
    """Every group's samples through `model` composed with that group's coefficients alone: (outputs,
    coefficient gradients (G, ...)) of Σ weight · outputs, and the input gradient when input_grad."""
    out = torch.empty(weight.shape)
    grads, dx = torch.zeros_like(coef), torch.zeros_like(images, dtype=torch.float32)
    for g in range(coef.shape[0]):
        samples = (index == g).nonzero().squeeze(1)
        if samples.numel() == 0:
            continue
        with torch.no_grad():
            model.coefficients.copy_(coef[g])
        model.coefficients.grad = None
        x = images[samples].requires_grad_(input_grad)
        y = model(x)
        (y * weight[samples]).sum().backward()
        out[samples] = y.detach()
        grads[g] = model.coefficients.grad
        if input_grad:
            dx[samples] = x.grad
    return (out, grads, dx) if input_grad else (out, grads)


def _grouped_run(model, coef, index, images, weight, input_grad=False):
    coef = coef.detach().clone().requires_grad_()
    x = images.clone().requires_grad_(input_grad)
    with model.groups(index, coef):
        y = model(x)
    (y * weight).sum().backward()
    return (y.detach(), coef.grad, x.grad) if input_grad else (y.detach(), coef.grad)


@pytest.mark.parametrize("backend,granularity,partitions,fmt", [
    ("torch", "block", 1, None), ("torch", "block", 3, None), ("torch", "task", 1, None), ("triton", "block", 3, None),
    ("torch", "block", 1, "int8"), ("triton", "block", 3, "int4")])
def test_vit_groups_match_separate_compositions(vit, bank, backend, granularity, partitions, fmt):
    """Against compositions run one group at a time (the ungrouped ops), on the same bank: float, or int8 / int4
    (groups of 16 of the ViT's 48-wide rows)."""
    if fmt is not None:
        bank = bank.to(dtype=torch.int8) if fmt == "int8" else bank.to(dtype="int4", group_size=16)
    model = _compose(vit, bank, backend, granularity, partitions)
    assert set(model.report.fused.values()) == {"Conv2d", "MultiheadAttention", "Linear"}
    assert model.report.generic, "the ViT's LayerNorms, embeddings and projection take the generic merge"
    G = 4
    coef = torch.rand(G, *model.coefficients.shape) * 1.6 - 0.8
    index = torch.tensor([2, 0, 3, 2, 0])          # group 1 unused
    images, weight = torch.randn(5, 3, 32, 32), torch.randn(5, 24)
    dev = model.coefficients.device
    y, g, dx = (t.cpu() for t in _grouped_run(model, *_to(dev, coef, index, images, weight), input_grad=True))
    y_ref, g_ref, dx_ref = _separate_runs(_compose(vit, bank, "torch", granularity, partitions), coef, index, images,
                                          weight, input_grad=True)
    tol_out, tol_grad = TOL[torch.float32]
    assert_rel(y, y_ref, tol_out, "output")
    assert_rel(g, g_ref, tol_grad, "coefficient gradient")
    assert_rel(dx, dx_ref, tol_grad, "input gradient")
    assert g[1].abs().max() == 0, "a group without samples got a coefficient gradient"
    for group in (0, 2, 3):
        assert_rel(g[group], g_ref[group], tol_grad, f"coefficient gradient of group {group}")
    assert model.coefficients.grad is None, "a grouped call trains the coefficients it was given"


@pytest.mark.parametrize("fmt", [None, "lowrank"])
def test_vit_groups_against_float64_reference(vit, bank, lowrank_banks, fmt):
    """Outputs per sample against the float64 model merged with its group's coefficients; a low-rank bank's grouped
    calls (the conv, attention and MLP weights factored, the generic blocks merged from the factors) among them."""
    bank, ref_bank = _banks(fmt, bank, lowrank_banks)
    model = _compose(vit, bank)
    coef = torch.rand(2, *model.coefficients.shape) * 1.6 - 0.8
    index = torch.tensor([1, 0, 1])
    images, weight = torch.randn(3, 3, 32, 32), torch.randn(3, 24)
    y, g = _grouped_run(model, coef, index, images, weight)
    for s, grp in enumerate(index.tolist()):
        merged = merged_reference(vit, ref_bank, coef[grp].double())
        assert_rel(y[s], reference_call(vit, merged, images[s:s + 1])[0], TOL[torch.float32][0], f"sample {s}")


class Router(nn.Module):
    """Per-sample coefficients (N, T, B) from the mean-pooled image."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = blocks
        self.linear = nn.Linear(3, T * blocks)

    def forward(self, images):
        return self.linear(images.mean((2, 3))).view(-1, T, self.blocks)


@pytest.mark.parametrize("fmt", [None, "lowrank"])
def test_router_gradients_match_per_sample_loop(vit, bank, lowrank_banks, fmt):
    """The router's parameter gradients through per-sample coefficients against a float64 per-sample loop."""
    bank, ref_bank = _banks(fmt, bank, lowrank_banks)
    model = _compose(vit, bank)
    router = Router(len(model.block_names))
    images, weight = torch.randn(4, 3, 32, 32), torch.randn(4, 24)
    coef = router(images)
    with model.groups(torch.arange(4), coef):
        y = model(images)
    (y * weight).sum().backward()
    router64 = copy.deepcopy(router).double()
    loss = 0
    for s in range(4):
        merged = merged_reference(vit, ref_bank, router64(images[s:s + 1].double())[0])
        loss = loss + (reference_call(vit, merged, images[s:s + 1]) * weight[s:s + 1].double()).sum()
    loss.backward()
    for (name, p), p64 in zip(router.named_parameters(), router64.parameters()):
        assert_rel(p.grad, p64.grad, TOL[torch.float32][1], f"router {name} gradient")


def test_compile_matches_eager(vit, bank):
    model = _compose(vit, bank, granularity="task")
    coef = torch.rand(3, *model.coefficients.shape) * 1.6 - 0.8
    index = torch.tensor([2, 0, 2, 1])
    images, weight = torch.randn(4, 3, 32, 32), torch.randn(4, 24)
    y, g = _grouped_run(model, coef, index, images, weight)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y_c, g_c = _grouped_run(compiled, coef, index, images, weight)
    assert_rel(y_c, y, 1e-6, "compiled output")
    assert_rel(g_c, g, 1e-6, "compiled coefficient gradient")


def test_groups_context_checks(vit, bank):
    model = _compose(vit, bank)
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="coefficients must be"):
        with model.groups(torch.tensor([0, 0]), model.coefficients):
            pass
    coef = model.group_coefficients(2)
    assert coef.shape == (2, *model.coefficients.shape) and coef.requires_grad
    with pytest.raises(ValueError, match="outside"):
        with model.groups(torch.tensor([0, 2]), coef):
            pass
    with pytest.raises(ValueError, match="samples of the index"):
        with model.groups(torch.tensor([0, 1, 1]), coef):
            model(images)
    with model.groups(torch.tensor([0, 1]), coef * 0 + 0.5):
        inner = model.model(images)
    assert_rel(inner, _compose(vit, bank)(images), 0.0, "the wrapped model called inside the context")
    assert model.atlas.grouped is None
    assert_rel(model(images), _compose(vit, bank)(images), 0.0, "an ungrouped call after the context")


@pytest.mark.parametrize("bank_dtype,rank", [("fp32", None), ("int8", None), ("fp32", 2)])
def test_bench_grouped_measures_every_variant(vit, bank_dtype, rank):
    from atlas_fast.bench import grouped as bench_grouped
    s = bench_grouped.GroupSettings(model="tiny", tasks=2, batch=4, groups=2, backend="torch", steps=1, warmup=0,
                                    bank_dtype=bank_dtype, rank=rank)
    results = {v: bench_grouped.measure(v, s, copy.deepcopy(vit)) for v in bench_grouped.VARIANTS}
    assert all(len(r["infer_s"]) == 1 and r["peak_extra_mb"] >= 0 for r in results.values())
    assert results["merged"]["train_s"] is None and len(results["grouped"]["train_s"]) == 1
    table = bench_grouped.format_table(results, s)
    assert all(v in table for v in bench_grouped.VARIANTS)


class TokenModel(nn.Module):
    """Embedding and LayerNorm (generic blocks) around a Linear (fused), with dropout."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens):
        return self.head(self.drop(self.norm(self.embed(tokens)))).mean(1)


def test_token_model_groups():
    torch.manual_seed(0)
    net = TokenModel().eval()
    bank = atlas_fast.synthetic_task_vectors(net, T, rel_scale=0.1, seed=1)
    model = atlas_fast.compose(copy.deepcopy(net), bank, "block", 2, backend="torch")
    assert set(model.report.generic) == {"embed.weight", "norm.weight", "norm.bias"}
    coef = torch.rand(3, *model.coefficients.shape) * 1.6 - 0.8
    index = torch.tensor([1, 2, 1, 0, 2])
    tokens, weight = torch.randint(0, 11, (5, 4)), torch.randn(5, 3)
    y, g = _grouped_run(model, coef, index, tokens, weight)
    ref = atlas_fast.compose(copy.deepcopy(net), bank, "block", 2, backend="torch")
    y_ref, g_ref = _separate_runs(ref, coef, index, tokens, weight)
    assert_rel(y, y_ref, TOL[torch.float32][0], "output")
    assert_rel(g, g_ref, TOL[torch.float32][1], "coefficient gradient")
    model.train()
    with model.groups(index, coef):
        assert model(tokens).shape == (5, 3), "dropout draws per sample under the grouped call"


def test_cli_bench_groups(monkeypatch):
    from atlas_fast import cli
    from atlas_fast.bench import grouped as bench_grouped
    seen = []
    monkeypatch.setattr(bench_grouped, "run", lambda s: seen.append(s) or 0)
    assert cli.main(["bench", "--groups", "3", "--batch", "6", "--tasks", "2", "--device", "cpu",
                     "--backends", "naive,torch"]) == 0
    assert (seen[0].groups, seen[0].batch, seen[0].tasks, seen[0].backend) == (3, 6, 2, "torch")
    assert cli.main(["bench", "--groups", "2", "--batch", "4", "--bank-dtype", "int4", "--device", "cpu"]) == 0
    assert seen[1].bank_dtype == "int4"
    assert cli.main(["bench", "--groups", "2", "--batch", "4", "--rank", "3", "--device", "cpu"]) == 0
    assert seen[2].rank == 3
    with pytest.raises(SystemExit):
        cli.main(["bench", "--groups", "7", "--batch", "6", "--device", "cpu"])


_SM90_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from atlas_fast.kernels import atlas_linear_grouped as k

act, quant = "{act}", {quant}
data = {{0: "bf16", 1: "i8", 2: "u8"}}[quant]
segments = dict(rows_ptr="*i32", seg_start_ptr="*i32", tile_group_ptr="*i32", tile_start_ptr="*i32")
bank = dict(w_ptr="*fp32", tau_w_ptr="*" + data, scale_w_ptr="*fp32", coef_w_ptr="*fp32", N="i32", K="i32",
            key_w="i32")
kernels = [
    (k.atlas_linear_grouped_fwd_kernel, dict(x_ptr="*" + act, b_ptr="*fp32", tau_b_ptr="*fp32", coef_b_ptr="*fp32",
     y_ptr="*" + act, stride_xm="i32", stride_xk="i32", stride_ym="i32", key_b="i32"),
     dict(T=3, T_B=3, HAS_BIAS=True, BLOCK_M=k.BLOCK_M, BLOCK_N=k.BLOCK_N, BLOCK_K=k.BLOCK_K)),
    (k.atlas_linear_grouped_dx_kernel, dict(dy_ptr="*" + act, dx_ptr="*" + act, stride_dym="i32", stride_dyn="i32",
     stride_dxm="i32"), dict(T=3, BLOCK_M=k.BLOCK_M, BLOCK_N=k.BLOCK_N, BLOCK_K=k.BLOCK_K)),
    (k.atlas_linear_grouped_dc_kernel, dict(dy_ptr="*" + act, x_ptr="*" + act, partial_ptr="*fp32", T="i32",
     stride_dym="i32", stride_dyn="i32", stride_xm="i32", stride_xk="i32"),
     dict(BLOCK_M=k.DC_BLOCK_M, BLOCK_N=k.DC_BLOCK_N, BLOCK_K=k.DC_BLOCK_K)),
]
for fn, signature, constants in kernels:
    constants.update(P=3, QUANT=quant, GROUP=64, UPCAST=act == "fp32", PRECISION="ieee")
    signature.update(segments)
    signature.update(bank)
    signature.update({{name: "constexpr" for name in constants}})
    signature = {{name: signature[name] for name in fn.arg_names}}
    triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=k.WARPS, num_stages=2))
"""


@pytest.mark.slow
@pytest.mark.parametrize("act,quant_kind", [("bf16", 0), ("bf16", 2), ("fp32", 1)])
def test_grouped_kernels_compile_for_sm90(act, quant_kind):
    """The interpreter does not lower the grouped kernels; compiling the float (0), int8 (1) and int4 (2) variants
    for Hopper does, with the tiles a GPU launch uses."""
    compile_for_sm90(_SM90_COMPILE.format(act=act, quant=quant_kind))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("fmt", [None, "int4", "lowrank"])
def test_empty_batch_gives_an_empty_result_and_zero_groups_are_refused(backend, fmt):
    """S = 0 samples with G >= 1 coefficient sets: outputs of no samples and a zero coefficient gradient, model and
    ops; G = 0 coefficient sets: one error naming the groups."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.LayerNorm(6))
    bank = atlas_fast.synthetic_task_vectors(net, T, rel_scale=1e-2, seed=2)
    bank = {None: bank, "int4": bank.to(dtype="int4", group_size=16), "lowrank": bank.low_rank(rank=2)}[fmt]
    device = _device(backend)
    model = atlas_fast.compose(net.to(device), bank.to(device), backend=backend)
    coef = (torch.rand(2, *model.coefficients.shape, device=device) - 0.5).requires_grad_()
    with model.groups(torch.zeros(0, dtype=torch.int64, device=device), coef):
        y = model(torch.randn(0, 3, 6, 6, device=device))
    assert y.shape == (0, 6)
    y.sum().backward()
    assert torch.equal(coef.grad, torch.zeros_like(coef))
    with pytest.raises(ValueError, match=r"groups: coefficients for 0 groups \(0, 3, 6\)"):
        with model.groups(torch.zeros(0, dtype=torch.int64, device=device), coef[:0]):
            pass

    x, _, weight, b, tau_w, tau_b, cw, cb = _linear_case(True, torch.float32, 1, device=device)
    y = atlas_linear_grouped(x[:0], torch.zeros(0, dtype=torch.int64, device=device), weight, b, tau_w, tau_b, cw,
                             cb, KEY_W, KEY_B, backend=backend)
    assert y.shape == (0, 5, 70)
    gw, gb = torch.autograd.grad(y.sum(), [cw, cb], allow_unused=True)
    assert all(g is None or torch.equal(g, torch.zeros_like(g)) for g in (gw, gb))
    with pytest.raises(ValueError, match=r"weight: coefficients for 0 groups \(0, 3, 1\)"):
        atlas_linear_grouped(x[:0], torch.zeros(0, dtype=torch.int64, device=device), weight, b, tau_w, tau_b,
                             cw[:0], cb[:0], KEY_W, KEY_B, backend=backend)
    with pytest.raises(ValueError, match=r"merge_blocks_grouped: coefficients for 0 groups"):
        merge_blocks_grouped([weight], [tau_w], cw[:0, :, None], [KEY_W])
