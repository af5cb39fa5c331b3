"""The training loop's rules, each against values computed here: the learning rate of every optimiser step (linear
warm-up, then cosine decay), the best epoch's tie-break (the first of equal scores), and the selection without
validation images (select='best' refused, the default selecting the last epoch, saying so)."""
import math

import pytest
import torch
from safetensors.torch import load_file

from atlas_fast.adapt import adapt, objectives

pytestmark = pytest.mark.usefixtures("one_thread")


def _adapt(world, out, **kw):
    settings = dict(objective="ce", pretrained=world["theta0"], classnames=world["classnames"],
                    templates=world["templates"], shots=4, epochs=3, steps_per_epoch=4, batch_size=16, lr=0.1,
                    seed=3, out=str(out), progress=False)
    settings.update(kw)
    return adapt(world["config"], world["bank"], [world["upright"]], **settings)


@pytest.fixture
def steps(monkeypatch):
    """[(learning rate the step used, coefficients after it)] of every AdamW step of the run."""
    seen = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        lr = self.param_groups[0]["lr"]
        out = original(self, *args, **kwargs)
        seen.append((lr, self.param_groups[0]["params"][0].detach().clone()))
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return seen


def test_learning_rate_of_every_step(world, tmp_path, steps):
    """12 steps, warm-up 0.25 of them (3): step k uses lr·(k + 1)/3 for k < 3, then lr·½(1 + cos(π (k − 3)/9))."""
    _adapt(world, tmp_path / "run", lr=0.2, warmup=0.25)
    want = [0.2 * ((k + 1) / 3 if k < 3 else 0.5 * (1 + math.cos(math.pi * (k - 3) / 9))) for k in range(12)]
    assert [lr for lr, _ in steps] == pytest.approx(want, rel=1e-12)


def test_best_epoch_is_the_first_of_equal_scores(world, tmp_path, steps, monkeypatch):
    """Scores 0.5 (start), 0.7, 0.7, 0.6: epoch 1 is selected, not epoch 2, and its coefficients are written (those
    after step 4 of 4 steps an epoch)."""
    scores = iter([0.5, 0.7, 0.7, 0.6])
    monkeypatch.setattr(objectives.CrossEntropy, "score", lambda self, *args: next(scores))
    summary = _adapt(world, tmp_path / "run").summary
    assert summary["selected_epoch"] == 1
    written = load_file(str(tmp_path / "run" / "coefficients.safetensors"))["coefficients"]
    assert torch.equal(written, steps[3][1].cpu())
    assert not torch.equal(written, steps[7][1].cpu())


def test_no_validation_images(world, tmp_path, steps):
    """val_fraction=0: select='best' is refused naming both settings; the default (best, for ce) selects the last
    epoch with a warning and writes the last step's coefficients, not the starting zeros."""
    with pytest.raises(ValueError, match=r"select='best': data set 'upright' has no validation images .* "
                                         r"use select='last', or val_fraction > 0"):
        _adapt(world, tmp_path / "best", val_fraction=0.0, select="best")
    with pytest.warns(UserWarning, match=r"data set 'upright' has no validation images \(val_fraction=0 holds none "
                                         r"out\): the last epoch is selected"):
        summary = _adapt(world, tmp_path / "default", val_fraction=0.0).summary
    assert summary["select"] == "last" and summary["selected_epoch"] == 3
    written = load_file(str(tmp_path / "default" / "coefficients.safetensors"))["coefficients"]
    assert torch.equal(written, steps[-1][1].cpu())
