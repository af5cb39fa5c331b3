"""The cost model of backends/plan.py: bytes and FLOPs of a small case computed by hand, and the choice
between fused and merge-once at inference and training sizes on H200 rates."""
import pytest
import torch

from atlas_fast.backends import plan as cost
from atlas_fast.backends.plan import Cost, DeviceSpec

# Round rates, so the expected seconds below are exact sums of bytes / rate.
TOY = DeviceSpec("toy", dram_bandwidth=1e9, l2_bytes=1 << 20, l2_bandwidth=4e9, cuda_core_flops=1e9,
                 tensor_core_flops=1e10, tf32_flops=5e9, launch_seconds=1e-6)
H200 = cost.DEVICES["H200"]
BF16, F32 = torch.bfloat16, torch.float32


@pytest.fixture(autouse=True)
def _no_overrides(monkeypatch):
    monkeypatch.delenv("ATLAS_FAST_STRATEGY", raising=False)
    monkeypatch.delenv("ATLAS_FAST_KEEP_BYTES", raising=False)
    previous = cost.set_strategy(None), cost.set_keep_budget(None)
    yield
    cost.set_strategy(previous[0])
    cost.set_keep_budget(previous[1])


def _small(**kw):
    """M=100, N=64, K=32, T=3, P=3; bf16 activations and bank, fp32 θ0; BLOCK_M=64, so two M tiles."""
    return cost.plan(100, 64, 32, 3, 3, BF16, BF16, F32, TOY, block_m=64, **kw)


def test_small_case_by_hand():
    # N·K = 2048. θ0 8192 B, bank 3·2048·2 = 12288 B, x 100·32·2 = 6400 B, y 100·64·2 = 12800 B, W(c) 4096 B.
    p = _small()
    # Fused: the weight is read once from DRAM and by both M tiles from L2; 2·100·64·32 tensor-core FLOPs,
    # 2 tiles · 3 · 2048 merge FMAs = 24576 CUDA-core FLOPs; compute 40.96 + 24.576 µs, plus one launch.
    assert p.forward_costs["fused"] == Cost(dram_bytes=39680, l2_bytes=40960, cuda_core_flops=24576,
                                            tensor_core_flops=409600, launches=1, seconds=pytest.approx(66.536e-6))
    # Merge once: merge kernel 8192 + 12288 + 4096 = 24576 B and 3·2048 FMAs (max(24.576, 12.288) µs + 1);
    # GEMM 6400 + 4096 + 12800 = 23296 B (max(23.296, 40.96) µs + 1). The buffer is 4096 B.
    assert p.forward_costs["merge_once"] == Cost(dram_bytes=47872, l2_bytes=0, cuda_core_flops=12288,
                                                 tensor_core_flops=409600, launches=2,
                                                 seconds=pytest.approx(67.536e-6), transient_bytes=4096)
    # dc: dy 12800 + x 6400 + bank 12288 B; G on tensor cores; 3 partitions · 3 · 2048 FMAs.
    assert p.dc == Cost(dram_bytes=31488, l2_bytes=0, cuda_core_flops=36864, tensor_core_flops=409600,
                        launches=1, seconds=pytest.approx(78.824e-6))
    assert (p.forward, p.dx, p.forced) == ("fused", "fused", False)
    assert p.dx_costs["fused"] == p.forward_costs["fused"] and p.dx_costs["merge_once"] == p.forward_costs["merge_once"]
    # Keeping the forward's buffer leaves the GEMM alone.
    assert p.dx_costs["keep"] == Cost(23296, 0, 0, 409600, 1, pytest.approx(41.96e-6), transient_bytes=4096)


def test_bank_column_larger_than_half_of_l2_is_refetched_from_dram():
    # A column of N tiles holds (4 + 3·2)·64·32 = 20480 B of θ0 and τ; with 32 KiB of L2 the second M tile
    # fetches the 20480 B of the weight from DRAM again.
    small_l2 = cost.device_spec("H200", l2_bytes=32 << 10)
    fused = cost.plan(100, 64, 32, 3, 1, BF16, BF16, F32, small_l2, block_m=64).forward_costs["fused"]
    assert (fused.dram_bytes, fused.l2_bytes) == (39680 + 20480, 40960)


def test_exact_fp32_gemm_runs_on_cuda_cores():
    # fp32 activations without tf32: the 2·M·N·K FLOPs move to CUDA cores; with tf32 they stay on tensor cores.
    exact = cost.plan(100, 64, 32, 3, 1, F32, BF16, F32, TOY, block_m=64)
    assert exact.forward_costs["fused"].tensor_core_flops == 0
    assert exact.forward_costs["fused"].cuda_core_flops == 409600 + 24576
    assert exact.forward_costs["merge_once"].cuda_core_flops == 409600 + 12288
    # Exact: x 12800 + y 25600 + weight 20480 = 58880 B; (409600 + 24576) FLOPs at 1e9/s = 434.176 µs.
    assert exact.forward_costs["fused"].seconds == pytest.approx(435.176e-6)
    tf32 = cost.plan(100, 64, 32, 3, 1, F32, BF16, F32, TOY, block_m=64, tf32=True)
    assert tf32.forward_costs["fused"].tensor_core_flops == 409600
    # tf32 at 5e9/s: 81.92 µs, plus the 24.576 µs merge on CUDA cores, plus the launch.
    assert tf32.forward_costs["fused"].seconds == pytest.approx(107.496e-6)


@pytest.mark.parametrize("theta", [F32, BF16])
@pytest.mark.parametrize("M", [1, 8, 37, 64])
def test_small_batches_fuse_on_h200(M, theta):
    p = cost.plan(M, 3072, 768, 21, 1, BF16, BF16, theta, H200)
    assert (p.forward, p.dx) == ("fused", "fused")


@pytest.mark.parametrize("theta", [F32, BF16])
def test_vit_b32_training_batch_merges_once_on_h200(theta):
    # ViT-B/32 MLP fc1 at batch 128: 128 images · 50 tokens = 6400 rows.
    p = cost.plan(6400, 3072, 768, 21, 1, BF16, BF16, theta, H200)
    assert (p.forward, p.dx) == ("merge_once", "merge_once")
    assert p.forward_costs["fused"].seconds > 5 * p.forward_costs["merge_once"].seconds


def test_plan_is_deterministic_and_device_lookup_is_by_name():
    assert cost.plan(6400, 3072, 768, 21, 1, BF16, BF16, F32, H200) == cost.plan(6400, 3072, 768, 21, 1, BF16, BF16,
                                                                                F32, H200)
    assert cost.device_spec("cpu") is cost.DEFAULT_DEVICE
    assert cost.device_spec("H200", dram_bandwidth=4e12).dram_bandwidth == 4e12


def test_set_strategy_and_env_force_the_choice(monkeypatch):
    assert cost.set_strategy("merge_once") is None
    p = _small()
    assert (p.forward, p.dx, p.forced) == ("merge_once", "merge_once", True)
    cost.set_strategy(None)
    monkeypatch.setenv("ATLAS_FAST_STRATEGY", "merge_once")
    assert _small().forward == "merge_once"
    cost.set_strategy("fused")  # the function wins over the environment
    assert _small().forward == "fused"
    with pytest.raises(ValueError, match="strategy="):
        cost.set_strategy("fastest")
    cost.set_strategy(None)
    monkeypatch.setenv("ATLAS_FAST_STRATEGY", "fastest")
    with pytest.raises(ValueError, match="ATLAS_FAST_STRATEGY"):
        _small()


def test_dx_keeps_the_buffer_only_within_the_budget():
    cost.set_strategy("merge_once")
    assert _small().dx == "merge_once"          # default budget 0
    assert _small(budget=4095).dx == "merge_once"
    assert _small(budget=4096).dx == "keep"
    cost.set_keep_budget(1 << 20)
    assert _small().dx == "keep"
    cost.set_strategy("fused")
    assert _small().dx == "fused"               # nothing to keep after a fused forward


def test_kept_weights_follow_versions_and_budget():
    cost.set_keep_budget(3 * 4096)
    kept = cost.KeptWeights()
    w, tau, coef = torch.randn(64, 32), torch.randn(3, 64, 32), torch.randn(3, 1)
    key = kept.key(w, tau, coef, 7, BF16)
    merged = torch.randn(64, 32, dtype=BF16)
    kept.put(key, merged)
    coef.add_(1.0)  # an optimiser step: the forward's entry no longer matches
    assert kept.take(kept.key(w, tau, coef, 7, BF16)) is None
    for block_key in (7, 8, 9):
        kept.put(kept.key(w, tau, coef, block_key, BF16), torch.randn(64, 32, dtype=BF16))
    assert kept.nbytes() == 3 * 4096           # the stale entry went first
    assert kept.take(key) is None
    assert kept.take(kept.key(w, tau, coef, 7, BF16)) is not None
    kept.put(key, torch.randn(128, 64, dtype=BF16))  # 16 KiB: over the budget, not kept
    assert kept.take(key) is None


def test_kept_weights_match_only_the_same_tensors():
    """Another tensor at the same address, shape and version (a view here; a new tensor where a freed one
    was, in a real run) must not take the entry."""
    cost.set_keep_budget(1 << 20)
    kept = cost.KeptWeights()
    w, tau, coef = torch.randn(64, 32), torch.randn(3, 64, 32), torch.randn(3, 1)
    kept.put(kept.key(w, tau, coef, 7, BF16), torch.randn(64, 32, dtype=BF16))
    assert kept.take(kept.key(w.view(64, 32), tau, coef, 7, BF16)) is None
    assert kept.take(kept.key(w, tau, coef, 7, BF16)) is not None
