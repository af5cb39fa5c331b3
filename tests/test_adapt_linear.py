"""Models without a text tower: a linear-probe head fitted on θ0's features, and a torchvision data set
object instead of a folder."""
import pytest
import torchvision

from atlas_fast import TaskVectors
from atlas_fast.adapt import LinearHead, adapt, evaluate
from atlas_fast.adapt.models import load_clip

pytestmark = pytest.mark.usefixtures("one_thread")


def test_linear_probe_head_and_a_torchvision_dataset(world, tmp_path):
    clip, preprocess, _ = load_clip(world["config"], world["theta0"])
    encoder = clip.visual                                   # an image encoder alone: no text tower
    data = torchvision.datasets.ImageFolder(world["upright"])   # yields (PIL image, class index)
    result = adapt(encoder, TaskVectors.load(world["bank"]), data, objective="ce", head="linear", shots=5,
                   preprocess=preprocess, epochs=4, steps_per_epoch=4, batch_size=50, lr=0.1,
                   out=str(tmp_path / "run"), progress=False)
    head = result.tasks[0].head
    assert isinstance(head, LinearHead)
    initial, selected = result.summary["initial"][0]["accuracy"], result.summary["selected"][0]["accuracy"]
    # the probe stays fitted to θ0's features, so the gain is smaller than with a zero-shot head
    assert selected > initial + 0.04
    # the saved heads reproduce the accuracy through evaluate(), on a fresh θ0 encoder
    clip2, _, _ = load_clip(world["config"], world["theta0"])
    rows = evaluate(clip2.visual, data, heads=str(tmp_path / "run" / "heads.pt"), preprocess=preprocess,
                    bank=world["bank"], coefficients=str(tmp_path / "run" / "coefficients.safetensors"))
    assert rows[0]["accuracy"] == pytest.approx(initial)
    assert rows[1]["accuracy"] == pytest.approx(selected)


def test_linear_head_needs_labels(world, tmp_path):
    clip, preprocess, _ = load_clip(world["config"], world["theta0"])
    with pytest.raises(ValueError, match="head='linear' is fitted on labelled images"):
        adapt(clip.visual, world["bank"], world["upright"], objective="entropy", head="linear",
              preprocess=preprocess, out=str(tmp_path / "run"), progress=False)
