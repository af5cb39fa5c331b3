"""The Triton launchers of kernels/atlas_linear.py called directly, against the float64 reference.

Outputs are preallocated and poisoned with NaN, so an element a kernel fails to write cannot pass.
On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import atlas_fast
from atlas_fast.backends import get_backend, triton_backend
from atlas_fast.kernels import atlas_linear as kernels
from atlas_fast.ops.hashing import block_key, partition_index
from atlas_fast.ops.reference import linear_ref, merge_ref
from conftest import DEVICE
from helpers import TOL, assert_rel, compile_for_sm90, random_bank, random_coef, rel_err

KEYS = (block_key(3, 0), block_key(3, 1))


def _case(M, K, N, T, P, bias, bank_dtype=torch.float32, act_dtype=torch.float32, device=DEVICE):
    x = torch.randn(M, K, device=device).to(act_dtype)
    w = torch.randn(N, K, device=device) / K ** 0.5
    b = torch.randn(N, device=device) * 0.1 if bias else None
    tw = random_bank((N, K), T, bank_dtype, 1e-2 / K ** 0.5, device)
    tb = random_bank((N,), T, bank_dtype, 1e-3, device) if bias else None
    cw = random_coef(T, P, device).detach()
    cb = random_coef(T, P, device).detach() if bias else None
    return x, w, b, tw, tb, cw, cb


def _poisoned(*shape, dtype=torch.float32, device=DEVICE):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _reference(case, dy, keys=KEYS):
    """y, dx, dc_w in float64 from the reference expression and autograd."""
    x, w, b, tw, tb, cw, cb = case
    x64 = x.double().requires_grad_()
    cw64 = cw.double().requires_grad_()
    y = linear_ref(x64, w, b, tw, tb, cw64, cb, *keys)
    dx, dcw = torch.autograd.grad(y, (x64, cw64), dy.double())
    return y.detach(), dx, dcw


def _run_launchers(case, dy, deterministic=True, keys=KEYS):
    x, w, b, tw, tb, cw, cb = case
    M, K = x.shape
    N, (T, P) = w.shape[0], cw.shape
    y = kernels.forward(x, w, b, tw, tb, cw, cb, *keys, out=_poisoned(M, N, dtype=x.dtype, device=x.device))
    dx = kernels.grad_input(dy, w, tw, cw, keys[0], out=_poisoned(M, K, dtype=x.dtype, device=x.device))
    dc = kernels.grad_coef(dy, x, tw, P, keys[0], deterministic, out=_poisoned(T, P, device=x.device))
    return y, dx, dc


def _check_launchers(case, dy, deterministic):
    y, dx, dc = _run_launchers(case, dy, deterministic)
    y_ref, dx_ref, dc_ref = _reference(case, dy)
    tol_out, tol_grad = TOL[torch.float32]
    assert_rel(y, y_ref, tol_out)
    assert_rel(dx, dx_ref, tol_grad, "dx")
    assert_rel(dc, dc_ref, tol_grad, "dc")


@pytest.mark.parametrize("T", [1, 3, 5])
@pytest.mark.parametrize("P", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("deterministic", [True, False])
def test_launchers_odd_shapes(T, P, bias, deterministic):
    _check_launchers(_case(37, 70, 45, T, P, bias), torch.randn(37, 45, device=DEVICE), deterministic)


@pytest.mark.parametrize("deterministic", [True, False])
def test_launchers_many_tiles(deterministic):
    """Several tiles along every dimension, whatever the tile configuration (the interpreter's is 64 wide)."""
    _check_launchers(_case(150, 201, 140, 2, 3, True), torch.randn(150, 140, device=DEVICE), deterministic)


@pytest.mark.parametrize("key", [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, KEYS[0]])
@pytest.mark.parametrize("P", [2, 5, 7])
def test_partition_hash_bit_exact(key, P):
    """With x = I, W0 = 0, τ = 1 and c[0, p] = p, the forward returns the partition of every weight element."""
    N, K = 19, 41
    x = torch.eye(K, device=DEVICE)
    w = torch.zeros(N, K, device=DEVICE)
    tw = torch.ones(1, N, K, device=DEVICE)
    cw = torch.arange(P, dtype=torch.float32, device=DEVICE).view(1, P)
    y = kernels.forward(x, w, None, tw, None, cw, None, key, 0, out=_poisoned(K, N))
    expected = partition_index(N * K, key, P, DEVICE).view(N, K).t().float()
    assert torch.equal(y, expected), f"first mismatches at {torch.nonzero(y != expected)[:5].tolist()}"


def test_deterministic_bit_identical_and_both_modes_match_reference():
    case = _case(123, 70, 45, 3, 3, False)
    x, _, _, tw, _, _, _ = case
    dy = torch.randn(123, 45, device=DEVICE)
    _, _, dc_ref = _reference(case, dy)
    first = kernels.grad_coef(dy, x, tw, 3, KEYS[0], deterministic=True)
    second = kernels.grad_coef(dy, x, tw, 3, KEYS[0], deterministic=True)
    assert torch.equal(first, second)
    atomic = kernels.grad_coef(dy, x, tw, 3, KEYS[0], deterministic=False)
    assert_rel(first, dc_ref, TOL[torch.float32][1], "deterministic dc")
    assert_rel(atomic, dc_ref, TOL[torch.float32][1], "atomic dc")


def test_strided_activations():
    """x and dy as transposed views: the kernels read them through their strides."""
    case = _case(29, 33, 21, 2, 3, True)
    x = case[0].t().contiguous().t()
    case = (x,) + case[1:]
    dy = torch.randn(21, 29, device=DEVICE).t()
    y, dx, dc = _run_launchers(case, dy)
    y_ref, dx_ref, dc_ref = _reference(case, dy)
    assert_rel(y, y_ref, TOL[torch.float32][0])
    assert_rel(dx, dx_ref, TOL[torch.float32][1], "dx")
    assert_rel(dc, dc_ref, TOL[torch.float32][1], "dc")


def test_empty_batch():
    x, w, b, tw, tb, cw, cb = _case(0, 8, 6, 2, 3, True)
    dy = torch.randn(0, 6, device=DEVICE)
    y, dx, dc = _run_launchers((x, w, b, tw, tb, cw, cb), dy)
    assert y.shape == (0, 6) and dx.shape == (0, 8)
    assert torch.equal(dc, torch.zeros(2, 3, device=DEVICE))


def test_bad_out_is_rejected():
    x, w, b, tw, tb, cw, cb = _case(5, 8, 6, 2, 1, True)
    with pytest.raises(ValueError, match="out: expected"):
        kernels.forward(x, w, b, tw, tb, cw, cb, out=_poisoned(5, 7))
    with pytest.raises(ValueError, match="coefficients must be float32"):
        kernels.forward(x, w, b, tw, tb, cw.double(), cb)


@settings(max_examples=12, deadline=None)
@given(M=st.integers(1, 40), K=st.integers(1, 50), N=st.integers(1, 40), T=st.integers(1, 4),
       P=st.integers(1, 4), bias=st.booleans(), bank_dtype=st.sampled_from([torch.float32, torch.bfloat16,
                                                                           torch.float16]),
       seed=st.integers(0, 2 ** 31 - 1))
def test_property_random_shapes(M, K, N, T, P, bias, bank_dtype, seed):
    torch.manual_seed(seed)
    keys = (block_key(seed, 0), block_key(seed, 1))
    case = _case(M, K, N, T, P, bias, bank_dtype)
    dy = torch.randn(M, N, device=DEVICE)
    y, dx, dc = _run_launchers(case, dy, keys=keys)
    y_ref, dx_ref, dc_ref = _reference(case, dy, keys)
    tol_out, tol_grad = TOL[torch.float32]
    assert_rel(y, y_ref, tol_out)
    assert_rel(dx, dx_ref, tol_grad, "dx")
    assert_rel(dc, dc_ref, tol_grad, "dc")


def _low_precision_budget(plain, ref):
    """Twice the error of plain PyTorch in the same dtype, plus a floor far below it for nearly exact results."""
    return 2 * rel_err(plain, ref) + 1e-4


def _check_low_precision(case, dy):
    """y and dx within 2x plain PyTorch's error in the activation dtype (on the merged weight rounded to it);
    dc is float32 from exactly representable inputs, so it takes the float32 tolerance."""
    x, w, b, tw, tb, cw, cb = case
    y, dx, dc = _run_launchers(case, dy)
    y_ref, dx_ref, dc_ref = _reference(case, dy)
    w_plain = merge_ref(w, tw, cw, KEYS[0]).to(x.dtype)
    y_plain = torch.nn.functional.linear(x, w_plain, merge_ref(b, tb, cb, KEYS[1]).to(x.dtype))
    assert y.dtype == dx.dtype == x.dtype and dc.dtype == torch.float32
    assert_rel(y, y_ref, _low_precision_budget(y_plain, y_ref))
    assert_rel(dx, dx_ref, _low_precision_budget(dy @ w_plain, dx_ref), "dx")
    assert_rel(dc, dc_ref, TOL[torch.float32][1], "dc")


def test_bf16_activations_in_interpreter():
    case = _case(45, 70, 37, 3, 3, True, torch.bfloat16, torch.bfloat16)
    _check_low_precision(case, torch.randn(45, 37, device=DEVICE).to(torch.bfloat16))


@pytest.mark.parametrize("T,bank_dtype,kept", [(1, torch.bfloat16, 6), (3, torch.bfloat16, 5), (21, torch.float32, 2)])
def test_hopper_configs_pruned_to_shared_memory(monkeypatch, T, bank_dtype, kept):
    """Large banks leave only the configurations that buffer no task-vector tile, which fit any T."""
    monkeypatch.setattr(kernels, "max_shared_memory", lambda device: 232448)  # H100/H200 per block
    configs = kernels._gemm_configs(kernels.HOPPER_GEMM_TILES)
    x, w = torch.empty(1, 1, dtype=torch.bfloat16), torch.empty(1, 1)
    tau = torch.empty(T, 1, 1, dtype=bank_dtype)
    for act_arg in ("x_ptr", "dy_ptr"):
        chosen = kernels._fits_shared_memory(configs, {act_arg: x, "w_ptr": w, "tau_w_ptr": tau}, T=T)
        assert len(chosen) >= kept and all(c.num_stages == 1 for c in chosen) == (T == 21)


_SM90_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from atlas_fast.kernels import atlas_linear as k

act, bank = "{act}", "{bank}"
common = dict(M="i32", N="i32", K="i32", key_w="i32", scale_w_ptr="*fp32")
kernels = [
    (k.atlas_linear_fwd_kernel, dict(x_ptr="*" + act, w_ptr="*fp32", tau_w_ptr="*" + bank, coef_w_ptr="*fp32",
     b_ptr="*fp32", tau_b_ptr="*" + bank, coef_b_ptr="*fp32", y_ptr="*" + act, stride_xm="i32", stride_xk="i32",
     stride_ym="i32", key_b="i32"), dict(T=3, T_B=3, HAS_BIAS=True, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32)),
    (k.atlas_linear_dx_kernel, dict(dy_ptr="*" + act, w_ptr="*fp32", tau_w_ptr="*" + bank, coef_w_ptr="*fp32",
     dx_ptr="*" + act, stride_dym="i32", stride_dyn="i32", stride_dxm="i32"),
     dict(T=3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32)),
    (k.atlas_linear_dc_kernel, dict(dy_ptr="*" + act, x_ptr="*" + act, tau_w_ptr="*" + bank, dc_ptr="*fp32",
     T="i32", stride_dym="i32", stride_dyn="i32", stride_xm="i32", stride_xk="i32"),
     dict(DETERMINISTIC=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, SPLIT_M=4)),
]
for fn, signature, constants in kernels:
    constants.update(P=3, QUANT=0, GROUP=1, UPCAST=act == "fp32", PRECISION="ieee")
    signature.update(common)
    signature.update({{name: "constexpr" for name in constants}})
    signature = {{name: signature[name] for name in fn.arg_names}}
    triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=4, num_stages=2))
"""


@pytest.mark.slow
@pytest.mark.parametrize("act,bank", [("bf16", "bf16"), ("fp32", "fp16")])
def test_kernels_compile_for_sm90(act, bank):
    """The interpreter does not lower the kernels; compiling them for Hopper does, without a GPU."""
    compile_for_sm90(_SM90_COMPILE.format(act=act, bank=bank))


def test_kernels_missing_from_the_install_are_named(monkeypatch):
    """The source tree on PYTHONPATH has no atlas_fast.kernels (setup.py maps kernels/ onto it): the reason names
    that, not triton."""
    import sys
    monkeypatch.setitem(sys.modules, "atlas_fast.kernels", None)
    reason = get_backend("triton").unavailable_reason(torch.device(DEVICE))
    assert reason.startswith("atlas_fast.kernels is not installed") and "pip install -e ." in reason


def test_backend_switch_and_availability():
    backend = get_backend("triton")
    assert backend.unavailable_reason(torch.device(DEVICE)) is None
    assert "CUDA" in backend.unavailable_reason(torch.device("meta"))
    x = torch.randn(13, 20, device=DEVICE, requires_grad=True)
    _, w, b, tw, tb, cw, cb = _case(13, 20, 9, 2, 3, True)
    cw.requires_grad_()
    g = torch.randn(13, 9, device=DEVICE)
    cw64 = cw.detach().double().requires_grad_()
    dcw_ref, = torch.autograd.grad(linear_ref(x, w, b, tw, tb, cw64, cb, *KEYS), cw64, g.double())
    previous = triton_backend.set_deterministic(False)
    try:
        assert not triton_backend.is_deterministic()
        y = atlas_fast.atlas_linear(x, w, b, tw, tb, cw, cb, *KEYS, backend="triton")
        dcw_atomic, = torch.autograd.grad(y, cw, g)
    finally:
        triton_backend.set_deterministic(previous)
    assert triton_backend.is_deterministic() == previous
    y = atlas_fast.atlas_linear(x, w, b, tw, tb, cw, cb, *KEYS, backend="triton")
    dcw, = torch.autograd.grad(y, cw, g)
    assert_rel(dcw_atomic, dcw_ref, TOL[torch.float32][1], "atomic dc")
    assert_rel(dcw, dcw_ref, TOL[torch.float32][1], "deterministic dc")


def test_opcheck_triton():
    x = torch.randn(9, 11, device=DEVICE, requires_grad=True)
    w, b = torch.randn(7, 11, device=DEVICE), torch.randn(7, device=DEVICE)
    tw, tb = random_bank((7, 11), 3, device=DEVICE), random_bank((7,), 3, device=DEVICE)
    cw, cb = random_coef(3, 2, DEVICE), random_coef(3, 2, DEVICE)
    torch.library.opcheck(torch.ops.atlas_fast.atlas_linear.default, (x, w, b, tw, tb, cw, cb, *KEYS, "triton"))
    g = torch.randn(9, 7, device=DEVICE)
    for needs_input_grad in (True, False):
        torch.library.opcheck(torch.ops.atlas_fast.atlas_linear_backward.default,
                              (g, x.detach(), w, tw, tb, cw.detach(), *KEYS, needs_input_grad, "triton"))


# ---------------------------------------------------------------- CUDA only

@pytest.mark.gpu
@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,K,N", [(37, 70, 45), (4096, 768, 768), (600, 768, 3072)])
def test_cuda_low_precision(act_dtype, bank_dtype, M, K, N):
    case = _case(M, K, N, 5, 3, True, bank_dtype, act_dtype, device="cuda")
    _check_low_precision(case, torch.randn(M, N, device="cuda").to(act_dtype))


@pytest.mark.gpu
def test_cuda_fp32_and_determinism_at_scale():
    case = _case(2048, 768, 768, 8, 3, True, torch.bfloat16, device="cuda")
    dy = torch.randn(2048, 768, device="cuda")
    y, dx, dc = _run_launchers(case, dy)
    y_ref, dx_ref, dc_ref = _reference(case, dy)
    tol_out, tol_grad = TOL[torch.float32]
    assert_rel(y, y_ref, tol_out)
    assert_rel(dx, dx_ref, tol_grad, "dx")
    assert_rel(dc, dc_ref, tol_grad, "dc")
    x, tw = case[0], case[3]
    again = kernels.grad_coef(dy, x, tw, 3, KEYS[0], deterministic=True)
    assert torch.equal(again, kernels.grad_coef(dy, x, tw, 3, KEYS[0], deterministic=True))
    assert_rel(kernels.grad_coef(dy, x, tw, 3, KEYS[0], deterministic=False), dc_ref, tol_grad, "atomic dc")
