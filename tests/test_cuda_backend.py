"""The cuda backend: lazy loading and clear refusals on any machine; every kernel against the float64 reference
on a GPU (forward and gradients, odd shapes, fp32/bf16/fp16 activations, fp32/bf16 banks, 1 and 3 partitions),
the grouped ops (a coefficient set per group of samples) among them.

Low-precision results follow the flash-attention rule: the error against float64 may be at most about twice
that of the torch backend in the same dtype.
"""
import copy
import dataclasses
import fnmatch
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import atlas_fast
from atlas_fast.backends import BackendUnavailable, Block, cuda_backend, get_backend, plan, resolve
from atlas_fast.bank import quant
from atlas_fast.ops import grouped as grouped_ops
from atlas_fast.ops.grouped import atlas_conv2d_grouped, atlas_linear_grouped
from atlas_fast.ops.hashing import block_key
from atlas_fast.ops.reference import conv2d_ref, linear_ref, merge_ref
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
        get_backend("cuda").atlas_linear(x, Block(w, None, tw, None, cw, None, 0, 0))
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
    patterns = ["*.cu", "*.cuh", "*.h", "*.cpp", "*.c"]
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
    for op in ("atlas_linear_grouped_cuda_forward", "atlas_linear_grouped_cuda_backward"):
        schema = str(getattr(torch.ops.atlas_fast, op).default._schema)
        assert "Tensor row_group" in schema and "Tensor? skip" in schema, schema


def _grouped_cpu_args(dtype=torch.float32):
    x, index = torch.randn(3, 2, 5, dtype=dtype), torch.tensor([1, 0, 1])
    w, tw = torch.randn(4, 5, dtype=dtype), torch.randn(2, 4, 5, dtype=dtype)
    return x, index, w, None, tw, None, torch.rand(2, 2, 1, dtype=dtype)


def test_grouped_dispatch_takes_the_cuda_kernels(monkeypatch):
    """A grouped call that resolves to the cuda backend runs that backend's grouped method (the segmented CUDA
    kernels), not the torch backend's; likewise for triton and torch."""
    x, index, w, b, tw, tb, cw = _grouped_cpu_args()
    for name in ("cuda", "triton", "torch"):
        calls = []
        monkeypatch.setattr(grouped_ops, "resolve", lambda backend, device, dtype, n=name: get_backend(n))
        monkeypatch.setattr(get_backend(name), "atlas_linear_grouped",
                            lambda x, index, block, n=name: calls.append(n) or x.new_zeros(3, 2, 4))
        atlas_linear_grouped(x, index, w, b, tw, tb, cw, backend="auto")
        assert calls == [name]
    assert get_backend("cuda").grouped_block_m() == cuda_backend.BLOCK_M


def test_grouped_on_cpu_tensors_raises_backend_unavailable():
    x, index, w, b, tw, tb, cw = _grouped_cpu_args()
    with pytest.raises(BackendUnavailable, match="backend='cuda' cannot run on cpu: the CUDA kernels run on CUDA"):
        atlas_linear_grouped(x, index, w, b, tw, tb, cw, backend="cuda")


def test_grouped_without_the_extension_names_the_reason(monkeypatch):
    """Where CUDA is there but the kernels cannot be loaded, the grouped dispatch raises with the loader's reason."""
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_backend, "_load_result", ["compiling the CUDA extension in /x failed: nvcc error"])
    with pytest.raises(BackendUnavailable, match="backend='cuda' cannot run on cuda: compiling .* nvcc error"):
        resolve("cuda", torch.device("cuda"), torch.float32)


def test_grouped_float64_is_refused_with_the_way_out():
    x, index, w, b, tw, tb, cw = _grouped_cpu_args(torch.float64)
    with pytest.raises(ValueError, match="backend='torch' for float64"):
        get_backend("cuda").atlas_linear_grouped(x, index, Block(w, b, tw, tb, cw, None, 0, 0))
    with pytest.raises(ValueError, match="backend='torch' for float64"):
        get_backend("cuda").atlas_linear_grouped_backward(torch.randn(3, 2, 4, dtype=torch.float64), x, index,
                                                          Block(w, None, tw, tb, cw, None, 0, 0), True)


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


# ---------------------------------------------------------------- GPU: grouped linear and conv

# The group of each sample (G = 4): group 1 gets no sample, group 0 spans several 64-row tiles of the kernels.
GROUPED_INDEX = [0, 2, 0, 3, 0, 2, 0, 0]


@pytest.fixture
def strategy(request, monkeypatch):
    """The cost model's per-group choice, forced: every group "fused", every group "merge_once", or "mixed"
    (groups of at most 80 rows merge-once: groups 2 and 3 below, group 0 fused)."""
    real = plan.for_linear

    def for_linear(M, *args):
        merge = request.param == "merge_once" or (request.param == "mixed" and M <= 80)
        choice = "merge_once" if merge else "fused"
        return dataclasses.replace(real(M, *args), forward=choice, dx=choice)
    monkeypatch.setattr(plan, "for_linear", for_linear)
    return request.param


def _grouped_case(act, bank, P, bias, index=GROUPED_INDEX, G=4, rows=37, K=45, N=70, T=3, device="cuda"):
    x = torch.randn(len(index), rows, K, device=device).to(act).requires_grad_()
    w = torch.randn(N, K, device=device) / K ** 0.5
    b = torch.randn(N, device=device) * 0.1 if bias else None
    tw = random_bank((N, K), T, bank, 1e-2 / K ** 0.5, device)
    tb = random_bank((N,), T, bank, 1e-3, device) if bias else None
    cw = (torch.rand(G, T, P, device=device) * 1.6 - 0.8).requires_grad_()
    cb = (torch.rand(G, T, P, device=device) * 1.6 - 0.8).requires_grad_() if bias else None
    return x, torch.tensor(index, dtype=torch.int64, device=device), w, b, tw, tb, cw, cb


def _grouped_reference(case, keys, g):
    """Float64 outputs and gradients (x, coef_w, coef_b): every sample through linear_ref with its group's
    coefficients."""
    x, index, w, b, tw, tb, cw, cb = case
    leaves = [t.detach().double().requires_grad_() for t in (x, cw, cb) if t is not None]
    x64, cw64, cb64 = leaves[0], leaves[1], leaves[2] if cb is not None else None
    y = torch.stack([linear_ref(x64[s], w, b, tw, tb, cw64[k], cb64[k] if cb64 is not None else None, *keys)
                     for s, k in enumerate(index.tolist())])
    return (y, *torch.autograd.grad(y, leaves, g))


def _grouped_run(backend, case, keys, g):
    x, index, w, b, tw, tb, cw, cb = case
    if x.is_cuda:
        _poison_allocator()
    y = atlas_linear_grouped(x, index, w, b, tw, tb, cw, cb, *keys, backend=backend)
    return (y, *torch.autograd.grad(y, [t for t in (x, cw, cb) if t is not None], g.to(y.dtype)))


def _check_grouped(case, keys, act, backend="cuda"):
    """`backend` against the float64 reference: TOL in fp32, else at most twice the torch backend's error in the
    same dtype (plus a floor)."""
    names = ("output", "grad x", "grad coef_w", "grad coef_b")
    g = torch.randn(*case[0].shape[:-1], case[2].shape[0], device=case[0].device).to(act).double()
    refs = _grouped_reference(case, keys, g)
    got = _grouped_run(backend, case, keys, g)
    assert got[2][1].abs().max() == 0, "a group without samples got a coefficient gradient"
    if act == torch.float32:
        for name, out, ref in zip(names, got, refs):
            assert_rel(out, ref, TOL[torch.float32][0 if name == "output" else 1], name)
        return
    plain = _grouped_run("torch", case, keys, g)
    for name, out, ref, base in zip(names, got, refs, plain):
        assert out.dtype == (torch.float32 if name.startswith("grad coef") else act), name
        assert_rel(out, ref, _low_precision_budget(base, ref, 1e-4), name)


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
def test_grouped_reference_check_on_cpu(act):
    """The grouped check below, on the torch backend and the CPU: what the CUDA run is held to."""
    case = _grouped_case(act, torch.bfloat16, 3, True, device="cpu")
    _check_grouped(case, (block_key(1, 4), block_key(1, 5)), act, backend="torch")


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["fused"], indirect=True)
@pytest.mark.parametrize("act", ACT_DTYPES)
@pytest.mark.parametrize("bank,P,bias", [(torch.float32, 1, True), (torch.bfloat16, 3, True),
                                         (torch.bfloat16, 1, False)])
def test_linear_grouped_matches_reference(strategy, act, bank, P, bias):
    _check_grouped(_grouped_case(act, bank, P, bias), (block_key(1, 4), block_key(1, 5)), act)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["merge_once", "mixed"], indirect=True)
@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
def test_linear_grouped_merge_once_groups(strategy, act):
    """Groups the cost model runs merge-once are left out of the kernels and computed on a merged layer."""
    _check_grouped(_grouped_case(act, torch.bfloat16, 3, True), (block_key(1, 4), block_key(1, 5)), act)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["fused", "mixed"], indirect=True)
@pytest.mark.parametrize("fmt,group,P", [("int8", 0, 1), ("int4", 16, 3)])
def test_linear_grouped_quantised(strategy, fmt, group, P):
    """int8 / int4 banks (K = 45: an odd int4 width, groups of 16 with a short last one): the segmented kernels
    dequantise in registers, the merge-once groups' layer is merged by the torch walk; against the float64
    reference of the dequantised bank."""
    x, index, w, b, tw, tb, cw, cb = _grouped_case(torch.float32, torch.float32, P, True)
    q = quant.quantize(tw, fmt, group or quant.DEFAULT_GROUP)
    keys = (block_key(1, 4), block_key(1, 5))
    g = torch.randn(*x.shape[:-1], w.shape[0], device=x.device, dtype=torch.float64)
    refs = _grouped_reference((x, index, w, b, q.dequantize(torch.float64), tb, cw, cb), keys, g)
    got = _grouped_run("cuda", (x, index, w, b, q, tb, cw, cb), keys, g)
    for name, out, ref in zip(("output", "grad x", "grad coef_w", "grad coef_b"), got, refs):
        assert_rel(out, ref, TOL[torch.float32][0 if name == "output" else 1], name)
    assert got[2][1].abs().max() == 0, "a group without samples got a coefficient gradient"


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["fused"], indirect=True)
def test_linear_grouped_many_groups(strategy):
    """Per-sample groups in a random order, some groups unused: the segments of 40 groups of 3 rows."""
    index = torch.randint(0, 50, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    case = _grouped_case(torch.float32, torch.float32, 2, True, index=index, G=50, rows=3, K=33, N=65)
    g = torch.randn(40, 3, 65, device="cuda").double()
    refs = _grouped_reference(case, (5, 6), g)
    for name, out, ref in zip(("output", "grad x", "grad coef_w", "grad coef_b"), _grouped_run("cuda", case, (5, 6), g),
                              refs):
        assert_rel(out, ref, TOL[torch.float32][0 if name == "output" else 1], name)


@pytest.mark.gpu
@pytest.mark.parametrize("act", ACT_DTYPES)
def test_linear_grouped_coef_grad_is_deterministic(act):
    x, index, w, b, tw, tb, cw, cb = _grouped_case(act, torch.bfloat16, 3, True, rows=97)
    x2, rows = x.detach().reshape(-1, x.shape[-1]), index.repeat_interleave(97)
    g = torch.randn(x2.shape[0], w.shape[0], device="cuda").to(act)
    runs = [torch.ops.atlas_fast.atlas_linear_grouped_cuda_backward(g, x2, rows, w, tw, tb, cw.detach(), 1, 2, True,
                                                                    None) for _ in range(3)]
    for run in runs[1:]:
        for a, b_ in zip(runs[0], run):
            assert torch.equal(a, b_)


@pytest.mark.gpu
def test_linear_grouped_empty_batch():
    x, index, w, b, tw, tb, cw, cb = _grouped_case(torch.float32, torch.float32, 1, True, index=[])
    y = atlas_linear_grouped(x, index, w, b, tw, tb, cw, cb, backend="cuda")
    assert y.shape == (0, 37, 70)
    dcw, dcb = torch.autograd.grad(y, (cw, cb), torch.ones_like(y))
    assert torch.equal(dcw, torch.zeros_like(cw)) and torch.equal(dcb, torch.zeros_like(cb))


@pytest.mark.gpu
def test_linear_grouped_opcheck():
    x, index, w, b, tw, tb, cw, cb = _grouped_case(torch.bfloat16, torch.bfloat16, 2, True, rows=3, K=11, N=7)
    x, cw, cb = x.detach(), cw.detach(), cb.detach()
    torch.library.opcheck(torch.ops.atlas_fast.atlas_linear_grouped.default,
                          (x.requires_grad_(), index, w, b, tw, tb, cw.requires_grad_(), cb, 1, 2, "cuda"))
    x2, rows, cw = x.detach().reshape(-1, 11), index.repeat_interleave(3), cw.detach()
    skip = torch.tensor([False, False, True, False], device="cuda")
    g = torch.randn(x2.shape[0], 7, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.atlas_fast.atlas_linear_grouped_cuda_forward.default,
                          (x2, rows, w, b, tw, tb, cw, cb, 1, 2, None))
    for tau_b, need, sk in ((tb, True, None), (None, False, None), (tb, True, skip)):
        torch.library.opcheck(torch.ops.atlas_fast.atlas_linear_grouped_cuda_backward.default,
                              (g, x2, rows, w, tw, tau_b, cw, 1, 2, need, sk))


@pytest.mark.gpu
def test_linear_grouped_bad_arguments_are_named():
    x, index, w, b, tw, tb, cw, cb = _grouped_case(torch.float32, torch.float32, 1, True, rows=2)
    x2, rows, cw, cb = x.detach().reshape(-1, x.shape[-1]), index.repeat_interleave(2), cw.detach(), cb.detach()
    fwd = torch.ops.atlas_fast.atlas_linear_grouped_cuda_forward
    with pytest.raises(RuntimeError, match="row_group must be int64"):
        fwd(x2, rows.int(), w, b, tw, tb, cw, cb, 0, 0, None)
    with pytest.raises(RuntimeError, match="row_group holds group ids outside"):
        fwd(x2, rows + 4, w, b, tw, tb, cw, cb, 0, 0, None)
    with pytest.raises(RuntimeError, match=r"coef_w must be float32 \(G, T, P\)"):
        fwd(x2, rows, w, b, tw, tb, cw[0], cb, 0, 0, None)
    with pytest.raises(RuntimeError, match="coef_b must be float32 shaped like coef_w"):
        fwd(x2, rows, w, b, tw, tb, cw, cb[:2], 0, 0, None)
    with pytest.raises(RuntimeError, match="skip must be bool"):
        fwd(x2, rows, w, b, tw, tb, cw, cb, 0, 0, torch.zeros(3, dtype=torch.bool, device="cuda"))
    with pytest.raises(RuntimeError, match="grad_out must be"):
        torch.ops.atlas_fast.atlas_linear_grouped_cuda_backward(x2, x2, rows, w, tw, tb, cw, 0, 0, True, None)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["fused", "merge_once"], indirect=True)
@pytest.mark.parametrize("patchify", [True, False])
def test_conv2d_grouped_matches_reference(strategy, patchify):
    """A conv runs the grouped linear kernels on its im2col rows: every patch row in its sample's group."""
    S, C, N = 5, 3, 7
    x = torch.randn(S, C, 17, 13, device="cuda", requires_grad=True)
    index = torch.tensor([2, 0, 2, 2, 0], device="cuda")
    k, stride, padding = (4, (4, 4), (0, 0)) if patchify else (3, (2, 1), (1, 1))
    w, b = torch.randn(N, C, k, k, device="cuda") / (C * k * k) ** 0.5, torch.randn(N, device="cuda")
    tw, tb = random_bank(w.shape, 3, torch.bfloat16, 1e-2, "cuda"), random_bank((N,), 3, torch.bfloat16, 1e-2, "cuda")
    cw = (torch.rand(3, 3, 2, device="cuda") * 1.6 - 0.8).requires_grad_()
    cb = (torch.rand(3, 3, 2, device="cuda") * 1.6 - 0.8).requires_grad_()
    _poison_allocator()
    y = atlas_conv2d_grouped(x, index, w, b, tw, tb, cw, cb, 5, 6, stride, padding, backend="cuda")
    g = torch.randn_like(y)
    got = (y, *torch.autograd.grad(y, (x, cw, cb), g))
    leaves = [t.detach().double().requires_grad_() for t in (x, cw, cb)]
    ref = torch.cat([conv2d_ref(leaves[0][s:s + 1], w, b, tw, tb, leaves[1][k_], leaves[2][k_], 5, 6, stride, padding)
                     for s, k_ in enumerate(index.tolist())])
    refs = (ref, *torch.autograd.grad(ref, leaves, g.double()))
    for name, out, r in zip(("output", "grad x", "grad coef_w", "grad coef_b"), got, refs):
        assert_rel(out, r, TOL[torch.float32][0 if name == "output" else 1], name)
    assert got[2][1].abs().max() == 0
