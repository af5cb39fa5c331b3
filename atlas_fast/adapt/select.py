"""Block selection: the `keep` most informative task vectors of each block, as a bank of `keep` instead of T.

Each (task vector t, block b) is scored by |∂L/∂c[t, b]| at c = 0, L the cross-entropy of θ0 composed with the
bank through the task's head over a few labelled batches. Slot j of the new bank holds, in every block b, the
τ_t,b of the task vector ranked j-th for that block, so a bank of keep "mixed" task vectors composes as any
other (θ_b(c) = θ0_b + Σ_j c[j, b] τ_{rank_j(b)},b). Random selection builds the same structure from a seeded
random choice per block, as the baseline it is compared with.

    sel = select_blocks("ViT-B-32", "bank.safetensors", "data/cars", keep=2, pretrained="zs.pt", shots=16,
                        out="bank_cars_b2.safetensors")     # also writes bank_cars_b2.selection.json
    adapt("ViT-B-32", "bank_cars_b2.safetensors", "data/cars", pretrained="zs.pt", shots=16)
"""
import json
import os
from dataclasses import dataclass, field

import torch

from ..bank.task_vectors import TaskVectors
from ..io.atomic import write_text
from .data import DataError, dataset_targets, few_shot_indices, mix_seed, stream_loader
from .inputs import (
    as_list,
    bank_label,
    compose_bank,
    data_sources,
    heads_from_files,
    load_bank,
    load_model,
    load_specs,
    make_heads,
    resolve_device,
)
from .loop import Task, TrainConfig, make_classify
from .objectives import get_objective

FORMAT = "atlas_fast.selection/1"
METHODS = ("gradient", "random")


@dataclass
class Selection:
    """The selected bank (sources select0 .. select{keep-1}) and its record: per block, the original task
    vector in each slot and (gradient selection) every task vector's score."""
    bank: TaskVectors = field(repr=False)
    record: dict

    def chosen(self):
        """(B, keep) int64: the original task vector held by each block's slots."""
        return torch.tensor([b["chosen"] for b in self.record["blocks"]], dtype=torch.int64)

    def scores(self):
        """(T, B) float64 scores in the coefficients' layout, or None for random selection."""
        if self.record["method"] != "gradient":
            return None
        return torch.tensor([b["scores"] for b in self.record["blocks"]], dtype=torch.float64).t()


def selection_path(bank_path):
    """Where the record of a selected bank is written: beside it, <name>.selection.json."""
    root, ext = os.path.splitext(os.fspath(bank_path))
    return (root if ext == ".safetensors" else os.fspath(bank_path)) + ".selection.json"


def select_blocks(model, bank, data=None, keep=1, method="gradient", out=None, pretrained=None, classnames=None,
                  templates=None, shots=None, batches=4, batch_size=32, head="zeroshot", heads=None, seed=0,
                  backend="auto", device=None, val_fraction=0.2, split_seed=0, preprocess=None, cache_dir=None,
                  amp="auto", workers=0, progress=True, allow_pickle=False):
    """Keep the `keep` best task vectors of each block of `bank` for `model` on labelled `data`.

    method "gradient": score[t, b] = |∂L/∂c[t, b]| at c = 0, where L is the mean over `batches` batches of
    `batch_size` training images (the `shots` per class adapt() would train on with the same seed) of the
    cross-entropy through each data set's head (several data sets: their mean, as adapt's "ce"). The gradient
    is accumulated over the batches before its absolute value is taken: the score is the magnitude of the
    gradient of the loss over all scoring images, i.e. the first-order change of that loss per unit of
    c[t, b]. Summing per-batch magnitudes instead would add the batches' noise (signs that cancel in the
    full gradient) to every score, favouring task vectors whose effect is erratic rather than consistent.
    Ties keep the lower task index first. method "random": a seeded random choice of `keep` task vectors
    per block; no data is read.

    The new bank holds the blocks the model composes (bank entries naming buffers are left out), in the
    original bank's dtype. out: write it there (.safetensors) and its record to selection_path(out), both
    atomically. A module passed as `model` is composed for scoring and left as it was. heads: head files
    instead of `head` (as for adapt); allow_pickle: read pickled θ0 and head files.
    Returns a Selection (bank, record).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {', '.join(METHODS)}")
    for name, value in (("batches", batches), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive int")
    cfg = TrainConfig(objective="ce", batch_size=batch_size, seed=seed, amp=amp, workers=workers, progress=progress)
    cfg.validate()
    device = resolve_device(device)
    label = bank_label(bank)
    bank = load_bank(bank, device)
    T = len(bank)
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= T:
        raise ValueError(f"keep={keep!r}: expected an int with 1 <= keep <= {T} (the bank's task vectors)")
    sources = data_sources(data)
    if method == "gradient" and not sources:
        raise DataError("data: gradient selection scores on labelled data; none given")
    loaded = load_model(model, pretrained, preprocess, device, allow_pickle)
    atlas = compose_bank(loaded, bank, label, backend=backend)
    try:
        blocks = atlas.block_names
        if method == "gradient":
            tasks = _labelled_tasks(loaded, sources, classnames, templates, shots, head, heads, cfg, device,
                                    val_fraction, split_seed, cache_dir, allow_pickle)
            scores = _gradient_scores(atlas, tasks, loaded.preprocess, cfg, batches)
            chosen = torch.sort(scores, dim=0, descending=True, stable=True).indices[:keep].t()
        else:
            scores = None
            g = torch.Generator().manual_seed(mix_seed(seed, 9))
            chosen = torch.stack([torch.randperm(T, generator=g)[:keep] for _ in blocks])
    finally:
        atlas.unwrap()
    selected = TaskVectors({name: bank[name].index_select(0, chosen[b].to(bank[name].device))
                            for b, name in enumerate(blocks)},
                           sources=[f"select{j}" for j in range(keep)], skipped=bank.skipped, check_finite=False)
    settings = {"seed": seed}
    if method == "gradient":
        settings.update(data=[os.fspath(s) if isinstance(s, (str, os.PathLike)) else t.name
                              for s, t in zip(sources, tasks)], shots=shots, batches=batches, batch_size=batch_size,
                        head=head if heads is None else _head_files(heads))
    record = _record(method, keep, label, bank.sources, blocks, chosen, scores, settings)
    result = Selection(selected, record)
    if out is not None:
        save_selection(result, out)
    return result


def _labelled_tasks(loaded, sources, classnames, templates, shots, head, heads, cfg, device, val_fraction,
                    split_seed, cache_dir, allow_pickle):
    """One Task per data set: the labelled training images adapt() would use (same shots and seed) and a head."""
    specs = load_specs(sources, classnames, val_fraction, split_seed)
    train = [few_shot_indices(dataset_targets(s.data), s.train, shots, cfg.seed, s.classes) for s in specs]
    head_list = heads_from_files(heads, specs, loaded, allow_pickle) if heads is not None else make_heads(
        loaded, specs, head, templates, cache_dir, train, device, cfg.progress)
    return [Task(s.name, s.data, s.names, h, tr, s.val) for s, h, tr in zip(specs, head_list, train)]


def _head_files(heads):
    """The head files as the record names them: one path, or a list of several."""
    files = [os.fspath(h) for h in as_list(heads)]
    return files[0] if len(files) == 1 else files


def _gradient_scores(atlas, tasks, preprocess, cfg, batches):
    """(T, B): |Σ over batches of ∂L_batch/∂c| / batches at c = 0, on the composed model."""
    from tqdm.auto import tqdm
    objective = get_objective("ce")
    coef = atlas.coefficients
    device = coef.device      # compose() starts c at zero: the model is θ0
    atlas.eval()
    classify = make_classify(atlas, tasks, device, cfg.amp)
    # the first `batches` steps of the streams adapt() trains on with this seed
    loaders = [stream_loader(data, bs, mix_seed(cfg.seed, 7, k), 0, batches, cfg.workers, device.type == "cuda")
               for k, (data, bs) in enumerate(objective.streams(tasks, cfg, preprocess, {}))]
    total = torch.zeros_like(coef, dtype=torch.float64)
    for step, batch in enumerate(tqdm(zip(*loaders), total=batches, desc="select (gradient)",
                                      disable=not cfg.progress)):
        batch = [[t.to(device, non_blocking=True) for t in b] for b in batch]
        loss, _ = objective.loss(classify, batch, cfg)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"select: the cross-entropy of batch {step} at θ0 is {loss.item()}")
        total += torch.autograd.grad(loss, coef)[0].double()
    return (total / batches).abs().cpu()


def _record(method, keep, bank_name, sources, blocks, chosen, scores, settings):
    T = len(sources)
    first = torch.bincount(chosen[:, 0], minlength=T).tolist()
    kept = torch.bincount(chosen.flatten(), minlength=T).tolist()
    return {"format": FORMAT, "method": method, "keep": keep,
            "bank": os.fspath(bank_name) if isinstance(bank_name, (str, os.PathLike)) else bank_name,
            "sources": list(sources), "slots": [f"select{j}" for j in range(keep)],
            "tasks": [{"source": s, "slot0_blocks": first[t], "kept_blocks": kept[t]}
                      for t, s in enumerate(sources)],
            "blocks": [{"name": name, "chosen": chosen[b].tolist(),
                        **({"scores": scores[:, b].tolist()} if scores is not None else {})}
                       for b, name in enumerate(blocks)],
            "settings": settings}


def save_selection(selection, out):
    """Write the selected bank to `out` and its record to selection_path(out), each atomically.
    Returns (bank path, record path)."""
    out = os.fspath(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    selection.bank.save(out)
    path = selection_path(out)
    write_text(path, json.dumps(selection.record, indent=1))
    return out, path


__all__ = ["select_blocks", "save_selection", "selection_path", "Selection"]
