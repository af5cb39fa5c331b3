"""The objectives coefficients are learned with.

    ce        supervised cross-entropy on labelled (few-shot) images of one or more tasks at once;
              selection by mean normalised accuracy (accuracy / the fine-tuned model's, when given)
    entropy   mean prediction entropy on unlabelled images (test-time adaptation, as AdaMerging)
    ufm       unsupervised FixMatch: a trusted set of the initial model's most confident predictions per
              class, in every batch with its pseudo-labels; other images are pseudo-labelled from a weak
              view and trained on a strong view where the confidence passes a threshold
    negation  lower the target task's accuracy (complement cross-entropy, −log(1 − p_true)) while a control
              task keeps its accuracy (cross-entropy); selection keeps the epoch with the lowest target
              accuracy among those whose control accuracy is ≥ keep × its initial accuracy
"""
import torch
import torch.nn.functional as F

from .data import DataError, ViewData
from .evaluation import predict


class Objective:
    name = ""
    select = "best"           # default epoch selection: "best" by score(), or "last"
    min_tasks, max_tasks = 1, 1

    def check(self, tasks):
        n = len(tasks)
        if not self.min_tasks <= n <= self.max_tasks:
            want = (f"exactly {self.min_tasks}" if self.min_tasks == self.max_tasks
                    else f"at least {self.min_tasks}")
            raise DataError(f"objective={self.name!r} takes {want} data set(s), got {n}")

    def prepare(self, classify, tasks, cfg, state, preprocess):
        """Compute what the objective needs before training (stored in the checkpoint as `state`)."""
        return state

    def streams(self, tasks, cfg, preprocess, state):
        """[(ViewData, batch size)], one batch of each per step."""
        raise NotImplementedError

    def loss(self, classify, batches, cfg):
        """(loss, {name: float}) for one step; classify(task index, images) gives logits."""
        raise NotImplementedError

    def score(self, evals, initial, tasks, cfg):
        """Selection score of an epoch's evaluation (higher is better), or None when not admissible."""
        return sum(e["accuracy"] for e in evals) / len(evals)


class CrossEntropy(Objective):
    name = "ce"
    max_tasks = 10**6

    def streams(self, tasks, cfg, preprocess, state):
        view = "weak" if cfg.augment else "plain"
        return [(ViewData(t.data, t.train, preprocess, (view,), flip=cfg.flip), cfg.batch_size) for t in tasks]

    def loss(self, classify, batches, cfg):
        losses = [F.cross_entropy(classify(i, x), y) for i, (x, y, _) in enumerate(batches)]
        return sum(losses) / len(losses), {}

    def score(self, evals, initial, tasks, cfg):
        norm = [e["accuracy"] / t.finetuned_accuracy if t.finetuned_accuracy else e["accuracy"]
                for e, t in zip(evals, tasks)]
        return sum(norm) / len(norm)


def entropy(logits):
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class Entropy(Objective):
    name = "entropy"
    select = "last"

    def streams(self, tasks, cfg, preprocess, state):
        return [(ViewData(tasks[0].data, tasks[0].train, preprocess, ("plain",)), cfg.batch_size)]

    def loss(self, classify, batches, cfg):
        x, _, _ = batches[0]
        return entropy(classify(0, x)).mean(), {}


class UFM(Objective):
    name = "ufm"
    select = "last"

    def prepare(self, classify, tasks, cfg, state, preprocess):
        if "trusted_positions" in state:
            return state
        t = tasks[0]
        probs = predict(lambda x: classify(0, x), ViewData(t.data, t.train, preprocess, ("plain",)), cfg)
        conf, pred = probs.max(1)
        positions, labels = [], []
        for c in range(probs.shape[1]):
            members = (pred == c).nonzero().flatten()
            if len(members) == 0:
                continue
            top = members[conf[members].argsort(descending=True, stable=True)[:cfg.trusted_per_class]]
            positions += top.tolist()
            labels += [c] * len(top)
        if not positions:
            raise DataError("ufm: the initial model predicts no class on the unlabelled data")
        return {"trusted_positions": positions, "trusted_labels": labels}

    def streams(self, tasks, cfg, preprocess, state):
        t = tasks[0]
        unlabelled = ViewData(t.data, t.train, preprocess, ("weak", "strong"), flip=cfg.flip)
        trusted = ViewData(t.data, [t.train[p] for p in state["trusted_positions"]], preprocess, ("strong",),
                           labels=state["trusted_labels"], flip=cfg.flip)
        return [(unlabelled, cfg.batch_size), (trusted, max(1, cfg.batch_size // 2))]

    def loss(self, classify, batches, cfg):
        (weak, strong, _, _), (t_strong, t_label, _) = batches
        with torch.no_grad():
            conf, pseudo = F.softmax(classify(0, weak).float(), dim=-1).max(-1)
        mask = (conf >= cfg.threshold).float()
        logits = classify(0, torch.cat([strong, t_strong]))
        n = strong.shape[0]
        unsup = (F.cross_entropy(logits[:n], pseudo, reduction="none") * mask).mean()
        sup = F.cross_entropy(logits[n:], t_label)
        return unsup + sup, {"mask_rate": mask.mean().item(), "trusted_ce": sup.item(), "pseudo_ce": unsup.item()}


class Negation(Objective):
    name = "negation"
    min_tasks = max_tasks = 2

    def streams(self, tasks, cfg, preprocess, state):
        return [(ViewData(t.data, t.train, preprocess, ("plain",)), cfg.batch_size) for t in tasks]

    def loss(self, classify, batches, cfg):
        (xt, yt, _), (xc, yc, _) = batches
        p_true = F.softmax(classify(0, xt).float(), dim=-1).gather(1, yt[:, None]).squeeze(1)
        forget = -torch.log1p(-p_true.clamp(max=1 - 1e-6)).mean()
        keep = F.cross_entropy(classify(1, xc), yc)
        return forget + cfg.control_weight * keep, {"forget": forget.item(), "keep": keep.item()}

    def score(self, evals, initial, tasks, cfg):
        if evals[1]["accuracy"] < cfg.keep * initial[1]["accuracy"]:
            return None
        return -evals[0]["accuracy"]


OBJECTIVES = {o.name: o for o in (CrossEntropy, Entropy, UFM, Negation)}


def get_objective(name):
    if name not in OBJECTIVES:
        raise ValueError(f"objective={name!r}: expected one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]()
