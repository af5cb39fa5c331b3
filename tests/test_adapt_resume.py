"""A run killed and resumed from its checkpoint ends exactly where an uninterrupted one ends."""
import json

import pytest
import torch

import adapt_world
from atlas_fast.adapt import adapt


from adapt_world import one_thread, world  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


class Killed(Exception):
    pass


def _adapt(world, out, objective="ce", **kw):
    data = [world["upright"]] if objective != "negation" else [world["upright"], world["rot90"]]
    settings = dict(objective=objective, pretrained=world["theta0"], classnames=world["classnames"],
                    templates=world["templates"], epochs=3, steps_per_epoch=3, batch_size=16, lr=0.1,
                    seed=5, out=str(out), progress=False, checkpoint_every=2)
    if objective == "ce":
        settings.update(shots=4, augment=True)    # seeded augmentations must replay too
    if objective == "ufm":
        settings.update(init=0.3, threshold=0.5)
    settings.update(kw)
    return adapt(world["config"], world["bank"], data, **settings)


def _kill_at(step):
    def on_step(s):
        if s == step:
            raise Killed
    return on_step


def _log(out):
    with open(out / "log.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("objective, kill", [("ce", 5), ("ufm", 4)])
def test_resumed_run_equals_uninterrupted(world, tmp_path, objective, kill):
    whole = _adapt(world, tmp_path / "whole", objective)
    with pytest.raises(Killed):
        _adapt(world, tmp_path / "killed", objective, on_step=_kill_at(kill))
    # the last checkpoint is from step 4, mid-epoch 2 (3 steps an epoch): steps 5.. are replayed,
    # here with data-loading workers, which must not change the batches either
    resumed = _adapt(world, tmp_path / "killed", objective, resume=True, workers=2)
    assert torch.equal(resumed.atlas.coefficients, whole.atlas.coefficients)
    state_whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    state_resumed = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)
    assert torch.equal(state_resumed["coefficients"], state_whole["coefficients"])
    assert state_resumed["optimizer"]["state"][0]["exp_avg_sq"].equal(state_whole["optimizer"]["state"][0]["exp_avg_sq"])
    assert _log(tmp_path / "killed") == _log(tmp_path / "whole")
    assert resumed.summary["selected_epoch"] == whole.summary["selected_epoch"]


def test_resume_refuses_other_settings(world, tmp_path):
    with pytest.raises(Killed):
        _adapt(world, tmp_path / "run", on_step=_kill_at(2))
    with pytest.raises(ValueError, match=r"checkpoint.pt: written with other settings \(lr\)"):
        _adapt(world, tmp_path / "run", resume=True, lr=0.2)


@pytest.mark.parametrize("partitions", [1, 3])
def test_outputs_are_written(world, tmp_path, partitions):
    from PIL import Image
    result = _adapt(world, tmp_path / "run", epochs=2, partitions=partitions)
    assert result.atlas.coefficients.shape == ((2, len(result.atlas.block_names), 3) if partitions == 3
                                               else (2, len(result.atlas.block_names)))
    out = tmp_path / "run"
    log = _log(out)
    assert [h["epoch"] for h in log] == [0, 1, 2]
    assert log[0]["loss"] is None and all(h["loss"] > 0 for h in log[1:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["selected"] == log[summary["selected_epoch"]]["eval"]
    for name in ("curves.png", "coefficients.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 150
    assert not list(out.glob(".tmp-*"))
    saved = result.atlas.coefficients.detach().clone()
    with torch.no_grad():
        result.atlas.coefficients.zero_()
    result.atlas.load_coefficients(out / "coefficients.safetensors")
    assert torch.equal(result.atlas.coefficients, saved)
