"""atlas_conv2d on every backend against the float64 reference: forward, input and coefficient gradients."""
import pytest
import torch

import atlas_fast
from atlas_fast.ops.hashing import block_key
from atlas_fast.ops.reference import conv2d_ref
from conftest import DEVICE
from helpers import TOL, assert_rel, random_bank, random_coef

BACKENDS = ["torch", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]

# (x shape, weight shape, stride, padding, dilation)
CONVS = {
    "patch_embed": ((2, 3, 32, 32), (24, 3, 8, 8), (8, 8), (0, 0), (1, 1)),
    "patch_embed_cropped": ((1, 3, 35, 29), (10, 3, 8, 8), (8, 8), (0, 0), (1, 1)),
    "general": ((2, 5, 13, 11), (7, 5, 3, 3), (2, 2), (1, 1), (1, 1)),
    "dilated": ((1, 4, 12, 10), (6, 4, 3, 2), (1, 2), (2, 0), (2, 3)),
}


def _case(xs, ws, T, P, bias, bank_dtype, device=DEVICE):
    fan_in = ws[1] * ws[2] * ws[3]
    x = torch.randn(*xs, device=device, requires_grad=True)
    w = torch.randn(*ws, device=device) / fan_in ** 0.5
    b = torch.randn(ws[0], device=device) * 0.1 if bias else None
    tw = random_bank(ws, T, bank_dtype, 1e-2 / fan_in ** 0.5, device)
    tb = random_bank((ws[0],), T, bank_dtype, 1e-3, device) if bias else None
    cw = random_coef(T, P, device)
    cb = random_coef(T, P, device) if bias else None
    return x, w, b, tw, tb, cw, cb


def _check(backend, case, conv, keys, groups=1):
    x, w, b, tw, tb, cw, cb = case
    stride, padding, dilation = conv
    y = atlas_fast.atlas_conv2d(x, w, b, tw, tb, cw, cb, *keys, stride, padding, dilation, groups, backend=backend)
    yr = conv2d_ref(x, w, b, tw, tb, cw, cb, *keys, stride, padding, dilation, groups)
    tol_out, tol_grad = TOL[torch.float32]
    assert_rel(y, yr, tol_out)
    g = torch.randn_like(yr)
    inputs = [t for t in (x, cw, cb) if t is not None]
    grads = torch.autograd.grad(y, inputs, g.to(y.dtype))
    grads_ref = torch.autograd.grad(yr, inputs, g)
    for name, gt, gr in zip(("grad x", "grad coef_w", "grad coef_b"), grads, grads_ref):
        assert_rel(gt, gr, tol_grad, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(CONVS))
@pytest.mark.parametrize("P", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(backend, shape, P, bias, bank_dtype):
    xs, ws, *conv = CONVS[shape]
    case = _case(xs, ws, 3, P, bias, bank_dtype)
    _check(backend, case, conv, (block_key(2, 0), block_key(2, 1)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_conv(backend):
    """groups > 1: the fused backends hand it to the torch backend; the result is the same."""
    case = _case((2, 6, 9, 9), (4, 3, 3, 3), 2, 3, True, torch.float32)
    _check(backend, case, ((1, 1), (1, 1), (1, 1)), (5, 6), groups=2)


def test_gradcheck_float64():
    d = dict(dtype=torch.float64)
    x = torch.randn(1, 2, 4, 5, **d, requires_grad=True)
    w, b = torch.randn(3, 2, 3, 2, **d), torch.randn(3, **d)
    tw, tb = torch.randn(2, 3, 2, 3, 2, **d), torch.randn(2, 3, **d)
    for P in (1, 3):
        cw, cb = torch.randn(2, P, **d, requires_grad=True), torch.randn(2, P, **d, requires_grad=True)
        f = lambda *a: atlas_fast.atlas_conv2d(a[0], w, b, tw, tb, a[1], a[2], 7, 8, (2, 1), (1, 0),  # noqa: E731
                                               backend="torch")
        assert torch.autograd.gradcheck(f, (x, cw, cb))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("conv", [((4, 4), (0, 0)), ((2, 1), (1, 1))])
def test_opcheck(backend, conv):
    stride, padding = conv
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w, b = torch.randn(5, 3, 4, 4), torch.randn(5)
    tw, tb = random_bank((5, 3, 4, 4), 2), random_bank((5,), 2)
    cw, cb = random_coef(2, 3), random_coef(2, 3)
    args = (x, w, b, tw, tb, cw, cb, 1, 2, list(stride), list(padding), [1, 1], 1, backend)
    torch.library.opcheck(torch.ops.atlas_fast.atlas_conv2d.default, args)
    g = torch.randn_like(torch.ops.atlas_fast.atlas_conv2d(*args))
    torch.library.opcheck(torch.ops.atlas_fast.atlas_conv2d_backward.default,
                          (g, x.detach(), w, tw, tb, cw.detach(), 1, 2, list(stride), list(padding), [1, 1], 1, True,
                           backend))


def test_triton_rejects_float64():
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    w, tw = torch.randn(3, 2, 2, 2, dtype=torch.float64), torch.randn(1, 3, 2, 2, 2, dtype=torch.float64)
    cw = torch.randn(1, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        atlas_fast.atlas_conv2d(x, w, None, tw, None, cw, backend="triton")


@pytest.mark.parametrize("P", [1, 3])
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("input_grad", [True, False])
def test_torch_backend_chunked(monkeypatch, P, bank_dtype, input_grad):
    """The torch backend's one pass over the bank in the backward, in chunks of 29 elements (the last one short),
    with and without an input gradient (a patch embedding's input needs none)."""
    from atlas_fast.backends import torch_backend
    monkeypatch.setattr(torch_backend, "CHUNK_BYTES", 29 * 3 * 4)
    xs, ws, *conv = CONVS["general"]
    case = list(_case(xs, ws, 3, P, True, bank_dtype, device="cpu"))
    if not input_grad:
        case[0] = case[0].detach()
    x, w, b, tw, tb, cw, cb = case
    y = atlas_fast.atlas_conv2d(x, w, b, tw, tb, cw, cb, 3, 4, *conv, backend="torch")
    yr = conv2d_ref(x, w, b, tw, tb, cw, cb, 3, 4, *conv)
    assert_rel(y, yr, TOL[torch.float32][0])
    g = torch.randn_like(yr)
    inputs = [t for t in (x, cw, cb) if t.requires_grad]
    for name, gt, gr in zip(("grad x", "grad coef_w", "grad coef_b")[-len(inputs):],
                            torch.autograd.grad(y, inputs, g.float()), torch.autograd.grad(yr, inputs, g)):
        assert_rel(gt, gr, TOL[torch.float32][1], name)
