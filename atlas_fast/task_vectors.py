"""TaskVectors: the bank of task vectors τ_t = θ_t − θ0, matched to parameters by name.

One stacked tensor (T, *param_shape) per block, in float32, bfloat16 or float16. Differences are taken in
float32 and stored in the bank's dtype. Saved and loaded as safetensors; every write is atomic. Every bank,
however it is made or read, holds finite values only.

Buffers are not task vectors: aTLAS composes parameters, and compose() never composes a buffer. from_models
takes parameters only, and state dicts lose their BatchNorm statistics (running_mean, running_var), unless
include_buffers=True asks for them.
"""
import json
import os
import tempfile

import torch

from .checkpoints import read_state_dict

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMAT = "atlas_fast.task_vectors/1"
# Entry names that are BatchNorm statistics (buffers) in any torch state dict.
BATCHNORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _dtype_name(dtype):
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"dtype={dtype}: task vectors are stored as float32, bfloat16 or float16")


def _select(state_dict, prefix, source):
    if not prefix:
        return dict(state_dict)
    out = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(f"{source}: no entry starts with prefix={prefix!r}")
    return out


def atomic_write(path, write):
    """Call write(tmp_path) on a temporary file beside `path`, then rename it over `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class TaskVectors:
    """A bank of T task vectors: `tv[name]` is the stacked (T, *shape) tensor of block `name`."""

    def __init__(self, vectors, sources=None, skipped=None, check_finite=True):
        """vectors: {name: (T, *shape) tensor}. check_finite=False skips the scan for NaN/Inf, for callers that
        checked every value already."""
        if not vectors:
            raise ValueError("TaskVectors: no blocks")
        T = {v.shape[0] for v in vectors.values()}
        if len(T) != 1:
            raise ValueError(f"TaskVectors: blocks stack different numbers of task vectors {sorted(T)}")
        dtypes = {v.dtype for v in vectors.values()}
        if len(dtypes) != 1:
            raise ValueError(f"TaskVectors: blocks have mixed dtypes {sorted(map(str, dtypes))}")
        _dtype_name(dtypes.pop())
        self.vectors = dict(vectors)
        self.num_tasks = T.pop()
        self.sources = list(sources) if sources is not None else [f"task{t}" for t in range(self.num_tasks)]
        if len(self.sources) != self.num_tasks:
            raise ValueError(f"TaskVectors: {len(self.sources)} source names for {self.num_tasks} task vectors")
        self.skipped = dict(skipped or {})
        if check_finite:
            for name, v in self.vectors.items():
                _check_finite(v, name, self.sources)

    # -- construction

    @classmethod
    def from_state_dicts(cls, pretrained_sd, finetuned_sds, dtype=torch.float32, prefix=None, sources=None,
                         include_buffers=False):
        """τ_t = finetuned_sds[t] − pretrained_sd for every floating entry except BatchNorm statistics
        (unless include_buffers=True). The fine-tuned state dicts may be an iterator (e.g. loading one
        checkpoint at a time): each is read once, into its slot of the bank."""
        _dtype_name(dtype)
        base = _select(pretrained_sd, prefix, "pretrained")
        skipped = {k: f"not floating ({v.dtype})" for k, v in base.items() if not v.is_floating_point()}
        if not include_buffers:
            skipped.update({k: "BatchNorm statistic: a buffer, not composed (include_buffers=True keeps it)"
                            for k, v in base.items() if k not in skipped and k.rpartition(".")[2] in BATCHNORM_STATS})
        floats = {k: v for k, v in base.items() if k not in skipped}
        bank, names = {k: [] for k in floats}, []
        for t, sd in enumerate(finetuned_sds):
            source = sources[t] if sources is not None and t < len(sources) else f"finetuned[{t}]"
            sd = _select(sd, prefix, source)
            missing = [k for k in floats if k not in sd]
            extra = [k for k in sd if k not in base]
            if missing or extra:
                what = f"lacks {missing[:5]}" if missing else f"has entries the pretrained model lacks: {extra[:5]}"
                raise ValueError(f"{source} {what}")
            for k, v0 in floats.items():
                v = sd[k]
                if v.shape != v0.shape:
                    raise ValueError(f"{source}: parameter {k!r} has shape {tuple(v.shape)}, pretrained "
                                     f"{tuple(v0.shape)}")
                diff = v.to(torch.float32) - v0.to(torch.float32)
                if not torch.isfinite(diff).all():
                    raise ValueError(f"{source}: parameter {k!r} has non-finite values")
                bank[k].append(diff.to(dtype))
            names.append(source)
        if not names:
            raise ValueError("TaskVectors: the list of fine-tuned models is empty")
        vectors = {k: torch.stack(v) for k, v in bank.items()}
        return cls(vectors, sources=names, skipped=skipped, check_finite=dtype != torch.float32)

    @classmethod
    def from_models(cls, pretrained, finetuned, dtype=torch.float32, prefix=None, include_buffers=False):
        """From modules of one architecture: their parameters, matched by name (and their floating buffers
        with include_buffers=True)."""
        def entries(m):
            out = {k: p.detach() for k, p in m.named_parameters()}
            if include_buffers:
                out.update({k: b for k, b in m.state_dict().items() if k not in out})
            return out
        finetuned = list(finetuned)
        return cls.from_state_dicts(entries(pretrained), (entries(m) for m in finetuned), dtype, prefix,
                                    sources=[f"model[{t}]" for t in range(len(finetuned))],
                                    include_buffers=include_buffers)

    @classmethod
    def from_checkpoints(cls, pretrained_path, finetuned_paths, dtype=torch.float32, prefix=None,
                         allow_pickle=False, include_buffers=False):
        """From checkpoint files, read one at a time: safetensors, torch state dicts, or (allow_pickle=True)
        pickled modules as the public aTLAS / task-vector checkpoints are, read without their code (a
        wrapper around one model, like their ImageEncoder, gives the wrapped model's names)."""
        paths = [os.fspath(p) for p in finetuned_paths]
        base = read_state_dict(pretrained_path, allow_pickle)
        return cls.from_state_dicts(base, (read_state_dict(p, allow_pickle) for p in paths), dtype, prefix,
                                    sources=paths, include_buffers=include_buffers)

    # -- access

    def __len__(self):
        return self.num_tasks

    def __contains__(self, name):
        return name in self.vectors

    def __getitem__(self, name):
        return self.vectors[name]

    @property
    def names(self):
        return list(self.vectors)

    @property
    def dtype(self):
        return next(iter(self.vectors.values())).dtype

    @property
    def nbytes(self):
        return sum(v.numel() * v.element_size() for v in self.vectors.values())

    def to(self, device=None, dtype=None):
        """A bank on another device or in another storage dtype (float32, bfloat16, float16)."""
        if dtype is not None:
            _dtype_name(dtype)
        # A narrower dtype can overflow to Inf (float16 above 65504): scan again only then.
        narrower = dtype is not None and torch.finfo(dtype).max < torch.finfo(self.dtype).max
        return TaskVectors({k: v.to(device=device, dtype=dtype) for k, v in self.vectors.items()},
                           self.sources, self.skipped, check_finite=narrower)

    def __repr__(self):
        return (f"TaskVectors(T={self.num_tasks}, blocks={len(self.vectors)}, dtype={self.dtype}, "
                f"{self.nbytes / 2**20:.1f} MiB)")

    # -- storage

    def save(self, path):
        """Write the bank as safetensors (atomic: a temporary file renamed into place)."""
        from safetensors.torch import save_file
        meta = {"format": FORMAT, "names": json.dumps(self.names), "num_tasks": str(self.num_tasks),
                "dtype": _dtype_name(self.dtype), "sources": json.dumps(self.sources),
                "skipped": json.dumps(self.skipped)}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.vectors.items()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path, device="cpu"):
        from safetensors import safe_open
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such task-vector file")
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ValueError(f"{path}: not an atlas_fast task-vector file (format={meta.get('format')!r})")
                names = json.loads(meta["names"])
                vectors = {k: f.get_tensor(k) for k in names}
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"{path}: unreadable or truncated task-vector file ({e})") from e
        tv = cls(vectors, sources=json.loads(meta["sources"]), skipped=json.loads(meta.get("skipped", "{}")))
        if tv.num_tasks != int(meta["num_tasks"]) or _dtype_name(tv.dtype) != meta["dtype"]:
            raise ValueError(f"{path}: contents disagree with its metadata (T, dtype)")
        return tv


def _check_finite(v, name, sources):
    bad = ~torch.isfinite(v.reshape(v.shape[0], -1)).all(1)
    if bad.any():
        t = int(torch.nonzero(bad)[0])
        raise ValueError(f"TaskVectors: block {name!r} of task vector {t} ({sources[t]!r}) has non-finite values")


def synthetic_task_vectors(model, num_tasks, rel_scale=1e-2, dtype=torch.float32, seed=0):
    """Random task vectors for every floating parameter of `model`, of magnitude rel_scale × the
    parameter's RMS (at least rel_scale × 1e-2 for all-zero parameters): a realistic stand-in for benchmarks
    and tests, where fine-tuned checkpoints are not at hand. Drawn on the parameters' device (the numbers
    depend on the device's generator)."""
    generators = {}
    vectors = {}
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        if p.device not in generators:
            generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        rms = p.detach().float().pow(2).mean().sqrt().item() if p.numel() else 0.0
        scale = rel_scale * max(rms, 1e-2)
        v = torch.randn((num_tasks, *p.shape), generator=generators[p.device], device=p.device) * scale
        vectors[name] = v.to(dtype)
    return TaskVectors(vectors, sources=[f"synthetic[{t}]" for t in range(num_tasks)])
