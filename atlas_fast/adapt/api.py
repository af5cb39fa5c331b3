"""The aTLAS jobs as Python functions, each the body of one `atlas-fast` subcommand:
build_bank, adapt, evaluate, merge.

Models are open_clip architectures (name or config .json) with a checkpoint file, or modules passed
directly: an open_clip CLIP (zero-shot heads from its text tower) or any image encoder (linear-probe
heads). Data are ImageFolder-layout folders (<root>/<class>/<image>, or <root>/train and <root>/val|test
holding that layout) or torchvision-style data sets yielding (PIL image, class index).
"""
import copy
import errno
import os
from dataclasses import dataclass, field, fields, replace

import torch
from torch.utils.data import ConcatDataset

from ..backends import BACKENDS, get_backend
from ..bank import quant
from ..bank.task_vectors import DTYPES, TaskVectors, read_state_dict
from ..composer.compose import compose
from ..errors import FileChangedError, OptionError, WriteError
from ..io.atomic import atomic_write, check_output_file
from . import distributed
from .checkpoint import torch_save
from .data import (
    DataError,
    ImageFolderData,
    ViewData,
    check_classnames,
    dataset_targets,
    few_shot_indices,
    folder_classnames,
    split_indices,
)
from .heads import (
    DEFAULT_TEMPLATES,
    Classifier,
    fit_linear_probe,
    head_record,
    read_classnames,
    read_heads,
    read_templates,
    zero_shot_head,
)
from .loop import Task, TrainConfig, train
from .loop import evaluate as evaluate_data
from .models import (
    ModelSpecError,
    clip_state_without_visual,
    load_hf_encoder,
    open_clip_from_checkpoint,
    read_pretrained,
)


class BankMismatchError(ValueError):
    """A task-vector bank whose blocks do not fit the model."""


@dataclass
class LoadedModel:
    module: torch.nn.Module           # the whole model (a CLIP, or the encoder itself)
    encoder: torch.nn.Module          # the image tower that is composed
    preprocess: object
    tokenizer: object = None
    model_id: str = None
    no_text: str = None               # why there is no text tower for zero-shot heads, when there is none
    hf_pretrained: str = None         # θ0's Hugging Face checkpoint, when it was one (merge writes that form)

    @property
    def has_text(self):
        return hasattr(self.module, "encode_text") and self.tokenizer is not None


def _device(device):
    """The torch device to run on (default: cuda when available); OptionError for one that is not here."""
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise OptionError("device", device, "not a torch device; expected cpu or cuda[:i]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("device", device, "no CUDA GPU is usable here (torch.cuda.is_available() is False); "
                                            "use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise OptionError("device", device, f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    return distributed.local_device(dev)


def _check_backend(backend, device):
    """OptionError now, before anything is loaded, for a backend that does not exist or cannot run on `device`."""
    if backend not in BACKENDS + ("auto",):
        raise OptionError("backend", backend, f"expected one of {', '.join(BACKENDS + ('auto',))}")
    reason = None if backend == "auto" else get_backend(backend).unavailable_reason(device)
    if reason is not None:
        raise OptionError("backend", backend, f"cannot run on {device}: {reason}")


def _check_out_folder(out):
    if os.path.exists(out) and not os.path.isdir(out):
        raise WriteError(errno.ENOTDIR, "it is a file; name a folder", os.fspath(out))
    check_output_file(os.path.join(out, "summary.json"), missing_folders=True)


def _check_partitions(partitions):
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise OptionError("partitions", partitions, "expected an int >= 1 (random partitions per block)")


def load_model(model, pretrained=None, preprocess=None, device=None, allow_pickle=False):
    """A LoadedModel from an open_clip name / config .json (+ checkpoint), from a Hugging Face CLIP vision
    checkpoint (pretrained= a folder; model None, or an architecture of the same shapes), or from a module.
    allow_pickle: read a pickled-module or raw-pickle checkpoint (checkpoints.read_state_dict)."""
    device = _device(device)
    if model is None or isinstance(model, (str, os.PathLike)):
        torch.manual_seed(0)   # a model without a checkpoint is the same random θ0 in every command
        ckpt = read_pretrained(pretrained, allow_pickle) if pretrained is not None else None
        if ckpt is not None and ckpt.hf:
            encoder, pre = load_hf_encoder(ckpt, model)
            encoder = encoder.to(device).eval()
            return LoadedModel(encoder, encoder, preprocess or pre, no_text=f"{ckpt.path} is a Hugging Face CLIP "
                               f"vision tower, with no text tower", hf_pretrained=ckpt.path)
        if model is None:
            raise ModelSpecError("model: an open_clip architecture name or config .json (--model) is needed "
                                 "unless the checkpoint is a Hugging Face CLIP folder")
        clip, pre, tok, removed = open_clip_from_checkpoint(os.fspath(model), ckpt)
        clip = clip.to(device).eval()
        # names the weights for the zero-shot head cache: a rewritten checkpoint gets a new entry
        stamp = os.stat(pretrained) if pretrained is not None else None
        ident = f"{model}|{pretrained}|{stamp.st_size}|{stamp.st_mtime_ns}" if stamp else f"{model}|random"
        why = f"{pretrained} has no text tower (no {', '.join(p + '.*' for p in removed)} entries, as an image " \
              f"encoder saved with keep_lang=False)" if removed else None
        return LoadedModel(clip, clip.visual, preprocess or pre, tok, ident, no_text=why)
    if not isinstance(model, torch.nn.Module):
        raise ModelSpecError(f"model: expected an open_clip name, a config .json or a module, "
                             f"got {type(model).__name__}")
    model = model.to(device).eval()
    if hasattr(model, "visual") and hasattr(model, "encode_text"):
        import open_clip
        size = getattr(model.visual, "image_size", 224)
        pre = preprocess or open_clip.image_transform(size, is_train=False)
        return LoadedModel(model, model.visual, pre, _tokenizer_for(model))
    if preprocess is None:
        raise ModelSpecError("model: an image encoder without a text tower needs preprocess= (PIL image -> tensor)")
    return LoadedModel(model, model, preprocess)


def _tokenizer_for(clip):
    import open_clip
    length = getattr(clip, "context_length", 77)
    return lambda texts: open_clip.tokenize(texts, context_length=length)


def _load_bank(bank, device):
    if isinstance(bank, TaskVectors):
        return bank.to(device)
    # on a CPU the bank is mapped, not read: the processes of a data-parallel run share one copy of it
    return TaskVectors.load(bank, device=str(device), mmap=device.type == "cpu")


def _compose(loaded, bank, bank_name, **kwargs):
    _check_backend(kwargs.get("backend", "auto"), next(loaded.encoder.parameters()).device)
    try:
        return compose(loaded.encoder, bank, **kwargs)
    except (OptionError, FileChangedError):
        raise
    except ValueError as e:
        raise BankMismatchError(f"{bank_name}: does not match the model's image tower: {e}") from e


def _as_list(x):
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


@dataclass
class DataSpec:
    name: str
    data: object
    classes: list
    names: list
    train: list
    val: list


def load_data(source, classnames=None, val_fraction=0.2, split_seed=0):
    """A DataSpec: the items, folder classes, class names and a (train, val) split.

    A folder with train/ and val/ (or test/) subfolders uses them; any other folder or data set is split
    per class, val_fraction of each class to val (seeded by split_seed, so every command sees one split)."""
    if isinstance(source, (str, os.PathLike)):
        root = os.fspath(source)
        name = os.path.basename(os.path.normpath(root))
        if name in ("train", "val", "test"):
            name = os.path.basename(os.path.dirname(os.path.normpath(root))) + "/" + name
        held = [s for s in ("val", "test") if os.path.isdir(os.path.join(root, s))]
        if os.path.isdir(os.path.join(root, "train")) and held:
            tr, va = ImageFolderData(os.path.join(root, "train")), ImageFolderData(os.path.join(root, held[0]))
            if tr.classes != va.classes:
                raise DataError(f"{root}: train/ and {held[0]}/ hold different class folders")
            data, classes = ConcatDataset([tr, va]), tr.classes
            train, val = list(range(len(tr))), list(range(len(tr), len(tr) + len(va)))
            targets = tr.targets + va.targets
        else:
            data = ImageFolderData(root)
            classes, targets = data.classes, data.targets
            train, val = split_indices(targets, val_fraction, split_seed)
    else:
        data, name = source, type(source).__name__
        classes = list(getattr(source, "classes", []) or [])
        targets = dataset_targets(source)
        if not classes:
            if classnames is None:
                raise DataError(f"{name}: the data set has no .classes; pass classnames")
            classes = [str(c) for c in range(max(targets) + 1)]
        train, val = split_indices(targets, val_fraction, split_seed)
    if classnames is None:
        names = folder_classnames(classes)
    elif isinstance(classnames, (str, os.PathLike)):
        names = check_classnames(read_classnames(classnames), classes, os.fspath(classnames))
    else:
        names = check_classnames(list(classnames), classes, "classnames")
    return DataSpec(name, data, classes, names, train, val)


def _per_dataset(value, n, what):
    """One value per data set from a single value or a list (a list of strings is per data set)."""
    if value is None or isinstance(value, (str, os.PathLike)):
        return [value] * n
    if len(value) == 1:
        return list(value) * n
    if len(value) != n:
        raise ValueError(f"{what}: {len(value)} entries for {n} data sets")
    return list(value)


def _is_name_list(x):
    return isinstance(x, (list, tuple)) and x and all(isinstance(v, str) for v in x) and \
        not all(os.path.isfile(v) for v in x)


def _heads(loaded, specs, head, templates, cache_dir, labelled, device, progress=True):
    if head == "zeroshot":
        if not loaded.has_text:
            raise ModelSpecError(f"{_no_text(loaded)}: zero-shot heads need one; use --head linear "
                                 f"(head='linear') or heads from files with --heads (heads=)")
        tpl = DEFAULT_TEMPLATES if templates is None else (
            read_templates(templates) if isinstance(templates, (str, os.PathLike)) else list(templates))
        return [zero_shot_head(loaded.module, loaded.tokenizer, s.names, tpl, cache_dir, loaded.model_id, progress)
                for s in specs]
    if head == "linear":
        return [_linear_probe(loaded, s, idx, device) for s, idx in zip(specs, labelled)]
    raise ValueError(f"head={head!r}: expected 'zeroshot' or 'linear'")


@torch.no_grad()
def _features(encoder, data, indices, preprocess, device, batch_size=256):
    from .data import eval_loader
    feats, labels = [], []
    for x, y, _ in eval_loader(ViewData(data, indices, preprocess), batch_size):
        feats.append(encoder(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def _no_text(loaded):
    return loaded.no_text or "the model has no open_clip text tower"


def _linear_probe(loaded, spec, indices, device):
    if indices is None:
        raise DataError(f"{spec.name}: head='linear' is fitted on labelled images; this objective has none "
                        f"(use a zero-shot head)")
    feats, labels = _features(loaded.encoder, spec.data, indices, loaded.preprocess, device)
    return fit_linear_probe(feats, labels, len(spec.classes))


def save_heads(path, tasks):
    torch_save(path, [{"name": t.name, **head_record(t.head)} for t in tasks])


def load_heads(paths, allow_pickle=False):
    """The heads of one or more files (heads.pt of a run, or the release's head_<Dataset>.pt), in order."""
    return [h for _, h in _read_head_files(paths, allow_pickle)]


def _read_head_files(paths, allow_pickle):
    """[(file, head)] of one or more head files, in order."""
    return [(os.fspath(p), h) for p in _as_list(paths) for h in read_heads(p, allow_pickle)]


def heads_from_files(paths, specs, loaded, allow_pickle):
    """The heads read from `paths`, one per data set, each checked against its data's classes and the image
    tower's feature width."""
    found = _read_head_files(paths, allow_pickle)
    if len(found) != len(specs):
        raise ValueError(f"heads: {', '.join(dict.fromkeys(f for f, _ in found))} hold {len(found)} heads for "
                         f"{len(specs)} data sets")
    width = getattr(loaded.encoder, "output_dim", None)
    for (path, h), s in zip(found, specs):
        classes, dim = h.weight.shape
        if classes != len(s.classes):
            raise ValueError(f"{path}: a head of {classes} classes for data {s.name} of {len(s.classes)} classes")
        if isinstance(width, int) and dim != width:
            raise ValueError(f"{path}: a head on {dim}-dim features; the image tower gives {width}")
    return [h for _, h in found]


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
    if finetuned_accuracy is not None and not all(0 < a <= 1 for a in _as_list(finetuned_accuracy)):
        raise ValueError(f"finetuned_accuracy={finetuned_accuracy}: expected fractions in (0, 1]")
    labelled = objective in ("ce", "negation")
    if shots is not None and not labelled:
        raise ValueError(f"shots={shots}: objective {objective!r} uses no labels")
    job = prepare_job(model, bank, data, out, pretrained=pretrained, classnames=classnames, templates=templates,
                      head=head, labelled=labelled, shots=shots, seed=cfg.seed, granularity=granularity,
                      partitions=partitions, backend=backend, device=device, val_fraction=val_fraction,
                      split_seed=split_seed, preprocess=preprocess, cache_dir=cache_dir, heads=heads, offload=offload,
                      progress=cfg.progress, allow_pickle=allow_pickle)
    ft = _per_dataset(finetuned_accuracy, len(job.specs), "finetuned_accuracy") if finetuned_accuracy is not None \
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
    device = _device(device)
    _check_backend(backend, device)
    _check_partitions(partitions)
    _check_out_folder(out)
    sources = _as_list(data) if not isinstance(data, (str, os.PathLike)) else [data]
    if not sources:
        raise DataError("data: no data set given")
    names = [classnames] if _is_name_list(classnames) and len(sources) == 1 else _per_dataset(
        classnames, len(sources), "classnames")
    specs = [load_data(s, n, val_fraction, split_seed) for s, n in zip(sources, names)]
    if shots is not None and not labelled:
        raise ValueError(f"shots={shots}: the objective uses no labels")
    train_sets = [few_shot_indices(dataset_targets(s.data), s.train, shots, seed, s.classes) if labelled else s.train
                  for s in specs]
    bank_name = bank if isinstance(bank, (str, os.PathLike)) else "bank"
    bank = _load_bank(bank, torch.device("cpu") if offload else device)
    loaded = load_model(model, pretrained, preprocess, device, allow_pickle)
    head_list = heads_from_files(heads, specs, loaded, allow_pickle) if heads is not None else _heads(
        loaded, specs, head, templates, cache_dir or os.path.join(out, "cache"),
        train_sets if labelled else [None] * len(specs), device, progress)
    atlas = _compose(loaded, bank, bank_name, granularity=granularity, partitions=partitions, backend=backend,
                     offload=offload)
    return Job(loaded, specs, [h.to(device) for h in head_list], atlas, train_sets)


def _coefficient_layout(path):
    """(granularity, partitions, seed) recorded in a coefficient file."""
    from safetensors import safe_open
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such coefficient file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ValueError(f"{path}: unreadable coefficient file ({e})") from e
    if "granularity" not in meta:
        raise ValueError(f"{path}: not an atlas_fast coefficient file")
    return meta["granularity"], int(meta["partitions"]), int(meta["seed"])


def compose_from_file(loaded, bank, coefficients, backend="auto", device=None, allow_bank_mismatch=False):
    """Compose loaded.encoder with `bank` laid out as in `coefficients` and load them (refused for a bank other
    than theirs unless allow_bank_mismatch=True: AtlasModel.load_coefficients)."""
    granularity, partitions, seed = _coefficient_layout(coefficients)
    bank_name = bank if isinstance(bank, (str, os.PathLike)) else "bank"
    atlas = _compose(loaded, _load_bank(bank, _device(device)), bank_name, granularity=granularity,
                     partitions=partitions, backend=backend, seed=seed)
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
    coefficients, finetuned = _as_list(coefficients), _as_list(finetuned)
    if coefficients and bank is None:
        raise ValueError("coefficients: evaluating a coefficient file needs the bank it was learned with")
    device = _device(device)
    sources = _as_list(data) if not isinstance(data, (str, os.PathLike)) else [data]
    names = [classnames] if _is_name_list(classnames) and len(sources) == 1 else _per_dataset(
        classnames, len(sources), "classnames")
    specs = [load_data(s, n, val_fraction, split_seed) for s, n in zip(sources, names)]
    cfg = TrainConfig(eval_batch_size=batch_size, workers=workers)
    _check_backend(backend, device)
    loaded = load_model(model, pretrained, preprocess, device, allow_pickle)
    if heads is not None:
        head_list = heads_from_files(heads, specs, loaded, allow_pickle)
    elif loaded.has_text:
        head_list = _heads(loaded, specs, "zeroshot", templates, cache_dir, None, device)
    else:
        raise ModelSpecError(f"{_no_text(loaded)}: evaluating it needs heads from files: --heads (heads=): "
                             f"heads.pt of an adapt run, or the release's head_<Dataset>.pt")
    rows = []

    def run(label, encoder):
        for s, h in zip(specs, head_list):
            idx = {"val": s.val, "train": s.train, "all": s.train + s.val}[split]
            clf = Classifier(encoder, h.to(device)).eval()
            r = evaluate_data(lambda x: clf(x.to(device)), ViewData(s.data, idx, loaded.preprocess), cfg)
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
    from_pretrained loads, in θ0's class and dtypes (convert.save_hf_clip_vision). Written atomically.
    A bank other than the coefficients' is refused unless allow_bank_mismatch=True."""
    _check_backend(backend, _device(device))
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
    Checkpoints: any file checkpoints.read_state_dict reads (allow_pickle as there); with prefix "visual."
    (an open_clip image tower) also Hugging Face CLIP vision folders and files, converted to open_clip names."""
    if dtype not in DTYPES and dtype not in quant.FORMATS:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join((*DTYPES, *quant.FORMATS))}")
    finetuned = _as_list(finetuned)
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
