"""The aTLAS jobs as Python functions, each the body of one `atlas-fast` subcommand:
build_bank, adapt, evaluate, merge (what they load and check first: inputs.py).
"""
import copy
import errno
import os
from dataclasses import dataclass, field, fields, replace

import torch

from ..bank import quant
from ..bank.task_vectors import DTYPES, TaskVectors, read_state_dict
from ..composer.coefficient_file import read_coefficient_file
from ..errors import OptionError, WriteError
from ..io.atomic import atomic_write, check_output_file
from . import distributed
from .checkpoint import torch_save
from .data import DataError, ViewData, dataset_targets, few_shot_indices
from .evaluation import classification_metrics
from .heads import Classifier
from .inputs import (
    BankMismatchError,
    LoadedModel,
    as_list,
    bank_label,
    check_backend,
    compose_bank,
    data_sources,
    heads_from_files,
    load_bank,
    load_data,
    load_model,
    load_specs,
    make_heads,
    per_dataset,
    resolve_device,
    save_heads,
)
from .loop import Task, TrainConfig, train
from .models import ModelSpecError, clip_state_without_visual, read_pretrained


def _check_out_folder(out):
    if os.path.exists(out) and not os.path.isdir(out):
        raise WriteError(errno.ENOTDIR, "it is a file; name a folder", os.fspath(out))
    check_output_file(os.path.join(out, "summary.json"), missing_folders=True)


def _check_partitions(partitions):
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise OptionError("partitions", partitions, "expected an int >= 1 (random partitions per block)")


@dataclass
class AdaptResult:
    summary: dict
    atlas: object = field(repr=False)
    tasks: list = field(repr=False)
    model: object = field(repr=False)

    def classifier(self, i=0):
        """The adapted image classifier of data set i: composed encoder + head."""
        return Classifier(self.atlas, self.tasks[i].head)


def adapt(model, bank, data, objective="ce", out="atlas_out", pretrained=None, classnames=None, templates=None,
          shots=None, head="zeroshot", granularity="block", partitions=1, backend="auto", device=None,
          val_fraction=0.2, split_seed=0, finetuned_accuracy=None, preprocess=None, cache_dir=None,
          heads=None, resume=False, on_step=None, offload=False, allow_pickle=False,
          allow_bank_mismatch=False, **options):
    """Learn aTLAS coefficients of `bank` for `model` on `data` with `objective`; writes the run to `out`.

    data: one or more folders / data sets (ce: one or more, task addition when several; negation:
    target then control; entropy and ufm: one, whose labels are not used for training).
    shots: labelled images per class for ce / negation (None: all training images).
    options: TrainConfig fields (epochs, batch_size, lr, seed, init, threshold, workers, ...).
    offload: "pinned" or "pageable" keeps the bank in host memory and streams it to the GPU module by module
    (compose(offload=...)): a bank larger than the GPU trains.
    heads: head files instead of `head` (a run's heads.pt, or one head_<Dataset>.pt per data set), each
    checked against its data's class count. allow_pickle: read pickled θ0 and head files (see load_model).
    resume: continue from out/checkpoint.pt, which must have been written for the same bank, θ0, data and settings
    (a one-line error names what differs); allow_bank_mismatch=True resumes with a bank of other values.
    Returns an AdaptResult (summary dict, the composed model, the tasks).
    Under `torchrun --nproc-per-node N` every process runs adapt() with the same arguments: data-parallel
    training (gloo on CPUs, NCCL on GPUs, one GPU per process), batch_size being the global batch.
    """
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"adapt: unknown option(s) {', '.join(unknown)}; TrainConfig has {', '.join(sorted(known))}")
    cfg = TrainConfig(objective=objective, **options)
    cfg.validate()
    if finetuned_accuracy is not None and not all(0 < a <= 1 for a in as_list(finetuned_accuracy)):
        raise ValueError(f"finetuned_accuracy={finetuned_accuracy}: expected fractions in (0, 1]")
    labelled = objective in ("ce", "negation")
    if shots is not None and not labelled:
        raise ValueError(f"shots={shots}: objective {objective!r} uses no labels")
    job = prepare_job(model, bank, data, out, pretrained=pretrained, classnames=classnames, templates=templates,
                      head=head, labelled=labelled, shots=shots, seed=cfg.seed, granularity=granularity,
                      partitions=partitions, backend=backend, device=device, val_fraction=val_fraction,
                      split_seed=split_seed, preprocess=preprocess, cache_dir=cache_dir, heads=heads, offload=offload,
                      progress=cfg.progress, allow_pickle=allow_pickle)
    ft = per_dataset(finetuned_accuracy, len(job.specs), "finetuned_accuracy") if finetuned_accuracy is not None \
        else [None] * len(job.specs)
    tasks = [Task(s.name, s.data, s.names, h, tr, s.val, a)
             for s, h, tr, a in zip(job.specs, job.heads, job.train, ft)]
    atlas = job.atlas
    os.makedirs(out, exist_ok=True)
    if distributed.is_main():
        save_heads(os.path.join(out, "heads.pt"), tasks)
    summary = train(atlas, tasks, job.loaded.preprocess, cfg, out, resume=resume, on_step=on_step,
                    allow_bank_mismatch=allow_bank_mismatch)
    return AdaptResult(summary, atlas, tasks, job.loaded.module)


@dataclass
class Job:
    """What a run over several data sets starts from: the model, one DataSpec and one head per data set, and the
    bank composed into the model's image tower."""
    loaded: LoadedModel
    specs: list
    heads: list
    atlas: object
    train: list                       # per data set: its training indices (its k-shot subset when labelled)


def prepare_job(model, bank, data, out, pretrained=None, classnames=None, templates=None, head="zeroshot",
                labelled=False, shots=None, seed=0, granularity="block", partitions=1, backend="auto", device=None,
                val_fraction=0.2, split_seed=0, preprocess=None, cache_dir=None, heads=None, offload=False,
                progress=True, allow_pickle=False):
    """A Job for `data` (a folder / data set or a list of them), with adapt()'s meaning of every argument; the
    device, backend, partitions and output folder are checked before anything is read.
    labelled=True: the training indices are each data set's `shots` per class drawn with `seed` (all when None),
    and a head="linear" probe is fitted on them; labelled=False: no label is used."""
    device = resolve_device(device)
    check_backend(backend, device)
    _check_partitions(partitions)
    _check_out_folder(out)
    sources = data_sources(data)
    if not sources:
        raise DataError("data: no data set given")
    specs = load_specs(sources, classnames, val_fraction, split_seed)
    if shots is not None and not labelled:
        raise ValueError(f"shots={shots}: the objective uses no labels")
    train_sets = [few_shot_indices(dataset_targets(s.data), s.train, shots, seed, s.classes) if labelled else s.train
                  for s in specs]
    label = bank_label(bank)
    bank = load_bank(bank, torch.device("cpu") if offload else device)
    loaded = load_model(model, pretrained, preprocess, device, allow_pickle)
    head_list = heads_from_files(heads, specs, loaded, allow_pickle) if heads is not None else make_heads(
        loaded, specs, head, templates, cache_dir or os.path.join(out, "cache"),
        train_sets if labelled else [None] * len(specs), device, progress)
    atlas = compose_bank(loaded, bank, label, granularity=granularity, partitions=partitions, backend=backend,
                         offload=offload)
    return Job(loaded, specs, [h.to(device) for h in head_list], atlas, train_sets)


def compose_from_file(loaded, bank, coefficients, backend="auto", device=None, allow_bank_mismatch=False):
    """Compose loaded.encoder with `bank` laid out as in `coefficients` and load them (refused for a bank other
    than theirs unless allow_bank_mismatch=True: AtlasModel.load_coefficients)."""
    meta = read_coefficient_file(coefficients).meta
    atlas = compose_bank(loaded, load_bank(bank, resolve_device(device)), bank_label(bank),
                         granularity=meta["granularity"], partitions=int(meta["partitions"]), backend=backend,
                         seed=int(meta["seed"]))
    atlas.load_coefficients(coefficients, allow_bank_mismatch)
    return atlas


def _load_finetuned(loaded, path, allow_pickle):
    """Load a fine-tuned checkpoint's image tower (keys with or without the "visual." prefix; a Hugging Face
    CLIP checkpoint converted) into loaded.encoder."""
    sd = read_pretrained(path, allow_pickle).state_dict
    if any(k.startswith("visual.") for k in sd):
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    try:
        loaded.encoder.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ModelSpecError(f"{path}: does not fit the model's image tower "
                             f"({str(e).strip().splitlines()[0]})") from e


def evaluate(model, data, pretrained=None, bank=None, coefficients=None, finetuned=None, classnames=None,
             templates=None, heads=None, split="val", val_fraction=0.2, split_seed=0, device=None, preprocess=None,
             cache_dir=None, backend="auto", allow_pickle=False, batch_size=256, workers=0, allow_bank_mismatch=False):
    """Accuracy on each data set's `split` ("val", "train" or "all") of θ0, of θ0 composed with each
    coefficient file, and of each fine-tuned checkpoint. Returns [{"model", "data", "accuracy", "n"}].
    heads: head files (as for adapt) instead of zero-shot heads; allow_pickle: read pickled checkpoints and
    head files.
    A coefficient file learned with a bank of other values is refused unless allow_bank_mismatch=True."""
    if split not in ("val", "train", "all"):
        raise ValueError(f"split={split!r}: expected val, train or all")
    coefficients, finetuned = as_list(coefficients), as_list(finetuned)
    if coefficients and bank is None:
        raise ValueError("coefficients: evaluating a coefficient file needs the bank it was learned with")
    device = resolve_device(device)
    specs = load_specs(data_sources(data), classnames, val_fraction, split_seed)
    cfg = TrainConfig(eval_batch_size=batch_size, workers=workers)
    check_backend(backend, device)
    loaded = load_model(model, pretrained, preprocess, device, allow_pickle)
    if heads is not None:
        head_list = heads_from_files(heads, specs, loaded, allow_pickle)
    elif loaded.has_text:
        head_list = make_heads(loaded, specs, "zeroshot", templates, cache_dir, None, device)
    else:
        raise ModelSpecError(f"{loaded.why_no_text}: evaluating it needs heads from files: --heads (heads=): "
                             f"heads.pt of an adapt run, or the release's head_<Dataset>.pt")
    rows = []

    def run(label, encoder):
        for s, h in zip(specs, head_list):
            idx = {"val": s.val, "train": s.train, "all": s.train + s.val}[split]
            clf = Classifier(encoder, h.to(device)).eval()
            r = classification_metrics(lambda x: clf(x.to(device)), ViewData(s.data, idx, loaded.preprocess), cfg)
            rows.append({"model": label, "data": s.name, "accuracy": r["accuracy"], "n": r["n"]})

    run("pretrained", loaded.encoder)
    for path in coefficients:
        # compose() works in place: compose a copy so that θ0 stays for the next model
        own = replace(loaded, encoder=copy.deepcopy(loaded.encoder))
        run(os.fspath(path), compose_from_file(own, bank, path, backend, device, allow_bank_mismatch))
    for path in finetuned:
        own = replace(loaded, encoder=copy.deepcopy(loaded.encoder))
        _load_finetuned(own, path, allow_pickle)
        run(os.fspath(path), own.encoder)
    return rows


def merge(model, bank, coefficients, out, pretrained=None, backend="auto", device="cpu", allow_pickle=False,
          allow_bank_mismatch=False):
    """Write θ0 + Σ c·τ in the form θ0 came in. Returns the path.

    An open_clip θ0: the whole model's state dict (.safetensors, or a torch file for any other suffix) that
    open_clip.load_checkpoint reads, with the entries θ0 has (a θ0 without its text tower gives a merged
    model without it). A Hugging Face θ0: a folder (config.json + model.safetensors) that transformers'
    from_pretrained loads, in θ0's class and dtypes (io.hf_clip.save_hf_clip_vision). Written atomically.
    A bank other than the coefficients' is refused unless allow_bank_mismatch=True."""
    check_backend(backend, resolve_device(device))
    loaded = load_model(model, pretrained, device=device, allow_pickle=allow_pickle)
    out = os.fspath(out)
    if loaded.hf_pretrained is not None and os.path.splitext(out)[1] in (".pt", ".pth", ".bin", ".safetensors"):
        raise ValueError(f"{out}: θ0 {loaded.hf_pretrained} is a Hugging Face CLIP checkpoint, so the merged model "
                         f"is written as a Hugging Face folder (config.json + model.safetensors): give a folder path")
    if loaded.hf_pretrained is None:
        check_output_file(out, missing_folders=True)
    rest = clip_state_without_visual(loaded.module) if loaded.encoder is not loaded.module else {}
    atlas = compose_from_file(loaded, bank, coefficients, backend, device, allow_bank_mismatch)
    plain = atlas.merge()
    tower = {k: v.detach().cpu().contiguous() for k, v in plain.state_dict().items()}
    if loaded.hf_pretrained is not None:
        from ..io.hf_clip import save_hf_clip_vision
        return save_hf_clip_vision(out, tower, loaded.hf_pretrained)
    prefix = "visual." if loaded.encoder is not loaded.module else ""
    state = {**rest, **{prefix + k: v for k, v in tower.items()}}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if out.endswith(".safetensors"):
        from safetensors.torch import save_file
        atomic_write(out, lambda tmp: save_file({k: v.clone() for k, v in state.items()}, tmp))
    else:
        torch_save(out, {"state_dict": state})
    return out


def build_bank(pretrained, finetuned, out, prefix="visual.", dtype="float32", allow_pickle=False, group_size=None,
               rank=None, energy=None):
    """Build a task-vector bank (τ_t = finetuned_t − pretrained) from checkpoint files and save it to `out`.
    dtype: float32, bfloat16, float16, int8 (per-row scales) or int4 (scales per group_size input columns);
    rank= or energy= (float32 only) factors each task vector of every 2-D+ block by truncated SVD instead.
    Checkpoints: any file io.checkpoints.read_state_dict reads (allow_pickle as there); with prefix "visual."
    (an open_clip image tower) also Hugging Face CLIP vision folders and files, converted to open_clip names."""
    if dtype not in DTYPES and dtype not in quant.FORMATS:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join((*DTYPES, *quant.FORMATS))}")
    finetuned = as_list(finetuned)
    if not finetuned:
        raise ValueError("finetuned: no fine-tuned checkpoint given")
    check_output_file(out)
    read = _bank_reader(prefix, allow_pickle)
    tv = TaskVectors.from_state_dicts(read(pretrained), (read(p) for p in finetuned), DTYPES.get(dtype, dtype),
                                      prefix or None, sources=[os.fspath(p) for p in finetuned],
                                      group_size=group_size, rank=rank, energy=energy)
    tv.save(out)
    return tv


def _bank_reader(prefix, allow_pickle):
    """A checkpoint reader for build_bank: Hugging Face CLIP towers are converted where the bank is of
    open_clip's image tower; any other prefix takes the names as the file has them."""
    if prefix == "visual.":
        from ..io.hf_clip import read_checkpoint
        return lambda path: read_checkpoint(path, allow_pickle).state_dict
    return lambda path: read_state_dict(path, allow_pickle)


__all__ = ["adapt", "evaluate", "merge", "build_bank", "load_data", "load_model", "AdaptResult",
           "BankMismatchError", "compose_from_file", "Job", "prepare_job"]
