"""Bad inputs and a changing environment, one case each: every one ends in one line naming the option and its value
(or the file), never a traceback, a signal, a silently wrong result or a lost file. The commands run in-process
(atlas_fast.cli.main); a subprocess only where the exit status of a fatal signal is the point."""
import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from atlas_fast import TaskVectors, compose, synthetic_task_vectors
from atlas_fast.cli import main
from atlas_fast.errors import FileChangedError
from atlas_fast.io.atomic import atomic_write

pytestmark = pytest.mark.usefixtures("one_thread")
HAS_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None


def _error_line(capsys, argv):
    """The one stderr line of a command that fails on its input (exit status 2)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("atlas-fast ")]
    assert len(lines) == 1, err
    return lines[0]


def _adapt(w, out, *extra):
    return ["adapt", "--model", w["config"], "--pretrained", w["theta0"], "--bank", w["bank"], "--data", w["upright"],
            "--classnames", w["classnames"], "--templates", w["templates"], "--shots", "2", "--epochs", "1",
            "--steps-per-epoch", "3", "--batch-size", "20", "--workers", "0", "--no-progress", "--out", str(out),
            *extra]


@pytest.fixture(scope="module")
def coefficients(world, tmp_path_factory):
    """A coefficient file of the world's bank, as adapt writes it (random values: merge reads any)."""
    from atlas_fast.adapt import load_model
    loaded = load_model(world["config"], world["theta0"], device="cpu")
    atlas = compose(loaded.encoder, TaskVectors.load(world["bank"]))
    with torch.no_grad():
        atlas.coefficients.normal_(0, 0.3)
    path = str(tmp_path_factory.mktemp("coefficients") / "coefficients.safetensors")
    atlas.save_coefficients(path)
    return path


def _merge(w, coefficients, out):
    return ["merge", "--model", w["config"], "--pretrained", w["theta0"], "--bank", w["bank"],
            "--coefficients", coefficients, "--out", str(out)]


# -- options reported as what they are, not as a problem with the bank

@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")
def test_device_cuda_without_a_gpu(world, tmp_path, capsys):
    assert _error_line(capsys, _adapt(world, tmp_path / "run", "--device", "cuda")) == (
        "atlas-fast adapt: error: --device cuda: no CUDA GPU is usable here (torch.cuda.is_available() is False); "
        "use cpu")


def test_unknown_backend(world, tmp_path, capsys):
    assert _error_line(capsys, _adapt(world, tmp_path / "run", "--backend", "foo")) == (
        "atlas-fast adapt: error: --backend foo: expected one of torch, triton, cuda, auto")


@pytest.mark.parametrize("mode", ["--per-stream", "--online"])
def test_unknown_backend_many_streams(world, tmp_path, capsys, mode):
    argv = [a for a in _adapt(world, tmp_path / "run", "--backend", "foo", mode) if a not in ("--shots", "2")]
    argv[argv.index("--data") + 1:argv.index("--data") + 2] = [world["upright"], world["upright"]]
    assert _error_line(capsys, argv + ["--objective", "entropy"]) == (
        "atlas-fast adapt: error: --backend foo: expected one of torch, triton, cuda, auto")


def test_zero_partitions(world, tmp_path, capsys):
    assert _error_line(capsys, _adapt(world, tmp_path / "run", "--partitions", "0")) == (
        "atlas-fast adapt: error: --partitions 0: expected an int >= 1 (random partitions per block)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton runs on the GPU")
def test_triton_on_a_cpu(world, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # the tests' interpreter; a user's CPU has none
    line = _error_line(capsys, _adapt(world, tmp_path / "run", "--backend", "triton"))
    assert line.startswith("atlas-fast adapt: error: --backend triton: cannot run on cpu: Triton runs CPU tensors "
                           "only in its interpreter")


def test_diverging_learning_rate(world, tmp_path, capsys):
    line = _error_line(capsys, _adapt(world, tmp_path / "run", "--lr", "1e30"))
    assert line.startswith("atlas-fast adapt: error: --lr 1e+30: training diverged at step ")
    assert line.endswith("; lower the learning rate")


def test_nan_init(world, tmp_path, capsys):
    assert _error_line(capsys, _adapt(world, tmp_path / "run", "--init", "nan")) == (
        "atlas-fast adapt: error: --init nan: expected a finite number (the initial value of every coefficient)")


def test_adapt_out_is_a_file(world, tmp_path, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("a file")
    assert _error_line(capsys, _adapt(world, blocker)) == (
        f"atlas-fast adapt: error: --out {blocker}: cannot write: it is a file; name a folder")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")
def test_bench_cuda_backend_on_a_cpu(world, tmp_path, capsys, monkeypatch):
    from atlas_fast.bench import step as bench
    monkeypatch.setattr(bench, "_run_job", lambda *a, **k: pytest.fail("a child ran before the backends were checked"))
    assert _error_line(capsys, ["bench", "--model", world["config"], "--device", "cpu", "--backends", "naive,cuda",
                                "--out", str(tmp_path / "bench")]) == (
        "atlas-fast bench: error: --backends cuda: cannot run on cpu: the CUDA kernels run on CUDA tensors, not on "
        "cpu; use backend='torch' or 'auto'")


# -- output files

def test_merge_out_under_a_file(world, coefficients, tmp_path, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("a file")
    out = blocker / "merged.pt"
    assert _error_line(capsys, _merge(world, coefficients, out)) == (
        f"atlas-fast merge: error: --out {out}: cannot write: {blocker} is a file, not a folder")


@pytest.mark.parametrize("case", ["missing", "a_bank", "truncated"])
def test_merge_with_a_bad_coefficient_file(world, coefficients, tmp_path, capsys, case):
    """One reader for every coefficient file: merge (its layout) and load_coefficients name the file and what is
    wrong with it, and nothing is written."""
    path = tmp_path / "coefficients.safetensors"
    if case == "a_bank":
        shutil.copy(world["bank"], path)
    elif case == "truncated":
        with open(coefficients, "rb") as f:
            data = f.read()
        path.write_bytes(data[:len(data) // 2])
    out = tmp_path / "merged.pt"
    line = _error_line(capsys, _merge(world, str(path), out))
    assert line.startswith(f"atlas-fast merge: error: {path}: " + {
        "missing": "no such coefficient file", "a_bank": "not an atlas_fast coefficient file",
        "truncated": "unreadable or truncated coefficient file ("}[case]), line
    assert not out.exists()


def test_merge_out_onto_a_folder(world, coefficients, tmp_path, capsys):
    (tmp_path / "kept.txt").write_text("x")
    assert _error_line(capsys, _merge(world, coefficients, tmp_path)) == (
        f"atlas-fast merge: error: --out {tmp_path}: cannot write: it is a folder; name a file")
    assert sorted(os.listdir(tmp_path)) == ["kept.txt"]


def test_merge_onto_a_full_disk(world, coefficients, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    out = tmp_path / "merged.pt"
    out.write_bytes(b"the previous file")
    monkeypatch.setattr(torch, "save", full)
    assert _error_line(capsys, _merge(world, coefficients, out)) == (
        f"atlas-fast merge: error: --out {out}: cannot write: No space left on device")
    assert os.listdir(tmp_path) == ["merged.pt"] and out.read_bytes() == b"the previous file"


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs (root only; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("name", ["merged.pt", "merged.safetensors"])
def test_merge_onto_a_really_full_disk(world, coefficients, tiny_disk, capsys, name):
    """torch.save reports a full disk as `unexpected pos` and safetensors as its own error: both become the line."""
    out = tiny_disk / name
    assert _error_line(capsys, _merge(world, coefficients, out)) == (
        f"atlas-fast merge: error: --out {out}: cannot write: No space left on device")
    assert os.listdir(tiny_disk) == []


def test_bank_out_in_a_missing_folder(world, tmp_path, capsys):
    out = tmp_path / "missing" / "bank.safetensors"
    assert _error_line(capsys, ["bank", "--pretrained", world["theta0"], "--finetuned", *world["finetuned"],
                                "--out", str(out)]) == (
        f"atlas-fast bank: error: --out {out}: cannot write: the folder {tmp_path / 'missing'} does not exist")


def test_eval_json_in_a_missing_folder(world, tmp_path, capsys):
    out = tmp_path / "missing" / "rows.json"
    assert _error_line(capsys, ["eval", "--model", world["config"], "--pretrained", world["theta0"], "--data",
                                world["upright"], "--classnames", world["classnames"], "--templates",
                                world["templates"], "--json", str(out)]) == (
        f"atlas-fast eval: error: --json {out}: cannot write: the folder {tmp_path / 'missing'} does not exist")


_WRITER = textwrap.dedent(r"""
    import os, sys, threading, time
    from atlas_fast.io.atomic import atomic_write
    def write(tmp):
        with open(tmp, "w") as f:
            f.write("half")
            f.flush()
            os.write(1, b"writing\n")
            time.sleep(60)
    for path in sys.argv[1:]:
        threading.Thread(target=atomic_write, args=(path, write), daemon=True).start()
    time.sleep(60)
""")


def _writers(*jobs):
    """A process per job, inside atomic_write() of each of the job's paths, stopped after writing part of each
    temporary file."""
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, *map(str, paths)], stdout=subprocess.PIPE, text=True)
             for paths in jobs]
    for proc, paths in zip(procs, jobs):
        assert [proc.stdout.readline() for _ in paths] == ["writing\n"] * len(paths)
    return procs


def test_killed_writer_leaves_nothing_behind(tmp_path):
    """A writer killed in atomic_write leaves its temporary file; the next write of that path removes it, and keeps
    the temporary files of a live writer and of other paths."""
    target, other = tmp_path / "summary.json", tmp_path / "other.json"
    killed, live = _writers((target, other), (target,))
    try:
        killed.kill()
        killed.wait()
        temporaries = {p: sorted(n for n in os.listdir(tmp_path) if n.startswith(f".tmp-{p.name}.")) for p in
                       (target, other)}
        assert len(temporaries[target]) == 2 and len(temporaries[other]) == 1
        atomic_write(target, lambda tmp: open(tmp, "w").write("done"))
        assert target.read_text() == "done"
        left = sorted(n for n in os.listdir(tmp_path) if n.startswith(".tmp-"))
        assert left == sorted([next(n for n in temporaries[target] if f"-{live.pid}-" in n), *temporaries[other]])
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_mode_open_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain", "w") as f:
            f.write("x")
        atomic_write(tmp_path / "atomic", lambda tmp: open(tmp, "w").write("x"))
        assert oct(os.stat(tmp_path / "atomic").st_mode) == oct(os.stat(tmp_path / "plain").st_mode)
        os.chmod(tmp_path / "atomic", 0o640)   # an existing file keeps its mode, as open(..., "w") keeps it
        atomic_write(tmp_path / "atomic", lambda tmp: open(tmp, "w").write("y"))
        assert oct(os.stat(tmp_path / "atomic").st_mode & 0o777) == oct(0o640)
    finally:
        os.umask(old)


# -- memory-mapped banks whose file changes

def _mapped_bank(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(37, 70), torch.nn.LayerNorm(70))
    path = tmp_path / "bank.safetensors"
    synthetic_task_vectors(model, 3).save(path)
    tv = TaskVectors.load(path, mmap=True)
    time.sleep(0.05)   # past the file system's timestamp granularity: a write now gets another mtime
    return model, path, tv


def _offset(path, name):
    """Byte offset of tensor `name`'s data in a safetensors file, read from its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return 8 + n + header[name]["data_offsets"][0]


def test_nan_written_into_a_mapped_file(tmp_path):
    model, path, tv = _mapped_bank(tmp_path)
    with open(path, "r+b") as f:
        f.seek(_offset(path, "0.weight"))
        f.write(struct.pack("<f", float("nan")))
    with pytest.raises(FileChangedError) as exc:
        compose(model, tv)
    assert str(exc.value) == (f"{path}: this memory-mapped file was modified since it was opened (its values may no "
                              f"longer be the ones checked when it was read); load it again")


def test_mapped_file_truncated_before_compose(tmp_path):
    model, path, tv = _mapped_bank(tmp_path)
    size = os.path.getsize(path)
    os.truncate(path, size - 100)
    with pytest.raises(FileChangedError) as exc:
        compose(model, tv)
    assert str(exc.value) == (f"{path}: this memory-mapped file was truncated since it was opened ({size - 100} bytes, "
                              f"its tensors need {size}): reading them would kill the process with SIGBUS; load it "
                              f"again")


def test_mapped_file_replaced(tmp_path):
    model, path, tv = _mapped_bank(tmp_path)
    synthetic_task_vectors(model, 3, seed=1).save(path)
    with pytest.raises(FileChangedError, match="was replaced by another file since it was opened"):
        compose(model, tv)


_MAPPED = textwrap.dedent("""
    import os, sys, torch
    from atlas_fast import TaskVectors, compose, synthetic_task_vectors
    model = torch.nn.Sequential(torch.nn.Linear(37, 700), torch.nn.LayerNorm(700))
    path = sys.argv[1]
    synthetic_task_vectors(model, 3).save(path)
    tv = TaskVectors.load(path, mmap=True)
    atlas = compose(model, tv)
    if sys.argv[2] == "truncate":
        os.truncate(path, 100)
        atlas(torch.randn(2, 37))
    else:
        tv["0.weight"].add_(1)
    print("went on")
""")


@pytest.mark.skipif(not HAS_CC, reason="the fault handler is built with a C compiler")
@pytest.mark.parametrize("what, message", [
    ("truncate", "{path}: this memory-mapped file was truncated while its tensors were in use (SIGBUS reading past "
                 "its new end); keep a loaded bank's file unchanged"),
    ("write", "a write into a tensor mapped read-only from {path} (SIGSEGV); clone() a mapped tensor to edit it")])
def test_mapped_file_fails_while_in_use(tmp_path, what, message):
    """Truncating a mapped file during a run, or writing into a mapped tensor: one line naming the file, status 1
    (not a bare SIGBUS, nor a write that a later release() silently undoes)."""
    path = tmp_path / "bank.safetensors"
    proc = subprocess.run([sys.executable, "-c", _MAPPED, str(path), what], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "went on" not in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == "atlas_fast: error: " + message.format(path=path)
