"""Many data sets ("streams": corruptions, cameras, sites, clients), one coefficient set each, learned together:
every step is one grouped forward/backward (AtlasModel.groups) over a batch mixing the streams, each stream's
loss, optimiser state, clipping and schedule its own (online.StreamCoefficients), so every stream ends where a
separate run on it alone ends, to float32 rounding.

    adapt_streams(...)   epoch mode, as adapt() per stream: entropy, ufm or ce (k shots per stream); stream s runs
                         its own number of steps (epochs × its own steps per epoch) with its own seeded batches,
                         views and warm-up/cosine schedule, is evaluated at the end of each of its own epochs and
                         dropped from the mixed batch after its last step
    adapt_online(...)    online test-time adaptation: each stream's images in their order, one pass, batch_size of
                         each stream per step; every batch is predicted with the current coefficients, then used
                         for one update (online.OnlineTTA); the accuracy is that of these predictions

Each writes, per stream, <out>/<stream>/coefficients.safetensors, summary.json and coefficients.png (epoch mode
also log.jsonl and curves.png), and <out>/summary.json over the streams; online mode also <out>/predictions.jsonl
(stream, sample, prediction, confidence, label) and <out>/running_accuracy.png. Stream folders are named by
position and data set name (00_fog, 01_snow, ...), so a run of one stream writes where stream 0 of a run of
several does.

Under torchrun (distributed.py) each process owns a contiguous share of the streams, runs their grouped steps
alone and sends its results to rank 0, which writes the files above as one process writes them; more processes
than streams are refused. Online predictions are held in memory (a line of JSON per image) until the end, when
rank 0 writes predictions.jsonl in one process's order: step by step, streams in order within a step.
"""
import json
import math
import os
import time
from dataclasses import asdict, fields

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.dataloader import default_collate

from ..io.atomic import write_text
from . import distributed
from .api import prepare_job
from .data import DataError, StreamBatches, ViewData, mix_seed, stream_batch_size
from .inputs import as_list
from .loop import Task, TrainConfig, autocast_for, evaluate_tasks, make_classify, schedule
from .objectives import entropy, get_objective
from .online import OnlineTTA, StreamCoefficients, grouped_logits
from .plots import coefficient_summary, plot_coefficients, plot_curves, plot_running_accuracy

OBJECTIVES = ("entropy", "ufm", "ce")
ONLINE_OBJECTIVES = ("entropy", "pseudo", "ufm")        # ufm online: its confident pseudo-label term


class MixedData(Dataset):
    """Items of several ViewData addressed as (stream, slot, position, augmentation seed): one loader (and one
    set of worker processes) feeds every stream."""

    def __init__(self, views):
        self.views = views                       # {(stream, slot): ViewData}

    def __len__(self):
        return sum(len(v) for v in self.views.values())

    def __getitem__(self, item):
        s, k, pos, seed = item
        return (s, k), self.views[(s, k)][(pos, seed)]


def collate_by_stream(items):
    """{(stream, slot): the collated batch of that stream's items, in their order}."""
    groups = {}
    for key, item in items:
        groups.setdefault(key, []).append(item)
    return {key: default_collate(batch) for key, batch in groups.items()}


class MixedBatches:
    """The batch sampler of a mixed run: step t holds every (stream, slot) sampler's step-t batch, for the
    samplers that have one. samplers: {(stream, slot): an iterable of lists of (position, seed)}."""

    def __init__(self, samplers, steps):
        self.samplers, self.steps = samplers, steps

    def __iter__(self):
        its = {key: iter(s) for key, s in self.samplers.items()}
        for _ in range(self.steps):
            batch = []
            for (s, k), it in list(its.items()):
                items = next(it, None)
                if items is None:
                    del its[(s, k)]
                    continue
                batch += [(s, k, pos, seed) for pos, seed in items]
            yield batch

    def __len__(self):
        return self.steps


class InOrder:
    """Positions of a subset of `size` in order, `batch_size` at a time (one pass): an online stream."""

    def __init__(self, size, batch_size):
        self.size, self.batch_size = size, batch_size

    def __iter__(self):
        for start in range(0, self.size, self.batch_size):
            yield [(p, 0) for p in range(start, min(start + self.batch_size, self.size))]

    def __len__(self):
        return math.ceil(self.size / self.batch_size)


def mixed_loader(views, samplers, steps, workers=0, pin=False):
    return DataLoader(MixedData(views), batch_sampler=MixedBatches(samplers, steps), collate_fn=collate_by_stream,
                      num_workers=workers, pin_memory=pin)


def stream_dirs(specs):
    """<position>_<data set name>, one per stream, unique and usable as a folder name."""
    return [f"{s:02d}_{spec.name.replace('/', '_').replace(os.sep, '_')}" for s, spec in enumerate(specs)]


def _save_stream(atlas, coef, folder, summary, history=None, names=None):
    """Stream files: coefficients.safetensors (through the AtlasModel, so the file carries its layout and bank),
    summary.json, coefficients.png, and with a history log.jsonl and curves.png."""
    os.makedirs(folder, exist_ok=True)
    with torch.no_grad():
        atlas.coefficients.copy_(coef)
    atlas.save_coefficients(os.path.join(folder, "coefficients.safetensors"))
    write_text(os.path.join(folder, "summary.json"), json.dumps(summary, indent=1))
    plot_coefficients(coef, atlas.block_names, atlas.sources, os.path.join(folder, "coefficients.png"))
    if history is not None:
        write_text(os.path.join(folder, "log.jsonl"), "".join(json.dumps(h) + "\n" for h in history))
        plot_curves(history, names, os.path.join(folder, "curves.png"))


# ---------------------------------------------------------------- epoch mode

def _grouped_losses(objective, atlas, heads, batches, active, cfg, ctx):
    """Per active stream, its objective's loss on its batch (as the objective's own loss() on that stream alone),
    all streams in one grouped forward (ufm: one without gradient for the pseudo-labels, then one)."""
    device = atlas.coefficients.device

    def logits(images, sizes, coef):
        index = torch.cat([torch.full((n,), g, dtype=torch.int64) for g, n in enumerate(sizes)]).to(device)
        return grouped_logits(atlas, [heads[s] for s in active], torch.cat(images).to(device), index, coef, ctx)

    def run(coef):
        if objective == "ufm":
            weak = [batches[(s, 0)][0] for s in active]
            with torch.no_grad():
                pseudo = [F.softmax(lg, -1).max(-1) for lg in logits(weak, [len(w) for w in weak], coef.detach())]
            inputs = [torch.cat([batches[(s, 0)][1], batches[(s, 1)][0]]) for s in active]
            out = []
            for s, lg, (conf, label) in zip(active, logits(inputs, [len(x) for x in inputs], coef), pseudo):
                n, t_label = len(conf), batches[(s, 1)][1].to(device)
                mask = (conf >= cfg.threshold).float()
                out.append((F.cross_entropy(lg[:n], label, reduction="none") * mask).mean()
                           + F.cross_entropy(lg[n:], t_label))
            return out
        xs = [batches[(s, 0)][0] for s in active]
        out = logits(xs, [len(x) for x in xs], coef)
        if objective == "entropy":
            return [entropy(lg).mean() for lg in out]
        return [F.cross_entropy(lg, batches[(s, 0)][1].to(device)) for s, lg in zip(active, out)]
    return run


def adapt_streams(model, bank, data, objective="entropy", out="atlas_out", pretrained=None, classnames=None,
                  templates=None, shots=None, head="zeroshot", granularity="block", partitions=1, backend="auto",
                  device=None, val_fraction=0.2, split_seed=0, preprocess=None, cache_dir=None, heads=None,
                  offload=False, allow_pickle=False, **options):
    """One coefficient set per data set of `data` (a list of S folders / data sets), learned together with
    `objective` (entropy, ufm, or ce with `shots` per class of each), each exactly as adapt() would learn it on that
    data set alone with the same options (TrainConfig fields). Returns the summary dict (also <out>/summary.json).
    Under torchrun every process calls it with the same arguments and learns its share of the streams
    (distributed.py); every process returns the whole summary."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"adapt_streams: unknown option(s) {', '.join(unknown)}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: one coefficient set per stream learns with "
                         f"{', '.join(OBJECTIVES)}")
    cfg = TrainConfig(objective=objective, **options)
    cfg.validate()
    distributed.check_streams(_count(data), "per-stream")
    job = prepare_job(model, bank, data, out, pretrained=pretrained, classnames=classnames, templates=templates,
                      head=head, labelled=objective == "ce", shots=shots, seed=cfg.seed, granularity=granularity,
                      partitions=partitions, backend=backend, device=device, val_fraction=val_fraction,
                      split_seed=split_seed, preprocess=preprocess, cache_dir=cache_dir, heads=heads, offload=offload,
                      progress=cfg.progress, allow_pickle=allow_pickle)
    atlas, pre = job.atlas, job.loaded.preprocess
    obj = get_objective(objective)
    select = cfg.select or obj.select
    device = atlas.coefficients.device
    ranks = distributed.ranks(device, distributed.STREAMS_TIMEOUT)
    # this process's streams; s below counts them, a stream's batches and seeds do not depend on its position
    own = ranks.share(list(range(len(job.specs))))
    tasks = [Task(job.specs[g].name, job.specs[g].data, job.specs[g].names, job.heads[g], job.train[g],
                  job.specs[g].val) for g in own]
    S = len(tasks)
    with torch.no_grad():
        atlas.coefficients.fill_(cfg.init)
    atlas.eval()
    classify = [make_classify(atlas, [t], device, cfg.amp) for t in tasks]
    initial = [evaluate_tasks(classify[s], [t], pre, cfg) for s, t in enumerate(tasks)]
    slots = [obj.streams([t], cfg, pre, obj.prepare(classify[s], [t], cfg, {}, pre)) for s, t in enumerate(tasks)]
    spe = [cfg.steps_per_epoch or math.ceil(len(t.train) / cfg.batch_size) for t in tasks]
    totals = [cfg.epochs * n for n in spe]
    coef = StreamCoefficients(atlas, S, cfg.lr, cfg.weight_decay, cfg.grad_clip, init=cfg.init,
                              schedules=[schedule(n, round(cfg.warmup * n)) for n in totals])
    views, samplers = {}, {}
    for s, streams in enumerate(slots):
        for k, (view, bs) in enumerate(streams):
            views[(s, k)] = view
            samplers[(s, k)] = StreamBatches(len(view), stream_batch_size(view, bs), mix_seed(cfg.seed, 7, k), 0,
                                             totals[s])
    history = [[{"epoch": 0, "step": 0, "loss": None, "eval": initial[s],
                 "score": obj.score(initial[s], initial[s], [t], cfg)}] for s, t in enumerate(tasks)]
    best = [{"epoch": 0, "score": history[s][0]["score"], "coefficients": coef.rows[s].detach().clone()}
            for s in range(S)]
    epoch_loss = [[0.0, 0] for _ in range(S)]
    ctx = autocast_for(device, cfg.amp)
    from tqdm.auto import tqdm
    bar = tqdm(total=max(totals), desc=f"adapt {_streams_label(own, len(job.specs))} ({objective})",
               disable=not (cfg.progress and ranks.main))
    started, seen = time.time(), 0
    loader = mixed_loader(views, samplers, max(totals), cfg.workers, device.type == "cuda")
    for step, batches in enumerate(loader):
        active = [s for s in range(S) if step < totals[s]]
        losses = _grouped_losses(objective, atlas, [t.head for t in tasks], batches, active, cfg, ctx)(
            coef.stacked(active))
        torch.stack(losses).sum().backward()
        values = [loss.item() for loss in losses]
        for s, v in zip(active, values):
            if not math.isfinite(v):
                raise FloatingPointError(f"step {step}: stream {tasks[s].name}: the {objective} loss is {v}; "
                                         f"lower lr={cfg.lr}")
        coef.step(active)
        seen += sum(len(b[0]) for b in batches.values())
        for s, v in zip(active, values):
            epoch_loss[s][0] += v
            epoch_loss[s][1] += 1
            if (step + 1) % spe[s] == 0:
                _end_epoch(s, step + 1, (step + 1) // spe[s], tasks, classify, pre, cfg, obj, coef, atlas, history,
                           best, epoch_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{sum(values) / len(values):.4f}", streams=len(active),
                        img_s=f"{seen / max(time.time() - started, 1e-9):.1f}")
    bar.close()
    seconds = time.time() - started
    results = [{"history": history[s],
                "selected_epoch": best[s]["epoch"] if select == "best" else history[s][-1]["epoch"],
                "coefficients": (best[s]["coefficients"] if select == "best" else coef.rows[s].detach()).cpu()}
               for s in range(S)]
    return _finish_streams(atlas, job, cfg, out, ranks.all_gather(results), select,
                           max(ranks.all_gather([seconds])), ranks)


def _count(data):
    """The number of data sets (streams) in `data`, as prepare_job reads it."""
    return 1 if isinstance(data, (str, os.PathLike)) else len(as_list(data))


def _streams_label(own, total):
    return f"{total} streams" if len(own) == total else f"streams {own[0]}-{own[-1]} of {total}"


def _end_epoch(s, step, epoch, tasks, classify, pre, cfg, obj, coef, atlas, history, best, epoch_loss):
    with torch.no_grad():
        atlas.coefficients.copy_(coef.rows[s])
    evals = evaluate_tasks(classify[s], [tasks[s]], pre, cfg)
    score = obj.score(evals, history[s][0]["eval"], [tasks[s]], cfg)
    n = max(epoch_loss[s][1], 1)
    history[s].append({"epoch": epoch, "step": step, "loss": epoch_loss[s][0] / n, "eval": evals, "score": score,
                       "lr": coef.opt.param_groups[s]["lr"]})
    epoch_loss[s][:] = [0.0, 0]
    if score is not None and (best[s]["score"] is None or score > best[s]["score"]):
        best[s] = {"epoch": epoch, "score": score, "coefficients": coef.rows[s].detach().clone()}


def _finish_streams(atlas, job, cfg, out, results, select, seconds, ranks):
    """The summary of every stream from `results` (one {history, selected_epoch, coefficients} per stream of the
    run, in order); rank 0 writes the files."""
    rows = []
    for sp, r, folder in zip(job.specs, results, stream_dirs(job.specs)):
        h, chosen = r["history"], r["selected_epoch"]
        rows.append({"stream": sp.name, "folder": folder, "steps": h[-1]["step"], "selected_epoch": chosen,
                     "initial_accuracy": h[0]["eval"][0]["accuracy"], "accuracy": h[chosen]["eval"][0]["accuracy"],
                     "n": h[chosen]["eval"][0]["n"]})
    summary = {"mode": "streams", "objective": cfg.objective, "select": select, "streams": rows,
               "config": asdict(cfg), "processes": ranks.world, "train_seconds": seconds}
    if not ranks.main:
        return summary
    os.makedirs(out, exist_ok=True)
    start = atlas.coefficients.detach().clone()
    for sp, r, folder in zip(job.specs, results, stream_dirs(job.specs)):
        h, chosen, c = r["history"], r["selected_epoch"], r["coefficients"]
        stream_summary = {"objective": cfg.objective, "select": select, "selected_epoch": chosen, "tasks": [sp.name],
                          "initial": h[0]["eval"], "selected": h[chosen]["eval"], "last": h[-1]["eval"],
                          "coefficients": coefficient_summary(c), "sources": list(atlas.sources),
                          "config": asdict(cfg)}
        _save_stream(atlas, c, os.path.join(out, folder), stream_summary, h, [sp.name])
    with torch.no_grad():
        atlas.coefficients.copy_(start)
    write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=1))
    return summary


# ---------------------------------------------------------------- online mode

def adapt_online(model, bank, data, objective="entropy", out="atlas_out", batch_size=32, lr=1e-3, weight_decay=0.0,
                 grad_clip=1.0, episodic=False, threshold=0.9, amp="auto", split="all", pretrained=None,
                 classnames=None, templates=None, head="zeroshot", granularity="block", partitions=1,
                 backend="auto", device=None, val_fraction=0.2, split_seed=0, preprocess=None, cache_dir=None,
                 heads=None, offload=False, workers=0, progress=True, allow_pickle=False):
    """Online test-time adaptation of each data set of `data` (one stream each): its images of `split` ("all",
    "train" or "val") in data-set order, `batch_size` of every stream per step, predicted then used for one
    update with `objective` ("entropy", or "pseudo" (alias "ufm"): UFM's confident pseudo-labels at `threshold`,
    with no strong view and no trusted set, which need the whole data set first). The labels are
    read only to count the accuracy. Returns the summary dict (also <out>/summary.json). Under torchrun every
    process calls it with the same arguments and adapts its share of the streams (distributed.py)."""
    if objective not in ONLINE_OBJECTIVES:
        raise ValueError(f"objective={objective!r}: online adaptation learns with {', '.join(ONLINE_OBJECTIVES)}")
    if split not in ("all", "train", "val"):
        raise ValueError(f"split={split!r}: expected all, train or val")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected a positive batch size")
    distributed.check_streams(_count(data), "online")
    job = prepare_job(model, bank, data, out, pretrained=pretrained, classnames=classnames, templates=templates,
                      head=head, granularity=granularity, partitions=partitions, backend=backend, device=device,
                      val_fraction=val_fraction, split_seed=split_seed, preprocess=preprocess, cache_dir=cache_dir,
                      heads=heads, offload=offload, progress=progress, allow_pickle=allow_pickle)
    atlas = job.atlas
    ranks = distributed.ranks(atlas.coefficients.device, distributed.STREAMS_TIMEOUT)
    own = ranks.share(list(range(len(job.specs))))      # this process's streams; s below counts them
    specs = [job.specs[g] for g in own]
    order = {"all": lambda sp: list(range(len(sp.data))), "train": lambda sp: sp.train, "val": lambda sp: sp.val}
    if any(len(order[split](sp)) == 0 for sp in job.specs):
        raise DataError(f"split={split!r}: a data set has no images there")
    views = {(s, 0): ViewData(sp.data, order[split](sp), job.loaded.preprocess) for s, sp in enumerate(specs)}
    samplers = {key: InOrder(len(v), batch_size) for key, v in views.items()}
    steps = max(len(s) for s in samplers.values())
    tta = OnlineTTA(atlas, [job.heads[g] for g in own], objective, len(specs), lr, weight_decay, grad_clip, episodic,
                    amp, threshold)
    correct, seen, curves = [0] * len(specs), [0] * len(specs), [[] for _ in specs]
    lines = [[] for _ in specs]          # per stream, per step of it: its predictions.jsonl lines of that batch
    paths = [_sample_paths(sp.data) for sp in specs]
    from tqdm.auto import tqdm
    bar = tqdm(total=steps, desc=f"online {_streams_label(own, len(job.specs))} ({objective})",
               disable=not (progress and ranks.main))
    started, images_done = time.time(), 0
    for batches in mixed_loader(views, samplers, steps, workers, atlas.coefficients.device.type == "cuda"):
        keys = sorted(batches)
        images = torch.cat([batches[k][0] for k in keys])
        ids = torch.cat([torch.full((len(batches[k][0]),), k[0], dtype=torch.int64) for k in keys])
        result = tta.step(images, ids)
        labels = torch.cat([batches[k][1] for k in keys])
        samples = torch.cat([batches[k][2] for k in keys])
        batch_lines = {}
        for n, (s, y, i) in enumerate(zip(ids.tolist(), labels.tolist(), samples.tolist())):
            pred = int(result.labels[n])
            correct[s] += pred == y
            seen[s] += 1
            row = {"stream": specs[s].name, "sample": i, "prediction": pred,
                   "class": specs[s].names[pred] if pred < len(specs[s].names) else None,
                   "confidence": float(result.confidence[n]), "label": y}
            if paths[s] is not None:
                row["path"] = paths[s][i]
            batch_lines.setdefault(s, []).append(json.dumps(row) + "\n")
        for s, text in batch_lines.items():
            lines[s].append("".join(text))
            curves[s].append((seen[s], correct[s] / seen[s]))
        images_done += len(ids)
        bar.update(1)
        bar.set_postfix(acc=f"{sum(correct) / max(sum(seen), 1):.3f}",
                        img_s=f"{images_done / max(time.time() - started, 1e-9):.1f}")
    bar.close()
    seconds = max(ranks.all_gather([time.time() - started]))
    results = ranks.all_gather([{"n": seen[s], "correct": correct[s], "updates": tta.steps[s], "curve": curves[s],
                                 "coefficients": tta.coefficients(s).cpu()} for s in range(len(specs))])
    lines = ranks.gather(lines)
    if ranks.main:
        os.makedirs(out, exist_ok=True)
        write_text(os.path.join(out, "predictions.jsonl"), "".join(_step_major(lines)))
    return _finish_online(atlas, job, out, objective, results, seconds, ranks,
                          {"batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "grad_clip": grad_clip,
                           "episodic": episodic, "threshold": threshold, "amp": amp, "split": split})


def _step_major(per_stream):
    """The batches of every stream in the order one process runs them: step by step, streams in order within a
    step (per_stream: per stream, its batches' text in order)."""
    for t in range(max(len(b) for b in per_stream)):
        for batches in per_stream:
            if t < len(batches):
                yield batches[t]


def _sample_paths(data):
    """The image file of each item of an image-folder data set, or None."""
    samples = getattr(data, "samples", None)
    if samples is None and hasattr(data, "datasets"):       # train/ + val/ folders (a ConcatDataset)
        parts = [getattr(d, "samples", None) for d in data.datasets]
        samples = None if any(p is None for p in parts) else [x for p in parts for x in p]
    return None if samples is None else [p for p, _ in samples]


def _finish_online(atlas, job, out, objective, results, seconds, ranks, config):
    """The summary of every stream from `results` (one {n, correct, updates, curve, coefficients} per stream of the
    run, in order); rank 0 writes the files."""
    rows = [{"stream": sp.name, "folder": folder, "n": r["n"], "accuracy": r["correct"] / max(r["n"], 1),
             "updates": r["updates"]} for sp, r, folder in zip(job.specs, results, stream_dirs(job.specs))]
    total = sum(r["n"] for r in results)
    summary = {"mode": "online", "objective": objective, "streams": rows,
               "accuracy": sum(r["correct"] for r in results) / max(total, 1), "n": total, "processes": ranks.world,
               "seconds": seconds, "images_per_second": total / max(seconds, 1e-9), "config": config}
    if not ranks.main:
        return summary
    start = atlas.coefficients.detach().clone()
    for row, r in zip(rows, results):
        c = r["coefficients"]
        _save_stream(atlas, c, os.path.join(out, row["folder"]),
                     {**row, "objective": objective, "coefficients": coefficient_summary(c),
                      "sources": list(atlas.sources), "config": config})
    with torch.no_grad():
        atlas.coefficients.copy_(start)
    plot_running_accuracy({sp.name: r["curve"] for sp, r in zip(job.specs, results)},
                          os.path.join(out, "running_accuracy.png"))
    write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=1))
    return summary


__all__ = ["adapt_streams", "adapt_online", "stream_dirs"]
