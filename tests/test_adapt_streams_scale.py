"""`atlas-fast adapt --per-stream` and `--online` at scale, on the tiny digits world with 3 streams of different sizes:

- under torchrun (gloo, 2 CPU processes: rank 0 owns stream 0, rank 1 streams 1 and 2) the run writes what one
  process writes: the same files, per-stream coefficients, accuracies, logs and predictions.jsonl;
- with --offload the streamed bank gives the resident bank's run (on a CPU the offload's device copies are host
  copies, its hooks and packing run as on a GPU; the gpu test runs the side stream);
- int8, int4 and low-rank banks: each stream of a joint run equals its own separate run on the same bank (epoch
  mode: the single-data-set `adapt` loop; online mode: a plain loop written here)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import adapt_world
import atlas_fast
from atlas_fast.cli import main

SIZES = {"upright": (0, 30), "rot90": (1, 17), "rot270": (3, 45)}
EPOCHS = ["--objective", "entropy", "--epochs", "2", "--batch-size", "8", "--lr", "0.2"]
ONLINE = ["--online", "--objective", "entropy", "--batch-size", "8", "--lr", "0.05"]
# Two processes group the streams otherwise than one (rank 0 runs stream 0 alone, where one process mixes it with
# the others): the same arithmetic on other GEMM shapes, so float32 rounding apart, amplified a little by AdamW's
# division by the square root of the second moment over the run's steps: the largest seen is 1.5e-6 relative.
PROCESSES_RTOL = 1e-5
CONF_RTOL = 1e-5
# A separate run is other code (the single-data-set loop, the plain loop below), summing in other orders over more
# steps: 1e-4, as tests/test_adapt_streams.py allows.
SEPARATE_RTOL = 1e-4


@pytest.fixture(scope="module")
def folders(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    out = []
    for name, (rot, n) in SIZES.items():
        images, labels = adapt_world.digits(rot)
        out.append(adapt_world.write_folder(str(root / name), images[:n], labels[:n]))
    return out


def _args(w, data, out, *extra, bank=None):
    return ["adapt", "--model", w["config"], "--pretrained", w["theta0"], "--bank", bank or w["bank"],
            "--data", *data, "--classnames", w["classnames"], "--templates", w["templates"], "--workers", "0",
            "--no-progress", "--out", str(out), *extra]


def _one_process(args):
    with adapt_world.single_thread():
        assert main(args) == 0


def _torchrun(nproc, args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "atlas_fast", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _json(path):
    with open(path) as f:
        return json.load(f)


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _coef(path):
    return load_file(str(path))["coefficients"]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _files(out):
    """Every file a run wrote, relative to its folder (the zero-shot head cache aside)."""
    return sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs
                  if os.path.relpath(d, out).split(os.sep)[0] != "cache")


def _assert_coefficients(a, b, what, rtol=PROCESSES_RTOL):
    assert b.abs().max() > 1e-3, f"{what}: the reference did not move the coefficients"
    assert _rel(a, b) < rtol, f"{what}: coefficients differ by {_rel(a, b):.2e} (relative)"


# ---------------------------------------------------------------- torchrun

@pytest.fixture(scope="module")
def runs(world, folders, tmp_path_factory):
    """Each mode once in this process and once as two torchrun processes through the CLI."""
    root = tmp_path_factory.mktemp("torchrun")
    out = {}
    for mode, opts in (("epochs", ["--per-stream", *EPOCHS]), ("online", ONLINE)):
        _one_process(_args(world, folders, root / f"{mode}_one", *opts))
        proc = _ok(_torchrun(2, _args(world, folders, root / f"{mode}_two", *opts)))
        out[mode] = (root / f"{mode}_one", root / f"{mode}_two", proc.stdout)
    return out


def test_per_stream_two_processes_write_what_one_writes(runs):
    one, two, stdout = runs["epochs"]
    assert _files(two) == _files(one)
    a, b = _json(one / "summary.json"), _json(two / "summary.json")
    assert a["processes"] == 1 and b["processes"] == 2
    assert b["streams"] == a["streams"], "folders, steps, selected epochs, accuracies and counts"
    assert len({r["steps"] for r in a["streams"]}) == 3, "the streams should run different numbers of steps"
    for row in a["streams"]:
        folder = row["folder"]
        _assert_coefficients(_coef(two / folder / "coefficients.safetensors"),
                             _coef(one / folder / "coefficients.safetensors"), folder)
        for x, y in zip(_jsonl(one / folder / "log.jsonl"), _jsonl(two / folder / "log.jsonl"), strict=True):
            assert (x["epoch"], x["step"], x["eval"][0]["accuracy"], x["eval"][0]["n"]) == \
                   (y["epoch"], y["step"], y["eval"][0]["accuracy"], y["eval"][0]["n"])
            assert (x["loss"] is None) == (y["loss"] is None)
            if x["loss"] is not None:
                assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        x, y = _json(one / folder / "summary.json"), _json(two / folder / "summary.json")
        assert (x["selected_epoch"], x["tasks"]) == (y["selected_epoch"], y["tasks"])
        for key in ("initial", "selected", "last"):
            assert (x[key][0]["accuracy"], x[key][0]["n"]) == (y[key][0]["accuracy"], y[key][0]["n"])
            assert y[key][0]["loss"] == pytest.approx(x[key][0]["loss"], rel=1e-5)
    assert stdout.count("accuracy per stream") == 1, "rank 0 prints, rank 1 does not"


def test_online_two_processes_write_what_one_writes(runs):
    one, two, _ = runs["online"]
    assert _files(two) == _files(one)
    a, b = _json(one / "summary.json"), _json(two / "summary.json")
    assert b["streams"] == a["streams"] and b["accuracy"] == a["accuracy"] and b["n"] == a["n"]
    rows_one, rows_two = _jsonl(one / "predictions.jsonl"), _jsonl(two / "predictions.jsonl")
    assert len(rows_one) == sum(n for _, n in SIZES.values())
    # the same rows in the same order (step by step, streams in order within a step), confidences to rounding
    assert [{k: v for k, v in r.items() if k != "confidence"} for r in rows_two] == \
           [{k: v for k, v in r.items() if k != "confidence"} for r in rows_one]
    np.testing.assert_allclose([r["confidence"] for r in rows_two], [r["confidence"] for r in rows_one],
                               rtol=CONF_RTOL)
    assert [r["stream"] for r in rows_one[:24]] == ["upright"] * 8 + ["rot90"] * 8 + ["rot270"] * 8
    for row in a["streams"]:
        _assert_coefficients(_coef(two / row["folder"] / "coefficients.safetensors"),
                             _coef(one / row["folder"] / "coefficients.safetensors"), row["folder"])


@pytest.mark.parametrize("mode", ["--per-stream", "--online"])
def test_more_processes_than_streams_are_refused(world, folders, tmp_path, monkeypatch, capsys, mode):
    """Checked before anything is loaded, from torchrun's WORLD_SIZE, in every process alike."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit):
        main(_args(world, folders, tmp_path / "x", mode, "--objective", "entropy"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{mode} under torchrun: 4 processes (--nproc-per-node) for 3 streams (--data)" in err
    assert "start at most 3" in err
    assert not os.path.exists(tmp_path / "x")


# ---------------------------------------------------------------- offload

def _recording_offload(monkeypatch):
    """The BankOffload of every job the stream modes prepare (None where the bank stays resident)."""
    from atlas_fast.adapt import streams
    seen, prepare = [], streams.prepare_job

    def recording(*args, **kwargs):
        job = prepare(*args, **kwargs)
        seen.append(job.atlas._offload)
        return job
    monkeypatch.setattr(streams, "prepare_job", recording)
    return seen


@pytest.mark.parametrize("offload", ["pinned", "pageable"])
def test_offloaded_stream_runs_equal_resident_ones(world, folders, runs, tmp_path, monkeypatch, offload):
    seen = _recording_offload(monkeypatch)
    for mode, opts in (("epochs", ["--per-stream", *EPOCHS]), ("online", ONLINE)):
        resident = runs[mode][0]
        _one_process(_args(world, folders, tmp_path / mode, *opts, "--offload", offload))
        off = seen.pop()
        assert off is not None, "--offload did not reach the composition"
        assert 1 <= off.peak_resident <= 2, "the grouped steps streamed the bank one module ahead"
        assert _json(tmp_path / mode / "summary.json")["streams"] == _json(resident / "summary.json")["streams"]
        for row in _json(resident / "summary.json")["streams"]:
            a = _coef(tmp_path / mode / row["folder"] / "coefficients.safetensors")
            b = _coef(resident / row["folder"] / "coefficients.safetensors")
            _assert_coefficients(a, b, f"{mode} --offload {offload}, {row['folder']}", rtol=1e-6)
    assert [r["prediction"] for r in _jsonl(tmp_path / "online" / "predictions.jsonl")] == \
           [r["prediction"] for r in _jsonl(runs["online"][0] / "predictions.jsonl")]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["--per-stream", "--online"])
def test_gpu_offloaded_stream_runs_equal_resident_ones(world, folders, tmp_path, mode):
    """On the GPU the offloaded bank is pinned host memory copied on a side stream."""
    opts = ["--per-stream", *EPOCHS] if mode == "--per-stream" else ONLINE
    for name, extra in (("resident", []), ("offloaded", ["--offload", "pinned"])):
        assert main(_args(world, folders, tmp_path / name, *opts, "--device", "cuda", "--amp", "off", *extra)) == 0
    a, b = _json(tmp_path / "offloaded" / "summary.json"), _json(tmp_path / "resident" / "summary.json")
    assert a["streams"] == b["streams"]
    for row in b["streams"]:
        _assert_coefficients(_coef(tmp_path / "offloaded" / row["folder"] / "coefficients.safetensors"),
                             _coef(tmp_path / "resident" / row["folder"] / "coefficients.safetensors"),
                             f"{mode} offloaded on the GPU, {row['folder']}")
    if mode == "--online":
        assert [r["prediction"] for r in _jsonl(tmp_path / "offloaded" / "predictions.jsonl")] == \
               [r["prediction"] for r in _jsonl(tmp_path / "resident" / "predictions.jsonl")]


# ---------------------------------------------------------------- bank formats

KINDS = {"int8": ["--dtype", "int8"], "int4": ["--dtype", "int4", "--group-size", "16"], "lowrank": ["--rank", "2"]}


@pytest.fixture(scope="module")
def banks(world, tmp_path_factory):
    """The world's bank in every stored format, made by `atlas-fast bank`."""
    root = tmp_path_factory.mktemp("banks")
    out = {}
    for kind, opts in KINDS.items():
        out[kind] = str(root / f"{kind}.safetensors")
        assert main(["bank", "--pretrained", world["theta0"], "--finetuned", *world["finetuned"], "--out",
                     out[kind], *opts]) == 0
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_per_stream_with_every_bank_format_equals_separate_runs(world, folders, banks, tmp_path, kind):
    assert atlas_fast.TaskVectors.load(banks[kind]).format == kind
    _one_process(_args(world, folders, tmp_path / "joint", "--per-stream", *EPOCHS, bank=banks[kind]))
    joint = _json(tmp_path / "joint" / "summary.json")
    for s, (folder, row) in enumerate(zip(folders, joint["streams"])):
        _one_process(_args(world, [folder], tmp_path / f"sep{s}", *EPOCHS, bank=banks[kind]))
        single = _json(tmp_path / f"sep{s}" / "summary.json")
        assert row["selected_epoch"] == single["selected_epoch"]
        assert row["accuracy"] == single["selected"][0]["accuracy"]
        assert row["initial_accuracy"] == single["initial"][0]["accuracy"]
        _assert_coefficients(_coef(tmp_path / "joint" / row["folder"] / "coefficients.safetensors"),
                             _coef(tmp_path / f"sep{s}" / "coefficients.safetensors"), f"{kind}: {row['folder']}",
                             SEPARATE_RTOL)


def _online_by_hand(world, bank, folder, batch_size, lr):
    """One stream by hand: θ0 composed with `bank`, the zero-shot head, the folder's images in folder order
    (class folders sorted, files sorted), each batch predicted, then one AdamW step on its mean entropy, the
    gradient clipped to norm 1 (adapt_online's default). Returns (predictions, coefficients)."""
    from PIL import Image

    from atlas_fast.adapt import load_model
    from atlas_fast.adapt.heads import zero_shot_head
    loaded = load_model(world["config"], world["theta0"], device="cpu")
    head = zero_shot_head(loaded.module, loaded.tokenizer, adapt_world.CLASSNAMES, ["a photo of the number {}."],
                          progress=False)
    files = [os.path.join(folder, c, f) for c in sorted(os.listdir(folder))
             for f in sorted(os.listdir(os.path.join(folder, c)))]
    x = torch.stack([loaded.preprocess(Image.open(f).convert("RGB")) for f in files])
    atlas = atlas_fast.compose(loaded.encoder, atlas_fast.TaskVectors.load(bank))
    coef = atlas.coefficients
    opt = torch.optim.AdamW([coef], lr=lr, weight_decay=0.0)
    predictions = []
    for start in range(0, len(x), batch_size):
        logits = head(atlas(x[start:start + batch_size])).float()
        predictions += logits.argmax(-1).tolist()
        p = F.softmax(logits, -1)
        (-(p * F.log_softmax(logits, -1)).sum(-1).mean()).backward()
        torch.nn.utils.clip_grad_norm_([coef], 1.0)
        opt.step()
        opt.zero_grad()
    return predictions, coef.detach().clone()


@pytest.mark.parametrize("kind", list(KINDS))
def test_online_with_every_bank_format_equals_separate_runs(world, folders, banks, tmp_path, kind):
    _one_process(_args(world, folders, tmp_path / "joint", *ONLINE, bank=banks[kind]))
    joint = _json(tmp_path / "joint" / "summary.json")
    rows = _jsonl(tmp_path / "joint" / "predictions.jsonl")
    for folder, row in zip(folders, joint["streams"]):
        with adapt_world.single_thread():
            predictions, coef = _online_by_hand(world, banks[kind], folder, 8, 0.05)
        assert [r["prediction"] for r in rows if r["stream"] == row["stream"]] == predictions
        _assert_coefficients(_coef(tmp_path / "joint" / row["folder"] / "coefficients.safetensors"), coef,
                             f"{kind}: {row['folder']}", SEPARATE_RTOL)
