"""The cuda backend: lazy loading and clear refusals on any machine; every kernel against the float64 reference
on a GPU (forward and gradients, odd shapes, fp32/bf16/fp16 activations, fp32/bf16 banks, 1 and 3 partitions).

Low-precision results follow the flash-attention rule: the error against float64 may be at most about twice
that of the torch backend in the same dtype.
"""
import copy
import fnmatch
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import atlas_fast
from atlas_fast.backends import BackendUnavailable, get_backend
from atlas_fast.backends import cuda_backend
from atlas_fast.hashing import block_key
from atlas_fast.reference import conv2d_ref, linear_ref, merge_ref

from helpers import TOL, assert_coef_grad, assert_rel, random_bank, random_coef, reference_outputs_and_grad, rel_err

ROOT = Path(__file__).resolve().parent.parent
ACT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ---------------------------------------------------------------- any machine

def test_import_and_compose_never_build_nor_touch_cuda():
    """Importing and composing (torch backend) loads no compiler machinery and initialises no CUDA context."""
    code = (
        "import sys, torch, atlas_fast\n"
        "from atlas_fast.backends import get_backend\n"
        "get_backend('cuda')\n"
        "model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 3))\n"
        "atlas = atlas_fast.compose(model, atlas_fast.synthetic_task_vectors(model, 2), backend='torch')\n"
        "atlas(torch.randn(4, 8)).sum().backward()\n"
        "assert 'torch.utils.cpp_extension' not in sys.modules, 'the compiler machinery was imported'\n"
        "assert 'atlas_fast._C' not in sys.modules\n"
        "assert not torch.cuda.is_initialized(), 'CUDA was initialised'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_cpu_tensors_raise_backend_unavailable():
    x, w, tw = torch.randn(5, 8), torch.randn(6, 8), random_bank((6, 8), 2)
    with pytest.raises(BackendUnavailable, match="backend='cuda' cannot run on cpu: the CUDA kernels run on CUDA"):
        atlas_fast.atlas_linear(x, w, None, tw, None, random_coef(2, 1), backend="cuda")
    with pytest.raises(BackendUnavailable, match="CUDA tensors"):
        atlas_fast.merge_blocks([torch.randn(4)], [random_bank((4,), 2)], random_coef(2, 1)[:, None], [0],
                                backend="cuda")


def test_cuda_backend_on_cpu_fails_at_compose_with_the_reason():
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.GELU(), torch.nn.Linear(6, 3))
    with pytest.raises(BackendUnavailable, match="CUDA tensors"):
        atlas_fast.compose(model, atlas_fast.synthetic_task_vectors(model, 2), backend="cuda")
    atlas = atlas_fast.compose(model, atlas_fast.synthetic_task_vectors(model, 2), backend="torch")
    with pytest.raises(BackendUnavailable, match="CUDA tensors"):
        atlas.backend = "cuda"
    assert atlas.backend == "torch" and atlas(torch.randn(4, 8)).shape == (4, 3)


def test_float64_is_refused_with_the_way_out():
    d = dict(dtype=torch.float64)
    x, w, tw, cw = torch.randn(3, 4, **d), torch.randn(5, 4, **d), torch.randn(2, 5, 4, **d), torch.randn(2, 1, **d)
    with pytest.raises(ValueError, match="backend='torch' for float64"):
        get_backend("cuda").atlas_linear(x, w, None, tw, None, cw, None, 0, 0)
    with pytest.raises(ValueError, match="backend='torch' for float64"):
        get_backend("cuda").merge_blocks_backward([torch.randn(4, **d)], [torch.randn(2, 4, **d)], [0], 1)


def test_reasons_name_what_is_missing(monkeypatch):
    from torch.utils import cpp_extension
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert "nvcc was not found" in cuda_backend._build_and_load()
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    assert "pip install ninja" in cuda_backend._build_and_load()


def test_sources_ship_with_the_package():
    """The JIT loader finds csrc/, and setup.py's package data covers every file in it."""
    src = cuda_backend.source_dir()
    assert src is not None and (src / "atlas_linear.cu").is_file() and (src / "merge_blocks.cu").is_file()
    patterns = ["*.cu", "*.cuh", "*.h", "*.cpp"]
    assert f'"atlas_fast.csrc": {patterns}'.replace("'", '"') in (ROOT / "setup.py").read_text()
    unshipped = [p.name for p in src.iterdir() if not any(fnmatch.fnmatch(p.name, pat) for pat in patterns)]
    assert unshipped == []


@pytest.mark.slow
def test_extension_builds_and_registers_its_ops(monkeypatch):
    """Loads the kernel ops as the backend does, compiling csrc/ if needed (minutes; nvcc and ninja, no GPU)."""
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME is None:
        pytest.skip("no CUDA toolkit")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    assert cuda_backend.load_extension() is None
    schema = str(torch.ops.atlas_fast.atlas_linear_cuda_forward.default._schema)
    assert "Tensor? bias" in schema and "int key_w" in schema
    for op in ("atlas_linear_cuda_backward", "merge_blocks_cuda", "merge_blocks_cuda_backward"):
        assert hasattr(torch.ops.atlas_fast, op)


# ---------------------------------------------------------------- GPU: helpers

def _poison_allocator():
    """Fill the caching allocator's free memory with NaN, so an output element a kernel never writes is NaN."""
    blocks = [torch.full((n,), float("nan"), device="cuda") for n in (1 << 16, 1 << 18, 1 << 24)]
    del blocks


def _low_precision_budget(torch_value, ref, floor):
    """Twice the torch backend's error in the same dtype, plus a floor for results that are nearly exact."""
    return 2 * rel_err(torch_value, ref) + floor


def _linear_case(M, K, N, T, P, bias, act, bank, lead=()):
    x = torch.randn(*lead, M, K, device="cuda").to(act).requires_grad_()
    w = torch.randn(N, K, device="cuda") / K ** 0.5
    b = torch.randn(N, device="cuda") * 0.1 if bias else None
    tw = random_bank((N, K), T, bank, 1e-2 / K ** 0.5, "cuda")
    tb = random_bank((N,), T, bank, 1e-3, "cuda") if bias else None
    cw = random_coef(T, P, "cuda")
    cb = random_coef(T, P, "cuda") if bias else None
    return x, w, b, tw, tb, cw, cb


def _linear_run(backend, case, keys, g):
    x, w, b, tw, tb, cw, cb = case
    _poison_allocator()
    y = atlas_fast.atlas_linear(x, w, b, tw, tb, cw, cb, *keys, backend=backend)
    inputs = [t for t in (x, cw, cb) if t is not None]
    return (y, *torch.autograd.grad(y, inputs, g.to(y.dtype)))


# ---------------------------------------------------------------- GPU: linear

SHAPES = [(37, 70, 45), (1, 123, 17), (64, 32, 96), (517, 70, 45), (1000, 64, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("P", [1, 3])
@pytest.mark.parametrize("act", ACT_DTYPES)
@pytest.mark.parametrize("bank", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_reference(M, K, N, T, P, act, bank, bias):
    case = _linear_case(M, K, N, T, P, bias, act, bank)
    x, w, b, tw, tb, cw, cb = case
    keys = (block_key(0, 4), block_key(0, 5))
    x64 = x.detach().double().requires_grad_()  # so that the reference input gradient is not rounded to x's dtype
    yr = linear_ref(x64, w, b, tw, tb, cw, cb, *keys)
    g = torch.randn_like(yr).to(act).double()  # the reference sees the gradient the kernels see
    refs = (yr, *torch.autograd.grad(yr, [t for t in (x64, cw, cb) if t is not None], g))
    got = _linear_run("cuda", case, keys, g)
    names = ("output", "grad x", "grad coef_w", "grad coef_b")
    if act == torch.float32:
        tol_out, tol_grad = TOL[torch.float32]
        for name, out, ref in zip(names, got, refs):
            assert_rel(out, ref, tol_out if name == "output" else tol_grad, name)
        return
    plain = _linear_run("torch", case, keys, g)
    for name, out, ref, base in zip(names, got, refs, plain):
        assert out.dtype == (torch.float32 if name.startswith("grad coef") else act), name
        assert_rel(out, ref, _low_precision_budget(base, ref, 1e-4), name)


@pytest.mark.gpu
def test_linear_leading_dims_and_strided_input():
    _, w, b, tw, tb, cw, cb = _linear_case(13, 40, 24, 2, 3, True, torch.float32, torch.float32)
    x_big = torch.randn(3, 13, 80, device="cuda", requires_grad=True)
    x = x_big[..., ::2]  # (3, 13, 40) with a stride of 2 along the features
    y = atlas_fast.atlas_linear(x, w, b, tw, tb, cw, cb, 7, 8, backend="cuda")
    yr = linear_ref(x, w, b, tw, tb, cw, cb, 7, 8)
    assert y.shape == (3, 13, 24)
    assert_rel(y, yr, TOL[torch.float32][0])
    g = torch.randn_like(yr)
    for name, out, ref in zip(("grad x", "grad coef_w", "grad coef_b"),
                              torch.autograd.grad(y, (x_big, cw, cb), g.float()),
                              torch.autograd.grad(yr, (x_big, cw, cb), g)):
        assert_rel(out, ref, TOL[torch.float32][1], name)


@pytest.mark.gpu
@pytest.mark.parametrize("act", ACT_DTYPES)
def test_coef_grad_is_deterministic(act):
    x, w, b, tw, tb, cw, cb = _linear_case(777, 96, 80, 5, 3, True, act, torch.bfloat16)
    g = torch.randn(777, 80, device="cuda").to(act)
    runs = [torch.ops.atlas_fast.atlas_linear_cuda_backward(g, x.detach(), w, tw, tb, cw.detach(), 1, 2, True)
            for _ in range(3)]
    for run in runs[1:]:
        for a, b_ in zip(runs[0], run):
            assert torch.equal(a, b_)


@pytest.mark.gpu
@pytest.mark.parametrize("act", ACT_DTYPES)
@pytest.mark.parametrize("conv", [((4, 4), (0, 0), (1, 1)), ((1, 2), (1, 0), (1, 1)), ((2, 1), (1, 1), (2, 1))])
def test_conv2d_matches_reference(act, conv):
    stride, padding, dilation = conv
    kernel = (4, 4) if stride == (4, 4) else (3, 3)
    x = torch.randn(2, 5, 17, 19, device="cuda").to(act).requires_grad_()
    w = torch.randn(7, 5, *kernel, device="cuda") / 45 ** 0.5
    b = torch.randn(7, device="cuda") * 0.1
    tw, tb = random_bank(w.shape, 3, torch.bfloat16, 1e-3, "cuda"), random_bank((7,), 3, torch.bfloat16, 1e-3, "cuda")
    cw, cb = random_coef(3, 3, "cuda"), random_coef(3, 3, "cuda")
    args = (x, w, b, tw, tb, cw, cb, 5, 6)

    def run(backend):
        y = atlas_fast.atlas_conv2d(*args, stride=stride, padding=padding, dilation=dilation, backend=backend)
        return (y, *torch.autograd.grad(y, (x, cw, cb), g.to(y.dtype)))

    x64 = x.detach().double().requires_grad_()
    yr = conv2d_ref(x64, *args[1:], stride=stride, padding=padding, dilation=dilation)
    g = torch.randn_like(yr).to(act).double()
    refs = (yr, *torch.autograd.grad(yr, (x64, cw, cb), g))
    plain = run("torch")
    _poison_allocator()
    for name, out, ref, base in zip(("output", "grad x", "grad coef_w", "grad coef_b"), run("cuda"), refs, plain):
        floor = 1e-5 if act == torch.float32 else 1e-4
        assert_rel(out, ref, _low_precision_budget(base, ref, floor), name)


@pytest.mark.gpu
def test_linear_opcheck():
    x, w, b, tw, tb, cw, cb = _linear_case(9, 11, 7, 3, 2, True, torch.bfloat16, torch.bfloat16)
    x, cw, cb = x.detach(), cw.detach(), cb.detach()
    torch.library.opcheck(torch.ops.atlas_fast.atlas_linear.default,
                          (x.requires_grad_(), w, b, tw, tb, cw.requires_grad_(), cb, 1, 2, "cuda"))
    x, cw = x.detach(), cw.detach()
    g = torch.randn(9, 7, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.atlas_fast.atlas_linear_cuda_forward.default, (x, w, b, tw, tb, cw, cb, 1, 2))
    for tau_b, need in ((tb, True), (None, False)):
        torch.library.opcheck(torch.ops.atlas_fast.atlas_linear_cuda_backward.default,
                              (g, x, w, tw, tau_b, cw, 1, 2, need))


@pytest.mark.gpu
def test_bad_arguments_are_named():
    x, w, b, tw, tb, cw, cb = _linear_case(5, 8, 6, 2, 1, True, torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match="tau_w must be"):
        torch.ops.atlas_fast.atlas_linear_cuda_forward(x.detach(), w, b, tw[:, :5], tb, cw.detach(), cb.detach(), 0, 0)
    with pytest.raises(RuntimeError, match="coef_w must be float32"):
        torch.ops.atlas_fast.atlas_linear_cuda_forward(x.detach(), w, b, tw, tb, cw.detach().half(), cb.detach(), 0, 0)
    with pytest.raises(RuntimeError, match="key_w must be a uint32"):
        torch.ops.atlas_fast.atlas_linear_cuda_forward(x.detach(), w, b, tw, tb, cw.detach(), cb.detach(), -1, 0)


# ---------------------------------------------------------------- GPU: merge_blocks

def _blocks(value_dtypes, bank, T, device="cuda"):
    """Blocks shaped like a model's small parameters: a bias, a norm scale, one element, an embedding larger
    than a chunk, a projection, and an empty block."""
    shapes = [(37,), (70,), (1,), (123, 45), (45, 70), (0,)]
    theta0 = [torch.randn(s, device=device).to(value_dtypes[i % len(value_dtypes)]) for i, s in enumerate(shapes)]
    tau = [random_bank(s, T, bank, 1e-2, device) for s in shapes]
    keys = [block_key(3, b) for b in range(len(shapes))]
    return theta0, tau, keys


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("P", [1, 3])
@pytest.mark.parametrize("values", [[torch.float32], [torch.bfloat16], [torch.float32, torch.float16]])
@pytest.mark.parametrize("bank", [torch.float32, torch.bfloat16])
def test_merge_blocks_matches_reference_and_torch(T, P, values, bank):
    theta0, tau, keys = _blocks(values, bank, T)
    coef = (torch.rand(T, len(theta0), P, device="cuda") * 1.6 - 0.8).requires_grad_()
    _poison_allocator()
    merged = atlas_fast.merge_blocks(theta0, tau, coef, keys, backend="cuda")
    plain = atlas_fast.merge_blocks(theta0, tau, coef, keys, backend="torch")
    refs = [merge_ref(t0, tv, coef[:, b], key) for b, (t0, tv, key) in enumerate(zip(theta0, tau, keys))]
    grads = [torch.randn(t.shape, device="cuda").to(t.dtype) for t in theta0]
    for b, (out, base, ref) in enumerate(zip(merged, plain, refs)):
        assert out.dtype == theta0[b].dtype and out.shape == theta0[b].shape
        if out.numel():
            assert_rel(out, ref, _low_precision_budget(base, ref, 1e-6), f"block {b}")
    dc = torch.autograd.grad(merged, coef, grads)[0]
    dc_ref = torch.autograd.grad(refs, coef, [g.double() for g in grads])[0]
    assert_rel(dc, dc_ref, TOL[torch.float32][1], "grad coef")
    assert torch.equal(dc, torch.autograd.grad(atlas_fast.merge_blocks(theta0, tau, coef, keys, backend="cuda"),
                                               coef, grads)[0]), "the coefficient gradient is not deterministic"


@pytest.mark.gpu
def test_merge_blocks_opcheck():
    theta0, tau, keys = _blocks([torch.float32], torch.bfloat16, 3)
    coef = torch.rand(3, len(theta0), 2, device="cuda")
    torch.library.opcheck(torch.ops.atlas_fast.merge_blocks.default, (theta0, tau, coef.requires_grad_(), keys, "cuda"))
    torch.library.opcheck(torch.ops.atlas_fast.merge_blocks_cuda.default, (theta0, tau, coef.detach(), keys))
    torch.library.opcheck(torch.ops.atlas_fast.merge_blocks_cuda_backward.default, (theta0, tau, keys, 2))


def _composed_model_against_reference(backend, device):
    """End to end: linear layers, LayerNorm and biases of a composed model, forward and every block's coefficient
    gradient against the float64 reference of the plain model."""
    model = torch.nn.Sequential(torch.nn.Linear(40, 70), torch.nn.LayerNorm(70), torch.nn.GELU(),
                                torch.nn.Linear(70, 37)).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    plain = copy.deepcopy(model)
    bank = atlas_fast.synthetic_task_vectors(model, 3, rel_scale=5e-2).to(device)
    atlas = atlas_fast.compose(model, bank, partitions=3, backend=backend, seed=2)
    with torch.no_grad():
        atlas.coefficients.uniform_(-0.8, 0.8)
    x = torch.randn(5, 11, 40, device=device)
    y = atlas(x)
    g = torch.randn_like(y)
    grad, = torch.autograd.grad(y, atlas.coefficients, g)
    ref, ref_grad = reference_outputs_and_grad(plain, bank, atlas.coefficients, (x,), grad_out=g, partitions=3, seed=2)
    assert_rel(y.detach(), ref, TOL[torch.float32][0])
    assert_coef_grad(grad, ref_grad, atlas.block_names, TOL[torch.float32][1], partitions=3)


def test_composed_model_reference_check_on_cpu():
    """The end-to-end check below, on the torch backend: what the CUDA run is held to."""
    _composed_model_against_reference("torch", "cpu")


@pytest.mark.gpu
def test_composed_model_matches_reference():
    _composed_model_against_reference("cuda", "cuda")
