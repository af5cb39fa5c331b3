"""The digits example end to end (minutes: marked slow). Its claim: learned block-wise coefficients beat
task-wise ones, which beat the best fixed task-arithmetic scale, which beats θ0."""
import importlib.util
import os

import pytest

import adapt_world


@pytest.mark.slow
def test_digits_example_orders_the_methods(tmp_path):
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "digits_atlas.py")
    spec = importlib.util.spec_from_file_location("digits_atlas", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with adapt_world.single_thread():
        results = example.main(["--quick", "--out", str(tmp_path)])
    norm = results["task_addition"]["normalised"]
    theta0, fixed, task, block = list(norm.values())
    assert block > task > fixed > theta0
    target = list(results["target"]["rows"].values())
    theta0, fixed, task_ce, block_ce, task_ufm, block_ufm = target
    assert block_ce > task_ce > fixed > theta0
    assert block_ufm > theta0 and task_ufm > theta0
    for run in ("addition_block", "target_ce_block", "target_ufm_block"):
        assert os.path.isfile(tmp_path / run / "coefficients.png")
