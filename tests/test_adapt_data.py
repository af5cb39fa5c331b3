"""Data for coefficient learning: folder checks, splits, k-shot sampling, the seeded batch stream and views."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from atlas_fast.adapt.api import load_data
from atlas_fast.adapt.data import DataError, ImageFolderData, StreamBatches, ViewData, few_shot_indices, split_indices


def _folder(root, counts, size=8):
    rng = np.random.default_rng(0)
    for c, n in counts.items():
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                os.path.join(root, c, f"{i}.png"))
    return str(root)


def test_image_folder_reads_classes_in_sorted_order(tmp_path):
    root = _folder(tmp_path / "d", {"b_cat": 2, "a_dog": 3})
    data = ImageFolderData(root)
    assert data.classes == ["a_dog", "b_cat"]
    assert data.targets == [0, 0, 0, 1, 1]
    img, y = data[4]
    assert img.size == (8, 8) and img.mode == "RGB" and y == 1


def test_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match="no such data folder"):
        ImageFolderData(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no class folders"):
        ImageFolderData(tmp_path / "empty")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"cls: class folder holds no images"):
        ImageFolderData(tmp_path / "noimg")
    root = _folder(tmp_path / "bad", {"a": 1})
    (tmp_path / "bad" / "a" / "broken.png").write_bytes(b"not a png")
    data = ImageFolderData(root)
    with pytest.raises(DataError, match=r"broken.png: unreadable image"):
        data[1]


def test_classnames_must_match_the_folders(tmp_path):
    root = _folder(tmp_path / "d", {"a": 2, "b": 2, "c": 2})
    names = tmp_path / "names.txt"
    names.write_text("apple\nbanana\n")
    with pytest.raises(DataError, match=r"names.txt: 2 class names for 3 classes"):
        load_data(root, str(names))
    names.write_text("apple\nbanana\ncherry\n")
    assert load_data(root, str(names)).names == ["apple", "banana", "cherry"]


def test_split_is_stratified_disjoint_and_seeded():
    targets = [0] * 10 + [1] * 5 + [2] * 2
    train, val = split_indices(targets, 0.2, seed=3)
    assert sorted(train + val) == list(range(17))
    assert [sum(targets[i] == c for i in val) for c in range(3)] == [2, 1, 1]
    assert split_indices(targets, 0.2, seed=3) == (train, val)
    assert split_indices(targets, 0.2, seed=4) != (train, val)


def test_few_shot_takes_k_per_class_and_refuses_more_than_a_class_has():
    targets = [0] * 10 + [1] * 4
    pool = list(range(14))
    picked = few_shot_indices(targets, pool, 3, seed=0)
    assert [sum(targets[i] == c for i in picked) for c in (0, 1)] == [3, 3]
    assert few_shot_indices(targets, pool, 3, seed=0) == picked
    with pytest.raises(DataError, match=r"shots=5: class 'b' has only 4 training images"):
        few_shot_indices(targets, pool, 5, seed=0, classes=["a", "b"])


def test_stream_batches_resume_mid_stream_and_cover_each_cycle():
    full = list(StreamBatches(7, 3, seed=1, start=0, stop=7))
    assert list(StreamBatches(7, 3, seed=1, start=4, stop=7)) == full[4:]
    positions = [p for batch in full for p, _ in batch]
    assert len(positions) == 21
    for cycle in range(3):       # 21 positions = three permutations of the 7 items
        assert sorted(positions[7 * cycle:7 * cycle + 7]) == list(range(7))
    seeds = [s for batch in full for _, s in batch]
    assert len(set(seeds)) == len(seeds)


def test_views_are_seeded_per_sample(tmp_path):
    import torchvision.transforms as T
    root = _folder(tmp_path / "d", {"a": 1}, size=16)
    data = ViewData(ImageFolderData(root), [0], T.ToTensor(), ("plain", "weak", "strong"))
    plain, weak, strong, label, index = data[(0, 123)]
    again = data[(0, 123)]
    other = data[(0, 124)]
    assert torch.equal(weak, again[1]) and torch.equal(strong, again[2])
    assert not torch.equal(strong, other[2])
    assert torch.equal(plain, T.ToTensor()(Image.open(os.path.join(root, "a", "0.png")).convert("RGB")))
    assert (label, index) == (0, 0)
