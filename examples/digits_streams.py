"""Online test-time adaptation of many corruption streams at once, on real weights and real images.

θ0, the head and the bank are those of examples/digits_atlas.py (EfficientNet-Lite0 with its ImageNet weights, a
frozen linear head for the ten digits, task vectors of four digit tasks fine-tuned from θ0). The streams are the
held-out test images of the upright digits under five corruptions (rotated by 90°, Gaussian noise, blur, low
contrast, inverted), each a folder. Each stream is adapted online (entropy, one pass in folder order, predict then
update): all five at once in one grouped step (atlas_fast.adapt.adapt_online on the five folders), and each on its
own; both against θ0's accuracy on the same images. Run:  python examples/digits_streams.py --out streams_out

The coefficients are task-wise by default (one per task vector, 4 in all), the same settings for every stream.
Block-wise ones (4 × 147) give entropy minimisation the freedom to make the model confident by predicting one
class: on the Gaussian noise stream, where θ0 is near chance (19.6%), block-wise entropy drifts to one class and
ends within a point of θ0 or below it at every learning rate tried (0.02–0.1). Task-wise coefficients can only
move whole task vectors, and along the upright digits' one entropy falls and accuracy rises on that stream. The
diagnosis and every setting tried are in benchmarks/RESULTS.md.
"""
import argparse
import importlib.util
import json
import os
import time
from types import SimpleNamespace

import numpy as np
import torch

from atlas_fast.adapt import adapt_online, evaluate
from atlas_fast.adapt.api import save_heads


def _digits_atlas():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_atlas.py")
    spec = importlib.util.spec_from_file_location("digits_atlas", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _blur(x):
    from PIL import Image, ImageFilter
    return np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(0.8))) for im in x])


CORRUPTIONS = {
    "rot90": lambda x, rng: np.ascontiguousarray(np.rot90(x, 1, axes=(1, 2))),
    "noise": lambda x, rng: np.clip(x + rng.normal(0, 60, x.shape), 0, 255).astype(np.uint8),
    "blur": lambda x, rng: _blur(x),
    "contrast": lambda x, rng: (128 + 0.35 * (x.astype(np.float64) - 128)).round().astype(np.uint8),
    "inverted": lambda x, rng: 255 - x,
}


def write_streams(root, images, labels):
    """One folder per corruption of the test images: <root>/<corruption>/<class>/<i>.png."""
    from PIL import Image
    rng = np.random.default_rng(0)
    folders = {}
    for name, fn in CORRUPTIONS.items():
        corrupted = fn(images, rng)
        for i, (im, y) in enumerate(zip(corrupted, labels)):
            folder = os.path.join(root, name, str(y))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(im, mode="L").save(os.path.join(folder, f"{i:04d}.png"))
        folders[name] = os.path.join(root, name)
    return folders


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="streams_out")
    p.add_argument("--quick", action="store_true", help="fewer fine-tuning steps (for the slow test)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--granularity", choices=("task", "block"), default="task",
                   help="one coefficient per task vector, or one per task vector and block")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    da = _digits_atlas()
    started = time.time()
    w = da.build_efficientnet(os.path.join(args.out, "world"), da.STUDIES["efficientnet-lite0"]["steps"][args.quick],
                              print)
    images, labels = da.digits()
    test_idx = np.sort(np.random.default_rng(0).permutation(len(images))[:len(images) // 4])   # digits_atlas's
    folders = write_streams(os.path.join(args.out, "streams"), images[test_idx], labels[test_idx])
    names = list(folders)
    heads = os.path.join(args.out, "heads_streams.pt")
    save_heads(heads, [SimpleNamespace(name=n, head=w.head) for n in names])

    def model(heads_file):       # a fresh θ0 for every run: compose works on the module in place
        return dict(model=da.efficientnet_lite0(), preprocess=da.efficientnet_preprocess(), heads=heads_file)
    theta0 = {r["data"]: r["accuracy"]
              for r in evaluate(data=[folders[n] for n in names], split="all", **model(heads))}
    online = dict(bank=w.bank, objective="entropy", granularity=args.granularity, batch_size=args.batch_size,
                  lr=args.lr, progress=False)
    together = adapt_online(data=[folders[n] for n in names], out=os.path.join(args.out, "together"), **online,
                            **model(heads))
    rows = {}
    for s, n in enumerate(names):
        one = adapt_online(data=[folders[n]], out=os.path.join(args.out, f"separate_{n}"), **online,
                           **model(_one_head(args.out, w.head, n)))
        rows[n] = {"theta0": theta0[n], "together": together["streams"][s]["accuracy"],
                   "separate": one["streams"][0]["accuracy"], "n": one["streams"][0]["n"],
                   "coefficients_rel_diff": _rel_diff(os.path.join(args.out, "together", f"{s:02d}_{n}"),
                                                      os.path.join(args.out, f"separate_{n}", f"00_{n}"))}
    results = {"streams": rows, "granularity": args.granularity, "lr": args.lr, "batch_size": args.batch_size,
               "quick": args.quick,
               "together_seconds": together["seconds"], "seconds": time.time() - started}
    lines = [f"{'stream':10} {'θ0':>8} {'together':>9} {'separate':>9}"]
    lines += [f"{n:10} {100 * r['theta0']:7.2f}% {100 * r['together']:8.2f}% {100 * r['separate']:8.2f}%"
              for n, r in rows.items()]
    print("\n".join(lines))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def _rel_diff(run, ref):
    """||c - c_ref|| / ||c_ref|| of two streams' final coefficients."""
    from safetensors.torch import load_file
    c, r = (load_file(os.path.join(d, "coefficients.safetensors"))["coefficients"].double() for d in (run, ref))
    return float((c - r).norm() / r.norm())


def _one_head(out, head, name):
    path = os.path.join(out, f"heads_{name}.pt")
    save_heads(path, [SimpleNamespace(name=name, head=head)])
    return path


if __name__ == "__main__":
    main()
