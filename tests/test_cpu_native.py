"""The compiled CPU walk (csrc/cpu_walk.c) against float64 sums computed here: every bank dtype (int8 and int4
where it has AVX-512), partitions from one to past the AVX-512 path's 16, odd lengths across blocks and threads,
the portable path built without AVX-512 as well; and its absence falls back cleanly."""
import os
import subprocess
import sys

import pytest
import torch

from atlas_fast.backends import cpu_native
from atlas_fast.bank import quant
from atlas_fast.ops.hashing import partition_index
from helpers import assert_rel

needs_native = pytest.mark.skipif(not cpu_native.available(), reason=f"{cpu_native.unavailable_reason()}")


def _reference(tau, part, K, coef, theta0, g):
    t64, c64 = tau.double(), coef.double()
    cmap = c64[:, part.long()] if K > 1 else c64.expand(-1, tau.shape[1])
    merged = theta0.double() + (cmap * t64).sum(0)
    onehot = torch.nn.functional.one_hot(part.long(), K).double() if K > 1 else torch.ones(tau.shape[1], 1).double()
    return merged, t64 @ (g.double()[:, None] * onehot)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("n,threads", [(5, 1), (4099, 2), (3 * 1024 + 1, 3)])
def test_walk_against_float64(dtype, K, n, threads):
    _check_walk(dtype, K, n, threads)


@pytest.fixture(scope="module")
def portable_walk(tmp_path_factory):
    """The walk built as on an x86 CPU without AVX-512 (the portable C path for every K), in a folder of its own."""
    handle = cpu_native._build([*cpu_native._FLAGS, "-mno-avx512f"], tmp_path_factory.mktemp("portable"))
    if isinstance(handle, str):
        pytest.skip(f"no portable build here: {handle}")
    return handle


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [1, 3, 16])
@pytest.mark.parametrize("n,threads", [(5, 1), (4099, 2)])
def test_portable_walk_against_float64(portable_walk, monkeypatch, dtype, K, n, threads):
    """K <= 16 takes the AVX-512 path where the CPU has it: the portable one, which other CPUs take, is built
    without it and checked the same way."""
    assert portable_walk.atlas_walk_takes(3, 1, 0) == 0, "an int8 bank is taken only by the AVX-512 walk"
    monkeypatch.setitem(cpu_native._state, "fn", portable_walk.atlas_walk)
    monkeypatch.setitem(cpu_native._state, "takes", portable_walk.atlas_walk_takes)
    assert not cpu_native.takes(quant.quantize(torch.ones(1, 1, 16), "int8"), torch.float32, K)
    _check_walk(dtype, K, n, threads)


def _check_walk(dtype, K, n, threads):
    """Merge and reduce, merge alone, reduce alone and merge from base, against the float64 sums."""
    torch.manual_seed(K + n)
    T = 5
    tau = (torch.randn(T, n) * 1e-2).to(dtype)
    part = partition_index(n, 7, K).to(torch.uint8)
    coef, theta0, g = torch.randn(T, K), torch.randn(n) * 1e-2, torch.randn(n)   # θ0 of the sums' scale
    merged_ref, dc_ref = _reference(tau, part, K, coef, theta0, g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        merged, dc = theta0.clone(), torch.zeros(T, K)
        cpu_native.walk(tau, part if K > 1 else None, K, coef, merged, g, dc)
        merge_only, dc_only = theta0.clone(), torch.zeros(T, K)
        cpu_native.walk(tau, part if K > 1 else None, K, coef=coef, merged=merge_only)
        cpu_native.walk(tau, part if K > 1 else None, K, g=g, dc=dc_only)
        # merged = θ0 + Σ c τ read from base: whatever merged held (NaN here) is not read
        from_base, theta0_before = torch.full_like(theta0, float("nan")), theta0.clone()
        cpu_native.walk(tau, part if K > 1 else None, K, coef=coef, merged=from_base, base=theta0)
    finally:
        torch.set_num_threads(before)
    assert_rel(merged, merged_ref, 1e-6, "merged")
    assert_rel(dc, dc_ref, 1e-5, "dc")
    assert torch.equal(merge_only, merged)
    assert_rel(dc_only, dc_ref, 1e-5, "dc alone")
    assert torch.equal(from_base, merged) and torch.equal(theta0, theta0_before)




@needs_native
@pytest.mark.parametrize("fmt,group,cols", [("int8", None, 70), ("int4", 16, 97), ("int4", 48, 1100)])
@pytest.mark.parametrize("K", [1, 5])
def test_quantised_walk_against_float64(fmt, group, cols, K):
    """int8 and int4 rows, odd lengths and rows longer than a block, against the dequantised bank in float64."""
    if not cpu_native.takes(quant.quantize(torch.ones(1, 1, 16), fmt, group or 16), torch.float32, K):
        pytest.skip("this CPU's compiled walk does not dequantise (no AVX-512)")
    torch.manual_seed(cols + K)
    T, rows = 3, 9
    block = quant.quantize(torch.randn(T, rows, cols) * 1e-2, fmt, group or 128)
    n = rows * cols
    part = partition_index(n, 5, K).to(torch.uint8)
    coef, theta0, g = torch.randn(T, K), torch.randn(n) * 1e-2, torch.randn(n)
    merged_ref, dc_ref = _reference(block.dequantize(torch.float64).reshape(T, n), part, K, coef, theta0, g)
    merged, dc = theta0.clone(), torch.zeros(T, K)
    cpu_native.walk(block, part if K > 1 else None, K, coef, merged, g, dc)
    from_base = torch.full_like(theta0, float("nan"))
    cpu_native.walk(block, part if K > 1 else None, K, coef=coef, merged=from_base, base=theta0)
    assert_rel(merged, merged_ref, 1e-6, "merged")
    assert_rel(dc, dc_ref, 1e-5, "dc")
    assert torch.equal(from_base, merged)


@needs_native
def test_walk_reads_strided_rows_and_names_bad_arguments():
    """Rows of a wider tensor (a view with row stride > n) are read in place."""
    T, n, K = 3, 1500, 2
    wide = torch.randn(T, n + 37)
    tau = wide[:, :n]
    part = partition_index(n, 1, K).to(torch.uint8)
    coef, g = torch.randn(T, K), torch.randn(n)
    dc = torch.zeros(T, K)
    cpu_native.walk(tau, part, K, g=g, dc=dc)
    assert_rel(dc, _reference(tau, part, K, coef, torch.zeros(n), g)[1], 1e-5, "dc")
    with pytest.raises(ValueError, match=r"dc must be a contiguous float32 \(3, 2\)"):
        cpu_native.walk(tau, part, K, g=g, dc=torch.zeros(T, K, dtype=torch.float64))
    with pytest.raises(ValueError, match="partitions K=2 need a contiguous uint8 index of 1500 elements"):
        cpu_native.walk(tau, part[:10], K, g=g, dc=dc)


def test_disabled_walk_falls_back():
    code = ("from atlas_fast.backends import cpu_native; import torch;"
            "from atlas_fast.backends.torch_backend import merge_and_reduce;"
            "print(cpu_native.unavailable_reason());"
            "m, dc = merge_and_reduce(torch.ones(4, 3), torch.ones(2, 4, 3).bfloat16(), torch.ones(2, 2), 5,"
            " torch.ones(4, 3)); print(float(m.sum()), float(dc.sum()))")
    env = dict(os.environ, ATLAS_FAST_CPU_NATIVE="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.splitlines() == ["disabled by ATLAS_FAST_CPU_NATIVE=0", "36.0 24.0"]
