"""The `atlas-fast` command. Each subcommand parses its options here and runs its logic from its module."""
import argparse
import sys

from . import bench


def _comma_list(text):
    return [b.strip() for b in text.split(",") if b.strip()]


def _add_bench(sub):
    p = sub.add_parser("bench", help="time and peak memory of every backend against naive merging and fine-tuning",
                       description="Checks every backend against naive merging, then measures naive merging, "
                                   "plain fine-tuning and every backend, each in a fresh process. Default: open_clip "
                                   "ViT-B-32 visual tower with random weights, T=8 synthetic task vectors, batch 8; "
                                   "fp32 on a CPU, bf16 bank and bf16 autocast on a GPU.")
    p.add_argument("--model", help="open_clip architecture name (default ViT-B-32), or a model config .json")
    p.add_argument("--tasks", type=int, help="number of task vectors T (default 8)")
    p.add_argument("--batch", type=int, help="images per step (default 8)")
    p.add_argument("--bank-dtype", choices=bench.BANK_DTYPES,
                   help="storage dtype of the task vectors (default fp32 on a CPU, bf16 on a GPU)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA, off for CPU)")
    p.add_argument("--backends", type=_comma_list,
                   help=f"comma list among {', '.join(bench.VARIANTS)} (default: naive, finetune and every backend "
                        "that runs on the device; on a CPU only torch, Triton's interpreter being far too slow)")
    p.add_argument("--granularity", choices=("block", "task"), help="one coefficient per block and task, or per task")
    p.add_argument("--partitions", type=int, help="random partitions per block, aTLAS ×K (default 1)")
    p.add_argument("--steps", type=int, help="timed steps per variant (default 3 on a CPU, 20 on a GPU)")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps per variant (default 1 on a CPU, 3 on a GPU)")
    p.add_argument("--out", help="output folder for results.json and the plot (default ./bench_out)")
    p.add_argument("--sweep", type=str, help="measure at several points: tasks=1,4,8,21 or batch=1,8,32")
    p.add_argument("--mode", choices=("step", "tta"),
                   help="step: forward + backward on a fixed batch; tta: coefficient learning (entropy loss, AdamW) "
                        "over a stream of batches")
    p.add_argument("--device", help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--seed", type=int, help="seed of the weights, task vectors, coefficients and data")
    p.set_defaults(run=_run_bench, parser=p)


def _run_bench(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    s = bench.default_settings(device)
    for name in ("model", "tasks", "batch", "bank_dtype", "amp", "backends", "granularity", "partitions", "steps",
                 "warmup", "out", "mode", "seed"):
        value = getattr(args, name)
        if value is not None:
            setattr(s, name, value)
    try:
        if args.sweep is not None:
            s.sweep = bench.parse_sweep(args.sweep)
        bench.validate(s)
    except ValueError as e:
        args.parser.error(str(e))
    return bench.run(s)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="atlas-fast", description="aTLAS task-vector composition, fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
