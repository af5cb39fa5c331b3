"""Many test-time streams at once: one coefficient set per stream, all of them stepped by one grouped
forward/backward (AtlasModel.groups) over a batch that mixes the streams.

    tta = OnlineTTA(atlas, head, objective="entropy", streams=75, lr=1e-3)
    for images, stream_ids in batches:               # arriving in order
        out = tta.step(images, stream_ids)           # predictions made BEFORE the update, then one update
        out.labels, out.confidence                   # (N,) each
    for out in tta.run(batch_iterable): ...          # the same over an iterable of (images, stream_ids)

Why the streams stay independent. The grouped forward gives every sample exactly the outputs and gradients of
a model composed with its own stream's coefficients, and the loss is Σ_s mean_{n ∈ s} ℓ_n: stream s's
coefficients receive the gradient of its own mean loss alone, as a separate run's would. Everything after the
gradient is per stream too: each stream's coefficients are their own leaf in their own AdamW parameter group
(their own moments, step count, learning rate and schedule, weight decay), gradient clipping is applied to each
stream's gradient on its own, and a stream without a sample in a batch is not stepped at all (its gradient is
set to None, which AdamW skips), as a separate run never sees that batch. So S streams stepped together equal S
separate single-stream runs with the same seeds and batch order, to float32 rounding. A batch holding a single
stream runs the plain composed forward instead of a grouped one (same result, no per-sample batching cost).

Episodic mode puts the coefficients and optimiser state of the streams of a batch back at the start after the
batch (each batch is adapted to from θ(c0) alone, then forgotten).
"""
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .loop import autocast_for
from .objectives import entropy


def entropy_loss(logits):
    """Mean prediction entropy (Tent, AdaMerging)."""
    return entropy(logits).mean()


def pseudo_label_loss(threshold=0.9):
    """The unlabelled term of UFM / FixMatch without the strong view (there is one view per sample online):
    cross-entropy against the model's own argmax where its confidence passes `threshold`, averaged over all the
    stream's samples of the batch (masked ones count as zero, as UFM's)."""
    def loss(logits):
        logits = logits.float()
        with torch.no_grad():
            conf, pseudo = F.softmax(logits, -1).max(-1)
        return (F.cross_entropy(logits, pseudo, reduction="none") * (conf >= threshold).float()).mean()
    return loss


def online_objective(objective, threshold=0.9):
    """A callable logits (n, C) -> scalar loss of one stream's samples, from a name or a callable."""
    if callable(objective):
        return objective
    if objective == "entropy":
        return entropy_loss
    if objective in ("pseudo", "ufm"):
        return pseudo_label_loss(threshold)
    raise ValueError(f"objective={objective!r}: expected 'entropy', 'pseudo' (UFM's confident pseudo-labels) "
                     f"or a callable logits -> loss")


class StreamCoefficients:
    """S coefficient sets of an AtlasModel, each its own float32 leaf in its own AdamW parameter group.

    schedules: None (constant lr) or a list of S functions step -> lr factor (torch LambdaLR), stream s's
    schedule counting the optimiser steps of the whole run (every stream of an epoch-mode run is stepped from the
    first step until its own last one)."""

    def __init__(self, atlas, streams, lr, weight_decay=0.0, grad_clip=None, betas=(0.9, 0.999), eps=1e-8,
                 init=None, schedules=None):
        if streams < 1:
            raise ValueError(f"streams={streams}: expected at least one stream")
        if lr <= 0:
            raise ValueError(f"lr={lr}: expected a positive learning rate")
        if grad_clip is not None and grad_clip < 0:
            raise ValueError(f"grad_clip={grad_clip}: expected None, 0 (off) or a positive norm")
        start = atlas.coefficients.detach().float().clone()
        if init is not None:
            start.fill_(init)
        self.start = start
        self.rows = [nn.Parameter(start.clone()) for _ in range(streams)]
        self.grad_clip = grad_clip
        self.opt = torch.optim.AdamW([{"params": [p]} for p in self.rows], lr=lr, weight_decay=weight_decay,
                                     betas=betas, eps=eps)
        self.sched = None
        if schedules is not None:
            if len(schedules) != streams:
                raise ValueError(f"schedules: {len(schedules)} for {streams} streams")
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, list(schedules))

    def __len__(self):
        return len(self.rows)

    def stacked(self, streams):
        """(len(streams), *shape): the coefficients of `streams`, differentiable into their leaves."""
        return torch.stack([self.rows[s] for s in streams])

    def step(self, stepped):
        """One optimiser step of the streams in `stepped` alone, each with its gradient clipped on its own."""
        stepped = set(stepped)
        for s, p in enumerate(self.rows):
            if s not in stepped:
                p.grad = None
            elif self.grad_clip:
                torch.nn.utils.clip_grad_norm_([p], self.grad_clip)
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def reset(self, streams):
        """The coefficients and AdamW state of `streams` back to the start."""
        for s in streams:
            self.rows[s].copy_(self.start)
            self.opt.state.pop(self.rows[s], None)

    def coefficients(self):
        """(S, *shape), a detached copy."""
        return torch.stack([p.detach() for p in self.rows]).clone()


def grouped_logits(atlas, heads, images, index, coef, autocast=nullcontext):
    """Logits of every sample with its group's coefficients: one grouped forward of the composed encoder (under
    `autocast`), then the head in float32 (one head for all, or heads[g] for the samples of group g, when heads is
    a list). A list of heads gives a list of (n_g, C_g) logits in group order; one head gives (N, C)."""
    with autocast():
        with atlas.groups(index, coef):
            features = atlas(images)
    if not isinstance(heads, (list, tuple)):
        return heads(features.float()) if heads is not None else features.float()
    return [heads[g](features[index == g].float()) for g in range(coef.shape[0])]


def plain_logits(atlas, heads, images, autocast=nullcontext):
    """grouped_logits for a batch of one group, by the AtlasModel's plain forward (its own coefficients)."""
    with autocast():
        features = atlas(images).float()
    if isinstance(heads, (list, tuple)):
        return [heads[0](features)]
    return heads(features) if heads is not None else features


@dataclass
class OnlineStep:
    labels: torch.Tensor          # (N,) int64: argmax predictions, made before this batch's update
    confidence: torch.Tensor      # (N,) float32: their softmax probability
    losses: dict                  # stream id -> its loss on this batch (float)


class OnlineTTA:
    """Online test-time adaptation of S streams at once (module docstring).

    atlas: an AtlasModel (its own coefficients are the starting point and stay untouched). head: the module
    turning the encoder's features into logits (a zero-shot or linear head), a list of S of them (one per
    stream), or None when the AtlasModel returns logits. objective: "entropy", "pseudo" (alias "ufm": confident
    pseudo-labels, `threshold`) or a callable logits (n, C) -> the loss of one stream's samples. Each stream's
    coefficients follow AdamW(lr, weight_decay) with its gradient clipped to grad_clip (None or 0: off);
    episodic=True resets the streams of each batch after its update. amp: as TrainConfig.amp."""

    def __init__(self, atlas, head=None, objective="entropy", streams=1, lr=1e-3, weight_decay=0.0, grad_clip=None,
                 episodic=False, amp="off", threshold=0.9, init=None):
        if isinstance(head, (list, tuple)) and len(head) != streams:
            raise ValueError(f"head: {len(head)} heads for streams={streams}")
        if amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"amp={amp!r}: expected auto, bf16, fp16 or off")
        self.atlas, self.head, self.episodic = atlas, head, episodic
        self.loss_fn = online_objective(objective, threshold)
        self.coef = StreamCoefficients(atlas, streams, lr, weight_decay, grad_clip, init=init)
        self.autocast = autocast_for(atlas.coefficients.device, amp)
        self.steps = [0] * streams          # updates made per stream

    @property
    def streams(self):
        return len(self.coef)

    def coefficients(self, stream=None):
        """The current coefficients: (S, *shape), or stream `stream`'s."""
        return self.coef.coefficients() if stream is None else self.coef.rows[stream].detach().clone()

    def _index(self, stream_ids, n):
        ids = torch.as_tensor(stream_ids, dtype=torch.int64).reshape(-1).cpu()
        if ids.numel() != n:
            raise ValueError(f"stream_ids: {ids.numel()} ids for a batch of {n} images")
        if n == 0:
            raise ValueError("images: an empty batch")
        if int(ids.min()) < 0 or int(ids.max()) >= self.streams:
            raise ValueError(f"stream_ids: ids outside [0, {self.streams})")
        present = torch.unique(ids).tolist()                  # sorted
        remap = torch.full((self.streams,), -1, dtype=torch.int64)
        remap[present] = torch.arange(len(present))
        return present, remap[ids]

    def step(self, images, stream_ids):
        """Predict `images` (N, ...) of streams `stream_ids` (N ints in [0, S)) with each stream's current
        coefficients, then update each stream present once on its own samples. Returns an OnlineStep."""
        present, index = self._index(stream_ids, images.shape[0])
        device = self.atlas.coefficients.device
        index = index.to(device)
        coef = self.coef.stacked(present) if len(present) > 1 else None
        head = [self.head[s] for s in present] if isinstance(self.head, (list, tuple)) else self.head
        with self._single_stream(present):
            if len(present) == 1:
                logits = plain_logits(self.atlas, head, images.to(device), self.autocast)
            else:
                logits = grouped_logits(self.atlas, head, images.to(device), index, coef, self.autocast)
            per_group = logits if isinstance(logits, list) else [logits[index == g] for g in range(len(present))]
            losses = [self.loss_fn(lg) for lg in per_group]
            torch.stack([loss.float() for loss in losses]).sum().backward()
        self.coef.step(present)
        if self.episodic:
            self.coef.reset(present)
        for s in present:
            self.steps[s] += 1
        labels, confidence = self._predictions(per_group, index, len(present))
        return OnlineStep(labels, confidence, {s: loss.item() for s, loss in zip(present, losses)})

    def run(self, batches):
        """step() over an iterable (a generator, a DataLoader) of (images, stream_ids) as they arrive; yields each
        batch's OnlineStep."""
        for images, stream_ids in batches:
            yield self.step(images, stream_ids)

    @contextmanager
    def _single_stream(self, present):
        """A batch of one stream runs the plain composed forward, cheaper than a grouped one of one group: the
        stream's coefficients are lent to the AtlasModel for the forward and backward, their gradient handed back,
        and the AtlasModel's own coefficients restored."""
        if len(present) > 1:
            yield
            return
        own, row = self.atlas.coefficients, self.coef.rows[present[0]]
        saved = own.detach().clone()
        with torch.no_grad():
            own.copy_(row)
        own.grad = None
        try:
            yield
            row.grad = own.grad
        finally:
            own.grad = None
            with torch.no_grad():
                own.copy_(saved)

    @staticmethod
    @torch.no_grad()
    def _predictions(per_group, index, groups):
        labels = torch.empty(index.shape[0], dtype=torch.int64, device=index.device)
        confidence = torch.empty(index.shape[0], dtype=torch.float32, device=index.device)
        for g in range(groups):
            conf, pred = F.softmax(per_group[g].float(), -1).max(-1)
            rows = index == g
            labels[rows], confidence[rows] = pred, conf
        return labels.cpu(), confidence.cpu()


__all__ = ["OnlineTTA", "OnlineStep", "StreamCoefficients", "online_objective", "entropy_loss",
           "pseudo_label_loss", "grouped_logits"]
