"""The `atlas-fast` command. Each subcommand parses its options here and runs its logic from its module."""
import argparse
import sys

from .bench import common as bench_common
from .bench import step as bench


def _comma_list(text):
    return [b.strip() for b in text.split(",") if b.strip()]


def _add_bench(sub):
    p = sub.add_parser("bench", help="time and peak memory of every backend against naive merging and fine-tuning",
                       description="Checks every backend against naive merging, then measures naive merging, "
                                   "plain fine-tuning and every backend, each in a fresh process. Default: open_clip "
                                   "ViT-B-32 visual tower with random weights, T=8 synthetic task vectors, batch 8; "
                                   "float32 on a CPU, bfloat16 bank and bf16 autocast on a GPU.")
    p.add_argument("--model", help="open_clip architecture name (default ViT-B-32), or a model config .json")
    p.add_argument("--tasks", type=int, help="number of task vectors T (default 8)")
    p.add_argument("--batch", type=int, help="images per step (default 8)")
    p.add_argument("--bank-dtype", type=bench_common.bank_dtype_name,
                   help="storage of the task vectors: float32, bfloat16, float16, int8 or int4, as `atlas-fast bank "
                        "--dtype` names them (fp32, bf16, fp16 also accepted; results record these short names); "
                        "default float32 on a CPU, bfloat16 on a GPU")
    p.add_argument("--rank", type=int, help="a low-rank bank: random rank-r factors τ = B·A per 2-D+ block "
                                            "(float32; composed without forming τ)")
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
    p.add_argument("--threads", type=int,
                   help="torch threads per worker (default: torch's own); on cores shared with other work, 1 can be "
                        "faster than more, whose parallel regions stall when a thread is descheduled")
    p.add_argument("--groups", type=int,
                   help="instead: one batch carrying G coefficient sets (AtlasModel.groups) against G separate "
                        "composed runs and G merged models, on the first backend of --backends (default auto)")
    p.add_argument("--streams", type=int,
                   help="with --mode tta: S streams of --batch images each adapting at once, one grouped step "
                        "against S separate composed runs in turn, S naive merges in turn and the per-sample merge "
                        "loop (bench/tta.py)")
    p.set_defaults(run=_run_bench, parser=p)


def _run_bench(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    s = bench.default_settings(device)
    if args.rank is not None and args.bank_dtype is None:
        args.bank_dtype = "fp32"   # the factors are float32 on every device
    for name in ("model", "tasks", "batch", "bank_dtype", "rank", "amp", "backends", "granularity", "partitions",
                 "steps", "warmup", "out", "mode", "seed", "threads"):
        value = getattr(args, name)
        if value is not None:
            setattr(s, name, value)
    try:
        if args.sweep is not None:
            s.sweep = bench.parse_sweep(args.sweep)
        bench.validate(s)
    except ValueError as e:
        args.parser.error(str(e))
    if args.groups is not None:
        return _run_bench_groups(args, s)
    if args.streams is not None:
        return _run_bench_streams(args, s)
    return bench.run(s)


def _run_bench_groups(args, s):
    from .bench import grouped
    if not 1 <= args.groups <= s.batch or s.model.endswith(".json"):
        args.parser.error(f"--groups {args.groups}: needs 1 <= G <= batch ({s.batch}) and an open_clip model name")
    backend = next((b for b in (args.backends or []) if b not in bench.BASELINES), "auto")
    g = grouped.GroupSettings(model=s.model, tasks=s.tasks, batch=s.batch, groups=args.groups, device=s.device,
                                    backend=backend, bank_dtype=s.bank_dtype, rank=s.rank, granularity=s.granularity,
                                    partitions=s.partitions, steps=s.steps, warmup=s.warmup, seed=s.seed,
                                    threads=s.threads, out=s.out)
    return grouped.run(g)


def _run_bench_streams(args, s):
    from .bench import tta
    if s.mode != "tta" or args.streams < 1:
        args.parser.error(f"--streams {args.streams}: needs --mode tta and S >= 1")
    if s.bank_dtype not in bench_common.FLOAT_BANK_DTYPES or s.rank is not None or s.granularity != "block" \
            or s.partitions != 1:
        args.parser.error("--streams: measured with a float32/bfloat16/float16 bank, --granularity block, one "
                          "partition")
    backend = next((b for b in (args.backends or []) if b not in bench.BASELINES), "auto")
    t = tta.TTASettings(model=s.model, tasks=s.tasks, batch=s.batch, streams=args.streams, device=s.device,
                              backend=backend, bank_dtype=s.bank_dtype, amp=s.amp, steps=s.steps, warmup=s.warmup,
                              seed=s.seed, threads=s.threads, out=s.out)
    return tta.run(t)


def _user_errors():
    """The error types that mean bad input (reported as one `atlas-fast CMD: error:` line, exit 2)."""
    from .adapt import BankMismatchError, DataError, ModelSpecError
    from .errors import WriteError
    return (ValueError, DataError, ModelSpecError, BankMismatchError, FileNotFoundError, PermissionError, WriteError)


def _fail(args, error):
    """Exit through argparse with one line: a data-loader worker's error arrives wrapped in its traceback. An
    OptionError of one of this command's options is shown under the flag's name (`--lr 1e+30: ...`), a WriteError
    of an output option's file under that option."""
    from .errors import OptionError, WriteError
    if isinstance(error, OptionError) and hasattr(args, error.option):
        args.parser.error(f"--{error.option.replace('_', '-')} {error.value}: {error.reason}")
    if isinstance(error, WriteError):
        args.parser.error(_write_error(args, error))
    lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    message = lines[0]
    if len(lines) > 1 and "Traceback" in str(error):
        name, _, rest = lines[-1].partition(": ")
        message = rest if rest and " " not in name else lines[-1]
    args.parser.error(message)


def _write_error(args, error):
    """The line of a WriteError, under the output option (--out, --json) that names its file or holds it."""
    import os
    target = os.path.abspath(error.filename)
    for option in ("out", "json"):
        value = getattr(args, option, None)
        if not value:
            continue
        if os.path.abspath(value) == target:
            return f"--{option} {value}: cannot write: {error.strerror}"
        if target.startswith(os.path.join(os.path.abspath(value), "")):
            return f"--{option} {value}: {error}"
    return str(error)


def _model_options(p, bank=True):
    p.add_argument("--model", help="open_clip architecture name (e.g. ViT-B-32) or a model config .json; required "
                                   "unless --pretrained is a Hugging Face CLIP folder, whose config.json gives the "
                                   "image tower (then --model, if given, must have the same shapes)")
    p.add_argument("--pretrained", help="checkpoint of θ0: what `atlas-fast bank` reads (safetensors, torch state "
                                        "dicts, pickled modules with --allow-pickle, a Hugging Face CLIP folder); "
                                        "default: the architecture's random initialisation")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pickled-module checkpoints and heads (e.g. the aTLAS release's torch.save(ImageEncoder) "
                        "and head_<Dataset>.pt), by stand-ins that import none of their code; only files you trust")
    if bank:
        p.add_argument("--bank", required=True, help="task-vector bank (.safetensors from `atlas-fast bank`)")
    p.add_argument("--device", help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--backend", default="auto", help="atlas backend: auto, torch, triton or cuda")


def _bank_mismatch_option(p, what):
    p.add_argument("--allow-bank-mismatch", action="store_true",
                   help=f"{what} even with a bank whose fingerprint (the task vectors' values, block by block) differs "
                        f"from the one the coefficients were learned with")


def _data_options(p, required=True):
    p.add_argument("--data", nargs="+", required=required,
                   help="image folder(s): <dir>/<class>/<image>, or <dir>/train and <dir>/val|test in that layout"
                        + ("" if required else " (not read by --method random)"))
    p.add_argument("--classnames", nargs="+",
                   help="class-name file(s), one name per line in sorted folder order (default: folder names)")
    p.add_argument("--templates", help="prompt-template file, one template with {} per line")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of each class held out for evaluation when a folder has no val/ or test/ (0.2)")


def _add_bank(sub):
    p = sub.add_parser("bank", help="build a task-vector bank from fine-tuned checkpoints",
                       description="τ_t = finetuned_t − pretrained for every floating entry under --prefix, "
                                   "saved as one safetensors bank.")
    p.add_argument("--pretrained", required=True, help="checkpoint of θ0: safetensors, a torch state dict, a pickled "
                                                       "module (--allow-pickle) or a Hugging Face CLIP folder")
    p.add_argument("--finetuned", nargs="+", required=True, help="fine-tuned checkpoints, one task vector each")
    p.add_argument("--out", required=True, help="output bank file (.safetensors)")
    p.add_argument("--prefix", default="visual.", help="keep entries under this prefix, stripped (default "
                                                       "'visual.': the image tower of an open_clip CLIP; '' for all)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "int8", "int4"),
                   help="storage of the bank: int8 has one scale per output row, int4 one per --group-size "
                        "input columns (1-D blocks stay float32); the quantisation error per block is printed")
    p.add_argument("--group-size", type=int, help="int4: input columns per scale (default 128)")
    low = p.add_mutually_exclusive_group()
    low.add_argument("--rank", type=int, help="a low-rank bank: each task vector of every 2-D+ block as its "
                                              "truncated SVD of this rank (float32 factors; 1-D blocks stay dense)")
    low.add_argument("--energy", type=float, help="a low-rank bank: the smallest rank keeping this fraction of "
                                                  "each task vector's squared norm (e.g. 0.9)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pickled-module checkpoints (runs code from the file: only for files you trust)")
    p.set_defaults(run=_run_bank, parser=p)


def _run_bank(args):
    from .adapt import build_bank
    from .bank import quant
    if (args.rank is not None or args.energy is not None) and args.dtype != "float32":
        args.parser.error(f"--rank/--energy make a float32 low-rank bank; --dtype {args.dtype} cannot be combined")
    try:
        tv = build_bank(args.pretrained, args.finetuned, args.out, args.prefix, args.dtype, args.allow_pickle,
                        args.group_size, args.rank, args.energy)
    except _user_errors() as e:
        _fail(args, e)
    print(f"wrote {args.out}: {tv}")
    if tv.format in quant.FORMATS + ("lowrank",):
        print(tv.quantization_report(blocks=5))
    return 0


def _add_adapt(sub):
    import os
    p = sub.add_parser("adapt", help="learn aTLAS coefficients on image folders (few-shot, task addition, "
                                     "test-time adaptation, UFM, negation)",
                       description="Learns the coefficients of a task-vector bank for an open_clip model on image "
                                   "folders and writes to --out: coefficients.safetensors (the selected epoch), "
                                   "checkpoint.pt (resumable), log.jsonl, summary.json, heads.pt, curves.png and "
                                   "coefficients.png. Under `torchrun --nproc-per-node N -m atlas_fast adapt ...` it "
                                   "trains data-parallel, --batch-size being the global batch.")
    _model_options(p)
    _data_options(p)
    p.add_argument("--objective", default="ce", choices=("ce", "entropy", "ufm", "negation"),
                   help="ce: labelled cross-entropy, several --data for task addition; entropy: entropy "
                        "minimisation on unlabelled data; ufm: unsupervised FixMatch; negation: forget the first "
                        "--data, keep the second")
    p.add_argument("--shots", type=int, help="labelled images per class for ce / negation (default: all)")
    p.add_argument("--head", default="zeroshot", choices=("zeroshot", "linear"),
                   help="zero-shot head from the text tower, or a linear probe fitted on θ0's features")
    p.add_argument("--heads", nargs="+", help="head files instead of --head: heads.pt of an adapt run, or one "
                                              "head_<Dataset>.pt of the aTLAS release per --data (--allow-pickle)")
    p.add_argument("--granularity", default="block", choices=("block", "task"))
    p.add_argument("--partitions", type=int, default=1, help="random partitions per block, aTLAS ×K (default 1)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--steps-per-epoch", type=int, help="default: one pass over the largest training set")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", type=float, default=0.0, help="initial value of every coefficient (0: θ0)")
    p.add_argument("--select", choices=("best", "last"), help="epoch kept (default: best for ce / negation, "
                                                               "last for the unsupervised objectives)")
    p.add_argument("--threshold", type=float, default=0.9, help="ufm: pseudo-label confidence threshold")
    p.add_argument("--trusted-per-class", type=int, default=8, help="ufm: trusted examples per class")
    p.add_argument("--keep", type=float, default=0.95, help="negation: share of the control accuracy to keep")
    p.add_argument("--finetuned-acc", type=float, nargs="+",
                   help="fine-tuned accuracy per --data, for selection by normalised accuracy")
    p.add_argument("--augment", action="store_true", help="ce: train on weakly augmented views")
    p.add_argument("--no-flip", action="store_true", help="augmentations never flip images horizontally")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data-loading processes")
    p.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps")
    p.add_argument("--offload", choices=("pinned", "pageable"),
                   help="keep the bank in host memory (page-locked, or mapped from its file) and stream it to the "
                        "GPU one module ahead: a bank larger than the GPU trains (also with --per-stream and "
                        "--online)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt (written for the same "
                                                         "bank, θ0, data and settings)")
    _bank_mismatch_option(p, "--resume")
    p.add_argument("--out", default="atlas_out", help="output folder (default ./atlas_out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--per-stream", action="store_true",
                   help="one coefficient set per --data folder (a stream each: entropy, ufm, or ce with --shots), "
                        "all learned together, one grouped step over a batch mixing the streams; each equals a "
                        "separate run on its folder. Writes --out/<NN_name>/ per stream and --out/summary.json. "
                        "Under torchrun each process owns a contiguous share of the streams (at most one process "
                        "per stream) and rank 0 writes every stream's files")
    p.add_argument("--online", action="store_true",
                   help="online test-time adaptation of every --data folder (a stream each, entropy or ufm's "
                        "confident pseudo-labels): one pass in folder order, --batch-size images of each stream per "
                        "step, predicted with the current coefficients then used for one update (the accuracy is "
                        "of those predictions); writes predictions.jsonl, running_accuracy.png and per-stream "
                        "coefficients. Under torchrun the streams are shared out as for --per-stream")
    p.add_argument("--episodic", action="store_true", help="--online: reset every stream to the start after each "
                                                           "of its batches")
    p.add_argument("--online-split", default="all", choices=("all", "train", "val"),
                   help="--online: the images of each folder streamed (default all, in folder order)")
    p.set_defaults(run=_run_adapt, parser=p)


def _run_adapt(args):
    if args.online or args.per_stream or args.episodic:
        return _run_adapt_streams(args)
    from .adapt import adapt, distributed
    options = {k: getattr(args, k) for k in ("epochs", "steps_per_epoch", "batch_size", "lr", "weight_decay", "seed",
                                             "init", "select", "threshold", "trusted_per_class", "keep", "augment",
                                             "amp", "workers", "checkpoint_every")}
    try:
        result = adapt(args.model, args.bank, args.data, objective=args.objective, out=args.out,
                       pretrained=args.pretrained, classnames=args.classnames, templates=args.templates,
                       shots=args.shots, head=args.head, heads=args.heads, allow_pickle=args.allow_pickle,
                       granularity=args.granularity, partitions=args.partitions,
                       backend=args.backend, device=args.device, val_fraction=args.val_fraction,
                       finetuned_accuracy=args.finetuned_acc, resume=args.resume, flip=not args.no_flip,
                       offload=args.offload or False, progress=not args.no_progress,
                       allow_bank_mismatch=args.allow_bank_mismatch, **options)
    except _user_errors() as e:
        _fail(args, e)
    finally:
        distributed.finish()
    if not distributed.is_main():
        return 0
    s = result.summary
    print(f"selected epoch {s['selected_epoch']} ({s['select']}); validation accuracy, initial -> adapted:")
    for name, a, b in zip(s["tasks"], s["initial"], s["selected"]):
        print(f"  {name}: {100 * a['accuracy']:.2f}% -> {100 * b['accuracy']:.2f}%" if b["n"] else
              f"  {name}: no validation images (--val-fraction 0)")
    print(f"wrote {args.out}/coefficients.safetensors, summary.json, log.jsonl, curves.png, coefficients.png")
    return 0


def _run_adapt_streams(args):
    from .adapt import distributed, streams
    if args.episodic and not args.online:
        args.parser.error("--episodic: only with --online")
    if args.online and args.per_stream:
        args.parser.error("--online and --per-stream: choose one (--online adapts one coefficient set per stream)")
    common = dict(out=args.out, pretrained=args.pretrained, classnames=args.classnames, templates=args.templates,
                  head=args.head, granularity=args.granularity, partitions=args.partitions, backend=args.backend,
                  device=args.device, val_fraction=args.val_fraction, offload=args.offload or False,
                  heads=args.heads, allow_pickle=args.allow_pickle)
    try:
        if args.online:
            if args.shots is not None:
                args.parser.error("--shots: --online reads no labels for training")
            s = streams.adapt_online(args.model, args.bank, args.data, objective=args.objective,
                                     batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                                     episodic=args.episodic, threshold=args.threshold, amp=args.amp,
                                     split=args.online_split, workers=args.workers, progress=not args.no_progress,
                                     **common)
        else:
            options = {k: getattr(args, k) for k in ("epochs", "steps_per_epoch", "batch_size", "lr", "weight_decay",
                                                     "seed", "init", "select", "threshold", "trusted_per_class",
                                                     "augment", "amp", "workers")}
            s = streams.adapt_streams(args.model, args.bank, args.data, objective=args.objective, shots=args.shots,
                                      flip=not args.no_flip, progress=not args.no_progress, **options, **common)
    except _user_errors() as e:
        _fail(args, e)
    finally:
        distributed.finish()
    if not distributed.is_main():
        return 0
    print(f"{len(s['streams'])} streams ({s['mode']}, {s['objective']}); accuracy per stream:")
    for r in s["streams"]:
        before = f"{100 * r['initial_accuracy']:.2f}% -> " if "initial_accuracy" in r else ""
        print(f"  {r['stream']}: {before}{100 * r['accuracy']:.2f}% ({r['folder']})")
    print(f"wrote {args.out}/summary.json and one folder per stream")
    return 0


def _add_eval(sub):
    p = sub.add_parser("eval", help="accuracy of θ0, of learned coefficients and of fine-tuned checkpoints",
                       description="Accuracy on each --data folder's evaluation split of θ0, of θ0 composed with "
                                   "each --coefficients file, and of each --finetuned checkpoint.")
    _model_options(p, bank=False)
    _data_options(p)
    p.add_argument("--bank", help="the bank the coefficients were learned with")
    p.add_argument("--coefficients", nargs="+", help="coefficient files from `atlas-fast adapt`")
    p.add_argument("--finetuned", nargs="+", help="fine-tuned checkpoints (whole model or image tower)")
    p.add_argument("--heads", nargs="+", help="heads.pt of an adapt run, or one head_<Dataset>.pt of the aTLAS "
                                              "release per --data (default: zero-shot heads from the text tower)")
    p.add_argument("--split", default="val", choices=("val", "train", "all"))
    p.add_argument("--json", help="also write the rows to this JSON file")
    _bank_mismatch_option(p, "evaluate --coefficients")
    p.set_defaults(run=_run_eval, parser=p)


def _run_eval(args):
    import json

    from .adapt import evaluate
    from .io.atomic import check_output_file
    try:
        if args.json:
            check_output_file(args.json)   # before the evaluation, not after it
        rows = evaluate(args.model, args.data, pretrained=args.pretrained, bank=args.bank,
                        coefficients=args.coefficients, finetuned=args.finetuned, classnames=args.classnames,
                        templates=args.templates, heads=args.heads, split=args.split,
                        val_fraction=args.val_fraction, device=args.device, backend=args.backend,
                        allow_pickle=args.allow_pickle, allow_bank_mismatch=args.allow_bank_mismatch)
    except _user_errors() as e:
        _fail(args, e)
    width = max(len(r["model"]) for r in rows)
    for r in rows:
        print(f"{r['model']:<{width}}  {r['data']}: {100 * r['accuracy']:.2f}% of {r['n']}")
    if args.json:
        from .errors import WriteError
        from .io.atomic import write_text
        try:
            write_text(args.json, json.dumps(rows, indent=1))
        except WriteError as e:
            _fail(args, e)
    return 0


def _add_merge(sub):
    p = sub.add_parser("merge", help="write θ0 + Σ c·τ as a plain checkpoint open_clip loads",
                       description="Merges learned coefficients into the image tower and writes the whole model in "
                                   "the form θ0 came in: its state dict (.safetensors, or a torch file for any other "
                                   "suffix), which open_clip.load_checkpoint(model, OUT) reads, or, for a Hugging "
                                   "Face θ0, a folder (config.json + model.safetensors) that from_pretrained loads.")
    _model_options(p)
    p.add_argument("--coefficients", required=True, help="coefficient file from `atlas-fast adapt`")
    p.add_argument("--out", required=True, help="output checkpoint (a folder when θ0 is a Hugging Face folder)")
    _bank_mismatch_option(p, "merge")
    p.set_defaults(run=_run_merge, parser=p)


def _run_merge(args):
    from .adapt import merge
    try:
        path = merge(args.model, args.bank, args.coefficients, args.out, pretrained=args.pretrained,
                     backend=args.backend, device=args.device or "cpu", allow_pickle=args.allow_pickle,
                     allow_bank_mismatch=args.allow_bank_mismatch)
    except _user_errors() as e:
        _fail(args, e)
    print(f"wrote {path}")
    return 0


def _add_select(sub):
    import os
    p = sub.add_parser("select", help="keep the b most informative task vectors of each block as a bank of b",
                       description="Scores every (task vector, block) by |dL/dc| at θ0 (cross-entropy over a few "
                                   "labelled batches of --data), keeps the --keep best task vectors of each block "
                                   "as a bank of --keep mixed task vectors, and writes it to --out with its record "
                                   "(which task vector each slot of each block holds, and the scores) beside it as "
                                   "<name>.selection.json. --method random chooses at random, for comparison, and "
                                   "reads no data.")
    _model_options(p)
    _data_options(p, required=False)
    p.add_argument("--keep", type=int, required=True, help="task vectors kept per block (1 <= keep <= T)")
    p.add_argument("--method", default="gradient", choices=("gradient", "random"))
    p.add_argument("--shots", type=int, help="labelled images per class, as for adapt with the same --seed "
                                             "(default: all)")
    p.add_argument("--batches", type=int, default=4, help="labelled batches the scores are taken over (4)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--head", default="zeroshot", choices=("zeroshot", "linear"),
                   help="zero-shot head from the text tower, or a linear probe fitted on θ0's features")
    p.add_argument("--heads", nargs="+", help="head files instead of --head: heads.pt of an adapt run, or one "
                                              "head_<Dataset>.pt of the aTLAS release per --data (--allow-pickle)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shots and batches, or of the random choice")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data-loading processes")
    p.add_argument("--out", required=True, help="output bank file (.safetensors)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_select, parser=p)


def _run_select(args):
    from .adapt import select_blocks, selection_path
    from .io.atomic import check_output_file
    try:
        check_output_file(args.out)
        sel = select_blocks(args.model, args.bank, args.data, keep=args.keep, method=args.method, out=args.out,
                            pretrained=args.pretrained, classnames=args.classnames, templates=args.templates,
                            shots=args.shots, batches=args.batches, batch_size=args.batch_size, head=args.head,
                            heads=args.heads, seed=args.seed, backend=args.backend, device=args.device,
                            val_fraction=args.val_fraction, amp=args.amp, workers=args.workers,
                            progress=not args.no_progress, allow_pickle=args.allow_pickle)
    except _user_errors() as e:
        _fail(args, e)
    blocks = len(sel.record["blocks"])
    first = "the best task vector" if args.method == "gradient" else "the first random pick"
    print(f"{args.method} selection: {args.keep} of {len(sel.record['sources'])} task vectors in each of {blocks} "
          f"blocks; slot 0 holds {first}:")
    for t in sel.record["tasks"]:
        kept = f", kept in {t['kept_blocks']}" if args.keep > 1 else ""
        print(f"  {t['source']}: slot 0 in {t['slot0_blocks']} blocks{kept}")
    print(f"wrote {args.out} and {selection_path(args.out)}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="atlas-fast", description="aTLAS task-vector composition, fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    for add in (_add_bank, _add_adapt, _add_eval, _add_merge, _add_select):
        add(sub)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
