"""`atlas-fast bench --mode tta --streams S`: its four variants make the same updates (the grouped step against
the paper-style functional_call merges, per stream and per sample), and the command end to end at tiny sizes."""
import json
import subprocess
import sys

import pytest
import torch

from atlas_fast.bench import tta as bench_tta
from helpers import assert_rel

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture
def tiny_model(tmp_path):
    path = tmp_path / "tiny-tta.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def _coefficients(runner):
    if runner.variant == "grouped":
        return runner.tta.coefficients()
    return torch.stack([r.detach() for r in runner.rows])


def test_variants_make_the_same_updates(tiny_model):
    s = bench_tta.TTASettings(model=tiny_model, tasks=2, batch=2, streams=3, backend="torch", lr=0.05)
    got = {}
    for variant in bench_tta.VARIANTS:
        runner = bench_tta.Runner(variant, s)
        for _ in range(2):
            runner.step()
        got[variant] = _coefficients(runner)
    ref = got["naive"]
    assert ref.abs().max() > 1e-2
    assert (ref[0] - ref[1]).abs().max() > 1e-3, "the streams should learn different coefficients"
    for variant in ("grouped", "separate", "per_sample"):
        assert_rel(got[variant], ref, 1e-4, f"{variant} against naive")


@pytest.mark.slow
def test_bench_streams_end_to_end(tmp_path, tiny_model):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "atlas_fast", "bench", "--mode", "tta", "--streams", "2",
                           "--model", tiny_model, "--tasks", "2", "--batch", "2", "--steps", "2", "--warmup", "0",
                           "--device", "cpu", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for variant in bench_tta.VARIANTS:
        assert variant in proc.stdout
    results = json.loads((out / "results_tta_S2.json").read_text())
    assert results["settings"]["streams"] == 2
    for variant in bench_tta.VARIANTS:
        r, row = results["results"][variant], results["summary"][variant]
        assert len(r["step_s"]) == 2 and all(t > 0 for t in r["step_s"])
        assert row["per_image_ms"] == pytest.approx(sum(r["step_s"]) / 2 / 4 * 1e3)   # median of 2, 4 images
        assert row["time_vs_grouped"] == pytest.approx(row["step_s"] / results["summary"]["grouped"]["step_s"])


def test_streams_needs_tta_mode(tiny_model, capsys):
    from atlas_fast.cli import main
    with pytest.raises(SystemExit):
        main(["bench", "--streams", "2", "--model", tiny_model])
    assert "--streams 2: needs --mode tta" in capsys.readouterr().err


def test_table_ratios():
    s = bench_tta.TTASettings(streams=4, batch=2)
    rows = bench_tta.summarise({"grouped": {"step_s": [0.2, 0.1, 0.3], "peak_extra_mb": 5.0},
                                "per_sample": {"step_s": [1.0, 1.2, 0.8], "peak_extra_mb": 9.0}}, s)
    assert rows["grouped"]["per_image_ms"] == pytest.approx(0.2 / 8 * 1e3)
    assert rows["per_sample"]["time_vs_grouped"] == pytest.approx(5.0)
    table = bench_tta.format_table(rows, s)
    assert "5.00x" in table and "S=4 streams x 2 images" in table
