"""atlas_linear on every backend against the float64 reference: forward, input and coefficient gradients."""
import pytest
import torch

import atlas_fast
from atlas_fast.ops.hashing import block_key
from atlas_fast.ops.reference import linear_ref
from conftest import DEVICE
from helpers import TOL, assert_rel, random_bank, random_coef

CPU_BACKENDS = ["torch", "triton"]
BACKENDS = CPU_BACKENDS + [pytest.param("cuda", marks=pytest.mark.gpu)]


def _case(M, K, N, T, P, bias, bank_dtype, device=DEVICE, lead=()):
    x = torch.randn(*lead, M, K, device=device, requires_grad=True)
    w = torch.randn(N, K, device=device) / K ** 0.5
    b = torch.randn(N, device=device) * 0.1 if bias else None
    tw = random_bank((N, K), T, bank_dtype, 1e-2 / K ** 0.5, device)
    tb = random_bank((N,), T, bank_dtype, 1e-3, device) if bias else None
    cw = random_coef(T, P, device)
    cb = random_coef(T, P, device) if bias else None
    return x, w, b, tw, tb, cw, cb


def _run(backend, case, keys):
    x, w, b, tw, tb, cw, cb = case
    y = atlas_fast.atlas_linear(x, w, b, tw, tb, cw, cb, *keys, backend=backend)
    yr = linear_ref(x, w, b, tw, tb, cw, cb, *keys)
    g = torch.randn_like(yr)
    inputs = [t for t in (x, cw, cb) if t is not None]
    grads = torch.autograd.grad(y, inputs, g.to(y.dtype))
    grads_ref = torch.autograd.grad(yr, inputs, g)
    return y, yr, grads, grads_ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,K,N", [(37, 70, 45), (1, 123, 17), (64, 32, 96)])
@pytest.mark.parametrize("T", [1, 3, 5])
@pytest.mark.parametrize("P", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference_fp32(backend, M, K, N, T, P, bias):
    case = _case(M, K, N, T, P, bias, torch.float32)
    y, yr, grads, grads_ref = _run(backend, case, (block_key(0, 4), block_key(0, 5)))
    tol_out, tol_grad = TOL[torch.float32]
    assert_rel(y, yr, tol_out)
    for name, g, gr in zip(("grad x", "grad coef_w", "grad coef_b"), grads, grads_ref):
        assert_rel(g, gr, tol_grad, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bank_dtype", [torch.bfloat16, torch.float16])
def test_half_banks_fp32_activations(backend, bank_dtype):
    """A half-precision bank is dequantised exactly; the fp32 tolerance still holds against its upcast."""
    case = _case(45, 70, 37, 3, 3, True, bank_dtype)
    y, yr, grads, grads_ref = _run(backend, case, (block_key(1, 0), block_key(1, 1)))
    tol_out, tol_grad = TOL[torch.float32]
    assert_rel(y, yr, tol_out)
    for name, g, gr in zip(("grad x", "grad coef_w", "grad coef_b"), grads, grads_ref):
        assert_rel(g, gr, tol_grad, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims(backend):
    """Inputs with batch and token dimensions, as in a transformer."""
    case = _case(13, 40, 24, 2, 1, True, torch.float32, lead=(3,))
    y, yr, grads, grads_ref = _run(backend, case, (0, 0))
    assert y.shape == (3, 13, 24)
    assert_rel(y, yr, TOL[torch.float32][0])
    for g, gr in zip(grads, grads_ref):
        assert_rel(g, gr, TOL[torch.float32][1])


@pytest.mark.parametrize("backend", ["torch"] + [pytest.param(b, marks=pytest.mark.gpu) for b in ("triton", "cuda")])
@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_activations(backend, act_dtype):
    """Error against float64 at most ~2x that of plain PyTorch on the merged weight in the same dtype,
    for the output and for both gradients."""
    if DEVICE == "cpu" and act_dtype == torch.float16:
        pytest.skip("float16 matmul on CPU is not what this path is for")
    from atlas_fast.ops.reference import merge_ref
    x, w, b, tw, tb, cw, cb = _case(64, 96, 80, 3, 1, True, torch.bfloat16)
    xl = x.detach().to(act_dtype).requires_grad_()
    y = atlas_fast.atlas_linear(xl, w, b, tw, tb, cw, cb, 0, 0, backend=backend)
    assert y.dtype == act_dtype
    yr = linear_ref(xl, w, b, tw, tb, cw, cb, 0, 0)
    y_plain = torch.nn.functional.linear(xl, merge_ref(w, tw, cw).to(act_dtype), merge_ref(b, tb, cb).to(act_dtype))
    g = torch.randn_like(yr)
    results = [(y,) + torch.autograd.grad(y, (xl, cw), g.to(act_dtype)),
               (yr,) + torch.autograd.grad(yr, (xl, cw), g),
               (y_plain,) + torch.autograd.grad(y_plain, (xl, cw), g.to(act_dtype))]
    for name, got, ref, plain in zip(("output", "grad x", "grad coef_w"), *results):
        assert_rel(got.detach(), ref.detach(), 2 * assert_rel(plain.detach(), ref.detach(), 1.0) + 1e-3, name)


def test_gradcheck_float64():
    d = dict(dtype=torch.float64)
    x = torch.randn(5, 7, **d, requires_grad=True)
    w, b = torch.randn(6, 7, **d), torch.randn(6, **d)
    tw, tb = torch.randn(2, 6, 7, **d), torch.randn(2, 6, **d)
    for P in (1, 3):
        cw, cb = torch.randn(2, P, **d, requires_grad=True), torch.randn(2, P, **d, requires_grad=True)
        f = lambda *a: atlas_fast.atlas_linear(a[0], w, b, tw, tb, a[1], a[2], 3, 4, backend="torch")  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, cw, cb))


def test_opcheck():
    x = torch.randn(9, 11, requires_grad=True)
    w, b = torch.randn(7, 11), torch.randn(7)
    tw, tb = random_bank((7, 11), 3), random_bank((7,), 3)
    cw, cb = random_coef(3, 2), random_coef(3, 2)
    torch.library.opcheck(torch.ops.atlas_fast.atlas_linear.default, (x, w, b, tw, tb, cw, cb, 1, 2, "torch"))
    g = torch.randn(9, 7)
    torch.library.opcheck(torch.ops.atlas_fast.atlas_linear_backward.default,
                          (g, x.detach(), w, tw, tb, cw.detach(), 1, 2, True, "torch"))


@pytest.mark.parametrize("bad", ["tau_shape", "coef_dtype", "coef_T", "x_shape", "frozen"])
def test_bad_input_names_the_problem(bad):
    x, w, b, tw, tb, cw, cb = _case(5, 8, 6, 2, 1, True, torch.float32, device="cpu")
    msg = {"tau_shape": "task vectors of shape", "coef_dtype": "float32", "coef_T": "coefficients of shape",
           "x_shape": "does not match weight", "frozen": "frozen"}[bad]
    if bad == "tau_shape":
        tw = tw[:, :5]
    elif bad == "coef_dtype":
        cw = cw.half()
    elif bad == "coef_T":
        cw = random_coef(3, 1)
    elif bad == "x_shape":
        x = torch.randn(5, 9)
    else:
        w.requires_grad_()
    with pytest.raises(ValueError, match=msg):
        atlas_fast.atlas_linear(x, w, b, tw, tb, cw, cb, backend="torch")


@pytest.mark.parametrize("chunk_elems", [1, 37, 1000])
@pytest.mark.parametrize("P", [1, 3])
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_backend_chunk_boundaries(monkeypatch, chunk_elems, P, bank_dtype):
    """The torch backend walks the bank in chunks (one pass in the backward merges for dx and reduces dc):
    chunks of 1, 37 and 1000 elements of a 45 x 70 weight, the last one short, against the float64 reference."""
    from atlas_fast.backends import torch_backend
    T = 3
    monkeypatch.setattr(torch_backend, "CHUNK_BYTES", chunk_elems * T * 4)
    case = _case(23, 70, 45, T, P, True, bank_dtype, device="cpu")
    y, yr, grads, grads_ref = _run("torch", case, (block_key(5, 0), block_key(5, 1)))
    tol_out, tol_grad = TOL[torch.float32]
    assert_rel(y, yr, tol_out)
    for name, g, gr in zip(("grad x", "grad coef_w", "grad coef_b"), grads, grads_ref):
        assert_rel(g, gr, tol_grad, name)


@pytest.mark.parametrize("P", [1, 4])
def test_torch_backend_frozen_input(monkeypatch, P):
    """Without an input gradient the backward only reduces dc: no merged weight is built."""
    from atlas_fast.backends import torch_backend
    monkeypatch.setattr(torch_backend, "CHUNK_BYTES", 101 * 2 * 4)
    x, w, b, tw, tb, cw, cb = _case(19, 33, 29, 2, P, True, torch.bfloat16, device="cpu")
    x = x.detach()
    y = atlas_fast.atlas_linear(x, w, b, tw, tb, cw, cb, 9, 10, backend="torch")
    yr = linear_ref(x, w, b, tw, tb, cw, cb, 9, 10)
    g = torch.randn_like(yr)
    grads = torch.autograd.grad(y, (cw, cb), g.float())
    grads_ref = torch.autograd.grad(yr, (cw, cb), g)
    for name, gt, gr in zip(("grad coef_w", "grad coef_b"), grads, grads_ref):
        assert_rel(gt, gr, TOL[torch.float32][1], name)
