"""TaskVectors: the bank of task vectors τ_t = θ_t − θ0, matched to parameters by name.

One stacked tensor (T, *param_shape) per block, in float32, bfloat16 or float16. Differences are taken in
float32 and stored in the bank's dtype. Saved and loaded as safetensors; every write is atomic. Every bank,
however it is made or read, holds finite values only.

Quantised banks (dtype=torch.int8, or "int4" / torch.int4) hold a quant.QuantizedBlock per block of two or more
dimensions: int8 with one float32 absmax scale per output row, or int4 with one per group of `group_size`
columns (default 128). 1-D blocks (biases, LayerNorm scales, class embeddings: a fraction of a percent of a
model) stay float32. The relative quantisation error of every block, ‖τ − deq(q(τ))‖ / ‖τ‖ over its T task
vectors, is measured when the bank is built: `quant_errors`, `quantization_report()`, and logged at INFO.

Low-rank banks (format "lowrank") hold a lowrank.LowRankBlock per block of two or more dimensions: τ_t = B_t A_t
as its factors, from a truncated SVD of each task vector (rank=r, or the smallest rank keeping a fraction
`energy` of ‖τ_t‖²) or from LoRA adapters (lora.lora_task_vectors(low_rank=True)). 1-D blocks stay float32. The
fraction of ‖τ‖² each factored block keeps is `lowrank_energy` (1 for LoRA factors, which are exact), reported
by `quantization_report()` and logged at INFO.

Buffers are not task vectors: aTLAS composes parameters, and compose() never composes a buffer. from_models
takes parameters only, and state dicts lose their BatchNorm statistics (running_mean, running_var), unless
include_buffers=True asks for them.
"""
import json
import logging
import math
import os

import torch

from ..io.atomic import atomic_write
from ..io.checkpoints import read_state_dict
from . import fingerprint, lowrank, mapped, quant

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMAT = "atlas_fast.task_vectors/1"
QUANT_FORMAT = "atlas_fast.task_vectors/2"   # quantised banks: data and scale tensors, group size, shapes
LOWRANK_FORMAT = "atlas_fast.task_vectors/3" # low-rank banks: factor a under the name, bt under name + BT_SUFFIX
SCALE_SUFFIX = "::scale"                     # the file key of a block's scales: its name + this
BT_SUFFIX = "::bt"                           # the file key of a low-rank block's left factor
LOWRANK = "lowrank"
_log = logging.getLogger("atlas_fast")
# Entry names that are BatchNorm statistics (buffers) in any torch state dict.
BATCHNORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _dtype_name(dtype):
    fmt = quant.format_of(dtype)
    if fmt is not None:
        return fmt
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"dtype={dtype}: task vectors are stored as float32, bfloat16, float16, int8 or int4")


def _select(state_dict, prefix, source):
    if not prefix:
        return dict(state_dict)
    out = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(f"{source}: no entry starts with prefix={prefix!r}")
    return out


class TaskVectors:
    """A bank of T task vectors: `tv[name]` is the stacked (T, *shape) tensor of block `name`."""

    def __init__(self, vectors, sources=None, skipped=None, check_finite=True, quant_errors=None,
                 lowrank_energy=None):
        """vectors: {name: (T, *shape) tensor, quant.QuantizedBlock or lowrank.LowRankBlock}. check_finite=False
        skips the scan for NaN/Inf, for callers that checked every value already. quant_errors: {name: relative
        error} of the quantised blocks, as measured when they were quantised; lowrank_energy: {name: fraction of
        ‖τ‖² kept} of the factored blocks."""
        if not vectors:
            raise ValueError("TaskVectors: no blocks")
        T = {v.shape[0] for v in vectors.values()}
        if len(T) != 1:
            raise ValueError(f"TaskVectors: blocks stack different numbers of task vectors {sorted(T)}")
        quantized = {k: v for k, v in vectors.items() if quant.is_quantized(v)}
        factored = {k: v for k, v in vectors.items() if lowrank.is_lowrank(v)}
        self.group_size = None
        if quantized and factored:
            raise ValueError("TaskVectors: a bank is quantised or low-rank, not both")
        if factored:
            self.format = LOWRANK
            for k, v in vectors.items():
                if k not in factored and v.dtype != torch.float32:
                    raise ValueError(f"TaskVectors: a low-rank bank keeps its unfactored blocks in float32; block "
                                     f"{k!r} is {v.dtype}")
        elif quantized:
            kinds = {(v.format, v.group) for v in quantized.values()}
            if len(kinds) != 1:
                raise ValueError(f"TaskVectors: quantised blocks of mixed formats and group sizes {sorted(kinds)}")
            self.format, group = kinds.pop()
            self.group_size = group or None
            for k, v in vectors.items():
                if k not in quantized and v.dtype != torch.float32:
                    raise ValueError(f"TaskVectors: a quantised bank keeps its unquantised blocks in float32; "
                                     f"block {k!r} is {v.dtype}")
        else:
            dtypes = {v.dtype for v in vectors.values()}
            if len(dtypes) != 1:
                raise ValueError(f"TaskVectors: blocks have mixed dtypes {sorted(map(str, dtypes))}")
            self.format = _dtype_name(dtypes.pop())
        self.vectors = dict(vectors)
        self.num_tasks = T.pop()
        self.sources = list(sources) if sources is not None else [f"task{t}" for t in range(self.num_tasks)]
        if len(self.sources) != self.num_tasks:
            raise ValueError(f"TaskVectors: {len(self.sources)} source names for {self.num_tasks} task vectors")
        self.skipped = dict(skipped or {})
        self.quant_errors = dict(quant_errors or {})
        self.lowrank_energy = dict(lowrank_energy or {})
        if check_finite:
            for name, v in self.vectors.items():
                for part in _stored(v):
                    _check_finite(part, name, self.sources)

    # -- construction

    @classmethod
    def from_state_dicts(cls, pretrained_sd, finetuned_sds, dtype=torch.float32, prefix=None, sources=None,
                         include_buffers=False, group_size=None, rank=None, energy=None):
        """τ_t = finetuned_sds[t] − pretrained_sd for every floating entry except BatchNorm statistics
        (unless include_buffers=True). The fine-tuned state dicts may be an iterator (e.g. loading one
        checkpoint at a time): each is read once, into its slot of the bank. dtype torch.int8 or "int4"
        quantises each difference as it is read (group_size: columns per int4 scale, default 128); rank= or
        energy= factors it instead (a low-rank bank: see low_rank())."""
        fmt = quant.format_of(dtype)
        group = _group_size(fmt, group_size)
        _dtype_name(dtype)
        factor = rank is not None or energy is not None
        if factor and dtype != torch.float32:
            raise ValueError(f"rank/energy: a low-rank bank keeps float32 factors; dtype={dtype} cannot be combined")
        base = _select(pretrained_sd, prefix, "pretrained")
        skipped = {k: f"not floating ({v.dtype})" for k, v in base.items() if not v.is_floating_point()}
        if not include_buffers:
            skipped.update({k: "BatchNorm statistic: a buffer, not composed (include_buffers=True keeps it)"
                            for k, v in base.items() if k not in skipped and k.rpartition(".")[2] in BATCHNORM_STATS})
        floats = {k: v for k, v in base.items() if k not in skipped}
        bank, names, errors = {k: [] for k in floats}, [], {}
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
                if factor and lowrank.factorable(diff.shape):
                    b, a, kept, total = _factor(diff, rank, energy)
                    errors[k] = [e + v for e, v in zip(errors.get(k, (0.0, 0.0)), (kept, total))]
                    bank[k].append((b, a))
                elif fmt is not None and quant.quantizable(diff.shape):
                    block = quant.quantize(diff[None], fmt, group)
                    parts = quant.squared_error(diff[None], block)
                    errors[k] = [a + b for a, b in zip(errors.get(k, (0.0, 0.0)), parts)]
                    bank[k].append(block)
                else:
                    bank[k].append(diff.to(torch.float32 if fmt is not None else dtype))
            names.append(source)
        if not names:
            raise ValueError("TaskVectors: the list of fine-tuned models is empty")
        vectors = {k: _stack(v, floats[k].shape) for k, v in bank.items()}
        # errors: (‖τ − q(τ)‖², ‖τ‖²) per quantised block, (‖τ‖² kept, ‖τ‖²) per factored one.
        # Only a float16 bank can hold a non-finite value that the float32 difference did not have.
        tv = cls(vectors, sources=names, skipped=skipped, check_finite=fmt is None and dtype != torch.float32,
                 quant_errors={} if factor else {k: _relative(*e) for k, e in errors.items()},
                 lowrank_energy={k: _kept(*e) for k, e in errors.items()} if factor else {})
        if fmt is not None or factor:
            tv._log_quantization()
        return tv

    @classmethod
    def from_models(cls, pretrained, finetuned, dtype=torch.float32, prefix=None, include_buffers=False,
                    group_size=None, rank=None, energy=None):
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
                                    include_buffers=include_buffers, group_size=group_size, rank=rank,
                                    energy=energy)

    @classmethod
    def from_checkpoints(cls, pretrained_path, finetuned_paths, dtype=torch.float32, prefix=None,
                         allow_pickle=False, include_buffers=False, group_size=None, rank=None, energy=None):
        """From checkpoint files, read one at a time: safetensors, torch state dicts, or (allow_pickle=True)
        pickled modules as the public aTLAS / task-vector checkpoints are, read without their code (a
        wrapper around one model, like their ImageEncoder, gives the wrapped model's names)."""
        paths = [os.fspath(p) for p in finetuned_paths]
        base = read_state_dict(pretrained_path, allow_pickle)
        return cls.from_state_dicts(base, (read_state_dict(p, allow_pickle) for p in paths), dtype, prefix,
                                    sources=paths, include_buffers=include_buffers, group_size=group_size,
                                    rank=rank, energy=energy)

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
        """The storage dtype: torch.float32, bfloat16, float16 or int8, or "int4" (torch has no 4-bit dtype
        in every version this package supports), or "lowrank" for a bank of factors."""
        if self.format in ("int4", LOWRANK):
            return self.format
        return torch.int8 if self.format == "int8" else DTYPES[self.format]

    @property
    def rank(self):
        """The largest rank of a low-rank bank's blocks (None for other banks)."""
        ranks = [v.rank for v in self.vectors.values() if lowrank.is_lowrank(v)]
        return max(ranks) if ranks else None

    @property
    def nbytes(self):
        """Bytes of the stored bank: values, scales of quantised blocks, factors of low-rank ones."""
        return sum(_nbytes(v) for v in self.vectors.values())

    def fingerprint(self, names=None):
        """(T, B, 2 + fingerprint.SAMPLES) float64: norm, sum and sampled values of every task vector of the blocks
        `names` (default: all, in bank order), from one read of them (fingerprint.py)."""
        return fingerprint.fingerprint(self.vectors[n] for n in (self.names if names is None else names))

    def to(self, device=None, dtype=None, group_size=None):
        """A bank on another device or in another storage dtype: float32, bfloat16 or float16 from any bank (a
        quantised one is dequantised, a low-rank one multiplied out, block by block), int8 or "int4" from a
        float bank (see quantize)."""
        target = self.format if dtype is None else _dtype_name(dtype)
        if target in quant.FORMATS and (target != self.format or group_size not in (None, self.group_size)):
            return self.quantize(target, group_size, device)
        if group_size is not None and target not in quant.FORMATS:
            raise ValueError(f"to(dtype={dtype}): group_size applies to int4 banks only")
        if target == self.format:
            return TaskVectors({k: v.to(device) if quant.is_quantized(v) else v.to(device=device)
                                for k, v in self.vectors.items()}, self.sources, self.skipped, check_finite=False,
                               quant_errors=self.quant_errors, lowrank_energy=self.lowrank_energy)
        # A narrower dtype can overflow to Inf (float16 above 65504): scan again only then.
        source = torch.float32 if self.format in quant.FORMATS + (LOWRANK,) else self.dtype
        narrower = torch.finfo(dtype).max < torch.finfo(source).max
        return TaskVectors({k: _dense(v).to(device=device, dtype=dtype) for k, v in self.vectors.items()},
                           self.sources, self.skipped, check_finite=narrower)

    def quantize(self, dtype=torch.int8, group_size=None, device=None):
        """This float bank quantised, block by block: dtype torch.int8 (one absmax scale per output row) or
        "int4" / torch.int4 (one per group_size columns, default 128). Blocks of one dimension stay float32.
        The relative error of each block is kept in `quant_errors` and logged (quantization_report())."""
        fmt = quant.format_of(dtype)
        if fmt is None:
            raise ValueError(f"quantize: dtype={dtype}; expected torch.int8 or 'int4'")
        if self.format in quant.FORMATS + (LOWRANK,):
            raise ValueError(f"quantize({fmt}): the bank is already {self.format}; quantising it would add both "
                             f"errors: quantise the float bank it came from")
        group = _group_size(fmt, group_size)
        vectors, errors = {}, {}
        for k, v in self.vectors.items():
            v = v.to(device=device)
            if quant.quantizable(v.shape[1:]):
                vectors[k] = quant.quantize(v, fmt, group)
                errors[k] = _relative(*quant.squared_error(v, vectors[k]))
            else:
                vectors[k] = v.to(torch.float32)
        tv = TaskVectors(vectors, self.sources, self.skipped, check_finite=False, quant_errors=errors)
        tv._log_quantization()
        return tv

    def low_rank(self, rank=None, energy=None):
        """This float bank as a low-rank one: each task vector of each block of two or more dimensions replaced by
        its truncated SVD, rank `rank`, or the smallest rank keeping the fraction `energy` of its ‖τ_t‖² (ranks
        differ by task vector and block; a block stacks them padded with zero factors). 1-D blocks stay float32.
        The energy each block keeps is in `lowrank_energy` and logged (quantization_report())."""
        from tqdm.auto import tqdm
        if self.format in quant.FORMATS + (LOWRANK,):
            raise ValueError(f"low_rank: the bank is {self.format}; factor the float bank it came from")
        vectors, energies = {}, {}
        for k, v in tqdm(self.vectors.items(), desc="low-rank", unit="block", leave=False):
            if not lowrank.factorable(v.shape[1:]):
                vectors[k] = v.to(torch.float32)
                continue
            parts, kept, total = [], 0.0, 0.0
            for t in range(self.num_tasks):
                b, a, k_t, n_t = _factor(v[t], rank, energy)
                parts.append((b, a))
                kept, total = kept + k_t, total + n_t
            vectors[k] = _stack(parts, v.shape[1:])
            energies[k] = _kept(kept, total)
        tv = TaskVectors(vectors, self.sources, self.skipped, check_finite=False, lowrank_energy=energies)
        tv._log_quantization()
        return tv

    def quantization_report(self, blocks=None):
        """The quantisation of this bank in words: format, size against float32, and the relative error
        ‖τ − deq(q(τ))‖ / ‖τ‖ of each quantised block (the `blocks` worst ones, or all), worst first."""
        fp32 = sum(4 * v.numel() for v in self.vectors.values())
        if self.format == LOWRANK:
            return self._lowrank_report(fp32, blocks)
        if self.format not in quant.FORMATS:
            return f"{self.format} bank: not quantised"
        scales = "one scale per row" if self.format == "int8" else f"one scale per {self.group_size} columns"
        errs = sorted(self.quant_errors.items(), key=lambda kv: -kv[1])
        kept = len(self.vectors) - sum(quant.is_quantized(v) for v in self.vectors.values())
        lines = [f"{self.format} bank ({scales}): {self.nbytes / 2**20:.1f} MiB, {self.nbytes / max(1, fp32):.3f}x "
                 f"float32; {len(self.vectors) - kept} blocks quantised, {kept} 1-D blocks kept float32"]
        if errs:
            values = sorted(e for _, e in errs)
            lines.append(f"relative error per block: median {values[len(values) // 2]:.4f}, max {errs[0][1]:.4f} "
                         f"({errs[0][0]})")
            lines += [f"  {e:.4f}  {k}" for k, e in errs[:blocks]]
        return "\n".join(lines)

    def _lowrank_report(self, fp32, blocks):
        ranks = sorted(v.rank for v in self.vectors.values() if lowrank.is_lowrank(v))
        kept = len(self.vectors) - len(ranks)
        lines = [f"lowrank bank (rank {ranks[0]} to {ranks[-1]}): {self.nbytes / 2**20:.1f} MiB, "
                 f"{self.nbytes / max(1, fp32):.3f}x float32; {len(ranks)} blocks factored, {kept} 1-D blocks kept "
                 f"float32"]
        energy = sorted(self.lowrank_energy.items(), key=lambda kv: kv[1])
        if energy:
            values = [e for _, e in energy]
            lines.append(f"energy of ‖τ‖² kept per block: median {values[len(values) // 2]:.4f}, min "
                         f"{energy[0][1]:.4f} ({energy[0][0]})")
            lines += [f"  {e:.4f}  {k}" for k, e in energy[:blocks]]
        return "\n".join(lines)

    def _log_quantization(self):
        _log.info("%s", self.quantization_report(blocks=5))

    def __repr__(self):
        return (f"TaskVectors(T={self.num_tasks}, blocks={len(self.vectors)}, dtype={self.format}, "
                f"{self.nbytes / 2**20:.1f} MiB)")

    # -- storage

    def save(self, path):
        """Write the bank as safetensors (atomic: a temporary file renamed into place). A quantised block is
        two entries, its data under its name and its scales under name + "::scale"; a low-rank block its factor
        a under its name and bt under name + "::bt"."""
        from safetensors.torch import save_file
        quantized = {k: v for k, v in self.vectors.items() if quant.is_quantized(v)}
        factored = {k: v for k, v in self.vectors.items() if lowrank.is_lowrank(v)}
        fmt = QUANT_FORMAT if quantized else LOWRANK_FORMAT if factored else FORMAT
        meta = {"format": fmt, "names": json.dumps(self.names),
                "num_tasks": str(self.num_tasks), "dtype": self.format, "sources": json.dumps(self.sources),
                "skipped": json.dumps(self.skipped)}
        tensors = {}
        for k, v in self.vectors.items():
            if k in quantized:
                if k + SCALE_SUFFIX in self.vectors:
                    raise ValueError(f"save: block {k + SCALE_SUFFIX!r} collides with the scales of block {k!r}")
                tensors[k], tensors[k + SCALE_SUFFIX] = v.data.cpu().contiguous(), v.scale.cpu().contiguous()
            elif k in factored:
                if k + BT_SUFFIX in self.vectors:
                    raise ValueError(f"save: block {k + BT_SUFFIX!r} collides with the factor of block {k!r}")
                tensors[k], tensors[k + BT_SUFFIX] = v.a.cpu().contiguous(), v.bt.cpu().contiguous()
            else:
                tensors[k] = v.detach().cpu().contiguous()
        if quantized:
            meta.update(group_size=str(self.group_size or 0), quant_errors=json.dumps(self.quant_errors),
                        shapes=json.dumps({k: list(v.shape) for k, v in quantized.items()}))
        if factored:
            meta.update(lowrank_energy=json.dumps(self.lowrank_energy),
                        shapes=json.dumps({k: list(v.shape) for k, v in factored.items()}))
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path, device="cpu", mmap=False):
        """A bank saved by save(). mmap=True (device "cpu") maps the file instead of reading it (mapped.py): the
        tensors are views of the file, read from disk when first used, so opening costs no memory, processes
        that open one file share one copy in the kernel's page cache, and the kernel can evict the pages of a
        bank larger than the memory. Its finite check reads the file once, a block at a time, and gives each
        block's pages back. The tensors are read-only (clone() one to edit it), and the file must stay as it is
        while the bank is in use: check_mapped_files() refuses one that changed."""
        from safetensors import safe_open
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such task-vector file")
        if mmap and torch.device(device).type != "cpu":
            raise ValueError(f"{path}: mmap=True maps the file into host memory; load with device='cpu' "
                             f"(then .to({str(device)!r}) copies it), not device={str(device)!r}")
        try:
            if mmap:
                tensors, meta = mapped.map_safetensors(path)
                vectors = _read_vectors(path, meta, tensors.__getitem__)
            else:
                with safe_open(path, framework="pt", device=str(device)) as f:
                    meta = f.metadata() or {}
                    vectors = _read_vectors(path, meta, f.get_tensor)
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"{path}: unreadable or truncated task-vector file ({e})") from e
        tv = cls(vectors, sources=json.loads(meta["sources"]), skipped=json.loads(meta.get("skipped", "{}")),
                 quant_errors=json.loads(meta.get("quant_errors", "{}")),
                 lowrank_energy=json.loads(meta.get("lowrank_energy", "{}")), check_finite=not mmap)
        if tv.num_tasks != int(meta["num_tasks"]) or tv.format != meta["dtype"]:
            raise ValueError(f"{path}: contents disagree with its metadata (T, dtype)")
        if mmap:
            for name, v in tv.vectors.items():
                mapped.check_unchanged(_tensors(v))   # a file truncated since it was mapped: an error, not SIGBUS
                for part in _stored(v):
                    _check_finite(part, name, tv.sources)
                if quant.is_quantized(v):
                    mapped.release(v.data)
        return tv

    def check_mapped_files(self):
        """Raise FileChangedError naming the file if a memory-mapped bank's file (load(mmap=True)) was replaced,
        removed, truncated or modified since it was opened: its tensors are that file (mapped.py). compose() calls
        it; other banks pass."""
        mapped.check_unchanged(t for v in self.vectors.values() for t in _tensors(v))


def _read_vectors(path, meta, get):
    """{name: tensor, QuantizedBlock or LowRankBlock} of a bank file, its tensors read with get(name)."""
    fmt = meta.get("format")
    if fmt not in (FORMAT, QUANT_FORMAT, LOWRANK_FORMAT):
        raise ValueError(f"{path}: not an atlas_fast task-vector file (format={fmt!r})")
    shapes = json.loads(meta.get("shapes", "{}"))
    group = int(meta.get("group_size", "0"))
    if fmt == LOWRANK_FORMAT:
        def block(k):
            return lowrank.LowRankBlock(get(k), get(k + BT_SUFFIX), shapes[k])
    else:
        def block(k):
            return quant.QuantizedBlock(get(k), get(k + SCALE_SUFFIX), group, shapes[k])
    return {k: _read_block(path, k, block) if k in shapes else get(k) for k in json.loads(meta["names"])}


def _read_block(path, name, block):
    try:
        return block(name)
    except ValueError as e:
        raise ValueError(f"{path}: block {name!r}: {e}") from e


def _group_size(fmt, group_size):
    """The int4 group size to use (default quant.DEFAULT_GROUP); refused for formats without groups."""
    if fmt == "int4":
        return quant.DEFAULT_GROUP if group_size is None else group_size
    if group_size is not None:
        raise ValueError(f"group_size={group_size}: only int4 banks have groups (int8 has one scale per row)")
    return None


def _stack(parts, shape):
    """The (T, *shape) stack of one block's per-task tensors, (1, *shape) QuantizedBlocks or (B, A) factors."""
    if isinstance(parts[0], tuple):
        return lowrank.stack(parts, shape)
    if not quant.is_quantized(parts[0]):
        return torch.stack(parts)
    shape = (len(parts), *parts[0].shape[1:])
    return quant.QuantizedBlock(torch.cat([p.data for p in parts]), torch.cat([p.scale for p in parts]),
                                parts[0].group, shape)


def _relative(err_sq, ref_sq):
    return math.sqrt(err_sq / ref_sq) if ref_sq > 0 else 0.0


def _kept(kept_sq, total_sq):
    """The fraction of ‖τ‖² a factored block keeps (all of a zero block)."""
    return kept_sq / total_sq if total_sq > 0 else 1.0


def _nbytes(v):
    return v.nbytes if quant.is_quantized(v) or lowrank.is_lowrank(v) else v.numel() * v.element_size()


def _stored(v):
    """The float tensors a block is stored as, for the finite scan: scales of a quantised block (its integers are
    finite), factors of a low-rank one, else the tensor itself."""
    if quant.is_quantized(v):
        return [v.scale]
    return [v.a, v.bt] if lowrank.is_lowrank(v) else [v]


def _tensors(v):
    """Every tensor a block is stored as."""
    if quant.is_quantized(v):
        return [v.data, v.scale]
    return [v.a, v.bt] if lowrank.is_lowrank(v) else [v]


def _dense(v):
    """A block as a float tensor: dequantised, multiplied out, or itself."""
    if quant.is_quantized(v):
        return v.dequantize()
    return v.dense() if lowrank.is_lowrank(v) else v


def _factor(tau, rank, energy):
    """(B, A, ‖τ‖² kept, ‖τ‖²) of one task vector's truncated SVD, the norms in float64."""
    b, a, frac = lowrank.truncate(tau, rank, energy)
    total = float(tau.detach().to(torch.float64).square().sum())
    return b, a, frac * total, total


# Elements per step of the finite scan: bounds its temporaries (isfinite builds |v| and masks) and, for a mapped
# bank, the pages resident at once.
_SCAN = 1 << 20


def _check_finite(v, name, sources):
    flat = v.reshape(-1)
    per_task = max(1, flat.numel() // max(1, v.shape[0]))
    for s in range(0, flat.numel(), _SCAN):
        part = flat[s:s + _SCAN]
        if not torch.isfinite(part).all():
            t = (s + int(torch.nonzero(~torch.isfinite(part))[0])) // per_task
            raise ValueError(f"TaskVectors: block {name!r} of task vector {t} ({sources[t]!r}) has non-finite "
                             f"values")
        mapped.release(v, s, s + part.numel())


def synthetic_task_vectors(model, num_tasks, rel_scale=1e-2, dtype=torch.float32, seed=0, rank=None):
    """Random task vectors for every floating parameter of `model`, of magnitude rel_scale × the
    parameter's RMS (at least rel_scale × 1e-2 for all-zero parameters): a realistic stand-in for benchmarks
    and tests, where fine-tuned checkpoints are not at hand. Drawn on the parameters' device (the numbers
    depend on the device's generator). rank=r: a low-rank bank of random rank-r factors (LoRA-like; float32)
    for the parameters of two or more dimensions, of the same entry magnitude."""
    if rank is not None and (not isinstance(rank, int) or rank < 1 or dtype != torch.float32):
        raise ValueError(f"synthetic_task_vectors: rank={rank!r} needs an int >= 1 and dtype=torch.float32")
    generators = {}
    vectors = {}
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        if p.device not in generators:
            generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        rms = p.detach().float().pow(2).mean().sqrt().item() if p.numel() else 0.0
        scale = rel_scale * max(rms, 1e-2)
        g = generators[p.device]
        if rank is not None and lowrank.factorable(p.shape):
            rows, cols = p.shape[0], p.numel() // p.shape[0]
            a = torch.randn((num_tasks, rank, cols), generator=g, device=p.device)
            bt = torch.randn((num_tasks, rank, rows), generator=g, device=p.device) * (scale / rank ** 0.5)
            vectors[name] = lowrank.LowRankBlock(a, bt, (num_tasks, *p.shape))
            continue
        v = torch.randn((num_tasks, *p.shape), generator=g, device=p.device) * scale
        vectors[name] = v.to(dtype)
    energy = {k: 1.0 for k, v in vectors.items() if lowrank.is_lowrank(v)}
    return TaskVectors(vectors, sources=[f"synthetic[{t}]" for t in range(num_tasks)], lowrank_energy=energy)
