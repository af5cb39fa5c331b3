"""The merge-once strategy of the fused backends against the float64 reference: the Triton merge kernel
alone, then the backend's forward, dx and dc with each strategy forced through plan.set_strategy and with the
cost model choosing. On CPU the Triton kernels run in the interpreter (tests/conftest.py); the CUDA tests
are marked gpu and skipped there.

Outputs the tests allocate are NaN-filled, and on CPU every buffer a launcher allocates is too
(_poison_launcher_outputs), so an element no kernel writes cannot pass.
"""
import pytest
import torch

import atlas_fast
from atlas_fast.backends import Block, get_backend, plan, triton_backend
from atlas_fast.kernels import atlas_linear as kernels
from atlas_fast.ops.hashing import block_key
from atlas_fast.ops.reference import conv2d_ref, linear_ref, merge_ref
from conftest import DEVICE
from helpers import TOL, assert_rel, random_bank, random_coef, rel_err

KEYS = (block_key(5, 2), block_key(5, 3))
TOL_OUT, TOL_GRAD = TOL[torch.float32]
HALF = (torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def _plan_defaults(monkeypatch):
    monkeypatch.delenv("ATLAS_FAST_STRATEGY", raising=False)
    monkeypatch.delenv("ATLAS_FAST_KEEP_BYTES", raising=False)
    saved = plan.set_strategy(None), plan.set_keep_budget(None)
    yield
    plan.set_strategy(saved[0])
    plan.set_keep_budget(saved[1])
    for name in ("triton", "cuda"):
        if name == "triton" or torch.cuda.is_available():
            get_backend(name).kept.clear()


@pytest.fixture
def _poison_launcher_outputs(monkeypatch):
    """Every output a Triton launcher allocates starts as NaN (out= buffers are the tests' own)."""
    check_out = kernels.check_out

    def poisoned(out, shape, dtype, device):
        if out is None:
            out = torch.full(shape, float("nan"), dtype=dtype, device=device)
        return check_out(out, shape, dtype, device)

    monkeypatch.setattr(kernels, "check_out", poisoned)


def _case(M, K, N, T, P, bias, bank, act=torch.float32, device=DEVICE):
    x = torch.randn(M, K, device=device).to(act)
    w = torch.randn(N, K, device=device) / K ** 0.5
    b = torch.randn(N, device=device) * 0.1 if bias else None
    tw = random_bank((N, K), T, bank, 1e-2 / K ** 0.5, device)
    tb = random_bank((N,), T, bank, 1e-3, device) if bias else None
    cw = random_coef(T, P, device).detach()
    cb = random_coef(T, P, device).detach() if bias else None
    return x, w, b, tw, tb, cw, cb


def _reference(case, dy):
    """y, dx, dc_w, dc_b (or None) in float64."""
    x, w, b, tw, tb, cw, cb = case
    x64 = x.double().requires_grad_()
    cw64 = cw.double().requires_grad_()
    cb64 = cb.double().requires_grad_() if cb is not None else None
    y = linear_ref(x64, w, b, tw, tb, cw64, cb64, *KEYS)
    grads = torch.autograd.grad(y, [t for t in (x64, cw64, cb64) if t is not None], dy.double())
    return (y.detach(), *grads) + ((None,) if cb is None else ())


def _backend_run(backend, case, dy):
    x, w, b, tw, tb, cw, cb = case
    y = backend.atlas_linear(x, Block(w, b, tw, tb, cw, cb, *KEYS))
    dx, dcw, dcb = backend.atlas_linear_backward(dy, x, Block(w, None, tw, tb, cw, None, *KEYS), True)
    return y, dx, dcw, dcb


def _half_budget(case, act, y_ref):
    """Twice plain PyTorch's error in `act` on the merged weight and bias, plus a floor."""
    x, w, b, tw, tb, cw, cb = case
    merged_w, merged_b = merge_ref(w, tw, cw, KEYS[0]).to(act), merge_ref(b, tb, cb, KEYS[1]).to(act)
    y_plain = torch.nn.functional.linear(x, merged_w, merged_b)
    return 2 * rel_err(y_plain, y_ref) + 1e-3


def _check(got, ref, tol_out=TOL_OUT, tol_grad=TOL_GRAD):
    for what, g, r, tol in zip(("y", "dx", "dc_w", "dc_b"), got, ref, (tol_out, tol_grad, tol_grad, tol_grad)):
        assert (g is None) == (r is None), what
        if r is not None:
            assert_rel(g, r, tol, what)


class _Spy:
    """Counts the calls of a launcher while passing them through."""

    def __init__(self, monkeypatch, module, name):
        self.calls = 0
        inner = getattr(module, name)

        def spy(*args, **kwargs):
            self.calls += 1
            return inner(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)


# ---------------------------------------------------------------- the Triton merge kernel

@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("P", [1, 3])
@pytest.mark.parametrize("bank", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_merge_kernel_matches_reference(T, P, bank, out_dtype):
    w = torch.randn(45, 70, device=DEVICE)
    tw = random_bank((45, 70), T, bank, 1e-2, DEVICE)
    cw = random_coef(T, P, DEVICE).detach()
    out = torch.full((45, 70), float("nan"), dtype=out_dtype, device=DEVICE)
    merged = kernels.merge(w, tw, cw, KEYS[0], out_dtype, out=out)
    ref = merge_ref(w, tw, cw, KEYS[0])
    assert merged is out
    # Merged in float32, rounded once to the output dtype: within half an ulp of the float64 merge.
    tol = 1e-6 if out_dtype == torch.float32 else 2.0 ** -8
    assert_rel(merged, ref, tol, "merged")


def test_merge_kernel_many_programs_and_any_shape():
    """More elements than one program's block (8192 in the interpreter), a 1-D bias and a 4-D conv weight."""
    for shape in [(97, 131), (45,), (6, 3, 5, 5)]:
        theta = torch.randn(*shape, device=DEVICE)
        tau = random_bank(shape, 3, torch.bfloat16, 1e-2, DEVICE)
        coef = random_coef(3, 3, DEVICE).detach()
        assert_rel(kernels.merge(theta, tau, coef, KEYS[1]), merge_ref(theta, tau, coef, KEYS[1]), 1e-6, str(shape))


def test_merge_kernel_rejects_bad_arguments():
    w, tw, cw = torch.randn(5, 6), torch.randn(2, 5, 6), torch.randn(2, 1)
    with pytest.raises(ValueError, match="do not stack"):
        kernels.merge(w, tw[:, :4], cw)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        kernels.merge(w, tw, cw, dtype=torch.float64)
    with pytest.raises(ValueError, match="out: expected"):
        kernels.merge(w, tw, cw, dtype=torch.bfloat16, out=torch.empty(5, 6))


# ---------------------------------------------------------------- the Triton backend, each strategy

@pytest.mark.usefixtures("_poison_launcher_outputs")
@pytest.mark.parametrize("strategy", plan.STRATEGIES)
@pytest.mark.parametrize("T,P,bias,bank", [(1, 1, True, torch.float32), (3, 3, True, torch.bfloat16),
                                           (3, 1, False, torch.float16), (1, 3, False, torch.bfloat16),
                                           (3, 3, False, torch.float32)])
def test_triton_backend_strategy_matches_reference(strategy, T, P, bias, bank, monkeypatch):
    plan.set_strategy(strategy)
    merges = _Spy(monkeypatch, kernels, "merge")
    fused = _Spy(monkeypatch, kernels, "forward")
    case = _case(37, 70, 45, T, P, bias, bank)
    dy = torch.randn(37, 45, device=DEVICE)
    _check(_backend_run(get_backend("triton"), case, dy), _reference(case, dy))
    # merge-once: the weight in the forward and again for dx (plus the bias when it has task vectors)
    assert (fused.calls, merges.calls) == ((1, 0) if strategy == "fused" else (0, 2 + bias))


@pytest.mark.usefixtures("_poison_launcher_outputs")
def test_triton_keeps_the_merged_weight_for_dx_within_the_budget(monkeypatch):
    plan.set_strategy("merge_once")
    plan.set_keep_budget(45 * 70 * 4)
    backend = get_backend("triton")
    merges = _Spy(monkeypatch, kernels, "merge")
    case = _case(37, 70, 45, 3, 3, False, torch.bfloat16)
    dy = torch.randn(37, 45, device=DEVICE)
    got = _backend_run(backend, case, dy)
    _check(got, _reference(case, dy))
    assert merges.calls == 1 and backend.kept.nbytes() == 0  # merged once, taken by the backward
    plan.set_keep_budget(45 * 70 * 4 - 1)
    _check(_backend_run(backend, case, dy), _reference(case, dy))
    assert merges.calls == 3


def test_triton_automatic_choice_runs_both_ways(monkeypatch):
    """Unforced, the default rates fuse 37 rows; slow CUDA cores and 8-row tiles (five merges per fused
    product) flip the same call to merge-once. Both give the reference."""
    merges = _Spy(monkeypatch, kernels, "merge")
    case = _case(37, 70, 45, 3, 3, True, torch.bfloat16)
    dy = torch.randn(37, 45, device=DEVICE)
    ref = _reference(case, dy)
    _check(_backend_run(get_backend("triton"), case, dy), ref)
    assert merges.calls == 0
    slow = plan.device_spec("H200", cuda_core_flops=1e6)
    monkeypatch.setattr(plan, "device_spec", lambda device=None, **measured: slow)
    monkeypatch.setattr(triton_backend, "BLOCK_M", 8)
    assert plan.for_linear(37, case[1], case[3], case[5], torch.float32, 8).forward == "merge_once"
    _check(_backend_run(get_backend("triton"), case, dy), ref)
    assert merges.calls == 3


@pytest.mark.parametrize("act", HALF)
def test_triton_merge_once_half_activations(act):
    """bf16/fp16 activations: within ~2x plain PyTorch's own error on the merged weight in that dtype."""
    plan.set_strategy("merge_once")
    case = _case(37, 70, 45, 3, 3, True, torch.bfloat16, act)
    dy = torch.randn(37, 45, device=DEVICE).to(act)
    y, dx, dcw, dcb = _backend_run(get_backend("triton"), case, dy)
    ref = _reference(case, dy)
    budget = _half_budget(case, act, ref[0])
    assert y.dtype == dx.dtype == act and dcw.dtype == torch.float32
    _check((y, dx, dcw, dcb), ref, budget, 10 * budget)


@pytest.mark.parametrize("strategy", plan.STRATEGIES)
def test_triton_op_and_conv_through_autograd(strategy):
    """The public ops with autograd, linear with leading dimensions and a patchify conv (im2col view)."""
    plan.set_strategy(strategy)
    x, w, b, tw, tb, cw, cb = _case(2 * 19, 70, 45, 3, 3, True, torch.bfloat16)
    x = x.view(2, 19, 70).requires_grad_()
    cw.requires_grad_()
    y = atlas_fast.atlas_linear(x, w, b, tw, tb, cw, cb, *KEYS, backend="triton")
    g = torch.randn_like(y)
    dx, dcw = torch.autograd.grad(y, (x, cw), g)
    x64, cw64 = x.detach().double().requires_grad_(), cw.detach().double().requires_grad_()
    yr = linear_ref(x64, w, b, tw, tb, cw64, cb, *KEYS)
    _check((y, dx, dcw), (yr, *torch.autograd.grad(yr, (x64, cw64), g.double())))

    img = torch.randn(2, 3, 12, 12, device=DEVICE, requires_grad=True)
    wc = torch.randn(8, 3, 4, 4, device=DEVICE) / 7
    tc = random_bank((8, 3, 4, 4), 3, torch.float16, 1e-2, DEVICE)
    cc = random_coef(3, 3, DEVICE)
    out = atlas_fast.atlas_conv2d(img, wc, None, tc, None, cc, None, KEYS[0], stride=(4, 4), backend="triton")
    g = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (img, cc), g))
    img64, cc64 = img.detach().double().requires_grad_(), cc.detach().double().requires_grad_()
    ref = conv2d_ref(img64, wc, None, tc, None, cc64, None, KEYS[0], stride=4)
    _check(got, (ref, *torch.autograd.grad(ref, (img64, cc64), g.double())))


# ---------------------------------------------------------------- the CUDA backend (GPU only)

def _poison_cuda_allocator():
    """Fill the caching allocator's free memory with NaN, so an element a kernel never writes is NaN."""
    blocks = [torch.full((n,), float("nan"), device="cuda") for n in (1 << 16, 1 << 18, 1 << 24)]
    del blocks


def _cuda_backend():
    """The cuda backend with its extension loaded (built on first use)."""
    backend = get_backend("cuda")
    reason = backend.unavailable_reason(torch.device("cuda"))
    assert reason is None, reason
    return backend


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", plan.STRATEGIES)
@pytest.mark.parametrize("M,K,N", [(37, 70, 45), (517, 70, 45)])
@pytest.mark.parametrize("T,P", [(1, 1), (3, 3)])
@pytest.mark.parametrize("bank", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_cuda_backend_strategy_matches_reference(strategy, M, K, N, T, P, bank, bias):
    plan.set_strategy(strategy)
    case = _case(M, K, N, T, P, bias, bank, device="cuda")
    dy = torch.randn(M, N, device="cuda")
    _poison_cuda_allocator()
    _check(_backend_run(_cuda_backend(), case, dy), _reference(case, dy))


@pytest.mark.gpu
@pytest.mark.parametrize("act", HALF)
@pytest.mark.parametrize("strategy", plan.STRATEGIES)
def test_cuda_backend_half_activations(act, strategy):
    plan.set_strategy(strategy)
    case = _case(517, 70, 45, 3, 3, True, torch.bfloat16, act, device="cuda")
    dy = torch.randn(517, 45, device="cuda").to(act)
    _poison_cuda_allocator()
    got = _backend_run(_cuda_backend(), case, dy)
    ref = _reference(case, dy)
    budget = _half_budget(case, act, ref[0])
    assert got[0].dtype == got[1].dtype == act
    _check(got, ref, budget, 10 * budget)


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("theta_dtype", [torch.float32, torch.bfloat16])
def test_cuda_merge_op_matches_reference(out_dtype, theta_dtype):
    w = torch.randn(97, 131, device="cuda").to(theta_dtype)
    tw = random_bank((97, 131), 3, torch.bfloat16, 1e-2, "cuda")
    cw = random_coef(3, 3, "cuda").detach()
    _cuda_backend()
    _poison_cuda_allocator()
    merged = torch.ops.atlas_fast.atlas_linear_cuda_merge(w, tw, cw, KEYS[0], out_dtype)
    assert merged.dtype == out_dtype and merged.shape == w.shape
    assert_rel(merged, merge_ref(w, tw, cw, KEYS[0]), 1e-6 if out_dtype == torch.float32 else 2.0 ** -8)


@pytest.mark.gpu
def test_cuda_keeps_the_merged_weight_for_dx():
    plan.set_strategy("merge_once")
    plan.set_keep_budget(1 << 20)
    backend = _cuda_backend()
    case = _case(517, 70, 45, 3, 3, True, torch.bfloat16, device="cuda")
    dy = torch.randn(517, 45, device="cuda")
    x, w, b, tw, tb, cw, cb = case
    backend.atlas_linear(x, Block(w, b, tw, tb, cw, cb, *KEYS))
    assert backend.kept.nbytes() == 45 * 70 * 4
    dx, dcw, dcb = backend.atlas_linear_backward(dy, x, Block(w, None, tw, tb, cw, None, *KEYS), True)
    assert backend.kept.nbytes() == 0
    _check((backend.atlas_linear(x, Block(w, b, tw, tb, cw, cb, *KEYS)), dx, dcw, dcb), _reference(case, dy))
