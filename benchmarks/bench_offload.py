"""A training step (forward + backward into the coefficients) with the bank resident on the device against the same
step with AtlasModel.offload_bank(): the fused modules' task vectors in page-locked host memory, copied one module
ahead on a side stream. Reports each one's median step time and peak device memory, everything allocated
included (CUDA; on a CPU the copies are host copies and only the time means anything), and the time ratio. It
measures, it asserts nothing.

    python3 benchmarks/bench_offload.py --device cuda --json offload.json
"""
import argparse
import json
import platform
import statistics
import time

import torch

import atlas_fast
from atlas_fast.bench.common import load_visual


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, images, steps, warmup, device):
    """(step times in s, peak device memory allocated in MB during the steps, or None off CUDA)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        model.coefficients.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(images).float().square().mean()
        loss.backward()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    return times, peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture name or model config .json")
    p.add_argument("--tasks", type=int, default=21)
    p.add_argument("--bank-dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    vit = load_visual(args.model, seed=0)[0].to(device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.bank_dtype]
    bank = atlas_fast.synthetic_task_vectors(vit, args.tasks, dtype=dtype, seed=0).to(device)
    bank_mb = sum(v.numel() * v.element_size() for v in bank.vectors.values()) / 2 ** 20
    model = atlas_fast.compose(vit, bank)
    del bank
    with torch.no_grad():
        model.coefficients.uniform_(-0.3, 0.3)
    size = vit.image_size[0] if isinstance(vit.image_size, tuple) else vit.image_size
    images = torch.randn(args.batch, 3, size, size, device=device)
    rows = {"resident": measure(model, images, args.steps, args.warmup, device)}
    off = model.offload_bank()
    rows["offloaded"] = measure(model, images, args.steps, args.warmup, device)
    result = {"settings": vars(args), "bank_mb": bank_mb, "offloaded_host_mb": off.host_bytes / 2 ** 20,
              "torch": torch.__version__, "python": platform.python_version(),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "backend": model.backend, "results": {k: {"step_s": t, "peak_mb": m} for k, (t, m) in rows.items()}}
    res = statistics.median(rows["resident"][0])
    print(f"{args.model}, T={args.tasks} {args.bank_dtype} bank ({bank_mb:.0f} MB), batch {args.batch}, {device}")
    for name, (times, peak) in rows.items():
        mem = f"{peak:8.0f} MB" if peak is not None else "       —"
        print(f"{name:10} step {statistics.median(times) * 1e3:9.1f} ms ({statistics.median(times) / res:.2f}x)  "
              f"peak {mem}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
