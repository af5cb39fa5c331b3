"""atlas_linear at the linear-layer shapes of CLIP ViTs: forward + backward (input and coefficient gradients).

Providers, all on the same x, θ0, bank and non-zero coefficients:
    frozen     plain F.linear on θ0 with frozen weights (input gradient only): the floor any method pays
    naive      W0 + Σ_t c_t τ_t merged in Python one task vector at a time, then F.linear; autograd through it
    <backend>  atlas_fast.atlas_linear(..., backend=<backend>)

    pytest benchmarks/bench_atlas_linear.py            CPU: the tokens of one image, fp32, torch backend
    pytest benchmarks/bench_atlas_linear.py -m gpu     GPU: the tokens of 128 images, bf16 x and bank
    python benchmarks/bench_atlas_linear.py            GPU: the ViT-B/32 MLP layer, T=21, against its FLOP
                                                       and byte floors from ceilings measured on the machine;
                                                       then each fused backend with the strategy forced to
                                                       fused, to merge-once, and left to the cost model, at
                                                       M = 6400, 128, 8, 1 rows, with the model's prediction
    python benchmarks/bench_atlas_linear.py --dry-run  the same at tiny sizes on the CPU (Triton interpreted)
"""
import argparse
import importlib
import json
import statistics
import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from atlas_fast import atlas_linear
from atlas_fast.backends import plan
from atlas_fast.bench.step import unavailable_reason

# (in_features, out_features, tokens per image) of the layers that dominate each model.
SHAPES = {"B32-mlp": (768, 3072, 50), "B32-in_proj": (768, 2304, 50), "B16-mlp": (768, 3072, 197),
          "L14-mlp": (1024, 4096, 257)}
TASKS = (1, 8, 21)
CPU_IMAGES = 1
GPU_IMAGES = 128


def make_inputs(tokens, k, n, T, device, x_dtype, bank_dtype, seed=0):
    """x, θ0 (fp32, as model parameters under autocast), bank (T, n, k), non-zero coefficients, dy."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) / k ** 0.5
    bias = torch.randn(n, generator=gen) * 1e-2
    std = weight.std().item()
    tau_w = torch.randn(T, n, k, generator=gen) * 1e-2 * std
    tau_b = torch.randn(T, n, generator=gen) * 1e-4
    coef = torch.rand(T, 1, generator=gen) * 1.6 - 0.8
    x = torch.randn(tokens, k, generator=gen)
    dy = torch.randn(tokens, n, generator=gen)
    return {"x": x.to(device, x_dtype).requires_grad_(), "weight": weight.to(device), "bias": bias.to(device),
            "tau_w": tau_w.to(device, bank_dtype), "tau_b": tau_b.to(device, bank_dtype),
            "coef_w": coef.to(device).requires_grad_(), "coef_b": coef.clone().to(device).requires_grad_(),
            "dy": dy.to(device, x_dtype)}


def _naive(a):
    w, b = a["weight"], a["bias"]
    for t in range(a["tau_w"].shape[0]):
        w = w + a["coef_w"][t, 0] * a["tau_w"][t]
        b = b + a["coef_b"][t, 0] * a["tau_b"][t]
    return F.linear(a["x"], w.to(a["x"].dtype), b.to(a["x"].dtype))


def forward_fn(provider, a):
    if provider == "frozen":
        return lambda: F.linear(a["x"], a["weight"].to(a["x"].dtype), a["bias"].to(a["x"].dtype))
    if provider == "naive":
        return lambda: _naive(a)
    return lambda: atlas_linear(a["x"], a["weight"], a["bias"], a["tau_w"], a["tau_b"], a["coef_w"], a["coef_b"],
                                backend=provider)


def step_fn(provider, a):
    """One forward + backward, synchronised on a GPU so a host timer sees the finished work."""
    forward = forward_fn(provider, a)
    cuda = a["x"].is_cuda

    def step():
        for t in (a["x"], a["coef_w"], a["coef_b"]):
            t.grad = None
        forward().backward(a["dy"])
        if cuda:
            torch.cuda.synchronize()
    return step


def _providers(device):
    backends = ("torch",) if device == "cpu" else ("torch", "triton", "cuda")
    return ("frozen", "naive") + backends


def _run(benchmark, provider, shape, T, device, images, x_dtype, bank_dtype):
    if provider not in ("frozen", "naive"):
        reason = unavailable_reason(provider, torch.device(device))
        if reason is not None:
            pytest.skip(reason)
    k, n, per_image = SHAPES[shape]
    tokens = images * per_image
    a = make_inputs(tokens, k, n, T, device, x_dtype, bank_dtype)
    benchmark.extra_info.update(tokens=tokens, in_features=k, out_features=n, tasks=T,
                                bank_mb=a["tau_w"].numel() * a["tau_w"].element_size() / 2**20)
    benchmark(step_fn(provider, a))


@pytest.mark.parametrize("T", TASKS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", _providers("cpu"))
def test_atlas_linear_cpu(benchmark, provider, shape, T):
    benchmark.group = f"cpu {shape} T={T}"
    _run(benchmark, provider, shape, T, "cpu", CPU_IMAGES, torch.float32, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("T", TASKS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", _providers("cuda"))
def test_atlas_linear_gpu(benchmark, provider, shape, T):
    benchmark.group = f"gpu {shape} T={T}"
    _run(benchmark, provider, shape, T, "cuda", GPU_IMAGES, torch.bfloat16, torch.bfloat16)


# ---------------------------------------------------------------- roofline on a GPU

@dataclass(frozen=True)
class Sizes:
    """The sizes of the roofline and strategy runs: the ViT-B/32 MLP layer on a GPU; tiny ones for the dry run,
    which checks on a CPU (Triton under its interpreter) that every path of this script runs and writes its files."""
    M: int = GPU_IMAGES * 50
    K: int = 768
    N: int = 3072
    T: int = 21
    rows: tuple = (6400, 128, 8, 1)
    matmul_n: int = 8192
    copy_bytes: int = 2 ** 30
    warmup: int = 5
    reps: int = 30


DRY_RUN = Sizes(M=40, K=48, N=80, T=3, rows=(64, 8, 1), matmul_n=256, copy_bytes=2 ** 22, warmup=1, reps=2)


def device_times(fn, device, warmup, reps):
    """Seconds per call: one CUDA-event pair around each call on a GPU, a host clock around each call elsewhere
    (where every op has finished when it returns)."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return times
    torch.cuda.synchronize(device)
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) / 1e3 for s, e in pairs]


def measured_ceilings(device, sizes):
    """bf16 matmul FLOP/s and device copy bytes/s, measured here rather than taken from a data sheet."""
    n = sizes.matmul_n
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    flops = 2 * n ** 3 / statistics.median(device_times(lambda: a @ b, device, sizes.warmup, sizes.reps))
    src = torch.empty(sizes.copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = statistics.median(device_times(lambda: dst.copy_(src), device, sizes.warmup, sizes.reps))
    return flops, 2 * src.numel() / copy_s


def fused_floors(M, K, N, T, x_bytes, w_bytes, tau_bytes):
    """FLOPs and bytes the fused forward + backward cannot avoid.
    FLOPs: y, dx and the dyᵀx tile reduced against τ (3 × 2MNK) plus merging twice and reducing (3 × 2TNK).
    Bytes: τ and θ0 read in forward and backward; x read twice; y, dy, dx once each."""
    flops = 6 * M * N * K + 6 * T * N * K
    nbytes = 2 * (T * N * K * tau_bytes + N * K * w_bytes) + 3 * M * K * x_bytes + 2 * M * N * x_bytes
    return flops, nbytes


def roofline(ceilings, device, sizes):
    flops_ceiling, bytes_ceiling = ceilings
    M, K, N, T = sizes.M, sizes.K, sizes.N, sizes.T
    flops, nbytes = fused_floors(M, K, N, T, 2, 4, 2)
    floor_s = max(flops / flops_ceiling, nbytes / bytes_ceiling)
    print(f"ceilings: bf16 matmul {flops_ceiling / 1e12:.2f} TFLOP/s, device copy {bytes_ceiling / 1e9:.0f} GB/s")
    print(f"atlas_linear M={M} K={K} N={N} T={T}, bf16 x and bank, fp32 θ0: {flops / 1e9:.3f} GFLOP, "
          f"{nbytes / 1e6:.1f} MB; FLOP floor {flops / flops_ceiling * 1e3:.3f} ms, byte floor "
          f"{nbytes / bytes_ceiling * 1e3:.3f} ms")
    rows = []
    print(f"{'provider':<8} {'fwd+bwd ms':>11} {'spread':>7} {'× floor':>8} {'TFLOP/s':>8}")
    for provider in _providers("cuda"):
        reason = None if provider in ("frozen", "naive") else unavailable_reason(provider, device)
        if reason is not None:
            print(f"{provider:<8} unavailable: {reason}")
            rows.append({"provider": provider, "unavailable": reason})
            continue
        a = make_inputs(M, K, N, T, device, torch.bfloat16, torch.bfloat16)
        times = device_times(step_fn(provider, a), device, sizes.warmup, sizes.reps)
        med = statistics.median(times)
        spread = (max(times) - min(times)) / 2
        print(f"{provider:<8} {med * 1e3:11.3f} {spread * 1e3:7.3f} {med / floor_s:8.2f} {flops / med / 1e12:8.3f}")
        rows.append({"provider": provider, "median_s": med, "times_s": times, "vs_floor": med / floor_s})
        del a
        _empty_cache(device)
    return {"device": str(device), "M": M, "K": K, "N": N, "T": T, "flops": flops, "bytes": nbytes,
            "flops_per_s_ceiling": flops_ceiling, "bytes_per_s_ceiling": bytes_ceiling, "floor_s": floor_s,
            "providers": rows}


def _empty_cache(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def predicted_step(backend, M, K, N, T, ceilings, strategy, device):
    """What the backend runs (its plan on the device's table entry) and the cost model's forward + dx + dc
    seconds for it, with the measured matmul and copy rates in place of the data sheet's."""
    table = plan.device_spec(device)
    measured = plan.device_spec(device, tensor_core_flops=ceilings[0], dram_bandwidth=ceilings[1])
    block_m = importlib.import_module(f"atlas_fast.backends.{backend}_backend").BLOCK_M
    shape = (M, N, K, T, 1, torch.bfloat16, torch.bfloat16, torch.float32)
    runs = plan.plan(*shape, table, block_m=block_m, strategy=strategy, budget=0)
    model = plan.plan(*shape, measured, block_m=block_m, strategy=strategy, budget=0)
    return runs, model.forward_costs[runs.forward].seconds + model.dx_costs[runs.dx].seconds + model.dc.seconds


def strategies(ceilings, device, sizes):
    """Forward + backward of each fused backend under each strategy, against the op's floor
    max(FLOP time, byte time) and against the cost model's prediction."""
    flops_ceiling, bytes_ceiling = ceilings
    K, N, T = sizes.K, sizes.N, sizes.T
    print(f"\nstrategies: K={K} N={N} T={T}, bf16 x and bank, fp32 θ0; 'plan' lets the cost model choose")
    print(f"{'backend':<7} {'M':>5} {'strategy':<10} {'chose':<10} {'fwd+bwd ms':>11} {'spread':>7} {'× floor':>8} "
          f"{'model ms':>9}")
    out = []
    for backend in ("triton", "cuda"):
        reason = unavailable_reason(backend, device)
        if reason is not None:
            print(f"{backend:<7} unavailable: {reason}")
            out.append({"backend": backend, "unavailable": reason})
            continue
        for M in sizes.rows:
            flops, nbytes = fused_floors(M, K, N, T, 2, 4, 2)
            floor_s = max(flops / flops_ceiling, nbytes / bytes_ceiling)
            a = make_inputs(M, K, N, T, device, torch.bfloat16, torch.bfloat16)
            for strategy in ("fused", "merge_once", None):
                previous = plan.set_strategy(strategy)
                try:
                    times = device_times(step_fn(backend, a), device, sizes.warmup, sizes.reps)
                finally:
                    plan.set_strategy(previous)
                chosen, model_s = predicted_step(backend, M, K, N, T, ceilings, strategy, device)
                med = statistics.median(times)
                name = strategy or "plan"
                print(f"{backend:<7} {M:>5} {name:<10} {chosen.forward + '/' + chosen.dx:<10} {med * 1e3:11.3f} "
                      f"{(max(times) - min(times)) / 2 * 1e3:7.3f} {med / floor_s:8.2f} {model_s * 1e3:9.3f}",
                      flush=True)
                out.append({"backend": backend, "M": M, "strategy": name, "forward": chosen.forward, "dx": chosen.dx,
                            "median_s": med, "times_s": times, "floor_s": floor_s, "vs_floor": med / floor_s,
                            "model_s": model_s})
            del a
            _empty_cache(device)
    return {"device": str(device), "K": K, "N": N, "T": T, "flops_per_s_ceiling": flops_ceiling,
            "bytes_per_s_ceiling": bytes_ceiling, "rows": out}


def _write(path, result):
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="atlas_linear against its FLOP and byte floors on a GPU")
    parser.add_argument("--json", help="also write the roofline numbers to this file")
    parser.add_argument("--strategies-json", help="also write the fused / merge-once timings to this file")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes on the CPU (Triton under TRITON_INTERPRET=1): checks that every path runs "
                             "and writes its files; its numbers mean nothing")
    args = parser.parse_args()
    if args.dry_run:
        device, sizes = torch.device("cpu"), DRY_RUN
    elif torch.cuda.is_available():
        device, sizes = torch.device("cuda"), Sizes()
    else:
        raise SystemExit("the roofline needs a CUDA device (or --dry-run)")
    ceilings = measured_ceilings(device, sizes)
    _write(args.json, {"dry_run": args.dry_run, **roofline(ceilings, device, sizes)})
    _write(args.strategies_json, {"dry_run": args.dry_run, **strategies(ceilings, device, sizes)})
