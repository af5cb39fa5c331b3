"""Each objective learns on a small real task: scikit-learn's digits, a tiny CLIP and task vectors from
real fine-tuning (adapt_world). θ0 knows digits in two other orientations and gets about 40% on the
upright and 90°-rotated ones; accuracies are measured on held-out images."""
import pytest

from atlas_fast.adapt import adapt, evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(world, tmp_path, data, objective, pretrained="theta0", **kw):
    result = adapt(world["config"], world["bank"], [world[d] for d in data], objective=objective,
                   pretrained=world[pretrained], classnames=world["classnames"], templates=world["templates"],
                   out=str(tmp_path / objective), progress=False, **kw)
    return result.summary, _history(tmp_path / objective)


def _history(out):
    import json
    with open(out / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def _theta0_accuracy(world, data):
    rows = evaluate(world["config"], world[data], pretrained=world["theta0"], classnames=world["classnames"],
                    templates=world["templates"])
    return rows[0]["accuracy"]


def test_ce_few_shot_learns_from_five_labels_per_class(world, tmp_path):
    summary, hist = _run(world, tmp_path, ["upright"], "ce", shots=5, epochs=5, steps_per_epoch=4,
                         batch_size=50, lr=0.2)
    theta0 = _theta0_accuracy(world, "upright")
    assert theta0 < 0.5
    assert hist[0]["eval"][0]["accuracy"] == pytest.approx(theta0)
    assert hist[-1]["loss"] < 0.7 * hist[1]["loss"]
    assert summary["selected"][0]["accuracy"] > theta0 + 0.3
    # the coefficient of the upright digits' task vector grew more than the rotated digits' one
    upright, rotated = summary["coefficients"]["per_task_mean"]
    assert upright > rotated + 0.3


def test_ce_task_addition_over_two_tasks_selects_by_normalised_accuracy(world, tmp_path):
    ft = [r["accuracy"] for r in evaluate(world["config"], [world["upright"], world["rot90"]],
                                          pretrained=world["theta0"], classnames=world["classnames"],
                                          templates=world["templates"], finetuned=world["finetuned"])
          if r["model"] != "pretrained" and r["model"].endswith(r["data"] + ".pt")]
    summary, hist = _run(world, tmp_path, ["upright", "rot90"], "ce", shots=5, epochs=4, steps_per_epoch=4,
                         batch_size=50, lr=0.2, finetuned_accuracy=ft)
    scores = [h["score"] for h in hist]
    best = max(range(len(scores)), key=lambda i: scores[i])
    assert summary["selected_epoch"] == best
    normalised = [s["accuracy"] / a for s, a in zip(summary["selected"], ft)]
    assert scores[best] == pytest.approx(sum(normalised) / 2)
    for before, after in zip(summary["initial"], summary["selected"]):
        assert after["accuracy"] > before["accuracy"] + 0.15


def test_entropy_minimisation_raises_accuracy_without_labels(world, tmp_path):
    # init=0.3: AdaMerging's starting scale; entropy minimisation needs a model that is right more often
    summary, hist = _run(world, tmp_path, ["upright"], "entropy", epochs=3, steps_per_epoch=6, batch_size=64,
                         lr=0.03, init=0.3)
    assert hist[-1]["loss"] < hist[1]["loss"]
    start = summary["initial"][0]["accuracy"]
    assert summary["selected_epoch"] == 3                 # unsupervised: the last epoch, not the best
    assert summary["selected"][0]["accuracy"] > start + 0.08
    assert summary["selected"][0]["accuracy"] > _theta0_accuracy(world, "upright") + 0.2


def test_ufm_raises_accuracy_without_labels(world, tmp_path):
    summary, hist = _run(world, tmp_path, ["upright"], "ufm", epochs=3, steps_per_epoch=6, batch_size=64,
                         lr=0.05, init=0.3, threshold=0.8, flip=False)
    # the pseudo-labelled share grows as the model grows confident, so the total is no fixed target
    assert hist[-1]["trusted_ce"] < hist[1]["trusted_ce"]
    # pseudo-labels above the threshold take part, more as training goes on; an epoch's rate is the mean of its 6
    # steps' shares of 64 images: a multiple of 1/384
    assert hist[-1]["mask_rate"] > hist[1]["mask_rate"]
    assert hist[-1]["mask_rate"] * 384 == pytest.approx(round(hist[-1]["mask_rate"] * 384), abs=1e-9)
    start = summary["initial"][0]["accuracy"]
    assert summary["selected"][0]["accuracy"] > start + 0.08
    assert summary["selected"][0]["accuracy"] > _theta0_accuracy(world, "upright") + 0.2


def test_ufm_loss_and_statistics_by_hand():
    """UFM's loss on logits given directly: 2 of 4 weak views reach confidence 0.8 (mask_rate 0.5), their strong
    views are trained on the weak views' labels, the trusted ones on theirs; every value computed here in float64."""
    from types import SimpleNamespace

    import torch

    from atlas_fast.adapt.objectives import UFM
    weak = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.2, 0.0], [0.0, 0.0, 3.0], [1.0, 1.2, 0.0]])
    strong = torch.tensor([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0], [0.0, 0.5, 1.5], [2.0, 0.0, -1.0]])
    trusted, labels = torch.tensor([[0.5, 1.5, -0.5], [2.5, 0.0, 1.0]]), torch.tensor([1, 2])
    loss, stats = UFM().loss(lambda i, x: x, [(weak, strong, None, None), (trusted, labels, None)],
                             SimpleNamespace(threshold=0.8))

    def ce(row, label):
        row = row.double()
        return float(torch.logsumexp(row, 0) - row[label])
    # softmax maxima of the weak rows: e^4/(e^4+2) = 0.965, 0.367, e^3/(e^3+2) = 0.909, 0.45
    pseudo = (ce(strong[0], 0) + ce(strong[2], 2)) / 4
    sup = (ce(trusted[0], 1) + ce(trusted[1], 2)) / 2
    assert stats["mask_rate"] == 0.5
    assert stats["pseudo_ce"] == pytest.approx(pseudo, rel=1e-6)
    assert stats["trusted_ce"] == pytest.approx(sup, rel=1e-6)
    assert float(loss) == pytest.approx(pseudo + sup, rel=1e-6)


def test_negation_forgets_the_target_and_keeps_the_control(world, tmp_path):
    summary, hist = _run(world, tmp_path, ["upright", "rot90"], "negation", pretrained="multi", shots=20,
                         epochs=3, steps_per_epoch=4, batch_size=64, lr=0.1)
    (t0, c0), (t1, c1) = [(e["accuracy"] for e in x) for x in (summary["initial"], summary["selected"])]
    assert hist[-1]["loss"] < hist[1]["loss"]
    assert t1 < 0.6 * t0
    assert c1 >= 0.95 * c0
    admissible = [h for h in hist if h["eval"][1]["accuracy"] >= 0.95 * c0]
    assert t1 == min(h["eval"][0]["accuracy"] for h in admissible)


def test_negation_keeps_the_start_when_no_epoch_keeps_the_control(world, tmp_path):
    # a huge lr and no control term: every trained epoch breaks the bound, so the start is kept
    summary, hist = _run(world, tmp_path, ["upright", "rot90"], "negation", pretrained="multi", shots=20,
                         epochs=2, steps_per_epoch=2, batch_size=64, lr=3.0, control_weight=0.0, keep=1.0)
    c0 = summary["initial"][1]["accuracy"]
    assert all(h["eval"][1]["accuracy"] < c0 for h in hist[1:])
    assert summary["selected_epoch"] == 0 and summary["selected"] == summary["initial"]


def test_ce_learns_under_bf16_autocast(world, tmp_path):
    # the GPU default; torch.autocast runs bf16 on a CPU as well
    summary, hist = _run(world, tmp_path, ["upright"], "ce", shots=5, epochs=2, steps_per_epoch=4,
                         batch_size=50, lr=0.2, amp="bf16")
    assert hist[-1]["loss"] < 0.7 * hist[1]["loss"]
    assert summary["selected"][0]["accuracy"] > _theta0_accuracy(world, "upright") + 0.3
