"""`atlas-fast adapt --per-stream` and `--online` on the tiny digits world: S = 3 folders of different sizes in
one run against 3 separate runs, one per folder (epoch mode: the single-data-set `adapt` loop, loop.train;
online mode: `--online` on one folder), and the online files read back by hand."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import adapt_world
from atlas_fast.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = {"upright": (0, 30), "rot90": (1, 17), "rot270": (3, 45)}


@pytest.fixture(scope="module")
def folders(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("streams")
    out = []
    for name, (rot, n) in SIZES.items():
        images, labels = adapt_world.digits(rot)
        out.append(adapt_world.write_folder(str(root / name), images[:n], labels[:n]))
    return out


def _base(w, data, out, *extra):
    return ["adapt", "--model", w["config"], "--pretrained", w["theta0"], "--bank", w["bank"], "--data", *data,
            "--classnames", w["classnames"], "--templates", w["templates"], "--workers", "0", "--no-progress",
            "--out", str(out), *extra]


def _coef(path):
    return load_file(path)["coefficients"]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("objective,extra", [("entropy", []), ("ufm", ["--threshold", "0.5",
                                                                       "--trusted-per-class", "2"]),
                                             ("ce", ["--shots", "1"])])
def test_per_stream_equals_separate_runs(world, folders, tmp_path, objective, extra):
    opts = ["--objective", objective, "--epochs", "2", "--batch-size", "8", "--lr", "0.2", *extra]
    assert main(_base(world, folders, tmp_path / "joint", "--per-stream", *opts)) == 0
    joint = json.loads((tmp_path / "joint" / "summary.json").read_text())
    assert [r["folder"] for r in joint["streams"]] == ["00_upright", "01_rot90", "02_rot270"]
    steps, moved = set(), set()
    for s, folder in enumerate(folders):
        sep = tmp_path / f"sep{s}"
        assert main(_base(world, [folder], sep, *opts)) == 0
        single = json.loads((sep / "summary.json").read_text())
        row = joint["streams"][s]
        mine = _coef(str(tmp_path / "joint" / row["folder"] / "coefficients.safetensors"))
        ref = _coef(str(sep / "coefficients.safetensors"))
        assert row["selected_epoch"] == single["selected_epoch"]
        if single["selected_epoch"] == 0:            # ce keeps θ0 where no epoch beats it
            assert torch.equal(mine, ref)
        else:
            moved.add(s)
            assert ref.abs().max() > 1e-3, "the separate run did not move the coefficients"
            assert _rel(mine, ref) < 1e-4, f"stream {s}: coefficients differ from its separate run by {_rel(mine, ref)}"
        assert row["accuracy"] == pytest.approx(single["selected"][0]["accuracy"], abs=1e-12)
        assert row["initial_accuracy"] == pytest.approx(single["initial"][0]["accuracy"], abs=1e-12)
        stream_summary = json.loads((tmp_path / "joint" / row["folder"] / "summary.json").read_text())
        assert stream_summary["last"][0]["accuracy"] == single["last"][0]["accuracy"]
        assert stream_summary["last"][0]["loss"] == pytest.approx(single["last"][0]["loss"], rel=1e-5)
        steps.add(row["steps"])
        for f in ("coefficients.png", "curves.png", "log.jsonl"):
            assert os.path.getsize(tmp_path / "joint" / row["folder"] / f) > 0
    if objective != "ce":     # k shots per class: every stream has the same training set size
        assert len(steps) > 1, "the streams should run different numbers of steps"
    assert len(moved) >= 2


@pytest.mark.parametrize("episodic", [False, True])
def test_online_equals_separate_online_runs(world, folders, tmp_path, episodic):
    opts = ["--online", "--objective", "entropy", "--batch-size", "8", "--lr", "0.05"] + (["--episodic"] * episodic)
    assert main(_base(world, folders, tmp_path / "joint", *opts)) == 0
    joint = json.loads((tmp_path / "joint" / "summary.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "joint" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == sum(n for _, n in SIZES.values())
    assert os.path.getsize(tmp_path / "joint" / "running_accuracy.png") > 0
    for s, (folder, (name, (_, n))) in enumerate(zip(folders, SIZES.items())):
        sep = tmp_path / f"sep{s}"
        assert main(_base(world, [folder], sep, *opts)) == 0
        one = [json.loads(line) for line in (sep / "predictions.jsonl").read_text().splitlines()]
        mine = [r for r in rows if r["stream"] == name]
        assert [r["sample"] for r in mine] == list(range(n)), "a stream is predicted in folder order, once each"
        assert [r["sample"] for r in one] == list(range(n))
        assert [r["prediction"] for r in mine] == [r["prediction"] for r in one]
        np.testing.assert_allclose([r["confidence"] for r in mine], [r["confidence"] for r in one], rtol=1e-5)
        # the accuracy is counted from the predictions written, against the folder's labels
        labels = [int(os.path.basename(os.path.dirname(r["path"]))) for r in mine]
        assert labels == [r["label"] for r in mine]
        row = joint["streams"][s]
        assert row["accuracy"] == pytest.approx(np.mean([r["prediction"] == y for r, y in zip(mine, labels)]))
        assert row["updates"] == -(-n // 8)
        a = _coef(str(tmp_path / "joint" / row["folder"] / "coefficients.safetensors"))
        b = _coef(str(sep / f"00_{name}" / "coefficients.safetensors"))
        if episodic:
            assert torch.equal(a, torch.zeros_like(a)) and torch.equal(b, a)
        else:
            assert b.abs().max() > 1e-3
            assert _rel(a, b) < 1e-4, f"stream {s}: coefficients differ from its separate run by {_rel(a, b)}"


def test_stream_flag_errors(world, folders, tmp_path, capsys):
    for extra, message in ((["--episodic"], "--episodic: only with --online"),
                           (["--online", "--per-stream"], "choose one"),
                           (["--online", "--objective", "ce"], "objective='ce': online adaptation"),
                           (["--per-stream", "--objective", "negation"], "objective='negation'")):
        with pytest.raises(SystemExit):
            main(_base(world, folders, tmp_path / "x", *extra))
        assert message in capsys.readouterr().err
