"""Step-time ratios that survive a shared, changing machine: finetune, the torch backend (K = 1 and optionally
K partitions) and a COPY_BYTES tensor copy, all in one process, round robin, each ratio taken within a round and
the median over rounds reported. `atlas-fast bench` times each variant in its own process, one after another, so
a load that changes between processes moves its ratios; this script trades that isolation for pairing.

    python benchmarks/interleaved_step.py --tasks 8 --bank-dtype fp32 --partitions 4 --rounds 3 > out.json

Prints one JSON object (every time, the floor per round, the load average) on stdout and a summary on stderr.
The floor of a round is its finetune step + 2 bank reads at that round's copy bandwidth, as in `atlas-fast bench`.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

from atlas_fast.bench import step as bench
from atlas_fast.bench.common import BANK_DTYPES, bank_dtype_name


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--bank-dtype", type=bank_dtype_name, choices=BANK_DTYPES, default="fp32",
                   help="float32, bfloat16, float16 (or fp32, bf16, fp16), int8 or int4")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--partitions", type=int, default=1, help="also time the torch backend with this many partitions")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    base = bench.Settings(model=a.model, tasks=a.tasks, batch=a.batch, bank_dtype=a.bank_dtype)
    k1 = bench.Runner(base, "torch")
    runs = {"finetune": bench.Runner(base, "finetune"), "torch K=1": k1}
    if a.partitions > 1:
        runs[f"torch K={a.partitions}"] = bench.Runner(bench.Settings(**{**vars(base), "partitions": a.partitions}),
                                                       "torch", k1.bank)
    src = torch.ones(bench.COPY_BYTES // 4)
    dst = torch.empty_like(src)
    bank_bytes = sum(v.numel() * v.element_size() for v in k1.bank.vectors.values())
    times = {k: [] for k in list(runs) + ["copy"]}
    for r in runs.values():  # warm-up: the partition cache, allocator and thread pools
        r.step()
    dst.copy_(src)  # and the copy's destination pages: a first copy times their page faults, not the memory
    loads = [os.getloadavg()[0]]
    for _ in range(a.rounds):
        t0 = time.perf_counter()
        dst.copy_(src)
        times["copy"].append(time.perf_counter() - t0)
        for name, r in runs.items():
            t0 = time.perf_counter()
            r.step()
            times[name].append(time.perf_counter() - t0)
        loads.append(os.getloadavg()[0])
    bandwidth = [2 * bench.COPY_BYTES / c for c in times["copy"]]
    floor = [f + 2 * bank_bytes / bw for f, bw in zip(times["finetune"], bandwidth)]
    ratios = {f"{k} / floor": statistics.median(t / f for t, f in zip(times[k], floor)) for k in runs}
    if a.partitions > 1:
        ratios[f"torch K={a.partitions} / torch K=1"] = statistics.median(
            x / y for x, y in zip(times[f"torch K={a.partitions}"], times["torch K=1"]))
    result = {"settings": vars(a), "threads": torch.get_num_threads(), "bank_gb": bank_bytes / 1e9,
              "load_avg": loads, "times_s": times, "floor_s": floor,
              "bandwidth_gb_s_median": statistics.median(bandwidth) / 1e9, "paired_median_ratios": ratios}
    json.dump(result, sys.stdout, indent=1)
    print(f"T={a.tasks} {a.bank_dtype} batch {a.batch}, {a.rounds} rounds, load {min(loads):.1f}-{max(loads):.1f}: "
          + "  ".join(f"{k} {statistics.median(v):.2f}s" for k, v in times.items() if k != "copy")
          + f"  floor {statistics.median(floor):.2f}s | " + "  ".join(f"{k} {v:.2f}" for k, v in ratios.items()),
          file=sys.stderr)


if __name__ == "__main__":
    main()
