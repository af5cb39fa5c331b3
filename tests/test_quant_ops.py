"""The ops and compose() on int8 and int4 banks, against the float64 reference of the dequantised bank: the
torch backend, Triton (in its interpreter on a CPU) and the CUDA kernels (on a GPU) (grouped calls: test_grouped.py);
the composed models' outputs against the float32 bank's."""
import copy

import pytest
import torch
import torch.nn as nn

import atlas_fast
from atlas_fast import TaskVectors, compose, synthetic_task_vectors
from atlas_fast.bank import quant
from atlas_fast.ops.hashing import block_key
from atlas_fast.ops.reference import conv2d_ref, linear_ref, merge_ref
from conftest import DEVICE
from helpers import TOL, assert_coef_grad, assert_rel, compile_for_sm90, random_coef, reference_outputs_and_grad

FORMATS = [("int8", None), ("int4", 16)]   # group 16: several groups per row and a short last one at K = 70


# ---------------------------------------------------------------- ops on quantised banks

def _linear_case(fmt, group, M=23, K=70, N=45, T=3, P=1):
    x = torch.randn(M, K)
    w, b = torch.randn(N, K) / K ** 0.5, torch.randn(N) * 0.1
    tw = quant.quantize(torch.randn(T, N, K) * 1e-2 / K ** 0.5, fmt, group or quant.DEFAULT_GROUP)
    tb = torch.randn(T, N) * 1e-3
    return x, w, b, tw, tb, random_coef(T, P), random_coef(T, P)


def _check_linear(backend, case, keys=(block_key(2, 0), block_key(2, 1)), device="cpu"):
    x, w, b, tw, tb, cw, cb = (t.to(device) if t is not None else None for t in case)
    cw, cb = cw.detach().requires_grad_(), cb.detach().requires_grad_()
    xl = x.clone().requires_grad_()
    y = atlas_fast.atlas_linear(xl, w, b, tw, tb, cw, cb, *keys, backend=backend)
    x64 = x.double().requires_grad_()
    y_ref = linear_ref(x64, w, b, tw.dequantize(torch.float64), tb, cw, cb, *keys)
    g = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, (xl, cw, cb), g.float())
    grads_ref = torch.autograd.grad(y_ref, (x64, cw, cb), g)
    tol_out, tol_grad = TOL[torch.float32]
    assert_rel(y, y_ref, tol_out)
    for name, got, ref in zip(("grad x", "grad coef_w", "grad coef_b"), grads, grads_ref):
        assert_rel(got, ref, tol_grad, name)


@pytest.mark.parametrize("fmt,group", FORMATS)
@pytest.mark.parametrize("P", [1, 3])
def test_linear_torch(fmt, group, P):
    _check_linear("torch", _linear_case(fmt, group, P=P))


# ---------------------------------------------------------------- Triton (the interpreter on a CPU)

SHAPES = [(37, 70, 45), (19, 37, 23)]   # (M, K, N); K = 37: an odd number of int4 columns, the last byte half used


def _kernel_case(fmt, group, M, K, N, T=3, P=1):
    x = torch.randn(M, K, device=DEVICE)
    w, b = torch.randn(N, K, device=DEVICE) / K ** 0.5, torch.randn(N, device=DEVICE) * 0.1
    tw = quant.quantize(torch.randn(T, N, K, device=DEVICE) * 1e-2 / K ** 0.5, fmt, group or quant.DEFAULT_GROUP)
    tb = torch.randn(T, N, device=DEVICE) * 1e-3
    return x, w, b, tw, tb, random_coef(T, P, DEVICE).detach(), random_coef(T, P, DEVICE).detach()


def _poisoned(*shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("fmt,group", FORMATS)
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("P", [1, 3])
@pytest.mark.parametrize("deterministic", [True, False])
def test_triton_launchers(fmt, group, M, K, N, P, deterministic):
    """forward, dx, dc and merge kernels on int8/int4 tiles dequantised in registers, outputs poisoned first."""
    from atlas_fast.kernels import atlas_linear as kernels
    x, w, b, tw, tb, cw, cb = _kernel_case(fmt, group, M, K, N, P=P)
    keys = (block_key(4, 0), block_key(4, 1))
    dy = torch.randn(M, N, device=DEVICE)
    y = kernels.forward(x, w, b, tw, tb, cw, cb, *keys, out=_poisoned(M, N))
    dx = kernels.grad_input(dy, w, tw, cw, keys[0], out=_poisoned(M, K))
    dc = kernels.grad_coef(dy, x, tw, P, keys[0], deterministic, out=_poisoned(3, P))
    merged = kernels.merge(w, tw, cw, keys[0], out=_poisoned(N, K))
    x64, cw64 = x.double().requires_grad_(), cw.double().requires_grad_()
    tw64 = tw.dequantize(torch.float64)
    y_ref = linear_ref(x64, w, b, tw64, tb, cw64, cb, *keys)
    dx_ref, dc_ref = torch.autograd.grad(y_ref, (x64, cw64), dy.double())
    tol_out, tol_grad = TOL[torch.float32]
    assert_rel(y, y_ref, tol_out)
    assert_rel(dx, dx_ref, tol_grad, "dx")
    assert_rel(dc, dc_ref, tol_grad, "dc")
    assert_rel(merged, merge_ref(w, tw64, cw, keys[0]), tol_out, "merge")


@pytest.mark.parametrize("fmt,group", FORMATS)
@pytest.mark.parametrize("strategy", ["fused", "merge_once", "keep"])
def test_triton_backend_strategies(fmt, group, strategy):
    """Fused kernels, merge-once, and merge-once keeping the forward's merged weight for dx."""
    from atlas_fast.backends import get_backend, plan
    saved = plan.set_strategy("merge_once" if strategy == "keep" else strategy), plan.set_keep_budget(
        1 << 30 if strategy == "keep" else 0)
    try:
        _check_linear("triton", _linear_case(fmt, group, P=2), device=DEVICE)
        assert get_backend("triton").kept.nbytes() == 0, "dx takes the kept weight"
    finally:
        plan.set_strategy(saved[0])
        plan.set_keep_budget(saved[1])


def _check_bf16_activations(backend, case):
    """bf16 activations on a quantised bank: output and dx within twice plain bf16's error of the float64
    reference (plain bf16: F.linear on the merged weight rounded to bf16), dc within 2e-2."""
    x, w, b, tw, tb, cw, cb = case
    cw = cw.detach().requires_grad_()
    xb = x.bfloat16().requires_grad_()
    y = atlas_fast.atlas_linear(xb, w, b, tw, tb, cw, cb, 3, 4, backend=backend)
    tw64 = tw.dequantize(torch.float64)
    x64 = x.double().requires_grad_()
    y_ref = linear_ref(x64, w, b, tw64, tb, cw, cb, 3, 4)
    y_plain = torch.nn.functional.linear(xb, merge_ref(w, tw64, cw, 3).bfloat16(), merge_ref(b, tb, cb, 4).bfloat16())
    assert y.dtype == torch.bfloat16
    assert_rel(y, y_ref, 2 * assert_rel(y_plain, y_ref, 1.0) + 1e-3)
    g = torch.randn_like(y_ref)
    dx, dc = torch.autograd.grad(y, (xb, cw), g.bfloat16())
    dx_ref, dc_ref = torch.autograd.grad(y_ref, (x64, cw), g)
    dx_plain = torch.autograd.grad(y_plain, xb, g.bfloat16())[0]
    assert_rel(dx, dx_ref, 2 * assert_rel(dx_plain, dx_ref, 1.0) + 1e-3, "dx")
    assert_rel(dc, dc_ref, 2e-2, "dc")


def test_triton_bf16_activations():
    _check_bf16_activations("triton", _kernel_case("int8", None, 37, 70, 45, P=2))


@pytest.mark.parametrize("chunk_rows", [1, 4, 100])
@pytest.mark.parametrize("fmt,group", FORMATS)
def test_torch_chunks_of_whole_rows(monkeypatch, chunk_rows, fmt, group):
    """The torch backend dequantises a chunk of whole rows at a time: one row, 4 rows (the last chunk short)
    and the whole block, through the merge (forward), the merge-and-reduce pass (backward) and reduce alone."""
    from atlas_fast.backends import torch_backend
    monkeypatch.setattr(torch_backend, "CHUNK_BYTES", chunk_rows * 70 * 3 * 4)
    for P in (1, 3):
        _check_linear("torch", _linear_case(fmt, group, P=P))
    x, w, b, tw, tb, cw, cb = _linear_case(fmt, group, P=2)
    y = atlas_fast.atlas_linear(x, w, b, tw, tb, cw, cb, 3, 4, backend="torch")
    y_ref = linear_ref(x.double(), w, b, tw.dequantize(torch.float64), tb, cw, cb, 3, 4)
    g = torch.randn_like(y_ref)
    assert_rel(torch.autograd.grad(y, cw, g.float())[0], torch.autograd.grad(y_ref, cw, g)[0], TOL[torch.float32][1])


_CUDA = pytest.param("cuda", marks=pytest.mark.gpu)


@pytest.mark.parametrize("backend", ["torch", _CUDA])
@pytest.mark.parametrize("fmt,group", FORMATS)
@pytest.mark.parametrize("conv", [dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1),
                                  dict(stride=(2, 2), padding=(0, 1), dilation=(1, 1), groups=2)])
def test_conv2d(fmt, group, conv, backend):
    """groups=1 runs the CUDA backend's linear kernels on the im2col view (rows: out channels, as quantised)."""
    T, P, device = 2, 2, "cuda" if backend == "cuda" else "cpu"
    x = torch.randn(3, 4, 9, 11, device=device)
    w, b = torch.randn(6, 4 // conv["groups"], 3, 3, device=device) * 0.2, torch.randn(6, device=device) * 0.1
    tw = quant.quantize(torch.randn(T, *w.shape, device=device) * 2e-3, fmt, group or quant.DEFAULT_GROUP)
    tb = torch.randn(T, 6, device=device) * 1e-3
    cw, cb = random_coef(T, P, device), random_coef(T, P, device)
    xl = x.clone().requires_grad_()
    y = atlas_fast.atlas_conv2d(xl, w, b, tw, tb, cw, cb, 5, 6, backend=backend, **conv)
    x64 = x.double().requires_grad_()
    y_ref = conv2d_ref(x64, w, b, tw.dequantize(torch.float64), tb, cw, cb, 5, 6, **conv)
    g = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, (xl, cw, cb), g.float())
    grads_ref = torch.autograd.grad(y_ref, (x64, cw, cb), g)
    assert_rel(y, y_ref, TOL[torch.float32][0])
    for name, got, ref in zip(("grad x", "grad coef_w", "grad coef_b"), grads, grads_ref):
        assert_rel(got, ref, TOL[torch.float32][1], name)


@pytest.mark.parametrize("backend", ["torch", _CUDA])
@pytest.mark.parametrize("fmt,group", FORMATS)
@pytest.mark.parametrize("shapes", [[(7, 37), (11,), (5, 2, 3)], [(7, 37), (5, 2, 3)]])
def test_merge_blocks_float_and_quantised(fmt, group, shapes, backend):
    """On the CUDA backend the float blocks take its multi-tensor kernels and the quantised ones the walk."""
    T, P, device = 3, 2, "cuda" if backend == "cuda" else "cpu"
    theta0 = [torch.randn(s, device=device) for s in shapes]
    taus = [quant.quantize(torch.randn(T, *s, device=device) * 1e-2, fmt, group or 128) if len(s) > 1
            else torch.randn(T, *s, device=device) * 1e-2 for s in shapes]
    coef = torch.randn(T, len(shapes), P, device=device, requires_grad=True)
    keys = [block_key(1, b) for b in range(len(shapes))]
    merged = atlas_fast.merge_blocks(theta0, taus, coef, keys, backend=backend)
    c64 = coef.detach().double().requires_grad_()
    refs = [merge_ref(t0, t.dequantize(torch.float64) if quant.is_quantized(t) else t, c64[:, b], keys[b])
            for b, (t0, t) in enumerate(zip(theta0, taus))]
    grads = [torch.randn_like(r) for r in refs]
    for m, r in zip(merged, refs):
        assert m.dtype == torch.float32
        assert_rel(m, r, TOL[torch.float32][0])
    dc = torch.autograd.grad(merged, coef, [g.float() for g in grads])[0]
    assert_rel(dc, torch.autograd.grad(refs, c64, grads)[0], TOL[torch.float32][1], "dc")


@pytest.mark.parametrize("fmt,group", FORMATS)
def test_gradcheck_float64(fmt, group):
    d = dict(dtype=torch.float64)
    x = torch.randn(5, 7, **d, requires_grad=True)
    w, b = torch.randn(6, 7, **d), torch.randn(6, **d)
    tw = quant.quantize(torch.randn(2, 6, 7, **d), fmt, group or 128)
    tw = quant.QuantizedBlock(tw.data, tw.scale.double(), tw.group, tw.shape)
    tb = torch.randn(2, 6, **d)
    for P in (1, 3):
        cw, cb = torch.randn(2, P, **d, requires_grad=True), torch.randn(2, P, **d, requires_grad=True)
        f = lambda *a: atlas_fast.atlas_linear(a[0], w, b, tw, tb, a[1], a[2], 3, 4, backend="torch")  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, cw, cb))


@pytest.mark.parametrize("fmt,group", FORMATS)
def test_opcheck(fmt, group):
    x, w, b, tw, tb, cw, cb = _linear_case(fmt, group, M=9, K=11, N=7, P=2)
    x.requires_grad_()
    args = (x, w, b, tw.data, tb, cw, cb, 1, 2, "torch", tw.scale, tw.group)
    torch.library.opcheck(torch.ops.atlas_fast.atlas_linear.default, args)
    torch.library.opcheck(torch.ops.atlas_fast.atlas_linear_backward.default,
                          (torch.randn(9, 7), x.detach(), w, tw.data, tb, cw.detach(), 1, 2, True, "torch", tw.scale,
                           tw.group))
    theta0 = [torch.randn(7, 11), torch.randn(7)]
    coef = torch.randn(3, 2, 2, requires_grad=True)
    torch.library.opcheck(torch.ops.atlas_fast.merge_blocks_quant.default,
                          ([theta0[0], theta0[1]], [tw.data, tb], [tw.scale, None], [tw.group, 0], coef, [1, 2],
                           "torch"))


def test_conv2d_opcheck():
    x = torch.randn(2, 4, 7, 9, requires_grad=True)
    w, b = torch.randn(5, 4, 3, 3) * 0.2, torch.randn(5)
    tw = quant.quantize(torch.randn(2, 5, 4, 3, 3) * 1e-2, "int4", 16)
    tb, cw, cb = torch.randn(2, 5) * 1e-2, random_coef(2, 1), random_coef(2, 1)
    args = (x, w, b, tw.data, tb, cw, cb, 1, 2, [1, 1], [1, 1], [1, 1], 1, "torch", tw.scale, tw.group)
    torch.library.opcheck(torch.ops.atlas_fast.atlas_conv2d.default, args)
    g = torch.randn_like(torch.ops.atlas_fast.atlas_conv2d(*args))
    torch.library.opcheck(torch.ops.atlas_fast.atlas_conv2d_backward.default,
                          (g, x.detach(), w, tw.data, tb, cw.detach(), 1, 2, [1, 1], [1, 1], [1, 1], 1, True, "torch",
                           tw.scale, tw.group))


def test_torch_compile_fullgraph():
    """A composed model on an int4 bank traces into one graph (the quantised blocks are unpacked into the ops'
    tensor arguments in Python) and gives the eager outputs and gradients."""
    torch.manual_seed(0)
    model, x = Mixed(), torch.randn(2, 3, 5, 5)
    atlas = compose(model, synthetic_task_vectors(model, 2, rel_scale=0.05).to(dtype="int4", group_size=16),
                    partitions=2, backend="torch")
    with torch.no_grad():
        atlas.coefficients.uniform_(-0.5, 0.5)
    eager = atlas(x)
    g = torch.randn_like(eager)
    grad = torch.autograd.grad(eager, atlas.coefficients, g)[0]
    out = torch.compile(atlas, fullgraph=True, backend="aot_eager")(x)
    assert_rel(out.detach(), eager.detach(), 1e-6)
    assert_rel(torch.autograd.grad(out, atlas.coefficients, g)[0], grad, 1e-6, "coefficient gradient")


def test_quantised_bias_is_refused():
    x, w, b, tw, tb, cw, cb = _linear_case("int8", None)
    with pytest.raises(ValueError, match="bias: task vectors of a bias are 1-D"):
        atlas_fast.atlas_linear(x, w, b, tw, quant.quantize(tb[..., None], "int8").reshape(3, 45), cw, cb)


def test_cuda_backend_on_cpu_tensors_names_the_device_for_quantised_banks():
    """A quantised bank is no reason to refuse the CUDA backend: on CPU tensors it says what it says for any bank."""
    from atlas_fast.backends import BackendUnavailable
    x, w, b, tw, tb, cw, cb = _linear_case("int8", None)
    with pytest.raises(BackendUnavailable, match="CUDA tensors, not on cpu"):
        atlas_fast.atlas_linear(x, w, b, tw, tb, cw, cb, backend="cuda")
    with pytest.raises(BackendUnavailable, match="CUDA tensors, not on cpu"):
        compose(nn.Linear(9, 4), synthetic_task_vectors(nn.Linear(9, 4), 2).to(dtype="int4"), backend="cuda")


def test_cuda_backend_takes_quantised_small_blocks_through_the_walk():
    """The CUDA backend's merge_blocks / merge_blocks_backward hand quantised blocks to the torch backend's walk
    (which runs on any device) and keep their order; called here on CPU tensors, where no kernel is needed."""
    from atlas_fast.backends import get_backend
    T, P = 3, 2
    shapes = [(7, 37), (5, 2, 3), (4, 9)]
    theta0 = [torch.randn(s) for s in shapes]
    taus = [quant.quantize(torch.randn(T, *s) * 1e-2, "int4", 16) for s in shapes]
    coef, keys = torch.randn(T, len(shapes), P), [block_key(7, b) for b in range(len(shapes))]
    grads = [torch.randn(s) for s in shapes]
    c64 = coef.double()
    for got, t0, t, b in zip(get_backend("cuda").merge_blocks(theta0, taus, coef, keys), theta0, taus, range(3)):
        assert_rel(got, merge_ref(t0, t.dequantize(torch.float64), c64[:, b], keys[b]), TOL[torch.float32][0])
    dc = get_backend("cuda").merge_blocks_backward(grads, taus, keys, P)
    assert dc.shape == (T, len(shapes), P)
    for b, (t, g) in enumerate(zip(taus, grads)):
        c = c64[:, b].clone().requires_grad_()
        ref = torch.autograd.grad(merge_ref(theta0[b], t.dequantize(torch.float64), c, keys[b]), c, g.double())[0]
        assert_rel(dc[:, b], ref, TOL[torch.float32][1], f"dc of block {b}")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,group", FORMATS)
@pytest.mark.parametrize("strategy", ["fused", "merge_once", "keep"])
@pytest.mark.parametrize("M,K,N,P", [(23, 70, 45, 2), (130, 77, 65, 3)])
def test_cuda_backend_strategies(fmt, group, strategy, M, K, N, P):
    """The fused CUDA kernels dequantising int8/int4 tiles in registers (K = 77: an odd int4 width; 130 rows and
    65 outputs: partial 64-row tiles), merge-once (the walk on the GPU) and merge-once keeping its weight for dx."""
    from atlas_fast.backends import get_backend, plan
    saved = plan.set_strategy("merge_once" if strategy == "keep" else strategy), plan.set_keep_budget(
        1 << 30 if strategy == "keep" else 0)
    try:
        _check_linear("cuda", _linear_case(fmt, group, M=M, K=K, N=N, P=P), device="cuda")
        assert get_backend("cuda").kept.nbytes() == 0, "dx takes the kept weight"
    finally:
        plan.set_strategy(saved[0])
        plan.set_keep_budget(saved[1])


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,group", FORMATS)
def test_cuda_bf16_activations(fmt, group):
    """The tensor-core path of the fused kernels on quantised tiles."""
    _check_bf16_activations("cuda", [t.cuda() for t in _linear_case(fmt, group, M=70, K=96, N=80, P=2)])


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,group", FORMATS)
def test_cuda_opcheck(fmt, group):
    x, w, b, tw, tb, cw, cb = (t.cuda() for t in _linear_case(fmt, group, M=9, K=11, N=7, P=2))
    from atlas_fast.backends.cuda_backend import load_extension
    assert load_extension() is None
    torch.library.opcheck(torch.ops.atlas_fast.atlas_linear_cuda_forward.default,
                          (x, w, b, tw.data, tb, cw, cb, 1, 2, tw.scale, tw.group))
    torch.library.opcheck(torch.ops.atlas_fast.atlas_linear_cuda_backward.default,
                          (torch.randn(9, 7, device="cuda"), x, w, tw.data, tb, cw, 1, 2, True, tw.scale, tw.group))


@pytest.mark.gpu
def test_cuda_bad_scales_are_named():
    from atlas_fast.backends.cuda_backend import load_extension
    assert load_extension() is None
    x, w, b, tw, tb, cw, cb = (t.cuda() for t in _linear_case("int4", 16, M=9, K=33, N=7))
    with pytest.raises(RuntimeError, match="scale_w must be"):
        torch.ops.atlas_fast.atlas_linear_cuda_forward(x, w, b, tw.data, tb, cw, cb, 1, 2, tw.scale[:, :, :1], 16)
    with pytest.raises(RuntimeError, match="int4 tau_w needs group_w"):
        torch.ops.atlas_fast.atlas_linear_cuda_forward(x, w, b, tw.data, tb, cw, cb, 1, 2, tw.scale, 0)


_SM90_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from atlas_fast.kernels import atlas_linear as k

act, quant = "{act}", {quant}
data = {{0: "bf16", 1: "i8", 2: "u8"}}[quant]
common = dict(M="i32", N="i32", K="i32", key_w="i32")
kernels = [
    (k.atlas_linear_fwd_kernel, dict(x_ptr="*" + act, w_ptr="*fp32", tau_w_ptr="*" + data, scale_w_ptr="*fp32",
     coef_w_ptr="*fp32", b_ptr="*fp32", tau_b_ptr="*fp32", coef_b_ptr="*fp32", y_ptr="*" + act, stride_xm="i32",
     stride_xk="i32", stride_ym="i32", key_b="i32"), dict(T=3, T_B=3, HAS_BIAS=True, BLOCK_M=128, BLOCK_N=64,
                                                          BLOCK_K=32)),
    (k.atlas_linear_dx_kernel, dict(dy_ptr="*" + act, w_ptr="*fp32", tau_w_ptr="*" + data, scale_w_ptr="*fp32",
     coef_w_ptr="*fp32", dx_ptr="*" + act, stride_dym="i32", stride_dyn="i32", stride_dxm="i32"),
     dict(T=3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32)),
    (k.atlas_linear_dc_kernel, dict(dy_ptr="*" + act, x_ptr="*" + act, tau_w_ptr="*" + data, scale_w_ptr="*fp32",
     dc_ptr="*fp32", T="i32", stride_dym="i32", stride_dyn="i32", stride_xm="i32", stride_xk="i32"),
     dict(DETERMINISTIC=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, SPLIT_M=4)),
]
for fn, signature, constants in kernels:
    constants.update(P=3, QUANT=quant, GROUP=64, UPCAST=act == "fp32", PRECISION="ieee")
    signature.update(common)
    signature.update({{name: "constexpr" for name in constants}})
    signature = {{name: signature[name] for name in fn.arg_names}}
    triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=4, num_stages=2))
fn = k.atlas_linear_merge_kernel
constants = dict(T=3, P=1, QUANT=quant, GROUP=64, BLOCK=2048)
signature = dict(theta_ptr="*fp32", tau_ptr="*" + data, scale_ptr="*fp32", coef_ptr="*fp32", out_ptr="*" + act,
                 numel="i32", K="i32", key="i32")
signature.update({{name: "constexpr" for name in constants}})
triton.compile(ASTSource(fn, {{n: signature[n] for n in fn.arg_names}}, constants), target=GPUTarget("cuda", 90, 32),
               options=dict(num_warps=4, num_stages=1))
"""


@pytest.mark.slow
@pytest.mark.parametrize("act,quant_kind", [("bf16", 0), ("bf16", 1), ("bf16", 2), ("fp32", 1)])
def test_quantised_kernels_compile_for_sm90(act, quant_kind):
    """The interpreter does not lower the kernels; compiling the float (0), int8 (1) and int4 (2) variants for
    Hopper does."""
    compile_for_sm90(_SM90_COMPILE.format(act=act, quant=quant_kind))


# ---------------------------------------------------------------- compose

class Mixed(nn.Module):
    """Every kind of composed block: Conv2d, Linear and MultiheadAttention (fused), LayerNorm, a bare parameter
    and an embedding (generic), at odd widths."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.lin = nn.Linear(6 * 5 * 5, 37)
        self.ln = nn.LayerNorm(37)
        self.proj = nn.Parameter(torch.randn(37, 36) * 0.1)
        self.emb = nn.Embedding(11, 36)
        self.attn = nn.MultiheadAttention(36, 4, batch_first=True)

    def forward(self, x):
        h = self.ln(self.lin(self.conv(x).flatten(1))) @ self.proj
        h = h[:, None] + self.emb.weight[None, :3]
        return self.attn(h, h, h, need_weights=False)[0]


def _dequantised(tv):
    return {k: v.dequantize() if quant.is_quantized(v) else v for k, v in tv.vectors.items()}


def composed_against_reference(model, x, bank, dense, granularity, partitions, backend):
    """A copy of `model` composed with `bank` at random coefficients: its output, input gradient and coefficient
    gradient against the float64 reference of the dense task vectors `dense`. Returns (AtlasModel, reference
    output) for further checks."""
    atlas = compose(copy.deepcopy(model), bank, granularity=granularity, partitions=partitions, backend=backend)
    assert set(atlas.report.fused) >= {"conv.weight", "lin.weight", "attn.in_proj_weight", "attn.out_proj.weight"}
    assert set(atlas.report.generic) == {"ln.weight", "ln.bias", "proj", "emb.weight"}
    with torch.no_grad():
        atlas.coefficients.uniform_(-0.8, 0.8)
    xl = x.clone().requires_grad_()
    y = atlas(xl)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref, dc_ref, dx_ref = reference_outputs_and_grad(model, dense, atlas.coefficients, (x,), grad_out=g,
                                                       granularity=granularity, partitions=partitions,
                                                       input_grads=True)
    tol_out, tol_grad = TOL[torch.float32]
    assert_rel(y, y_ref, tol_out)
    assert_rel(xl.grad, dx_ref, tol_grad, "grad x")
    assert_coef_grad(atlas.coefficients.grad, dc_ref, atlas.block_names, tol_grad, granularity, partitions)
    return atlas, y_ref


@pytest.mark.parametrize("fmt,group", FORMATS)
@pytest.mark.parametrize("granularity,partitions", [("block", 1), ("task", 1), ("block", 3)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compose_against_reference(fmt, group, granularity, partitions, backend):
    torch.manual_seed(0)
    model, x = Mixed(), torch.randn(4, 3, 5, 5)
    bank = synthetic_task_vectors(model, 3, rel_scale=0.05).to(dtype=torch.int8 if fmt == "int8" else "int4",
                                                                group_size=group)
    composed_against_reference(model, x, bank, _dequantised(bank), granularity, partitions, backend)


def test_composed_model_moves_keep_scales_and_copies():
    torch.manual_seed(0)
    model, x = Mixed(), torch.randn(2, 3, 5, 5)
    bank = synthetic_task_vectors(model, 2, rel_scale=0.05).to(dtype="int4", group_size=16)
    atlas = compose(model, bank, backend="torch")
    with torch.no_grad():
        atlas.coefficients.uniform_(-0.5, 0.5)
    y = atlas(x)
    assert not any("tau" in k for k in atlas.state_dict()), "task vectors are not state"
    generic = {n: b.dtype for n, b in atlas.atlas.generic.named_buffers() if not n.endswith("_scale")}
    assert sorted(map(str, generic.values())) == ["torch.float32"] * 2 + ["torch.uint8"] * 2, generic
    twin = copy.deepcopy(atlas)
    assert torch.equal(twin(x), y)
    plain = atlas.merge()
    assert_rel(plain(x), y, 1e-5, "merge()")
    dense = {k: v.dequantize(torch.float64) if quant.is_quantized(v) else v.double() for k, v in bank.vectors.items()}
    norms = torch.stack([dense[name].reshape(2, -1).norm(dim=1) for name in atlas.block_names], 1)
    assert_rel(atlas.bank_fingerprint()[:, :, 0], norms, 1e-12, "fingerprint norms")
    atlas.bfloat16()
    scales = [b for n, b in atlas.model.named_buffers() if n.endswith("_scale")]
    assert scales and all(s.dtype == torch.float32 for s in scales)
    assert atlas.model.lin.tau_weight.dtype == torch.uint8 and atlas.model.lin.tau_bias.dtype == torch.bfloat16
    assert_rel(atlas(x.bfloat16()).float(), y, 2e-2, "bfloat16 model")


# ---------------------------------------------------------------- accuracy of composed models

def _digits(size, rotate, n, offset=0):
    """n of scikit-learn's digits rotated by 90° × rotate, as (n, 3, size, size) images in [-1, 1], and labels."""
    from adapt_world import digits
    images, labels = digits(rotate)
    x = torch.as_tensor(images[offset:offset + n], dtype=torch.float32)[:, None] / 127.5 - 1
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous(), torch.as_tensor(labels[offset:offset + n])


def _finetuned_bank(model, size, T=2, steps=4, batch=8, lr=1e-5):
    """Task vectors from real fine-tuning: `steps` AdamW steps (lr 1e-5, as CLIP towers are fine-tuned for task
    vectors) of the whole tower on digits rotated by 90° × t through a fixed random head, one task per t."""
    tuned = []
    for t in range(T):
        torch.manual_seed(10 + t)
        m = copy.deepcopy(model).train()
        head = torch.randn(10, m.output_dim) / m.output_dim ** 0.5
        opt = torch.optim.AdamW(m.parameters(), lr=lr)
        x, y = _digits(size, t, steps * batch)
        for s in range(steps):
            loss = torch.nn.functional.cross_entropy(m(x[s * batch:(s + 1) * batch]) @ head.t(),
                                                     y[s * batch:(s + 1) * batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        tuned.append(m.eval())
    return TaskVectors.from_models(model, tuned)


def _composed_errors(model, x, bank, seed=0):
    """Relative errors of the int8 and int4 banks' outputs against the float32 bank's, for one composed model
    with coefficients in [0, 1): {format: (error relative to the outputs, error relative to the task vectors'
    effect on them)}."""
    torch.manual_seed(seed)
    coef, outs = None, {}
    with torch.no_grad():
        y0 = model(x)
        for fmt, dtype in (("float32", torch.float32), ("int8", torch.int8), ("int4", "int4")):
            atlas = compose(copy.deepcopy(model), bank.to(dtype=dtype), backend="torch")
            coef = torch.rand_like(atlas.coefficients) if coef is None else coef
            atlas.coefficients.copy_(coef)
            outs[fmt] = atlas(x)
    ref = outs["float32"]
    return {fmt: (((outs[fmt] - ref).norm() / ref.norm()).item(), ((outs[fmt] - ref).norm() / (ref - y0).norm()).item())
            for fmt in quant.FORMATS}


# Output error against the float32 bank: the requirement (int8 2%, int4 5%), and the error against what the task
# vectors change (they move the outputs by a few percent), which the first bound alone would hardly test.
ACCURACY = {"int8": (0.02, 0.02), "int4": (0.05, 0.12)}


def test_small_vit_int8_int4_accuracy():
    from open_clip.transformer import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, width=128, layers=2, heads=4, mlp_ratio=4.0,
                              output_dim=64).eval()
    for bank in (synthetic_task_vectors(model, 4, rel_scale=1e-2), _finetuned_bank(model, 32)):
        errors = _composed_errors(model, _digits(32, 0, 4, offset=1000)[0], bank)
        for fmt, (out_err, effect_err) in errors.items():
            assert out_err <= ACCURACY[fmt][0] and effect_err <= ACCURACY[fmt][1], (fmt, out_err, effect_err)


@pytest.mark.slow
def test_vit_b_32_int8_int4_accuracy():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).visual.eval()
    bank = _finetuned_bank(model, 224)
    assert bank.to(dtype=torch.int8).nbytes <= 0.27 * bank.nbytes
    assert bank.to(dtype="int4").nbytes <= 0.15 * bank.nbytes
    errors = _composed_errors(model, _digits(224, 0, 2, offset=1000)[0], bank)
    print({fmt: f"{e[0]:.2e} of the outputs, {e[1]:.2e} of the task vectors' effect" for fmt, e in errors.items()})
    for fmt, (out_err, effect_err) in errors.items():
        assert out_err <= ACCURACY[fmt][0] and effect_err <= ACCURACY[fmt][1], (fmt, out_err, effect_err)
