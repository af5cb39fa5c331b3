"""A small real task world for the adapt tests: scikit-learn's handwritten digits (8×8, shipped inside the
package) as ImageFolder folders, a tiny open_clip CLIP built offline, and task vectors from real
fine-tuning of its image tower on two source tasks (upright digits, digits rotated by 90°) with the
zero-shot head frozen, as aTLAS's task vectors are made."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CONFIG = {"embed_dim": 32,
          "vision_cfg": {"image_size": 16, "layers": 2, "width": 48, "head_width": 12, "patch_size": 4,
                         "mlp_ratio": 2.0},
          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}}


def digits(rotate=0):
    """(images uint8 (N, 8, 8), labels) of scikit-learn's digits, rotated by 90° × rotate."""
    from sklearn.datasets import load_digits
    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    return np.ascontiguousarray(np.rot90(images, k=rotate, axes=(1, 2))), d.target.astype(np.int64)


def write_folder(root, images, labels, names=None):
    """<root>/<class>/<i>.png; returns root."""
    from PIL import Image
    names = names or [str(c) for c in range(10)]
    for c in set(labels.tolist()):
        os.makedirs(os.path.join(root, names[c]), exist_ok=True)
    for i, (img, y) in enumerate(zip(images, labels)):
        Image.fromarray(img, mode="L").save(os.path.join(root, names[y], f"{i:04d}.png"))
    return root


def write_config(folder):
    path = os.path.join(folder, "tinyclip.json")
    with open(path, "w") as f:
        json.dump(CONFIG, f)
    return path


def finetune_visual(clip, preprocess, head, images, labels, steps=150, lr=2e-3, seed=0, batch=64):
    """Fine-tune a copy of clip.visual on (images, labels) through the frozen head; returns the copy."""
    import copy

    from PIL import Image
    x = torch.stack([preprocess(Image.fromarray(im, mode="L")) for im in images])
    y = torch.as_tensor(labels)
    visual = copy.deepcopy(clip.visual).train()
    opt = torch.optim.Adam(visual.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,), generator=g)
        loss = F.cross_entropy(head(visual(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return visual.eval()


def build_world(root, steps=100, pretrain_steps=200):
    """Folders, config, θ0 checkpoint, two fine-tuned checkpoints and their bank under `root`.
    Returns a dict of paths."""
    from atlas_fast.adapt import build_bank
    from atlas_fast.adapt.heads import zero_shot_head
    from atlas_fast.adapt.models import load_clip
    os.makedirs(root, exist_ok=True)
    config = write_config(root)
    torch.manual_seed(0)
    clip, preprocess, tok = load_clip(config)
    with torch.no_grad():   # a trained CLIP's temperature (scale 100), not the initial 1/0.07
        clip.logit_scale.fill_(math.log(100.0))
    head = zero_shot_head(clip, tok, CLASSNAMES, ["a photo of the number {}."], progress=False)
    # θ0: the image tower pre-trained on digits rotated by 180° and 270°, so that it has some "zero-shot"
    # skill on the other orientations, as a pre-trained CLIP has on a new task
    pre = [digits(r) for r in (2, 3)]
    clip.visual = finetune_visual(clip, preprocess, head, np.concatenate([p[0] for p in pre]),
                                  np.concatenate([p[1] for p in pre]), steps=pretrain_steps, seed=7)
    theta0 = os.path.join(root, "theta0.pt")
    torch.save(clip.state_dict(), theta0)
    paths = {"config": config, "theta0": theta0, "root": root}
    classnames = os.path.join(root, "classnames.txt")
    with open(classnames, "w") as f:
        f.write("\n".join(CLASSNAMES) + "\n")
    paths["classnames"] = classnames
    finetuned = []
    for rot, name in ((0, "upright"), (1, "rot90")):
        images, labels = digits(rot)
        paths[name] = write_folder(os.path.join(root, name), images, labels)
        # fine-tune on the first 2/3 of the items; the tests evaluate on the split made by load_data
        n = len(images) * 2 // 3
        visual = finetune_visual(clip, preprocess, head, images[:n], labels[:n], steps=steps, seed=rot)
        ckpt = os.path.join(root, f"ft_{name}.pt")
        state = {**{k: v for k, v in clip.state_dict().items() if not k.startswith("visual.")},
                 **{"visual." + k: v for k, v in visual.state_dict().items()}}
        torch.save(state, ckpt)
        finetuned.append(ckpt)
    paths["finetuned"] = finetuned
    # θ0 + 0.7 (τ_upright + τ_rot90): a model that knows some of both tasks, where the negation tests start
    base = torch.load(theta0, weights_only=True)
    tuned = [torch.load(c, weights_only=True) for c in finetuned]
    paths["multi"] = os.path.join(root, "multi.pt")
    torch.save({k: v + 0.7 * sum(t[k] - v for t in tuned) if k.startswith("visual.") else v for k, v in base.items()},
               paths["multi"])
    paths["bank"] = os.path.join(root, "bank.safetensors")
    build_bank(theta0, finetuned, paths["bank"])
    paths["templates"] = os.path.join(root, "templates.txt")
    with open(paths["templates"], "w") as f:
        f.write("a photo of the number {}.\n")
    return paths


def get_world(tmp_path_factory):
    """The world, built once per test session under pytest's base temporary folder."""
    root = os.path.join(str(tmp_path_factory.getbasetemp()), "adapt_world")
    done = os.path.join(root, "paths.json")
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    with single_thread():
        paths = build_world(root)
    with open(done, "w") as f:
        json.dump(paths, f)
    return paths


class single_thread:
    """One intra-op thread: on a small shared machine tiny models run several times faster so."""

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The world's paths, for the test modules that import this fixture."""
    return get_world(tmp_path_factory)


@pytest.fixture
def one_thread():
    with single_thread():
        yield
