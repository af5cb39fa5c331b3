"""Data for coefficient learning: image folders or torchvision data sets, k-shot subsets, a validation
split, weak and strong augmented views, and a batch order that is a pure function of (seed, step).

Every batch of step s is fixed by the seed alone (an endless stream of seeded permutations cut into
batches), and every random augmentation is seeded by (seed, step, position in the batch): a run resumed at
step s sees exactly the batches and views an uninterrupted run sees there, whatever the number of workers.
"""
import os

import torch
from torch.utils.data import DataLoader, Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A data folder, class list or sampling request that cannot be used."""


def mix_seed(*values):
    """A 63-bit seed from integers (splitmix64 steps), so nearby (seed, step, slot) give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x >> 1


class ImageFolderData(Dataset):
    """<root>/<class>/<image> (torchvision's ImageFolder layout): (PIL image, class index), with clear
    errors for a missing, empty or unreadable folder or image."""

    def __init__(self, root):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DataError(f"{root}: no such data folder")
        try:
            classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        except OSError as e:
            raise DataError(f"{root}: unreadable data folder ({e.strerror or e})") from e
        if not classes:
            raise DataError(f"{root}: no class folders (expected {root}/<class>/<image>)")
        samples = []
        for i, c in enumerate(classes):
            folder = os.path.join(root, c)
            try:
                files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
            except OSError as e:
                raise DataError(f"{folder}: unreadable class folder ({e.strerror or e})") from e
            if not files:
                raise DataError(f"{folder}: class folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            samples += [(os.path.join(folder, f), i) for f in files]
        self.root, self.classes, self.samples = root, classes, samples
        self.targets = [t for _, t in samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image
        path, target = self.samples[i]
        try:
            with Image.open(path) as img:
                return img.convert("RGB"), target
        except OSError as e:
            raise DataError(f"{path}: unreadable image ({e})") from e


def dataset_targets(dataset):
    """Class index of every item, from .targets / .labels / ._labels, or by reading each item."""
    for attr in ("targets", "labels", "_labels", "y"):
        t = getattr(dataset, attr, None)
        if t is not None and len(t) == len(dataset):
            return [int(v) for v in t]
    return [int(dataset[i][1]) for i in range(len(dataset))]


def folder_classnames(classes):
    """Readable names from folder names: underscores to spaces."""
    return [c.replace("_", " ") for c in classes]


def check_classnames(names, classes, source):
    if len(names) != len(classes):
        raise DataError(f"{source}: {len(names)} class names for {len(classes)} classes in the data "
                        f"({', '.join(classes[:5])}{' ...' if len(classes) > 5 else ''})")
    return list(names)


def split_indices(targets, val_fraction, seed):
    """(train, val) index lists, stratified per class: round(val_fraction · n_c) of each class to val,
    at least one when val_fraction > 0 and the class has two or more items."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction}: expected 0 <= val_fraction < 1")
    by_class = _by_class(targets)
    train, val = [], []
    for c, idx in sorted(by_class.items()):
        perm = _perm(len(idx), mix_seed(seed, 1, c))
        n_val = min(len(idx) - 1, max(1 if val_fraction > 0 else 0, round(val_fraction * len(idx))))
        val += [idx[j] for j in perm[:n_val]]
        train += [idx[j] for j in perm[n_val:]]
    return sorted(train), sorted(val)


def few_shot_indices(targets, indices, shots, seed, classes=None):
    """`shots` items per class drawn (seeded) from `indices`; raises if a class has fewer."""
    if shots is None:
        return list(indices)
    if shots < 1:
        raise DataError(f"shots={shots}: expected a positive number of labelled images per class")
    by_class = _by_class([targets[i] for i in indices])
    out = []
    for c in range(max(max(targets) + 1, len(classes or []))):
        idx = by_class.get(c, [])
        if len(idx) < shots:
            name = classes[c] if classes else c
            raise DataError(f"shots={shots}: class {name!r} has only {len(idx)} training images")
        perm = _perm(len(idx), mix_seed(seed, 2, c))
        out += [indices[idx[j]] for j in perm[:shots]]
    return sorted(out)


def _by_class(targets):
    out = {}
    for i, t in enumerate(targets):
        out.setdefault(int(t), []).append(i)
    return out


def _perm(n, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


class StreamBatches:
    """Batches of positions into a subset for steps [start, stop): the subset's endless stream of seeded
    permutations, cut into batches of `batch_size`. Yields lists of (subset position, augmentation seed).
    share(items) picks a process's part of each batch (data-parallel runs); the seeds stay those of the
    whole batch, so the views do not depend on the number of processes."""

    def __init__(self, size, batch_size, seed, start, stop, share=None):
        if size < 1:
            raise DataError("a training subset is empty")
        self.size, self.batch_size, self.seed, self.start, self.stop = size, batch_size, seed, start, stop
        self.share = share or (lambda items: items)

    def positions(self, step):
        first, last = step * self.batch_size, (step + 1) * self.batch_size
        out, cycle = [], first // self.size
        while cycle * self.size < last:
            perm = _perm(self.size, mix_seed(self.seed, 3, cycle))
            lo, hi = max(first - cycle * self.size, 0), min(last - cycle * self.size, self.size)
            out += perm[lo:hi]
            cycle += 1
        return out

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.share([(p, mix_seed(self.seed, 4, step, slot)) for slot, p in enumerate(self.positions(step))])

    def __len__(self):
        return self.stop - self.start


class Views:
    """Weak view: random resized crop (scale 0.6–1, the image's own size) and, optionally, a horizontal flip;
    strong view: the weak view then RandAugment (2 ops, magnitude 9), as in FixMatch."""

    def __init__(self, flip=True):
        import torchvision.transforms as T
        self.flip = T.RandomHorizontalFlip() if flip else None
        self.randaugment = T.RandAugment(num_ops=2, magnitude=9)

    def weak(self, img):
        import torchvision.transforms as T
        w, h = img.size
        img = T.RandomResizedCrop((h, w), scale=(0.6, 1.0), antialias=True)(img)
        return self.flip(img) if self.flip is not None else img

    def strong(self, img):
        return self.randaugment(self.weak(img))


class ViewData(Dataset):
    """Items of `base` at `indices`, as (view tensors..., label, index) for the requested views
    ("plain", "weak", "strong"), each preprocessed by the model's own transform. A label override
    (pseudo-labels of a trusted set) replaces the data set's labels."""

    def __init__(self, base, indices, preprocess, views=("plain",), labels=None, flip=True):
        self.base, self.indices, self.preprocess, self.views = base, list(indices), preprocess, tuple(views)
        self.labels = None if labels is None else list(labels)
        self.augment = Views(flip) if set(self.views) - {"plain"} else None

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, item):
        pos, seed = item if isinstance(item, tuple) else (item, 0)
        img, label = self.base[self.indices[pos]]
        if self.labels is not None:
            label = self.labels[pos]
        out = []
        for k, view in enumerate(self.views):
            if view == "plain":
                out.append(self.preprocess(img))
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(mix_seed(seed, 5, k))
                out.append(self.preprocess(getattr(self.augment, view)(img)))
        return (*out, int(label), self.indices[pos])


def stream_batch_size(data, batch_size):
    """The global batch size of `data`'s stream: batch_size, or the whole subset when it is smaller."""
    return min(batch_size, len(data))


def stream_loader(data, batch_size, seed, start, stop, workers=0, pin_memory=False, share=None):
    """A DataLoader over `data` (a ViewData) for steps [start, stop) of its seeded stream; share(batch) picks
    this process's part of each batch."""
    sampler = StreamBatches(len(data), stream_batch_size(data, batch_size), seed, start, stop, share)
    return DataLoader(data, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory)


def eval_loader(data, batch_size, workers=0, pin_memory=False):
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory)
