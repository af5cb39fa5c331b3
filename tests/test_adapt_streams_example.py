"""The corruption-streams example end to end (minutes: marked slow): five corruption streams of the real test
digits adapted online all at once equal each stream adapted on its own, and adaptation does not lose against θ0."""
import importlib.util
import os

import pytest

import adapt_world


@pytest.mark.slow
def test_streams_together_equal_separate_and_beat_theta0(tmp_path):
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "digits_streams.py")
    spec = importlib.util.spec_from_file_location("digits_streams", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with adapt_world.single_thread():
        results = example.main(["--quick", "--out", str(tmp_path)])
    rows = results["streams"]
    assert len(rows) == 5
    for name, r in rows.items():
        assert abs(r["together"] - r["separate"]) <= 1 / r["n"], f"{name}: together != separate"
        assert r["together"] >= r["theta0"], f"{name}: online adaptation lost against θ0"
    mean = lambda key: sum(r[key] for r in rows.values()) / len(rows)  # noqa: E731
    assert mean("together") > mean("theta0") + 0.03
    assert os.path.isfile(tmp_path / "together" / "running_accuracy.png")
