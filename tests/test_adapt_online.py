"""Online test-time adaptation of many streams at once (adapt/online.py) against what it must equal: each stream
run on its own, by the same object with one stream, and by a plain loop written here (compose, AdamW, the loss
by its formula, predictions from the pre-update forward), on a tiny open_clip ViT with streams of different
sizes mixed in every batch."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import atlas_fast
from atlas_fast.adapt import OnlineTTA
from helpers import assert_rel, tiny_vit

pytestmark = pytest.mark.usefixtures("one_thread")

T, CLASSES = 3, 10
SIZES = (7, 3, 10)          # samples per stream
BATCH = 6                    # a mixed batch of several streams


@pytest.fixture(scope="module")
def world():
    """(the plain ViT, its bank, a head, per-stream images, the mixed batches as lists of (stream, sample))."""
    vit = tiny_vit()
    bank = atlas_fast.synthetic_task_vectors(vit, T, rel_scale=5e-2, seed=2)
    torch.manual_seed(1)
    head = nn.Linear(24, CLASSES).eval()
    for p in head.parameters():
        p.requires_grad_(False)
    images = [torch.randn(n, 3, 32, 32) for n in SIZES]
    order = [(s, i) for s, n in enumerate(SIZES) for i in range(n)]
    order = [order[j] for j in torch.randperm(len(order), generator=torch.Generator().manual_seed(3)).tolist()]
    batches = [order[k:k + BATCH] for k in range(0, len(order), BATCH)]
    return vit, bank, head, images, batches


def _entropy(logits):
    p = F.softmax(logits, -1)
    return -(p * F.log_softmax(logits, -1)).sum(-1).mean()


def _pseudo(threshold):
    def loss(logits):
        conf, pseudo = F.softmax(logits.detach(), -1).max(-1)
        return (F.cross_entropy(logits, pseudo, reduction="none") * (conf >= threshold)).mean()
    return loss


LOSSES = {"entropy": _entropy, "pseudo": _pseudo(0.12)}
OPTIONS = dict(lr=0.05, weight_decay=0.1, grad_clip=0.02)


def _plain_loop(vit, bank, head, xs, loss_fn, lr, weight_decay, grad_clip, episodic=False):
    """One stream by hand: its batches in order, predict with the current coefficients, then one AdamW step."""
    atlas = atlas_fast.compose(copy.deepcopy(vit), bank)
    coef = atlas.coefficients
    opt = torch.optim.AdamW([coef], lr=lr, weight_decay=weight_decay)
    labels, conf = [], []
    for x in xs:
        logits = head(atlas(x))
        c, y = F.softmax(logits.detach(), -1).max(-1)
        labels.append(y)
        conf.append(c)
        loss_fn(logits).backward()
        torch.nn.utils.clip_grad_norm_([coef], grad_clip)
        opt.step()
        opt.zero_grad()
        if episodic:
            opt = torch.optim.AdamW([coef], lr=lr, weight_decay=weight_decay)
            with torch.no_grad():
                coef.zero_()
    return torch.cat(labels), torch.cat(conf), coef.detach().clone()


def _run_mixed(tta, images, batches):
    """Steps tta over the mixed batches (a generator, as a serving loop feeds them); returns per stream
    (labels, confidence) in its own sample order."""
    got = {s: ([], []) for s in range(len(images))}
    arriving = ((torch.stack([images[s][i] for s, i in batch]), [s for s, _ in batch]) for batch in batches)
    for batch, out in zip(batches, tta.run(arriving)):
        ids = [s for s, _ in batch]
        for n, s in enumerate(ids):
            got[s][0].append(out.labels[n])
            got[s][1].append(out.confidence[n])
    return {s: (torch.stack(a), torch.stack(b)) for s, (a, b) in got.items()}


def _stream_batches(images, batches, s):
    """Stream s's samples of each mixed batch that holds any, in order: what a separate run of s sees."""
    return [images[s][[i for t, i in b if t == s]] for b in batches if any(t == s for t, _ in b)]


@pytest.mark.parametrize("objective", ["entropy", "pseudo"])
def test_mixed_streams_equal_separate_runs(world, objective):
    vit, bank, head, images, batches = world
    atlas = atlas_fast.compose(copy.deepcopy(vit), bank)
    obj = objective if objective == "entropy" else LOSSES["pseudo"]
    tta = OnlineTTA(atlas, head, objective=obj, streams=len(SIZES), **OPTIONS)
    mixed = _run_mixed(tta, images, batches)
    assert torch.equal(atlas.coefficients.detach(), torch.zeros_like(atlas.coefficients)), \
        "the AtlasModel's own coefficients changed"
    for s in range(len(SIZES)):
        xs = _stream_batches(images, batches, s)
        assert tta.steps[s] == len(xs)
        single = OnlineTTA(atlas_fast.compose(copy.deepcopy(vit), bank), head, objective=obj, streams=1, **OPTIONS)
        one = [single.step(x, [0] * len(x)) for x in xs]
        labels, conf, coef = _plain_loop(vit, bank, head, xs, LOSSES[objective], **OPTIONS)
        assert coef.abs().max() > 1e-3, "the plain loop did not move the coefficients"
        assert torch.equal(mixed[s][0], labels), f"stream {s}: predictions differ from the plain loop"
        assert torch.equal(torch.cat([o.labels for o in one]), labels)
        assert_rel(tta.coefficients(s), coef, 1e-4, f"stream {s}: coefficients against the plain loop")
        assert_rel(single.coefficients(0), coef, 1e-4, f"stream {s}: single-stream run against the plain loop")
        assert_rel(mixed[s][1], conf, 1e-5, f"stream {s}: confidence")


def test_episodic_resets_each_batch(world):
    vit, bank, head, images, batches = world
    tta = OnlineTTA(atlas_fast.compose(copy.deepcopy(vit), bank), head, streams=len(SIZES), episodic=True,
                    **OPTIONS)
    mixed = _run_mixed(tta, images, batches)
    for s in range(len(SIZES)):
        xs = _stream_batches(images, batches, s)
        labels, conf, _ = _plain_loop(vit, bank, head, xs, _entropy, episodic=True, **OPTIONS)
        with torch.no_grad():
            theta0 = F.softmax(head(vit(torch.cat(xs))), -1).max(-1)
        assert torch.equal(mixed[s][0], labels)
        assert torch.equal(labels, theta0.indices)
        assert_rel(mixed[s][1], theta0.values, 1e-5, f"stream {s}: episodic confidence against θ0")
        assert torch.equal(tta.coefficients(s), torch.zeros_like(tta.coefficients(s)))
    assert tta.coef.opt.state == {}


def test_one_head_per_stream(world):
    """A list of heads: each stream's samples go through its own head (here: different class counts)."""
    vit, bank, _, images, batches = world
    torch.manual_seed(5)
    heads = [nn.Linear(24, c).requires_grad_(False) for c in (4, 10, 7)]
    tta = OnlineTTA(atlas_fast.compose(copy.deepcopy(vit), bank), heads, streams=3, **OPTIONS)
    mixed = _run_mixed(tta, images, batches)
    for s in range(3):
        labels, _, coef = _plain_loop(vit, bank, heads[s], _stream_batches(images, batches, s), _entropy,
                                      **OPTIONS)
        assert torch.equal(mixed[s][0], labels)
        assert_rel(tta.coefficients(s), coef, 1e-4, f"stream {s}: coefficients")


def test_bad_input_is_named(world):
    vit, bank, head, images, _ = world
    tta = OnlineTTA(atlas_fast.compose(copy.deepcopy(vit), bank), head, streams=2, **OPTIONS)
    x = images[0][:3]
    with pytest.raises(ValueError, match="stream_ids: ids outside"):
        tta.step(x, [0, 1, 2])
    with pytest.raises(ValueError, match="stream_ids: 2 ids for a batch of 3"):
        tta.step(x, [0, 1])
    with pytest.raises(ValueError, match="objective='tent'"):
        OnlineTTA(tta.atlas, head, objective="tent")
    with pytest.raises(ValueError, match="head: 1 heads for streams=2"):
        OnlineTTA(tta.atlas, [head], streams=2)
    assert tta.steps == [0, 0]


@pytest.mark.parametrize("bank_format", ["int8", "int4", "lowrank"])
def test_quantised_and_low_rank_banks(world, bank_format):
    """Every bank format adapts online: the mixed run equals each stream's plain loop on the same bank."""
    vit, bank, head, images, batches = world
    bank = bank.low_rank(rank=2) if bank_format == "lowrank" else bank.to(dtype=getattr(torch, bank_format, "int4"))
    tta = OnlineTTA(atlas_fast.compose(copy.deepcopy(vit), bank), head, streams=len(SIZES), **OPTIONS)
    mixed = _run_mixed(tta, images, batches)
    for s in range(len(SIZES)):
        labels, _, coef = _plain_loop(vit, bank, head, _stream_batches(images, batches, s), _entropy, **OPTIONS)
        assert coef.abs().max() > 1e-3
        assert torch.equal(mixed[s][0], labels)
        assert_rel(tta.coefficients(s), coef, 1e-4, f"{bank_format} bank, stream {s}: coefficients")
