"""The coefficient-learning loop: AdamW on the coefficients alone, warm-up then cosine schedule, autocast
(bf16 on a GPU), gradient clipping, evaluation and best-epoch selection each epoch, atomic resumable
checkpoints, a JSON-lines log and plots.

A run is a pure function of its config and seed: batches and augmentations are fixed by (seed, step)
(see data.py), so a run killed and resumed from its checkpoint ends exactly where an uninterrupted one does.
Under torchrun the same loop runs data-parallel (distributed.py): each process takes its share of every global
batch, and the coefficients' gradient is all-reduced.
"""
import json
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ..composer.compose import COEF_KEY
from ..errors import OptionError
from ..io.atomic import write_text
from . import checkpoint as ckpt
from . import distributed
from .data import ViewData, mix_seed, stream_batch_size, stream_loader
from .evaluation import classification_metrics
from .objectives import get_objective
from .plots import coefficient_summary, plot_coefficients, plot_curves


@dataclass
class Task:
    """One data set to learn on or evaluate: items (image, class index), its head and its splits."""
    name: str
    data: Dataset
    classes: list
    head: nn.Module
    train: list                       # indices into data used for training (labelled or not)
    val: list                         # indices into data used for evaluation and selection
    finetuned_accuracy: Optional[float] = None   # for normalised accuracy in task addition


@dataclass
class TrainConfig:
    objective: str = "ce"
    epochs: int = 10
    batch_size: int = 32
    steps_per_epoch: Optional[int] = None  # default: one pass over the largest training set
    lr: float = 0.1
    weight_decay: float = 0.0
    warmup: float = 0.1                    # fraction of all steps with a linear warm-up
    grad_clip: float = 1.0
    amp: str = "auto"                      # "auto" (bf16 on a GPU), "bf16", "fp16" or "off"
    seed: int = 0
    init: float = 0.0                      # starting value of every coefficient (0: the model is θ0)
    select: Optional[str] = None           # "best" or "last"; default by objective
    threshold: float = 0.9                 # ufm: pseudo-label confidence threshold
    trusted_per_class: int = 8             # ufm: trusted examples per predicted class
    keep: float = 0.95                     # negation: control accuracy kept, relative to the initial
    control_weight: float = 1.0            # negation: weight of the control task's cross-entropy
    augment: bool = False                  # ce: train on weak augmented views
    flip: bool = True                      # augmentations may flip horizontally
    eval_batch_size: int = 256
    checkpoint_every: int = 0              # also checkpoint every n steps within an epoch (0: epoch ends)
    workers: int = 0
    progress: bool = True

    def result_fields(self):
        """The fields that change the outcome: a checkpoint resumes only under the same values."""
        d = asdict(self)
        for k in ("eval_batch_size", "checkpoint_every", "workers", "progress"):
            d.pop(k)
        return d

    def validate(self):
        checks = [("epochs", self.epochs >= 1), ("batch_size", self.batch_size >= 1), ("lr", 0 < self.lr < math.inf),
                  ("warmup", 0 <= self.warmup < 1), ("threshold", 0 <= self.threshold <= 1),
                  ("trusted_per_class", self.trusted_per_class >= 1), ("keep", 0 <= self.keep <= 1),
                  ("select", self.select in (None, "best", "last")),
                  ("amp", self.amp in ("auto", "bf16", "fp16", "off")),
                  ("steps_per_epoch", self.steps_per_epoch is None or self.steps_per_epoch >= 1),
                  ("checkpoint_every", self.checkpoint_every >= 0), ("workers", self.workers >= 0)]
        for name, ok in checks:
            if not ok:
                raise OptionError(name, getattr(self, name), "invalid value")
        if not math.isfinite(self.init):
            raise OptionError("init", self.init, "expected a finite number (the initial value of every coefficient)")
        get_objective(self.objective)


def autocast_for(device, amp):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if amp == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else nullcontext


def schedule(total, warmup_steps):
    """Linear warm-up to the base rate, then cosine decay to zero at `total` steps."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def make_classify(encoder, tasks, device, amp):
    heads = [t.head.to(device) for t in tasks]
    ctx = autocast_for(device, amp)

    def classify(i, images):
        with ctx():
            features = encoder(images.to(device, non_blocking=True))
        return heads[i](features.float())
    return classify


def evaluate_tasks(classify, tasks, preprocess, cfg, ranks=None):
    share = ranks.share if ranks is not None else list
    return [classification_metrics(lambda x, i=i: classify(i, x), ViewData(t.data, share(t.val), preprocess), cfg,
                                   ranks)
            for i, t in enumerate(tasks)]


def train(atlas, tasks, preprocess, cfg, out, resume=False, on_step=None, allow_bank_mismatch=False):
    """Learn atlas.coefficients on `tasks` with cfg.objective; write checkpoint.pt, log.jsonl,
    coefficients.safetensors (the selected epoch's), summary.json, curves.png and coefficients.png to `out`.

    resume=True continues from out/checkpoint.pt when there is one, whatever the number of processes that wrote
    it: the same settings and the same inputs are required (checkpoint.py: bank, θ0, data, splits, heads), the
    bank's fingerprint excepted with allow_bank_mismatch=True. on_step(step) is called after every optimiser step.
    Returns the summary dict. Under torchrun every process calls train(); cfg.batch_size is the global batch, split
    evenly across them.
    The best epoch is the first of the highest score (a later epoch must score higher to replace it). select="best"
    needs validation images in every task; without them the default selection is the last epoch, with a warning.
    """
    from tqdm.auto import tqdm
    cfg.validate()
    objective = get_objective(cfg.objective)
    objective.check(tasks)
    select = _selection(cfg, objective, tasks)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, ckpt.CHECKPOINT)
    coef = atlas.coefficients
    device = coef.device
    ranks = distributed.ranks(device)
    classify = make_classify(atlas, tasks, device, cfg.amp)
    spe = cfg.steps_per_epoch or math.ceil(max(len(t.train) for t in tasks) / cfg.batch_size)
    total = cfg.epochs * spe
    opt = torch.optim.AdamW([coef], lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(total, round(cfg.warmup * total)))
    atlas.eval()

    resuming = resume and os.path.isfile(path)
    ranks.barrier()  # every process has decided before rank 0 writes a first checkpoint
    record = ckpt.run_record(atlas, tasks, COEF_KEY)
    if resuming:
        state = ckpt.load(path)
        if state["config"] != cfg.result_fields():
            diff = [k for k in cfg.result_fields() if state["config"].get(k) != cfg.result_fields()[k]]
            raise ValueError(f"{path}: written with other settings ({', '.join(diff)}); resume with the same "
                             f"settings or use another output folder")
        if state["coefficients"].shape != coef.shape:
            raise ValueError(f"{path}: coefficients of shape {tuple(state['coefficients'].shape)}, "
                             f"the model has {tuple(coef.shape)}")
        ckpt.check_resume(path, state, record, atlas, allow_bank_mismatch)
        state["record"] = record
        with torch.no_grad():
            coef.copy_(state["coefficients"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
    else:
        with torch.no_grad():
            coef.fill_(cfg.init)
        evals = evaluate_tasks(classify, tasks, preprocess, cfg, ranks)
        score = objective.score(evals, evals, tasks, cfg)
        state = {"config": cfg.result_fields(), "record": record, "step": 0, "epoch_loss": [0.0, 0], "epoch_stats": {},
                 "history": [{"epoch": 0, "step": 0, "loss": None, "eval": evals, "score": score}],
                 "best": {"epoch": 0, "score": score, "coefficients": coef.detach().cpu().clone()},
                 "objective_state": objective.prepare(classify, tasks, cfg, {}, preprocess)}
        if ranks.main:
            _save(path, state, coef, opt, sched)
    with torch.no_grad():
        ranks.broadcast_(coef)

    streams = objective.streams(tasks, cfg, preprocess, state["objective_state"])
    for data, bs in streams:
        ranks.check_divides("batch_size" if bs == cfg.batch_size else f"{cfg.objective} batch size",
                            stream_batch_size(data, bs))
    step = state["step"]
    bar = tqdm(total=total, initial=step, desc=f"adapt ({cfg.objective})", disable=not (cfg.progress and ranks.main))
    pin = device.type == "cuda"
    started = time.time()
    while step < total:
        epoch = step // spe + 1
        loaders = [stream_loader(data, bs, mix_seed(cfg.seed, 7, k), step, epoch * spe, cfg.workers, pin,
                                 ranks.share) for k, (data, bs) in enumerate(streams)]
        for batches in zip(*loaders):
            batches = [[t.to(device, non_blocking=True) for t in b] for b in batches]
            loss, stats = objective.loss(classify, batches, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            loss, stats = _reduce_step(ranks, coef, loss, stats)
            if not math.isfinite(loss):
                raise _diverged(cfg, step, f"the {cfg.objective} loss is {loss}")
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_([coef], cfg.grad_clip)
            opt.step()
            if not bool(torch.isfinite(coef).all()):
                raise _diverged(cfg, step + 1, "the coefficients are non-finite")
            sched.step()
            step += 1
            state["step"] = step
            state["epoch_loss"][0] += loss
            state["epoch_loss"][1] += 1
            for k, v in stats.items():
                state["epoch_stats"][k] = state["epoch_stats"].get(k, 0.0) + v
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step % spe and ranks.main:
                _save(path, state, coef, opt, sched)
            if on_step is not None:
                on_step(step)
        evals = evaluate_tasks(classify, tasks, preprocess, cfg, ranks)
        score = objective.score(evals, state["history"][0]["eval"], tasks, cfg)
        n = max(state["epoch_loss"][1], 1)
        state["history"].append({"epoch": epoch, "step": step, "loss": state["epoch_loss"][0] / n,
                                 "eval": evals, "score": score, "lr": sched.get_last_lr()[0],
                                 **{k: v / n for k, v in state["epoch_stats"].items()}})
        state["epoch_loss"], state["epoch_stats"] = [0.0, 0], {}
        best = state["best"]
        if score is not None and (best["score"] is None or score > best["score"]):
            state["best"] = {"epoch": epoch, "score": score, "coefficients": coef.detach().cpu().clone()}
        if ranks.main:
            _save(path, state, coef, opt, sched)
            _write_log(out, state["history"])
        bar.set_postfix(loss=f"{state['history'][-1]['loss']:.4f}",
                        acc=" ".join(f"{e['accuracy']:.3f}" for e in evals))
    bar.close()
    return _finish(atlas, tasks, cfg, out, state, select, time.time() - started, ranks)


def _selection(cfg, objective, tasks):
    """"best" or "last": cfg.select, else the objective's default; "best" scores the validation images, so a task
    without any is refused with select="best" and selects the last epoch, saying so, by default."""
    select = cfg.select or objective.select
    empty = [t.name for t in tasks if not t.val]
    if select != "best" or not empty:
        return select
    if cfg.select == "best":
        raise ValueError(f"select='best': data set {empty[0]!r} has no validation images to choose the epoch by "
                         f"(val_fraction=0 holds none out); use select='last', or val_fraction > 0")
    warnings.warn(f"data set {empty[0]!r} has no validation images (val_fraction=0 holds none out): the last epoch "
                  f"is selected, not the best (select='last'); its validation accuracy is not measured",
                  stacklevel=3)
    return "last"


def _diverged(cfg, step, what):
    """The error of a run whose loss or coefficients became non-finite at `step`: after the first step the learning
    rate is at fault, at it the initial coefficients (or, at θ0, the model or the data)."""
    if step > 0:
        return OptionError("lr", cfg.lr, f"training diverged at step {step} ({what}); lower the learning rate")
    if cfg.init != 0:
        return OptionError("init", cfg.init, f"{what} at the initial coefficients; start from a smaller value")
    return ValueError(f"{what} at θ0, before any step: the model or the data give non-finite values")


def _reduce_step(ranks, coef, loss, stats):
    """(loss, stats) as floats, averaged over the processes with the coefficients' gradient in one all-reduce:
    each process's loss is the mean over its equal share of the global batch, so the average is the global
    batch's."""
    if ranks.world == 1:
        return loss.item(), stats
    grad = coef.grad.reshape(-1)
    flat = torch.cat([grad, loss.detach().float().reshape(1).to(grad.device),
                      torch.tensor(list(stats.values()), dtype=grad.dtype, device=grad.device)])
    ranks.mean_(flat)
    coef.grad.copy_(flat[:grad.numel()].view_as(coef.grad))
    values = flat[grad.numel():].tolist()
    return values[0], dict(zip(stats, values[1:]))


def _save(path, state, coef, opt, sched):
    ckpt.save(path, {**state, "coefficients": coef.detach().cpu().clone(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict()})


def _write_log(out, history):
    write_text(os.path.join(out, "log.jsonl"), "".join(json.dumps(h) + "\n" for h in history))


def _finish(atlas, tasks, cfg, out, state, select, seconds, ranks):
    history = state["history"]
    chosen = state["best"]["epoch"] if select == "best" else history[-1]["epoch"]
    if select == "best":
        with torch.no_grad():
            atlas.coefficients.copy_(state["best"]["coefficients"])
    names = [t.name for t in tasks]
    entry = history[chosen]
    summary = {"objective": cfg.objective, "select": select, "selected_epoch": chosen,
               "tasks": names, "initial": history[0]["eval"], "selected": entry["eval"],
               "last": history[-1]["eval"], "coefficients": coefficient_summary(atlas.coefficients),
               "sources": list(atlas.sources), "config": asdict(cfg), "processes": ranks.world,
               "train_seconds_this_run": seconds}
    if not ranks.main:
        return summary
    atlas.save_coefficients(os.path.join(out, "coefficients.safetensors"))
    write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=1))
    _write_log(out, history)
    plot_curves(history, names, os.path.join(out, "curves.png"))
    plot_coefficients(atlas.coefficients, atlas.block_names, atlas.sources, os.path.join(out, "coefficients.png"))
    return summary


__all__ = ["Task", "TrainConfig", "train", "make_classify"]
