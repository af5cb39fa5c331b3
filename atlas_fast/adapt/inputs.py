"""What every job reads and checks before it runs: the device and backend, the bank composed into the model's
image tower, the model, the data sets and their heads.

Models are open_clip architectures (name or config .json) with a checkpoint file, or modules passed
directly: an open_clip CLIP (zero-shot heads from its text tower) or any image encoder (linear-probe
heads). Data are ImageFolder-layout folders (<root>/<class>/<image>, or <root>/train and <root>/val|test
holding that layout) or torchvision-style data sets yielding (PIL image, class index).
"""
import os
from dataclasses import dataclass

import torch
from torch.utils.data import ConcatDataset

from ..backends import BACKENDS, get_backend
from ..bank.task_vectors import TaskVectors
from ..composer.compose import compose
from ..errors import FileChangedError, OptionError
from . import distributed
from .checkpoint import torch_save
from .data import (
    DataError,
    ImageFolderData,
    ViewData,
    check_classnames,
    dataset_targets,
    eval_loader,
    folder_classnames,
    split_indices,
)
from .heads import (
    DEFAULT_TEMPLATES,
    fit_linear_probe,
    head_record,
    read_classnames,
    read_heads,
    read_templates,
    zero_shot_head,
)
from .models import ModelSpecError, load_hf_encoder, open_clip_from_checkpoint, read_pretrained


class BankMismatchError(ValueError):
    """A task-vector bank whose blocks do not fit the model."""


def as_list(x):
    """x as a list: [] for None, a list or tuple as a list, anything else as a list of one."""
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def per_dataset(value, n, what):
    """One value per data set from a single value or a list (a list of strings is per data set)."""
    if value is None or isinstance(value, (str, os.PathLike)):
        return [value] * n
    if len(value) == 1:
        return list(value) * n
    if len(value) != n:
        raise ValueError(f"{what}: {len(value)} entries for {n} data sets")
    return list(value)


# -- device, backend, bank

def resolve_device(device):
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


def check_backend(backend, device):
    """OptionError now, before anything is loaded, for a backend that does not exist or cannot run on `device`."""
    if backend not in BACKENDS + ("auto",):
        raise OptionError("backend", backend, f"expected one of {', '.join(BACKENDS + ('auto',))}")
    reason = None if backend == "auto" else get_backend(backend).unavailable_reason(device)
    if reason is not None:
        raise OptionError("backend", backend, f"cannot run on {device}: {reason}")


def bank_label(bank):
    """How errors name a bank: its path, or "bank" for a TaskVectors passed in."""
    return bank if isinstance(bank, (str, os.PathLike)) else "bank"


def load_bank(bank, device):
    """A TaskVectors on `device` from a bank file or a TaskVectors."""
    if isinstance(bank, TaskVectors):
        return bank.to(device)
    # on a CPU the bank is mapped, not read: the processes of a data-parallel run share one copy of it
    return TaskVectors.load(bank, device=str(device), mmap=device.type == "cpu")


def compose_bank(loaded, bank, label, **kwargs):
    """compose(loaded.encoder, bank, **kwargs), a bank that does not fit the image tower a BankMismatchError
    naming `label`."""
    check_backend(kwargs.get("backend", "auto"), next(loaded.encoder.parameters()).device)
    try:
        return compose(loaded.encoder, bank, **kwargs)
    except (OptionError, FileChangedError):
        raise
    except ValueError as e:
        raise BankMismatchError(f"{label}: does not match the model's image tower: {e}") from e


# -- the model

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

    @property
    def why_no_text(self):
        """The start of an error for a job that needs the text tower this model lacks."""
        return self.no_text or "the model has no open_clip text tower"


def load_model(model, pretrained=None, preprocess=None, device=None, allow_pickle=False):
    """A LoadedModel from an open_clip name / config .json (+ checkpoint), from a Hugging Face CLIP vision
    checkpoint (pretrained= a folder; model None, or an architecture of the same shapes), or from a module.
    allow_pickle: read a pickled-module or raw-pickle checkpoint (io.checkpoints.read_state_dict)."""
    device = resolve_device(device)
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


# -- data sets

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


def data_sources(data):
    """The data sets of a job's `data` argument: one folder / data set, or a list of them."""
    return [data] if isinstance(data, (str, os.PathLike)) else as_list(data)


def load_specs(sources, classnames, val_fraction, split_seed):
    """One DataSpec per source. classnames: None, one file or list of names for every source, or one per source
    (a list of names given with a single source is that source's)."""
    names = [classnames] if _is_name_list(classnames) and len(sources) == 1 else per_dataset(
        classnames, len(sources), "classnames")
    return [load_data(s, n, val_fraction, split_seed) for s, n in zip(sources, names)]


def _is_name_list(x):
    return isinstance(x, (list, tuple)) and x and all(isinstance(v, str) for v in x) and \
        not all(os.path.isfile(v) for v in x)


# -- heads

def make_heads(loaded, specs, head, templates, cache_dir, labelled, device, progress=True):
    """One head per DataSpec: head="zeroshot" from the model's text tower with `templates` (cached in
    cache_dir), head="linear" a probe fitted on θ0's features of each data set's `labelled` indices."""
    if head == "zeroshot":
        if not loaded.has_text:
            raise ModelSpecError(f"{loaded.why_no_text}: zero-shot heads need one; use --head linear "
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
    feats, labels = [], []
    for x, y, _ in eval_loader(ViewData(data, indices, preprocess), batch_size):
        feats.append(encoder(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


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
    return [(os.fspath(p), h) for p in as_list(paths) for h in read_heads(p, allow_pickle)]


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
