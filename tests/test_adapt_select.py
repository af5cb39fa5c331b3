"""Block selection on the digits world (adapt_world): the scores are |∂L/∂c| at θ0 as naive merging computes
them, the selected bank holds the chosen task vectors exactly, and a bank of one gradient-selected task vector
per block learns the target task better than a randomly selected one."""
import json

import pytest
import torch
import torch.nn.functional as F

import adapt_world
from atlas_fast import TaskVectors
from atlas_fast.adapt import BankMismatchError, DataError, adapt, select_blocks, selection_path

pytestmark = pytest.mark.usefixtures("one_thread")


def _select(world, data="upright", **kw):
    settings = dict(pretrained=world["theta0"], classnames=world["classnames"], templates=world["templates"],
                    progress=False)
    settings.update(kw)
    return select_blocks(world["config"], world["bank"], world[data] if data else None, **settings)


def _naive_gradient(world, shots, seed):
    """|∂L/∂c| at c = 0 by naive merging (functional_call), L the mean cross-entropy over all `shots` per class
    of the training split in one batch: {block name: (T,)}."""
    from atlas_fast.adapt import load_data
    from atlas_fast.adapt.data import dataset_targets, few_shot_indices
    from atlas_fast.adapt.heads import read_templates, zero_shot_head
    from atlas_fast.adapt.models import load_clip
    from atlas_fast.bench.naive import NaiveAtlas
    clip, preprocess, tok = load_clip(world["config"], world["theta0"])
    head = zero_shot_head(clip, tok, adapt_world.CLASSNAMES, read_templates(world["templates"]), progress=False)
    spec = load_data(world["upright"])
    idx = few_shot_indices(dataset_targets(spec.data), spec.train, shots, seed)
    x = torch.stack([preprocess(spec.data[i][0]) for i in idx])
    y = torch.tensor([spec.data[i][1] for i in idx])
    naive = NaiveAtlas(clip.visual.eval(), TaskVectors.load(world["bank"]))
    F.cross_entropy(head(naive(x)), y).backward()
    return {name: g.abs() for name, g in zip(naive.block_names, naive.coefficients.grad.t())}


def test_scores_are_the_coefficient_gradient_of_naive_merging(world, tmp_path):
    # 2 shots × 10 classes in 2 batches of 10: one pass over the labelled images, whose mean gradient is
    # the gradient of their mean loss in one batch
    out = tmp_path / "b1.safetensors"
    sel = _select(world, keep=1, shots=2, batches=2, batch_size=10, seed=3, out=out)
    want = _naive_gradient(world, shots=2, seed=3)
    record = json.loads(open(selection_path(out)).read())
    assert [b["name"] for b in record["blocks"]] == list(want)
    got = torch.tensor([b["scores"] for b in record["blocks"]], dtype=torch.float32)
    torch.testing.assert_close(got, torch.stack(list(want.values())), rtol=1e-4, atol=1e-7)
    assert torch.equal(sel.scores().t().float(), got)
    # keep=1 takes each block's highest score, and both task vectors win somewhere on this world
    chosen = torch.tensor([b["chosen"] for b in record["blocks"]])
    assert torch.equal(chosen[:, 0], got.argmax(1))
    assert 0 < int(chosen.sum()) < len(chosen)


def test_selected_bank_holds_the_chosen_task_vectors(world, tmp_path):
    original = TaskVectors.load(world["bank"])
    for keep, method in ((1, "gradient"), (2, "gradient"), (1, "random"), (2, "random")):
        out = tmp_path / f"{method}{keep}.safetensors"
        _select(world, keep=keep, method=method, shots=2, batches=2, batch_size=10, out=out)
        bank = TaskVectors.load(out)
        record = json.loads(open(selection_path(out)).read())
        assert bank.sources == record["slots"] == [f"select{j}" for j in range(keep)]
        assert record["method"] == method and record["keep"] == keep and record["sources"] == original.sources
        assert bank.names == [b["name"] for b in record["blocks"]] == original.names
        chosen = torch.tensor([b["chosen"] for b in record["blocks"]])
        for name, picks in zip(bank.names, chosen):
            for j, t in enumerate(picks):
                assert torch.equal(bank[name][j], original[name][t]), (method, keep, name, j)
            if keep == len(original):                           # keep = T: a permutation of the bank
                assert sorted(picks.tolist()) == list(range(len(original)))
        for t, entry in enumerate(record["tasks"]):
            assert entry["source"] == original.sources[t]
            assert entry["slot0_blocks"] == int((chosen[:, 0] == t).sum())
            assert entry["kept_blocks"] == int((chosen == t).sum())
        if method == "gradient":     # slots in decreasing score, and no task vector left out scores higher
            scores = torch.tensor([b["scores"] for b in record["blocks"]])
            ranked = scores.gather(1, chosen)
            assert (ranked[:, :-1] >= ranked[:, 1:]).all()
            dropped = scores.scatter(1, chosen, float("-inf")).max(1)[0]
            assert (ranked[:, -1] >= dropped).all()
        else:
            assert "scores" not in record["blocks"][0]


def test_random_selection_is_seeded_and_reads_no_data(world):
    a, b, c = (_select(world, data=None, keep=1, method="random", seed=s).chosen() for s in (4, 4, 5))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0 < int(a.sum()) < len(a)                           # both task vectors are drawn


def test_quantised_bank_keeps_its_chosen_values_and_scales(world):
    from atlas_fast import TaskVectors
    bank = TaskVectors.load(world["bank"]).quantize(torch.int8)
    sel = select_blocks(world["config"], bank, None, keep=1, method="random", seed=3, pretrained=world["theta0"],
                        progress=False)
    assert sel.bank.format == "int8"
    quantised = 0
    for entry in sel.record["blocks"]:
        t = entry["chosen"][0]
        got, want = sel.bank[entry["name"]], bank[entry["name"]]
        if hasattr(want, "scale"):
            assert torch.equal(got.data[0], want.data[t]) and torch.equal(got.scale[0], want.scale[t])
            quantised += 1
        else:
            assert torch.equal(got[0], want[t])
    assert quantised > 0


def test_a_module_is_left_as_it_was(world):
    from atlas_fast.adapt.models import load_clip
    clip, preprocess, _ = load_clip(world["config"], world["theta0"])
    before = {k: v.clone() for k, v in clip.visual.state_dict().items()}
    cls = type(clip.visual)
    select_blocks(clip, world["bank"], keep=1, method="random", preprocess=preprocess, progress=False)
    assert type(clip.visual) is cls and not hasattr(clip.visual, "atlas_coefficients")
    after = clip.visual.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_bad_input_names_the_parameter(world, tmp_path):
    for keep in (0, 3, 1.5):
        with pytest.raises(ValueError, match=rf"keep={keep}: expected an int with 1 <= keep <= 2"):
            _select(world, keep=keep)
    with pytest.raises(ValueError, match="method='best': expected one of gradient, random"):
        _select(world, keep=1, method="best")
    for name in ("batches", "batch_size"):
        with pytest.raises(ValueError, match=rf"{name}=0: expected a positive int"):
            _select(world, keep=1, **{name: 0})
    with pytest.raises(DataError, match="data: gradient selection scores on labelled data"):
        _select(world, data=None, keep=1)
    from open_clip.transformer import VisionTransformer

    from atlas_fast import synthetic_task_vectors
    other = VisionTransformer(image_size=16, patch_size=4, width=32, layers=2, heads=4, mlp_ratio=2.0, output_dim=32)
    path = tmp_path / "other.safetensors"
    synthetic_task_vectors(other, 2).save(path)
    with pytest.raises(BankMismatchError, match="other.safetensors: does not match the model's image tower"):
        select_blocks(world["config"], path, world["upright"], keep=1, pretrained=world["theta0"], progress=False)


def test_gradient_selection_learns_better_than_random(world, tmp_path):
    # target: the 90°-rotated digits. One task vector per block: chosen by gradient it learns as well as the
    # full bank of two; chosen at random it mixes the wrong task vector into many blocks.
    common = dict(pretrained=world["theta0"], classnames=world["classnames"], templates=world["templates"],
                  progress=False)
    banks = {"full": world["bank"]}
    for method in ("gradient", "random"):
        banks[method] = str(tmp_path / f"{method}.safetensors")
        select_blocks(world["config"], world["bank"], world["rot90"], keep=1, method=method, shots=5, batches=4,
                      batch_size=25, out=banks[method], **common)
    acc = {}
    for name, bank in banks.items():
        result = adapt(world["config"], bank, world["rot90"], shots=5, epochs=3, steps_per_epoch=4, batch_size=50,
                       lr=0.2, out=str(tmp_path / name), **common)
        acc[name] = result.summary["selected"][0]["accuracy"]
    assert acc["gradient"] > acc["random"] + 0.1, acc
    assert acc["gradient"] > acc["full"] - 0.05, acc


def test_cli_select(world, tmp_path, capsys):
    from atlas_fast.cli import main
    out = tmp_path / "sel.safetensors"
    args = ["select", "--model", world["config"], "--pretrained", world["theta0"], "--bank", world["bank"],
            "--data", world["upright"], "--classnames", world["classnames"], "--templates", world["templates"],
            "--shots", "2", "--batches", "2", "--batch-size", "10", "--workers", "0", "--no-progress"]
    assert main([*args, "--keep", "1", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    record = json.loads(open(selection_path(out)).read())
    assert len(TaskVectors.load(out)) == 1
    assert lines[0].startswith("gradient selection: 1 of 2 task vectors in each of 32 blocks")
    for t in record["tasks"]:
        assert f"  {t['source']}: slot 0 in {t['slot0_blocks']} blocks" in lines
    with pytest.raises(SystemExit) as exc:
        main([*args, "--keep", "3", "--out", str(tmp_path / "three.safetensors")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "atlas-fast select: error: keep=3: expected an int with 1 <= keep <= 2 (the bank's task vectors)"
    assert not (tmp_path / "three.safetensors").exists()
    bare = ["select", "--model", world["config"], "--pretrained", world["theta0"], "--bank", world["bank"],
            "--keep", "1", "--no-progress"]
    assert main([*bare, "--method", "random", "--out", str(tmp_path / "random.safetensors")]) == 0
    assert capsys.readouterr().out.startswith("random selection: 1 of 2 task vectors")
    with pytest.raises(SystemExit):
        main([*bare, "--out", str(tmp_path / "nodata.safetensors")])
    assert "data: gradient selection scores on labelled data" in capsys.readouterr().err
