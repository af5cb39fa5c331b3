"""Cost model of one linear block: fuse the merge into the GEMM, or merge once and call a stock GEMM.

For x (M, K), W0 (N, K), a bank τ (T, N, K) and P partitions, two strategies compute y = x W(c)ᵀ (and,
with the roles of the operands swapped, dx = dy W(c)):

    fused       one kernel rebuilds each merged (BLOCK_N × BLOCK_K) tile from θ0 and the T task-vector tiles
                inside the GEMM, once per M tile: ⌈M / BLOCK_M⌉ · T · N·K merge multiply-adds on CUDA cores,
                and the θ0 and τ tiles are re-read from L2 by every M tile. Nothing is written but y.
    merge_once  one merge kernel reads θ0 and the bank once and writes W(c) (N, K) in the activation dtype to
                a transient buffer (one layer, freed after the GEMM), then a stock GEMM at tensor-core speed.

For dx the backward may also "keep" the forward's merged buffer until the backward, when it fits a memory
budget (`set_keep_budget`, env ATLAS_FAST_KEEP_BYTES; default 0: never). The coefficient gradient is always
the fused reduction: it accumulates its tile of G = dyᵀx over all rows and reads the bank once at any M.

Each estimate is a roofline: seconds = max(DRAM bytes / DRAM bandwidth, L2 bytes / L2 bandwidth, compute)
+ one launch latency per kernel, where compute adds the tensor-core and CUDA-core terms (the merged tile
must exist before its product, and both are issued by the same warps). Only the weight is modelled; the
bias (N elements) is noise at this scale. The partition hash adds integer work that is not counted; so does
dequantising an int8/int4 bank (a multiply per value), whose bytes per value include its scales.

The choice is deterministic: the same shapes, dtypes and device give the same plan. `set_strategy` (or env
ATLAS_FAST_STRATEGY = fused | merge_once) forces one strategy for benchmarks and tests.
"""
import math
import os
import weakref
from dataclasses import dataclass, replace
from functools import lru_cache
from types import MappingProxyType

STRATEGIES = ("fused", "merge_once")

_forced = None
_keep_budget = None


@dataclass(frozen=True)
class DeviceSpec:
    """Peak rates of a device. Bandwidths in bytes/s; FLOP/s count a multiply-add as 2."""
    name: str
    dram_bandwidth: float
    l2_bytes: int
    l2_bandwidth: float
    cuda_core_flops: float     # fp32 on CUDA cores
    tensor_core_flops: float   # dense bf16/fp16 on tensor cores
    tf32_flops: float          # dense tf32 on tensor cores
    launch_seconds: float = 3e-6


# Data-sheet DRAM bandwidth and FLOP/s (dense, no sparsity) of the SXM parts; L2 bandwidths are approximate
# figures from published microbenchmarks (no data sheet gives them). Pass measured values to device_spec.
DEVICES = {
    "H200": DeviceSpec("H200", 4.8e12, 50 << 20, 7.0e12, 67e12, 989e12, 494e12),
    "H100": DeviceSpec("H100", 3.35e12, 50 << 20, 7.0e12, 67e12, 989e12, 494e12),
    "A100": DeviceSpec("A100", 2.04e12, 40 << 20, 4.5e12, 19.5e12, 312e12, 156e12),
}
# An unknown GPU: rates below any data-centre part of the last two generations.
DEFAULT_DEVICE = DeviceSpec("default", 1.0e12, 6 << 20, 2.5e12, 20e12, 150e12, 75e12)


def device_spec(device=None, **measured):
    """The spec of a torch device (matched by name in DEVICES, else DEFAULT_DEVICE), or of a DEVICES key;
    keyword arguments replace fields with measured values (e.g. dram_bandwidth=4.1e12)."""
    spec = DEVICES[device] if isinstance(device, str) and device in DEVICES else _device_spec(device)
    return replace(spec, **measured) if measured else spec


def _device_spec(device):
    import torch
    if device is None:
        return DEFAULT_DEVICE
    device = device if isinstance(device, torch.device) else torch.device(device)
    if device.type != "cuda":
        return DEFAULT_DEVICE
    return _cuda_spec(device.index if device.index is not None else torch.cuda.current_device())


@lru_cache(maxsize=None)
def _cuda_spec(index):
    import torch
    name = torch.cuda.get_device_name(index)
    for key, spec in DEVICES.items():
        if key in name:
            return spec
    return DEFAULT_DEVICE


@dataclass(frozen=True)
class Cost:
    """The work of one strategy for one block; seconds is the roofline estimate."""
    dram_bytes: int
    l2_bytes: int
    cuda_core_flops: int
    tensor_core_flops: int
    launches: int
    seconds: float
    transient_bytes: int = 0   # memory allocated beyond the op's inputs and outputs


@dataclass(frozen=True)
class Plan:
    """The choice for the forward and for dx, with the cost of every option (keyed by strategy name)."""
    forward: str                # "fused" | "merge_once"
    dx: str                     # "fused" | "merge_once" (merge again) | "keep" (the forward's buffer)
    forward_costs: MappingProxyType
    dx_costs: MappingProxyType
    dc: Cost
    forced: bool


def _dtype_bytes(dtype):
    if isinstance(dtype, (int, float)):   # a byte width; fractional for a quantised bank (int4: ~0.53)
        return dtype
    name = str(dtype).replace("torch.", "")
    return {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}[name]


def _tensor_rate(spec, act, tf32):
    """FLOP/s of the tensor cores for a GEMM of this activation width: bf16/fp16, or fp32 as tf32 when torch
    allows it; None when the GEMM runs on CUDA cores (exact fp32)."""
    if act == 2:
        return spec.tensor_core_flops
    return spec.tf32_flops if tf32 else None


def _seconds(spec, dram, l2, tensor, cuda, launches, tensor_rate):
    compute = (tensor / tensor_rate if tensor else 0.0) + cuda / spec.cuda_core_flops
    return max(dram / spec.dram_bandwidth, l2 / spec.l2_bandwidth, compute) + launches * spec.launch_seconds


def _gemm_work(M, N, K, act, spec, tf32):
    """(tensor-core FLOPs, CUDA-core FLOPs) of the 2·M·N·K GEMM for this activation width."""
    flops = 2 * M * N * K
    return (flops, 0) if _tensor_rate(spec, act, tf32) else (0, flops)


def fused_cost(M, N, K, T, act, bank, theta, spec, block_m=128, block_n=128, tf32=False):
    """One fused GEMM (forward y = x Wᵀ, or dx = dy W: the same work) that merges per M tile."""
    NK = N * K
    tiles_m = max(1, math.ceil(M / block_m))
    weight_bytes = NK * theta + T * NK * bank
    dram = M * K * act + M * N * act + weight_bytes
    l2 = tiles_m * weight_bytes
    # Programs running together share one column of N tiles: its θ0 and τ tiles stay in L2 when they take at
    # most half of it; otherwise every M tile fetches them from DRAM again.
    if (theta + T * bank) * min(block_n, N) * K > spec.l2_bytes // 2:
        dram += (tiles_m - 1) * weight_bytes
    tensor, cuda = _gemm_work(M, N, K, act, spec, tf32)
    cuda += 2 * tiles_m * T * NK
    return Cost(dram, l2, cuda, tensor, 1, _seconds(spec, dram, l2, tensor, cuda, 1, _tensor_rate(spec, act, tf32)))


def merge_cost(N, K, T, act, bank, theta, spec):
    """The merge kernel alone: read θ0 and the bank once, write W(c) in the activation dtype."""
    NK = N * K
    dram = NK * theta + T * NK * bank + NK * act
    cuda = 2 * T * NK
    return Cost(dram, 0, cuda, 0, 1, _seconds(spec, dram, 0, 0, cuda, 1, None), NK * act)


def gemm_cost(M, N, K, act, spec, tf32=False):
    """A stock GEMM on a merged weight in the activation dtype."""
    dram = M * K * act + N * K * act + M * N * act
    tensor, cuda = _gemm_work(M, N, K, act, spec, tf32)
    return Cost(dram, 0, cuda, tensor, 1, _seconds(spec, dram, 0, tensor, cuda, 1, _tensor_rate(spec, act, tf32)))


def _add(a, b):
    return Cost(a.dram_bytes + b.dram_bytes, a.l2_bytes + b.l2_bytes, a.cuda_core_flops + b.cuda_core_flops,
                a.tensor_core_flops + b.tensor_core_flops, a.launches + b.launches, a.seconds + b.seconds,
                max(a.transient_bytes, b.transient_bytes))


def merge_once_cost(M, N, K, T, act, bank, theta, spec, tf32=False):
    """Merge kernel, then a stock GEMM; the buffer lives from one to the other."""
    return _add(merge_cost(N, K, T, act, bank, theta, spec), gemm_cost(M, N, K, act, spec, tf32))


def dc_cost(M, N, K, T, P, act, bank, spec, tf32=False):
    """The fused coefficient gradient: G = dyᵀx accumulated per tile, reduced against the bank read once;
    T·N·K multiply-adds for P = 1, and one select-and-add per partition more for P > 1."""
    NK = N * K
    dram = M * N * act + M * K * act + T * NK * bank
    tensor, cuda = _gemm_work(M, N, K, act, spec, tf32)
    cuda += 2 * T * NK * P
    return Cost(dram, 0, cuda, tensor, 1, _seconds(spec, dram, 0, tensor, cuda, 1, _tensor_rate(spec, act, tf32)))


def set_strategy(strategy):
    """Force "fused" or "merge_once" for every block (None: let the cost model choose); returns the previous
    setting. Takes precedence over ATLAS_FAST_STRATEGY."""
    global _forced
    if strategy not in STRATEGIES + (None,):
        raise ValueError(f"strategy={strategy!r}: expected one of {STRATEGIES} or None")
    previous, _forced = _forced, strategy
    return previous


def forced_strategy():
    """The forced strategy (set_strategy, else ATLAS_FAST_STRATEGY), or None."""
    if _forced is not None:
        return _forced
    env = os.environ.get("ATLAS_FAST_STRATEGY", "").strip() or None
    if env is not None and env not in STRATEGIES:
        raise ValueError(f"ATLAS_FAST_STRATEGY={env!r}: expected one of {STRATEGIES}")
    return env


def set_keep_budget(nbytes):
    """Bytes of merged weights the forward may keep alive for dx (None: ATLAS_FAST_KEEP_BYTES, default 0);
    returns the previous setting."""
    global _keep_budget
    previous, _keep_budget = _keep_budget, None if nbytes is None else int(nbytes)
    return previous


def keep_budget():
    if _keep_budget is not None:
        return _keep_budget
    return int(os.environ.get("ATLAS_FAST_KEEP_BYTES", "0"))


def plan(M, N, K, T, P, act_dtype, bank_dtype, theta_dtype, spec=None, block_m=128, block_n=128, tf32=False,
         strategy=None, budget=None):
    """The plan for one linear block. Dtypes are torch dtypes (or byte widths); spec a DeviceSpec
    (DEFAULT_DEVICE when None); strategy forces one (default: forced_strategy()); budget the bytes the forward
    may keep for dx (default: keep_budget())."""
    spec = DEFAULT_DEVICE if spec is None else spec
    strategy = forced_strategy() if strategy is None else strategy
    budget = keep_budget() if budget is None else budget
    if strategy not in STRATEGIES + (None,):
        raise ValueError(f"strategy={strategy!r}: expected one of {STRATEGIES} or None")
    return _plan(M, N, K, T, P, _dtype_bytes(act_dtype), _dtype_bytes(bank_dtype), _dtype_bytes(theta_dtype),
                 spec, block_m, block_n, bool(tf32), strategy, budget)


@lru_cache(maxsize=4096)
def _plan(M, N, K, T, P, act, bank, theta, spec, block_m, block_n, tf32, strategy, budget):
    fused = fused_cost(M, N, K, T, act, bank, theta, spec, block_m, block_n, tf32)
    once = merge_once_cost(M, N, K, T, act, bank, theta, spec, tf32)
    forward_costs = {"fused": fused, "merge_once": once}
    forward = strategy or min(STRATEGIES, key=lambda s: (forward_costs[s].seconds, s != "fused"))
    dx_costs = dict(forward_costs)
    keep = gemm_cost(M, N, K, act, spec, tf32)
    dx_costs["keep"] = replace(keep, transient_bytes=N * K * act)
    options = [strategy] if strategy else list(STRATEGIES)
    if forward == "merge_once" and N * K * act <= budget:
        options.append("keep")
    dx = min(options, key=lambda s: (dx_costs[s].seconds, s != "fused"))
    dc = dc_cost(M, N, K, T, P, act, bank, spec, tf32)
    return Plan(forward, dx, MappingProxyType(forward_costs), MappingProxyType(dx_costs), dc, strategy is not None)


def for_linear(M, weight, tau_w, coef_w, act_dtype, block_m):
    """The plan of a backend's call: shapes and dtypes from its tensors, rates from their device, tf32 as
    torch allows it for matmuls."""
    import torch

    from ..bank.quant import is_quantized
    N, K = weight.shape
    T, P = coef_w.shape
    bank = tau_w.element_bytes if is_quantized(tau_w) else tau_w.dtype   # bytes per value, scales included
    return plan(M, N, K, T, P, act_dtype, bank, weight.dtype, device_spec(weight.device), block_m=block_m,
                tf32=torch.backends.cuda.matmul.allow_tf32)


class KeptWeights:
    """Merged weights a forward keeps for its backward, up to `keep_budget()` bytes in all.

    Keyed by the very tensors θ0, τ and c (held weakly) and their version counters, so an in-place update
    of any of them (an optimiser step on c) makes the entry unreachable, and so does freeing them (a new
    tensor at the same address is another tensor); `take` removes what it returns, and an entry that no
    backward takes is dropped first when a new one needs the room."""

    def __init__(self):
        self._entries = {}

    @staticmethod
    def key(weight, tau_w, coef_w, key_w, dtype):
        from ..bank.quant import is_quantized
        tensors = (weight, tau_w.data, tau_w.scale, coef_w) if is_quantized(tau_w) else (weight, tau_w, coef_w)
        return _TensorsKey(tensors, (key_w, dtype, weight.device))

    def put(self, key, merged):
        size = merged.numel() * merged.element_size()
        budget = keep_budget()
        if size > budget:
            return
        self._entries.pop(key, None)
        while self._entries and self.nbytes() + size > budget:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = merged

    def take(self, key):
        return self._entries.pop(key, None)

    def nbytes(self):
        return sum(m.numel() * m.element_size() for m in self._entries.values())

    def clear(self):
        self._entries.clear()


class _TensorsKey:
    """Equal only for the same live tensor objects, at the same versions, with the same extra values."""
    __slots__ = ("value", "refs")

    def __init__(self, tensors, extra):
        self.value = tuple((t.data_ptr(), tuple(t.shape), tuple(t.stride()), t._version) for t in tensors) + extra
        self.refs = tuple(weakref.ref(t) for t in tensors)

    def __hash__(self):
        return hash(self.value)

    def __eq__(self, other):
        return (isinstance(other, _TensorsKey) and self.value == other.value
                and all(a() is not None and a() is b() for a, b in zip(self.refs, other.refs)))
