"""Data-parallel coefficient learning under torchrun (gloo on CPU processes): two processes learn what one
process learns on the same global batches, a killed two-process run resumes, with two processes or with one,
and ends where an uninterrupted run ends."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from adapt_world import single_thread
from atlas_fast.adapt import adapt
from atlas_fast.adapt.distributed import Ranks

HERE = os.path.dirname(os.path.abspath(__file__))
# a mid-epoch checkpoint (every 2 steps, 3 steps an epoch), seeded augmentations that must replay per item
SETTINGS = dict(epochs=3, steps_per_epoch=3, batch_size=16, lr=0.1, seed=5, shots=4, augment=True,
                checkpoint_every=2, workers=0, progress=False)
# float32 rounding of a gradient summed in another order, through nine AdamW steps
RTOL, ATOL = 1e-5, 5e-6


def _paths(world):
    return dict(model=world["config"], bank=world["bank"], data=[world["upright"]], pretrained=world["theta0"],
                classnames=world["classnames"], templates=world["templates"])


def _torchrun(nproc, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _worker(world, out, nproc, **extra):
    settings = {**_paths(world), **SETTINGS, "out": str(out), **extra}
    return _torchrun(nproc, os.path.join(HERE, "distributed_adapt.py"), json.dumps(settings))


def _cli(world, out, nproc, *extra):
    s = SETTINGS
    args = ["-m", "atlas_fast", "adapt", "--model", world["config"], "--pretrained", world["theta0"],
            "--bank", world["bank"], "--data", world["upright"], "--classnames", world["classnames"],
            "--templates", world["templates"], "--shots", str(s["shots"]), "--augment", "--epochs", str(s["epochs"]),
            "--steps-per-epoch", str(s["steps_per_epoch"]), "--batch-size", str(s["batch_size"]),
            "--lr", str(s["lr"]), "--seed", str(s["seed"]), "--checkpoint-every", str(s["checkpoint_every"]),
            "--workers", "0", "--no-progress", "--out", str(out), *extra]
    return _torchrun(nproc, *args)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _coefficients(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["coefficients"]


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    """An uninterrupted run in this process and the same run as two torchrun processes through the CLI."""
    root = tmp_path_factory.mktemp("distributed")
    torch.manual_seed(0)
    with single_thread():
        single = adapt(**_paths(world), **SETTINGS, out=str(root / "one"))
    two = _ok(_cli(world, root / "two", 2))
    return {"root": root, "single": single, "cli_stdout": two.stdout}


def test_two_processes_learn_what_one_learns(runs):
    root = runs["root"]
    one, two = _coefficients(root / "one"), _coefficients(root / "two")
    assert not torch.equal(one, torch.zeros_like(one))
    torch.testing.assert_close(two, one, rtol=RTOL, atol=ATOL)
    # evaluation is shared between the processes and its counts summed: the same accuracies
    for a, b in zip(_log(root / "one"), _log(root / "two")):
        assert [e["accuracy"] for e in a["eval"]] == [e["accuracy"] for e in b["eval"]]
        assert [e["n"] for e in a["eval"]] == [e["n"] for e in b["eval"]]
        if a["loss"] is not None:
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    summary = json.loads((root / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["selected_epoch"] == runs["single"].summary["selected_epoch"]
    assert runs["cli_stdout"].count("selected epoch") == 1     # rank 0 prints, rank 1 does not


def test_killed_two_process_run_resumes_with_two_or_one(world, runs):
    root = runs["root"]
    killed = root / "killed"
    proc = _worker(world, killed, 2, kill_at=5)
    assert proc.returncode != 0 and "killed at step 5" in proc.stderr
    assert torch.load(killed / "checkpoint.pt", weights_only=False)["step"] == 4
    shutil.copytree(killed, root / "killed_one")
    # the same process count replays the same arithmetic: bit for bit the uninterrupted two-process run
    _ok(_cli(world, killed, 2, "--resume"))
    assert torch.equal(_coefficients(killed), _coefficients(root / "two"))
    assert _log(killed) == _log(root / "two")
    # another process count: the run ends where the uninterrupted ones end, to float32 rounding
    with single_thread():
        resumed = adapt(**_paths(world), **SETTINGS, out=str(root / "killed_one"), resume=True)
    torch.testing.assert_close(resumed.atlas.coefficients.detach(), _coefficients(root / "one"), rtol=RTOL, atol=ATOL)


def test_shares_split_every_batch_exactly():
    items = list(range(10))
    for world_size in (1, 2, 3, 4):
        shares = [Ranks(r, world_size).share(items) for r in range(world_size)]
        assert sum(shares, []) == items
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_uneven_global_batch_is_refused():
    Ranks(1, 4).check_divides("batch_size", 32)
    with pytest.raises(ValueError, match=r"batch_size=30: a global batch must split evenly across the 4 processes"):
        Ranks(1, 4).check_divides("batch_size", 30)
