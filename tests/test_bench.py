"""`atlas-fast bench` end to end at tiny settings, its outputs, and its option errors."""
import json
import os
import subprocess
import sys

import pytest

from atlas_fast import cli
from atlas_fast.bench import step as bench

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 1}}
VARIANT_KEYS = {"name", "step_time_s", "step_times_s", "peak_extra_mb", "images_per_s"}


@pytest.fixture
def tiny_model(tmp_path):
    path = tmp_path / "tiny-vit.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def _bench(*args):
    proc = subprocess.run([sys.executable, "-m", "atlas_fast", "bench", *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def _check_variant(v, steps):
    assert VARIANT_KEYS <= set(v), v
    assert v["status"] == "ok", v
    assert len(v["step_times_s"]) == steps and all(t > 0 for t in v["step_times_s"])
    assert v["step_time_s"] > 0 and v["images_per_s"] > 0 and v["peak_extra_mb"] >= 0


def test_bench_end_to_end(tmp_path, tiny_model):
    out = tmp_path / "out"
    stdout = _bench("--model", tiny_model, "--tasks", "2", "--batch", "2", "--steps", "2", "--warmup", "1",
                    "--backends", "naive,finetune,torch", "--device", "cpu", "--out", str(out))
    results = json.loads((out / "results.json").read_text())
    assert {"machine", "versions", "settings", "variants"} <= set(results)
    assert {"cpu", "cores", "memory_gb"} <= set(results["machine"])
    assert {"python", "torch", "open_clip", "atlas_fast"} <= set(results["versions"])
    assert results["settings"]["tasks"] == 2 and results["settings"]["backends"] == ["naive", "finetune", "torch"]
    assert [v["name"] for v in results["variants"]] == ["naive", "finetune", "floor", "torch"]
    naive, finetune, floor, torch_v = results["variants"]
    for v in (naive, finetune, torch_v):
        _check_variant(v, steps=2)
    assert torch_v["rel_err_out"] <= bench.TOLERANCE["fp32"][0]
    assert torch_v["rel_err_grad"] <= bench.TOLERANCE["fp32"][1]
    assert torch_v["time_vs_naive"] == pytest.approx(torch_v["step_time_s"] / naive["step_time_s"])
    assert floor["bandwidth_gb_s"] > 0 and len(floor["copy_times_s"]) == bench.COPY_REPEATS
    visual, _, _ = bench._load_model(bench.Settings(model=tiny_model))
    assert floor["bank_gb"] == pytest.approx(2 * sum(p.numel() for p in visual.parameters()) * 4 / 1e9)  # T=2, fp32
    assert floor["step_time_s"] == pytest.approx(finetune["step_time_s"] + floor["bank_read_time_s"])
    assert torch_v["time_vs_floor"] == pytest.approx(torch_v["step_time_s"] / floor["step_time_s"])
    assert _is_png(out / "bench.png")
    assert "torch" in stdout and "rel err" in stdout and "time ×floor" in stdout



@pytest.mark.parametrize("bank_dtype", ["int8", "int4"])
def test_bench_quantised_bank(tmp_path, tiny_model, bank_dtype):
    """--bank-dtype int8 | int4: the torch backend on the quantised bank agrees with naive on its dequantised
    copy, the floor reads the quantised bytes, and the cuda backend is reported as not dequantising it."""
    from atlas_fast.bank import quant
    out = tmp_path / "out"
    _bench("--model", tiny_model, "--tasks", "2", "--batch", "2", "--steps", "1", "--warmup", "0", "--bank-dtype",
           bank_dtype, "--backends", "naive,finetune,torch", "--device", "cpu", "--out", str(out))
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["bank_dtype"] == bank_dtype
    by_name = {v["name"]: v for v in results["variants"]}
    assert by_name["torch"]["status"] == "ok"
    assert by_name["torch"]["rel_err_out"] <= bench.TOLERANCE["fp32"][0]
    assert by_name["torch"]["rel_err_grad"] <= bench.TOLERANCE["fp32"][1]
    visual, _, _ = bench._load_model(bench.Settings(model=tiny_model))
    bank = bench._bank(visual, bench.Settings(model=tiny_model, tasks=2, bank_dtype=bank_dtype))
    assert by_name["floor"]["bank_gb"] == pytest.approx(bank.nbytes / 1e9)
    assert bank.format == bank_dtype and bank.nbytes < 0.3 * sum(p.numel() for p in visual.parameters()) * 4 * 2
    assert quant.FORMATS == bench.QUANTIZED_BANKS

def test_bench_low_rank_bank(tmp_path, tiny_model):
    """--rank 3: the torch backend on the factors agrees with naive on the bank multiplied out, and the floor
    reads the factors' bytes."""
    out = tmp_path / "out"
    stdout = _bench("--model", tiny_model, "--tasks", "2", "--batch", "2", "--steps", "1", "--warmup", "0", "--rank",
                    "3", "--backends", "naive,finetune,torch", "--device", "cpu", "--out", str(out))
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["rank"] == 3 and results["settings"]["bank_dtype"] == "fp32"
    by_name = {v["name"]: v for v in results["variants"]}
    assert by_name["torch"]["status"] == "ok"
    assert by_name["torch"]["rel_err_out"] <= bench.TOLERANCE["fp32"][0]
    assert by_name["torch"]["rel_err_grad"] <= bench.TOLERANCE["fp32"][1]
    visual, _, _ = bench._load_model(bench.Settings(model=tiny_model))
    bank = bench._bank(visual, bench.Settings(model=tiny_model, tasks=2, rank=3))
    assert bank.format == "lowrank" and bank.rank == 3
    assert by_name["floor"]["bank_gb"] == pytest.approx(bank.nbytes / 1e9)
    assert "rank 3 (fp32 factors)" in stdout
    with pytest.raises(ValueError, match="--rank 3: a low-rank bank holds float32 factors"):
        bench.validate(bench.Settings(model=tiny_model, rank=3, bank_dtype="bf16", out=str(tmp_path)))


def test_bench_sweep_tta(tmp_path, tiny_model):
    out = tmp_path / "out"
    _bench("--model", tiny_model, "--batch", "2", "--steps", "2", "--warmup", "0", "--backends", "torch",
           "--sweep", "tasks=1,2", "--mode", "tta", "--device", "cpu", "--threads", "1", "--out", str(out))
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["threads"] == 1 and results["machine"]["torch_threads"] == 1
    assert results["sweep"] == {"param": "tasks", "values": [1, 2]} and results["settings"]["mode"] == "tta"
    assert [p["tasks"] for p in results["points"]] == [1, 2]
    for p in results["points"]:
        assert [v["name"] for v in p["variants"]] == ["torch"]
        _check_variant(p["variants"][0], steps=2)
        assert p["variants"][0]["tasks"] == p["tasks"] and p["variants"][0]["torch_threads"] == 1
    assert _is_png(out / "sweep_tasks.png")


@pytest.mark.parametrize("args, option", [
    (["--model", "ViT-B-23"], "--model"),
    (["--backends", "naive,fast"], "--backends"),
    (["--sweep", "depth=1,2"], "--sweep"),
    (["--sweep", "tasks=1,x"], "--sweep"),
    (["--tasks", "0"], "--tasks"),
    (["--bank-dtype", "fp8"], "--bank-dtype"),
    (["--mode", "train"], "--mode"),
    (["--granularity", "task", "--partitions", "4"], "--partitions"),
    (["--partitions", "0"], "--partitions"),
    (["--threads", "0"], "--threads"),
    (["--groups", "2", "--rank", "0"], "--rank"),
])
def test_bad_option_names_it(args, option, capsys, tmp_path, monkeypatch):
    """Every option is checked before anything runs: a bad one exits with status 2 and names itself."""
    monkeypatch.setattr(bench, "_run_job", lambda *a, **k: pytest.fail("a job ran before the options were checked"))
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--device", "cpu", "--out", str(tmp_path / "out"), *args])
    assert exc.value.code == 2
    assert option in capsys.readouterr().err


@pytest.mark.parametrize("spelling, name", [("float32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16"),
                                            ("fp32", "fp32"), ("bf16", "bf16"), ("int4", "int4")])
def test_bank_dtype_takes_the_bank_commands_names(spelling, name, monkeypatch, tmp_path):
    """--bank-dtype float32 | bfloat16 | float16 as `atlas-fast bank --dtype` spells them; the short names still
    work, and the settings (results.json) record the short ones."""
    seen = []
    monkeypatch.setattr(bench, "run", lambda s: seen.append(s) or 0)
    assert cli.main(["bench", "--bank-dtype", spelling, "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    assert seen[0].bank_dtype == name


@pytest.mark.parametrize("where", ["under_a_file", "a_file"])
def test_unwritable_out_is_one_line_error(tmp_path, tiny_model, where):
    blocker = tmp_path / "results"
    blocker.write_text("a file, not a folder")
    out = blocker / "out" if where == "under_a_file" else blocker
    proc = subprocess.run([sys.executable, "-m", "atlas_fast", "bench", "--model", tiny_model, "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"atlas-fast bench: error: --out '{out}': cannot write")


def test_triton_on_cpu_warns_before_running(tmp_path, monkeypatch, capsys, tiny_model):
    seen = []

    def fake_job(job, bar, env=None):
        seen.append(capsys.readouterr().err)
        if job["kind"] == "check":
            return {"triton": {"status": "ok", "rel_err_out": 0.0, "rel_err_grad": 0.0, "note": ""}}
        return {"step_times_s": [1.0]} if job["kind"] == "time" else {"peak_extra_mb": 1.0}

    monkeypatch.setattr(bench, "_run_job", fake_job)
    bench.run(bench.Settings(model=tiny_model, backends=["naive", "triton"], device="cpu", out=str(tmp_path)))
    assert "warning: --backends triton on a CPU runs the Triton interpreter" in seen[0]


def test_floor_row_arithmetic(tmp_path, monkeypatch, tiny_model):
    """floor = finetune's median step + 2 x bank bytes / measured bandwidth; every variant gets its ratio to it."""
    def fake_job(job, bar, env=None):
        kind, variant = job["kind"], job.get("variant")
        if kind == "check":
            return {"torch": {"status": "ok", "rel_err_out": 0.0, "rel_err_grad": 0.0, "note": ""}}
        if kind == "bandwidth":
            return {"bandwidth_gb_s": 10.0, "bank_params": 1_000_000, "bank_bytes_per_task": 2_000_000,
                    "copy_times_s": [0.05] * bench.COPY_REPEATS}
        if kind == "time":
            return {"step_times_s": {"naive": [3.0], "finetune": [1.0, 2.0, 3.0], "torch": [2.5]}[variant]}
        return {"peak_extra_mb": 5.0}

    monkeypatch.setattr(bench, "_run_job", fake_job)
    s = bench.Settings(model=tiny_model, tasks=8, bank_dtype="bf16", out=str(tmp_path))
    assert bench.run(s) == 0
    variants = json.loads((tmp_path / "results.json").read_text())["variants"]
    by_name = {v["name"]: v for v in variants}
    assert [v["name"] for v in variants] == ["naive", "finetune", "floor", "torch"]
    floor = by_name["floor"]
    assert floor["bank_gb"] == pytest.approx(8 * 1e6 * 2 / 1e9)
    assert floor["step_time_s"] == pytest.approx(2.0 + 2 * 16e6 / 10e9)
    assert by_name["torch"]["time_vs_floor"] == pytest.approx(2.5 / floor["step_time_s"])
    assert by_name["torch"]["time_vs_finetune"] == pytest.approx(1.25)
    assert by_name["naive"]["time_vs_floor"] == pytest.approx(3.0 / floor["step_time_s"])


def test_mismatching_backend_is_reported_not_timed(tmp_path, monkeypatch, tiny_model):
    """A backend that disagrees with naive gets no timing run, and the command fails."""
    jobs = []

    def fake_job(job, bar, env=None):
        jobs.append((job["kind"], job.get("variant")))
        if job["kind"] == "check":
            return {"torch": {"status": "mismatch", "rel_err_out": 0.5, "rel_err_grad": 0.5, "note": "beyond"}}
        return {"step_times_s": [1.0, 2.0, 3.0]} if job["kind"] == "time" else {"peak_extra_mb": 10.0}

    monkeypatch.setattr(bench, "_run_job", fake_job)
    s = bench.Settings(model=tiny_model, backends=["naive", "torch"], out=str(tmp_path))
    assert bench.run(s) == 1
    assert ("time", "torch") not in jobs and ("time", "naive") in jobs
    results = json.loads((tmp_path / "results.json").read_text())
    torch_v = results["variants"][1]
    assert torch_v["status"] == "mismatch" and torch_v["step_time_s"] is None and torch_v["rel_err_out"] == 0.5
    assert results["variants"][0]["step_time_s"] == 2.0 and results["variants"][0]["step_time_spread_s"] == 1.0
    assert os.path.exists(tmp_path / "bench.png")
