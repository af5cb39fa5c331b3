"""A run killed and resumed from its checkpoint ends exactly where an uninterrupted one ends."""
import json

import pytest
import torch

import adapt_world
from atlas_fast.adapt import adapt

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


def _bank_variant(world, tmp_path, name, order=(0, 1), sources=None):
    """The world's bank with its task vectors in `order` and other source names, saved under tmp_path."""
    from atlas_fast import TaskVectors
    bank = TaskVectors.load(world["bank"])
    order = list(order)
    variant = TaskVectors({k: v[order] for k, v in bank.vectors.items()},
                          sources=sources or [bank.sources[t] for t in order])
    path = str(tmp_path / name)
    variant.save(path)
    return path


def _killed_run(world, out):
    with pytest.raises(Killed):
        _adapt(world, out, on_step=_kill_at(2))


def test_resume_refuses_other_inputs_naming_them(world, tmp_path):
    """Another bank (task vectors swapped), θ0, image set, shot count or class names: each resume is refused with
    one line naming it; the checkpoint stays and a resume with the same inputs still ends as an uninterrupted run."""
    import shutil
    run = tmp_path / "run"
    _killed_run(world, run)
    before = (run / "checkpoint.pt").read_bytes()
    swapped = _bank_variant(world, tmp_path, "swapped.safetensors", order=(1, 0))

    def refused(pattern, bank=None, data=None, **kw):
        data = data or [world["upright"]]
        with pytest.raises(ValueError, match=r"checkpoint.pt: written for other inputs: " + pattern):
            adapt(world["config"], bank or world["bank"], data, objective="ce", pretrained=kw.pop("pretrained",
                  world["theta0"]), classnames=kw.pop("classnames", world["classnames"]),
                  templates=world["templates"], epochs=3, steps_per_epoch=3, batch_size=16, lr=0.1, seed=5,
                  out=str(run), progress=False, checkpoint_every=2, shots=kw.pop("shots", 4), augment=True,
                  resume=True, **kw)

    refused(r"another bank: block '\S+' of task vector 0 \('\S+ft_upright.pt' then, '\S+ft_rot90.pt' now\) holds "
            r"other values .*--allow-bank-mismatch", bank=swapped)
    refused(r"θ0 \(the model's tensors\) differs: [0-9a-f]{12} then, [0-9a-f]{12} now", pretrained=world["multi"])
    fewer = tmp_path / "copy" / "upright"
    shutil.copytree(world["upright"], fewer)
    (fewer / "7" / sorted(p.name for p in (fewer / "7").iterdir())[0]).unlink()
    refused(r"data set 0 \('upright'\): images \(names and classes\) differs", data=[str(fewer)])
    refused(r"data set 0 \('upright'\): training images \(count, indices: shots, seed, val_fraction\) differs: "
            r"40 images [0-9a-f]{12} then, 50 images [0-9a-f]{12} now", shots=5)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(n.upper() for n in adapt_world.CLASSNAMES) + "\n")
    refused(r"data set 0 \('upright'\): class list differs: \['zero', 'one', .* then, \['ZERO', 'ONE', .* now",
            classnames=str(names))
    assert (run / "checkpoint.pt").read_bytes() == before
    resumed = _adapt(world, run, resume=True)
    whole = _adapt(world, tmp_path / "whole")
    assert torch.equal(resumed.atlas.coefficients, whole.atlas.coefficients)


def test_resume_accepts_the_same_bank_from_moved_files(world, tmp_path):
    """The same task vectors under other source names (the checkpoints moved, the bank rebuilt) resume; a bank of
    other values resumes with allow_bank_mismatch=True."""
    run = tmp_path / "run"
    _killed_run(world, run)
    moved = _bank_variant(world, tmp_path, "moved.safetensors", sources=["/moved/a.pt", "/moved/b.pt"])
    resumed = adapt(world["config"], moved, [world["upright"]], objective="ce", pretrained=world["theta0"],
                    classnames=world["classnames"], templates=world["templates"], epochs=3, steps_per_epoch=3,
                    batch_size=16, lr=0.1, seed=5, out=str(run), progress=False, checkpoint_every=2, shots=4,
                    augment=True, resume=True)
    whole = _adapt(world, tmp_path / "whole")
    assert torch.equal(resumed.atlas.coefficients, whole.atlas.coefficients)
    other = tmp_path / "other"
    _killed_run(world, other)
    swapped = _bank_variant(world, tmp_path, "swapped.safetensors", order=(1, 0))
    adapt(world["config"], swapped, [world["upright"]], objective="ce", pretrained=world["theta0"],
          classnames=world["classnames"], templates=world["templates"], epochs=3, steps_per_epoch=3, batch_size=16,
          lr=0.1, seed=5, out=str(other), progress=False, checkpoint_every=2, shots=4, augment=True, resume=True,
          allow_bank_mismatch=True)
    assert torch.load(other / "checkpoint.pt", weights_only=False)["step"] == 9


def test_resume_of_a_checkpoint_without_record_warns(world, tmp_path):
    """A checkpoint written before checkpoints kept their record resumes, with a warning that nothing was checked."""
    run = tmp_path / "run"
    _killed_run(world, run)
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    del state["record"]
    torch.save(state, run / "checkpoint.pt")
    with pytest.warns(UserWarning, match=r"checkpoint.pt: written without a record of its bank, θ0 and data"):
        resumed = _adapt(world, run, resume=True)
    assert torch.equal(resumed.atlas.coefficients, _adapt(world, tmp_path / "whole").atlas.coefficients)
