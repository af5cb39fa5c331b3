"""The command line from --help to an adapted, evaluated and exported model, and its one-line errors."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import adapt_world
from atlas_fast.cli import main
from helpers import assert_rel

pytestmark = pytest.mark.usefixtures("one_thread")


def test_help_lists_the_subcommands():
    out = subprocess.run([sys.executable, "-m", "atlas_fast", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("bank", "adapt", "eval", "merge", "select"):
        assert cmd in out.stdout


def test_bank_adapt_eval_merge(world, tmp_path, capsys):
    import open_clip
    from safetensors import safe_open
    w = world
    bank = str(tmp_path / "bank.safetensors")
    assert main(["bank", "--pretrained", w["theta0"], "--finetuned", *w["finetuned"], "--out", bank]) == 0
    run = tmp_path / "run"
    assert main(["adapt", "--model", w["config"], "--pretrained", w["theta0"], "--bank", bank,
                 "--data", w["upright"], "--classnames", w["classnames"], "--templates", w["templates"],
                 "--shots", "5", "--epochs", "3", "--steps-per-epoch", "4", "--batch-size", "50", "--lr", "0.2",
                 "--workers", "0", "--out", str(run), "--no-progress"]) == 0
    assert "upright:" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    coef_file = str(run / "coefficients.safetensors")

    rows_file = tmp_path / "rows.json"
    assert main(["eval", "--model", w["config"], "--pretrained", w["theta0"], "--data", w["upright"],
                 "--classnames", w["classnames"], "--templates", w["templates"], "--bank", bank,
                 "--coefficients", coef_file, "--finetuned", w["finetuned"][0], "--json", str(rows_file)]) == 0
    rows = {r["model"]: r["accuracy"] for r in json.loads(rows_file.read_text())}
    assert rows["pretrained"] == pytest.approx(summary["initial"][0]["accuracy"])
    assert rows[coef_file] == pytest.approx(summary["selected"][0]["accuracy"])
    assert rows[coef_file] > rows["pretrained"] + 0.3

    merged = str(tmp_path / "merged.pt")
    assert main(["merge", "--model", w["config"], "--pretrained", w["theta0"], "--bank", bank,
                 "--coefficients", coef_file, "--out", merged]) == 0
    clip, _, _ = adapt_world_clip(w)
    open_clip.load_checkpoint(clip, merged)
    # θ0 + Σ_t c[t, b] τ_t,b by hand, from the files alone
    theta0 = torch.load(w["theta0"], weights_only=True)
    with safe_open(coef_file, framework="pt") as f:
        c, names = f.get_tensor("coefficients"), json.loads(f.metadata()["block_names"])
    with safe_open(bank, framework="pt") as f:
        for b, name in enumerate(names):
            want = theta0["visual." + name] + torch.einsum("t,t...->...", c[:, b], f.get_tensor(name))
            torch.testing.assert_close(clip.state_dict()["visual." + name], want, rtol=1e-6, atol=1e-6)
    assert torch.equal(clip.state_dict()["text_projection"], theta0["text_projection"])

    assert main(["eval", "--model", w["config"], "--pretrained", merged, "--data", w["upright"],
                 "--classnames", w["classnames"], "--templates", w["templates"], "--json", str(rows_file)]) == 0
    assert json.loads(rows_file.read_text())[0]["accuracy"] == pytest.approx(rows[coef_file], abs=1e-9)


def adapt_world_clip(w):
    from atlas_fast.adapt.models import load_clip
    return load_clip(w["config"])


def _adapt_error(world, capsys, *extra, data=None, bank=None, classnames=None):
    args = ["adapt", "--model", world["config"], "--pretrained", world["theta0"],
            "--bank", bank or world["bank"], "--data", data or world["upright"],
            "--classnames", classnames or world["classnames"], "--templates", world["templates"],
            "--epochs", "1", "--workers", "2", "--no-progress", *extra]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("atlas-fast adapt: error: ")
    return err[-1]


def _errors_against_checkpoints(w, tv):
    """{(task vector, block): ‖τ_bank − τ‖ / ‖τ‖} against τ taken directly from the world's checkpoints, for the
    blocks a checkpoint changes."""
    base = torch.load(w["theta0"], weights_only=True)
    errors = {}
    for t, path in enumerate(w["finetuned"]):
        tuned = torch.load(path, weights_only=True)
        for name, v in tv.to(dtype=torch.float32).vectors.items():
            tau = tuned["visual." + name].float() - base["visual." + name].float()
            if tau.norm() > 0:
                errors[t, name] = ((v[t] - tau).norm() / tau.norm()).item()
    return errors


@pytest.mark.parametrize("dtype, bound", [("int8", 0.01), ("int4", 0.15)])
def test_quantised_bank(world, tmp_path, capsys, dtype, bound):
    from atlas_fast import TaskVectors
    w = world
    bank = tmp_path / f"{dtype}.safetensors"
    args = ["bank", "--pretrained", w["theta0"], "--finetuned", *w["finetuned"], "--out", str(bank), "--dtype", dtype]
    assert main(args + (["--group-size", "16"] if dtype == "int4" else [])) == 0
    out = capsys.readouterr().out
    assert f"{dtype} bank" in out and "relative error per block" in out
    tv = TaskVectors.load(bank)
    assert tv.format == dtype
    for block, err in _errors_against_checkpoints(w, tv).items():
        assert err < bound, block


def test_low_rank_bank_adapts(world, tmp_path, capsys):
    """bank --energy 0.99: every task vector within √(1 − 0.99) of the checkpoints' difference; adapt trains on it."""
    from atlas_fast import TaskVectors
    w = world
    bank = tmp_path / "lowrank.safetensors"
    assert main(["bank", "--pretrained", w["theta0"], "--finetuned", *w["finetuned"], "--out", str(bank),
                 "--energy", "0.99"]) == 0
    out = capsys.readouterr().out
    assert "lowrank bank (rank" in out and "energy of ‖τ‖² kept per block" in out
    tv = TaskVectors.load(bank)
    assert tv.format == "lowrank" and min(tv.lowrank_energy.values()) >= 0.99
    for block, err in _errors_against_checkpoints(w, tv).items():
        assert err <= 0.1 + 1e-5, block
    run = tmp_path / "run"
    assert main(["adapt", "--model", w["config"], "--pretrained", w["theta0"], "--bank", str(bank),
                 "--data", w["upright"], "--classnames", w["classnames"], "--templates", w["templates"],
                 "--shots", "5", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "20",
                 "--workers", "0", "--out", str(run), "--no-progress"]) == 0
    assert json.loads((run / "summary.json").read_text())["selected_epoch"] == 1
    with pytest.raises(SystemExit):
        main(["bank", "--pretrained", w["theta0"], "--finetuned", *w["finetuned"], "--out", str(bank), "--rank", "2",
              "--dtype", "int8"])
    assert "--dtype int8 cannot be combined" in capsys.readouterr().err


def test_offloaded_bank_learns_what_a_resident_one_learns(world, tmp_path, monkeypatch):
    """adapt --offload pageable (the bank stays mapped on the host, streamed module by module) learns the same
    coefficients as the resident bank, step for step. Adam's first step from c = 0 moves every coefficient by
    lr · g / (|g| + eps) = ±lr (no warm-up step of 3 at warmup 0.1): each one got a gradient."""
    from safetensors.torch import load_file
    first = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if not first:
            first.append(self.param_groups[0]["params"][0].detach().clone())
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    w = world
    bank = str(tmp_path / "bank.safetensors")
    assert main(["bank", "--pretrained", w["theta0"], "--finetuned", *w["finetuned"], "--out", bank]) == 0
    coefs = []
    for run, extra in (("resident", []), ("offloaded", ["--offload", "pageable"])):
        assert main(["adapt", "--model", w["config"], "--pretrained", w["theta0"], "--bank", bank,
                     "--data", w["upright"], "--classnames", w["classnames"], "--templates", w["templates"],
                     "--shots", "5", "--epochs", "1", "--steps-per-epoch", "3", "--batch-size", "20", "--lr", "0.2",
                     "--workers", "0", "--out", str(tmp_path / run), "--no-progress", *extra]) == 0
        coefs.append(load_file(str(tmp_path / run / "coefficients.safetensors"))["coefficients"])
    assert_rel(first[0].abs(), torch.full_like(first[0], 0.2), 1e-4, "|coefficients| after Adam's first step")
    assert_rel(coefs[1], coefs[0], 1e-5, "coefficients")


def test_missing_files(world, tmp_path, capsys):
    assert "nope.safetensors: no such task-vector file" in _adapt_error(
        world, capsys, bank=str(tmp_path / "nope.safetensors"))
    assert "missing: no such data folder" in _adapt_error(world, capsys, data=str(tmp_path / "missing"))
    line = _adapt_error(world, capsys, "--pretrained", str(tmp_path / "gone.pt"))
    assert "gone.pt: no such checkpoint file" in line


def test_bank_of_another_architecture(world, tmp_path, capsys):
    from open_clip.transformer import VisionTransformer

    from atlas_fast import synthetic_task_vectors
    other = VisionTransformer(image_size=16, patch_size=4, width=32, layers=2, heads=4, mlp_ratio=2.0,
                              output_dim=32)
    path = str(tmp_path / "other.safetensors")
    synthetic_task_vectors(other, 2).save(path)
    line = _adapt_error(world, capsys, bank=path)
    assert "other.safetensors: does not match the model's image tower" in line and "shape" in line


def test_bad_data(world, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "empty: no class folders" in _adapt_error(world, capsys, data=str(tmp_path / "empty"))
    names = tmp_path / "nine.txt"
    names.write_text("\n".join(adapt_world.CLASSNAMES[:9]))
    assert "nine.txt: 9 class names for 10 classes in the data" in _adapt_error(
        world, capsys, classnames=str(names))
    assert "shots=1000: class '0' has only" in _adapt_error(world, capsys, "--shots", "1000")
    small = tmp_path / "small"
    for c in range(10):
        src = os.path.join(world["upright"], str(c))
        os.makedirs(small / str(c))
        for f in sorted(os.listdir(src))[:3]:
            shutil.copy(os.path.join(src, f), small / str(c) / f)
    (small / "3" / "zz_broken.png").write_bytes(b"\x89PNG truncated")
    line = _adapt_error(world, capsys, data=str(small))
    assert "zz_broken.png: unreadable image" in line


def test_python_functions_are_exported():
    import atlas_fast
    import atlas_fast.adapt.loop
    from atlas_fast.adapt import api
    assert atlas_fast.evaluate is api.evaluate and atlas_fast.merge is api.merge
    assert atlas_fast.build_bank is api.build_bank
    # the package is callable as adapt(): the call reaches adapt()'s own argument checks
    with pytest.raises(ValueError, match="objective='nope': expected one of ce, entropy, ufm, negation"):
        atlas_fast.adapt("ViT-B-32", "bank.safetensors", "data", objective="nope")


def test_bank_mismatch_is_named_and_can_be_overridden(world, tmp_path, capsys):
    """eval and merge with a bank whose task vectors are swapped: one line naming the block, the task vector and
    --allow-bank-mismatch; with the flag they run. The same bank under other source names (moved checkpoints) runs
    without it."""
    import atlas_fast
    from atlas_fast.adapt import load_model
    w = world
    bank = atlas_fast.TaskVectors.load(w["bank"])
    swapped, moved = str(tmp_path / "swapped.safetensors"), str(tmp_path / "moved.safetensors")
    atlas_fast.TaskVectors({k: v[[1, 0]] for k, v in bank.vectors.items()}, sources=bank.sources).save(swapped)
    atlas_fast.TaskVectors(bank.vectors, sources=["/moved/a.pt", "/moved/b.pt"]).save(moved)
    atlas = atlas_fast.compose(load_model(w["config"], w["theta0"], device="cpu").encoder, bank)
    with torch.no_grad():
        atlas.coefficients.uniform_(0.1, 0.5)
    coef = str(tmp_path / "coef.safetensors")
    atlas.save_coefficients(coef)
    common = ["--model", w["config"], "--pretrained", w["theta0"], "--coefficients", coef, "--device", "cpu"]
    evaluate = ["eval", *common, "--data", w["upright"], "--classnames", w["classnames"], "--templates",
                w["templates"]]
    merge = ["merge", *common, "--out", str(tmp_path / "merged.pt")]
    for args in (evaluate, merge):
        with pytest.raises(SystemExit) as exc:
            main(args + ["--bank", swapped])
        assert exc.value.code == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert "coef.safetensors: saved for another bank: block 'class_embedding' of task vector 0 (" in line
        assert "--allow-bank-mismatch" in line
        assert main(args + ["--bank", swapped, "--allow-bank-mismatch"]) == 0
        assert main(args + ["--bank", moved]) == 0


def test_select_best_without_validation_images(world, tmp_path, capsys):
    line = _adapt_error(world, capsys, "--val-fraction", "0", "--select", "best", "--out", str(tmp_path / "run"))
    assert "select='best': data set 'upright' has no validation images" in line
    assert "use select='last', or val_fraction > 0" in line
