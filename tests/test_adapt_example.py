"""The digits example end to end (minutes: marked slow), with each θ0: EfficientNet-Lite0's ImageNet weights
and the tiny CLIP it pre-trains itself. Its claim: learned block-wise coefficients beat task-wise ones, which
beat the best fixed task-arithmetic scale, which beats θ0."""
import importlib.util
import os

import pytest

import adapt_world


@pytest.mark.slow
@pytest.mark.parametrize("theta0", ["efficientnet-lite0", "tiny-clip"])
def test_digits_example_orders_the_methods(tmp_path, theta0):
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "digits_atlas.py")
    spec = importlib.util.spec_from_file_location("digits_atlas", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with adapt_world.single_thread():
        results = example.main(["--quick", "--theta0", theta0, "--out", str(tmp_path)])
    norm = results["task_addition"]["normalised"]
    theta0_acc, fixed, task, block = list(norm.values())
    assert block > task > fixed > theta0_acc
    target = list(results["target"]["rows"].values())
    theta0_acc, fixed, task_ce, block_ce, task_ufm, block_ufm = target
    assert block_ce > task_ce > fixed > theta0_acc
    assert block_ufm > theta0_acc and task_ufm > theta0_acc
    for run in ("addition_block", "target_ce_block", "target_ufm_block"):
        assert os.path.isfile(tmp_path / run / "coefficients.png")
