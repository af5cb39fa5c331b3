"""Atomic, resumable training checkpoints: coefficients, optimiser, schedule, RNG, step and history, and the
record of what the run trains on, which a resume must find unchanged.

The record (run_record) names the inputs by their contents, never by their paths: the bank by its fingerprint
(fingerprint.py; the same bank rebuilt from moved checkpoints is the same bank), θ0 by a SHA-256 of the composed
model's tensors, each data set by a SHA-256 of its images' names (relative to the folder) and classes, its class
list, its train and validation indices (so shots, val_fraction and the split seed take part) and the fingerprint of
its head's tensors (templates and class names take part; to rounding: a head computed again may differ in its last
bits), and the coefficient layout. The settings that change the result are
compared apart (TrainConfig.result_fields). A checkpoint written before checkpoints had a record resumes with a
warning that nothing of this could be checked.
"""
import hashlib
import os
import random
import warnings

import numpy as np
import torch
from torch.utils.data import ConcatDataset

from ..bank import fingerprint
from ..io.atomic import atomic_write
from .data import ImageFolderData, dataset_targets

FORMAT = "atlas_fast.adapt_checkpoint/1"
CHECKPOINT = "checkpoint.pt"


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def torch_save(path, obj):
    """torch.save to `path` atomically (through an open file: torch's writer rejects some temp names)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    atomic_write(path, write)


def save(path, state):
    """Write a checkpoint (a temporary file renamed over `path`: a crash leaves the previous one)."""
    state = {"format": FORMAT, **state, "rng": rng_state()}
    torch_save(path, state)


def load(path):
    """A checkpoint written by save(). Its RNG state is restored by the caller (set_rng_state)."""
    path = os.fspath(path)
    try:
        # Optimiser and RNG states hold plain Python and NumPy objects; the file is this package's own.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path}: unreadable training checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not an atlas_fast training checkpoint")
    return state


def tensors_digest(tensors):
    """SHA-256 (hex) of named tensors: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        v = tensors[name].detach()
        h.update(f"{name}|{v.dtype}|{tuple(v.shape)}|".encode())
        if v.numel():
            h.update(v.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_digest(data):
    """SHA-256 (hex) of what a data set holds: its images' names relative to its folder and their classes (an
    ImageFolderData, or a ConcatDataset of them), else its type, length and targets."""
    h = hashlib.sha256()
    parts = data.datasets if isinstance(data, ConcatDataset) else [data]
    for part in parts:
        if isinstance(part, ImageFolderData):
            h.update("folder|".encode())
            for path, target in part.samples:
                h.update(f"{os.path.relpath(path, part.root)}|{target}\n".encode())
        else:
            h.update(f"{type(part).__name__}|{len(part)}|{dataset_targets(part)}\n".encode())
    return h.hexdigest()


def head_fingerprint(head):
    """(tensor names, their sizes, their fingerprint (1, H, 2 + S)) of a head: compared to rounding, since a head
    computed again (a linear probe fitted anew, a zero-shot head on another device) may differ in its last bits."""
    state = {k: v.detach().to(torch.float64) for k, v in sorted(head.state_dict().items())}
    return (list(state), [v.numel() for v in state.values()],
            fingerprint.fingerprint(v.reshape(1, -1) for v in state.values()))


def _indices_digest(indices):
    return hashlib.sha256(",".join(map(str, indices)).encode()).hexdigest()


def run_record(atlas, tasks, coef_key):
    """What a run learns from, by contents: see the module's docstring. coef_key: the composed model's
    coefficient entry, left out of θ0."""
    theta0 = {k: v for k, v in atlas.state_dict().items() if k != coef_key}
    a = atlas.atlas
    return {"bank": atlas.bank_fingerprint().clone(), "bank_blocks": list(atlas.block_names),
            "bank_sources": list(atlas.sources), "layout": [a.granularity, a.partitions, a.seed],
            "theta0": tensors_digest(theta0),
            "tasks": [{"name": t.name, "classes": list(t.classes), "data": data_digest(t.data),
                       "train": [len(t.train), _indices_digest(t.train)], "val": [len(t.val), _indices_digest(t.val)],
                       "head": head_fingerprint(t.head), "finetuned_accuracy": t.finetuned_accuracy}
                      for t in tasks]}


def _short(value):
    """A value for an error line: a digest by its first 12 hex digits, anything long cut at 80 characters."""
    text = (value[:12] if len(value) == 64 else value) if isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def record_mismatch(saved, ours, atlas, allow_bank_mismatch=False):
    """None when a resume may continue (`saved` of the checkpoint, `ours` of this run), else one line naming
    the first item that differs, then and now."""
    for key, what in (("layout", "coefficient layout (granularity, partitions, seed)"),
                      ("theta0", "θ0 (the model's tensors)")):
        if saved[key] != ours[key]:
            return f"{what} differs: {_short(saved[key])} then, {_short(ours[key])} now"
    if not allow_bank_mismatch:
        if saved["bank_blocks"] != ours["bank_blocks"]:
            return f"the bank's blocks differ: {_short(saved['bank_blocks'])} then, {_short(ours['bank_blocks'])} now"
        problem = atlas.bank_mismatch(saved["bank"], saved["bank_sources"])
        if problem is not None:
            return f"another bank: {problem} (allow_bank_mismatch=True, --allow-bank-mismatch, resumes anyway)"
    if len(saved["tasks"]) != len(ours["tasks"]):
        return f"the data sets differ: {len(saved['tasks'])} then, {len(ours['tasks'])} now"
    items = (("name", "name"), ("classes", "class list"), ("data", "images (names and classes)"),
             ("train", "training images (count, indices: shots, seed, val_fraction)"),
             ("val", "validation images (count, indices: val_fraction, split seed)"),
             ("finetuned_accuracy", "finetuned_accuracy"))
    for i, (then, now) in enumerate(zip(saved["tasks"], ours["tasks"])):
        for key, what in items:
            if then[key] != now[key]:
                a, b = then[key], now[key]
                if key in ("train", "val"):
                    a, b = f"{a[0]} images {a[1][:12]}", f"{b[0]} images {b[1][:12]}"
                return f"data set {i} ({then['name']!r}): {what} differs: {_short(a)} then, {_short(b)} now"
        problem = _head_mismatch(then["head"], now["head"])
        if problem is not None:
            return f"data set {i} ({then['name']!r}): the head (class names, templates, head type) differs: {problem}"
    return None


def _head_mismatch(saved, ours):
    (names0, numels0, fp0), (names1, numels1, fp1) = saved, ours
    if (names0, numels0) != (names1, numels1):
        return f"tensors {names0} of sizes {numels0} then, {names1} of sizes {numels1} now"
    return fingerprint.mismatch(fp0, fp1, names1, ["head"], numels1)


def check_resume(path, state, ours, atlas, allow_bank_mismatch=False):
    """Raise a one-line ValueError when the checkpoint at `path` was written for other inputs than `ours`;
    warn when it has no record (written before checkpoints kept one)."""
    saved = state.get("record")
    if saved is None:
        warnings.warn(f"{path}: written without a record of its bank, θ0 and data (an older checkpoint); resuming "
                      f"without checking that they are the same", stacklevel=3)
        return
    problem = record_mismatch(saved, ours, atlas, allow_bank_mismatch)
    if problem is not None:
        raise ValueError(f"{path}: written for other inputs: {problem}; resume with the same inputs or use another "
                         f"output folder")
