"""Classifier heads on image features: open_clip zero-shot heads from the text tower, and linear probes.

A zero-shot head is the normalised mean over prompt templates of the normalised text embeddings of each
class; logits = logit_scale · normalise(image features) · headᵀ, as CLIP scores images against text.

Heads are read from a run's heads.pt or from the public aTLAS / task-vector release's head_<Dataset>.pt:
a pickled ClassificationHead(torch.nn.Linear) of the authors' code (weight (classes × dim) holding
logit_scale × the class embeddings, bias, and `normalize`: logits = normalise(features) · Wᵀ + b), read with
allow_pickle=True by checkpoints' stand-in unpickler, without that code.
"""
import hashlib
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import torch_save

# Generic photo prompts; a data set's own templates (a file, one per line with "{}") usually do better.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of a {}.",
    "a bright photo of a {}.",
    "a cropped photo of the {}.",
    "an image of a {}.",
)


def read_templates(path):
    """Prompt templates from a file, one per line, each with one "{}" for the class name."""
    lines = _read_lines(path, "templates file")
    bad = [t for t in lines if t.count("{}") != 1]
    if bad:
        raise ValueError(f"{path}: template {bad[0]!r} needs exactly one '{{}}' for the class name")
    return lines


def _read_lines(path, what):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such {what}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable {what} ({e})") from e
    if not lines:
        raise ValueError(f"{path}: empty {what}")
    return lines


def read_classnames(path):
    """Class names from a file, one per line, in the order of the data's (sorted) class folders."""
    return _read_lines(path, "class-names file")


class ZeroShotHead(nn.Module):
    """logits = scale · normalise(features) · weightᵀ; weight (C, D) holds normalised class embeddings."""

    def __init__(self, weight, logit_scale):
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("logit_scale", torch.as_tensor(float(logit_scale)))

    def forward(self, features):
        f = F.normalize(features.float(), dim=-1)
        return self.logit_scale * f @ self.weight.t()


class LinearHead(nn.Module):
    """A frozen linear probe: logits = features · Wᵀ + b."""

    def __init__(self, weight, bias):
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", bias.detach().float().clone())

    def forward(self, features):
        return F.linear(features.float(), self.weight, self.bias)


class NormalizedLinearHead(LinearHead):
    """A frozen linear head on normalised features (the release's ClassificationHead with normalize=True):
    logits = normalise(features) · Wᵀ + b."""

    def forward(self, features):
        return F.linear(F.normalize(features.float(), dim=-1), self.weight, self.bias)


HEAD_TYPES = {"ZeroShotHead": ZeroShotHead, "LinearHead": LinearHead, "NormalizedLinearHead": NormalizedLinearHead}


def head_record(head):
    """A head as a run's heads.pt stores it (its type's name and its tensors)."""
    return {"type": type(head).__name__, **{k: v.cpu() for k, v in head.state_dict().items()}}


def read_heads(path, allow_pickle=False):
    """The heads of one file: a run's heads.pt (a list of head records, one per data set), or one pickled
    Linear-like module (the release's head_<Dataset>.pt; allow_pickle=True)."""
    from ..io.checkpoints import is_module_like, read_object
    path = os.fspath(path)
    obj = read_object(path, allow_pickle, what="heads")
    if is_module_like(obj):
        return [_module_head(obj, path)]
    if not isinstance(obj, list) or not obj or not all(isinstance(h, dict) and h.get("type") in HEAD_TYPES
                                                       for h in obj):
        raise ValueError(f"{path}: neither a heads.pt of an adapt run (a list of heads) nor a pickled "
                         f"classification head (found {type(obj).__name__})")
    try:
        return [ZeroShotHead(h["weight"], h["logit_scale"]) if h["type"] == "ZeroShotHead"
                else HEAD_TYPES[h["type"]](h["weight"], h["bias"]) for h in obj]
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: a damaged heads file ({type(e).__name__}: {e})") from e


def _module_head(obj, path):
    from ..io.checkpoints import module_state_dict
    sd = module_state_dict(obj)
    w, b = sd.get("weight"), sd.get("bias")
    if set(sd) != {"weight", "bias"} or w.ndim != 2 or b.shape != (w.shape[0],):
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        raise ValueError(f"{path}: not a classification head (a Linear's weight (classes × dim) and bias); "
                         f"it holds {shapes}")
    normalize = getattr(obj, "normalize", False)
    if not isinstance(normalize, bool):
        raise ValueError(f"{path}: the head's `normalize` is {normalize!r}, not True or False")
    return (NormalizedLinearHead if normalize else LinearHead)(w, b)


def _head_cache_key(fingerprint, templates, classnames):
    blob = json.dumps({"model": fingerprint, "templates": list(templates), "classes": list(classnames)})
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@torch.no_grad()
def text_embeddings(clip, tokenizer, classnames, templates, batch_size=256, device=None, progress=True):
    """(C, D): per class, the normalised mean of the normalised embeddings of its prompts (one pass)."""
    from tqdm.auto import tqdm
    device = device or next(clip.parameters()).device
    prompts = [t.format(c) for c in classnames for t in templates]
    chunks = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="text head", disable=not progress, leave=False):
        tokens = tokenizer(prompts[i:i + batch_size]).to(device)
        chunks.append(F.normalize(clip.encode_text(tokens).float(), dim=-1))
    emb = torch.cat(chunks).view(len(classnames), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1).cpu()


def zero_shot_head(clip, tokenizer, classnames, templates=DEFAULT_TEMPLATES, cache_dir=None, model_id=None,
                   progress=True):
    """A ZeroShotHead for `classnames`, read from `cache_dir` when it holds one for the same text weights,
    templates and class names, else computed with the text tower and cached there (atomic write).
    `model_id` names the weights (e.g. architecture + checkpoint path); by default they are hashed."""
    if not hasattr(clip, "encode_text"):
        raise ValueError("zero-shot head: the model has no text tower; use a linear probe (head='linear')")
    classnames, templates = list(classnames), list(templates)
    logit_scale = clip.logit_scale.detach().exp().item()
    path = None
    if cache_dir is not None:
        from .models import model_fingerprint
        if model_id is None:
            text_part = nn.ModuleDict({k: m for k, m in clip.named_children() if k != "visual"})
            model_id = model_fingerprint(text_part)
        os.makedirs(cache_dir, exist_ok=True)
        path = os.path.join(cache_dir, f"head-{_head_cache_key(model_id, templates, classnames)}.pt")
        if os.path.isfile(path):
            try:
                cached = torch.load(path, map_location="cpu", weights_only=True)
                return ZeroShotHead(cached["weight"], cached["logit_scale"])
            except Exception:
                pass  # a damaged cache entry is recomputed and replaced
    weight = text_embeddings(clip, tokenizer, classnames, templates, progress=progress)
    if path is not None:
        torch_save(path, {"weight": weight, "logit_scale": logit_scale, "classes": classnames,
                          "templates": templates})
    return ZeroShotHead(weight, logit_scale)


def fit_linear_probe(features, labels, num_classes, weight_decay=1e-4, steps=300, seed=0):
    """A LinearHead fitted by full-batch L-BFGS (multinomial logistic regression) on fixed features."""
    g = torch.Generator().manual_seed(seed)
    features, labels = features.float(), labels.long()
    mean_norm = features.norm(dim=1).mean().clamp_min(1e-6)
    x = features / mean_norm
    lin = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 1e-3)
        lin.bias.zero_()
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), labels) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LinearHead(lin.weight.detach() / mean_norm, lin.bias.detach())


class Classifier(nn.Module):
    """An image encoder (the composed tower) followed by a frozen head."""

    def __init__(self, encoder, head):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, images):
        return self.head(self.encoder(images))
