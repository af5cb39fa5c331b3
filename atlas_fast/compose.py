"""compose(): run a model with θ0 + Σ c·τ, swapping modules in place through one table.

Parameters of swapped modules (nn.Linear, nn.Conv2d, nn.MultiheadAttention) go through the fused atlas
ops. Every other composed parameter (LayerNorm scales, embeddings, projections, biases of other modules)
takes the generic on-the-fly merge: a forward pre-hook on the composed model merges all of them in one
merge_blocks call and sets them on their owners; an owner called on its own (say clip.encode_image on a
composed clip) merges its own blocks in its own pre-hook. An nn.MultiheadAttention that cannot be swapped
reads its out_proj's parameters itself, so its pre-hook merges those too.
"""
import copy
import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .backends import BACKENDS
from .backends.torch_backend import merge_block
from .modules import SWAP_TABLE, SWAPPABLE, AtlasCoefficients
from .ops import merge_blocks
from .task_vectors import atomic_write

COEF_FORMAT = "atlas_fast.coefficients/1"


@dataclass
class CompositionReport:
    """What compose() did with each parameter and bank entry."""
    composed: list                                   # block names, in model.named_parameters() order
    fused: dict = field(default_factory=dict)        # block name -> module type running it through a fused op
    generic: list = field(default_factory=list)      # blocks merged on the fly
    missing_from_bank: list = field(default_factory=list)  # model parameters kept at θ0
    unused_bank_entries: list = field(default_factory=list)  # bank entries naming no parameter or buffer
    buffers_not_composed: list = field(default_factory=list)  # bank entries naming buffers: the model keeps its own

    def __str__(self):
        lines = [f"composed {len(self.composed)} blocks: {len(self.fused)} through fused ops, "
                 f"{len(self.generic)} merged on the fly"]
        for label, names in (("kept at θ0 (no task vector)", self.missing_from_bank),
                             ("bank entries naming nothing in the model", self.unused_bank_entries),
                             ("bank entries for buffers, not composed (the model keeps its own)",
                              self.buffers_not_composed)):
            if names:
                lines.append(f"{label}: {len(names)}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
        return "\n".join(lines)


def _swap_entry(module):
    """The SWAP_TABLE entry for a module of a listed type (or a subclass keeping its forward), else None."""
    for base, entry in SWAP_TABLE.items():
        if isinstance(module, base) and type(module).forward is base.forward and SWAPPABLE[base](module):
            return entry
    return None


class GenericBlocks(nn.Module):
    """θ0 and τ of the blocks merged on the fly, and the hooks that set the merged tensors on their owners."""

    def __init__(self, root, entries, coefs, bank):
        """entries: (name, owner module, attribute, block index, trigger module) per block."""
        super().__init__()
        object.__setattr__(self, "atlas", coefs)
        object.__setattr__(self, "root", root)
        self.entries = [(owner, attr, b) for _, owner, attr, b, _ in entries]
        self.theta0 = nn.ParameterList([owner._parameters[attr] for _, owner, attr, _, _ in entries])
        for i, (name, *_) in enumerate(entries):
            self.register_buffer(f"tau_{i}", bank[name], persistent=False)
        # Each block is merged by its trigger's pre-hook when the trigger runs outside the composed model.
        self.triggers, self.by_trigger = {}, {}
        for i, (*_, trigger) in enumerate(entries):
            self.triggers[id(trigger)] = trigger
            self.by_trigger.setdefault(id(trigger), []).append(i)
        self._active = False
        self._handles = []
        self.install()

    def merge(self, indices):
        coef = self.atlas.blocks([self.entries[i][2] for i in indices])
        merged = merge_blocks([self.theta0[i] for i in indices], [getattr(self, f"tau_{i}") for i in indices],
                              coef, [self.atlas.keys[self.entries[i][2]] for i in indices], self.atlas.backend)
        for i, m in zip(indices, merged):
            owner, attr, _ = self.entries[i]
            setattr(owner, attr, m)

    def _root_pre(self, module, args):
        self._active = True
        self.merge(range(len(self.entries)))

    def _root_post(self, module, args, output):
        self._active = False

    def _trigger_pre(self, module, args):
        if not self._active:
            self.merge(self.by_trigger[id(module)])

    def install(self):
        """Take the composed parameters off their owners (θ0 stays here) and hook the merge in."""
        for i, (owner, attr, _) in enumerate(self.entries):
            del owner._parameters[attr]
            setattr(owner, attr, self.theta0[i].detach())
        if not self.entries:
            return
        self._handles = [self.root.register_forward_pre_hook(self._root_pre),
                         self.root.register_forward_hook(self._root_post, always_call=True)]
        self._handles += [t.register_forward_pre_hook(self._trigger_pre) for t in self.triggers.values()
                          if t is not self.root]

    def uninstall(self):
        """Put θ0 back on the owners as parameters and remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for i, (owner, attr, _) in enumerate(self.entries):
            owner.__dict__.pop(attr, None)
            owner._parameters[attr] = self.theta0[i]


class AtlasModel(nn.Module):
    """A model running θ0 + Σ c·τ. `coefficients` is its only trainable parameter."""

    def __init__(self, model, coefs, generic, swaps, blocks, report, sources):
        super().__init__()
        self.model, self.atlas, self.generic = model, coefs, generic
        self.report, self.sources = report, list(sources)
        object.__setattr__(self, "_swaps", swaps)      # (parent, attr, original module, atlas module)
        # (name, θ0 parameter, module holding τ, its buffer name) in block order: τ is looked up when used,
        # so it follows the module through .to().
        object.__setattr__(self, "_blocks", blocks)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @property
    def coefficients(self):
        return self.atlas.coefficients

    @property
    def block_names(self):
        return list(self.report.composed)

    @property
    def backend(self):
        return self.atlas.backend

    @backend.setter
    def backend(self, name):
        _check_backend(name)
        self.atlas.backend = name

    @torch.no_grad()
    def merged_parameters(self):
        """{block name: θ0 + Σ c τ} in θ0's dtype, one block at a time (torch backend)."""
        return {name: merge_block(p0, getattr(holder, tau), self.atlas.block(b), self.atlas.keys[b]).to(p0.dtype)
                for b, (name, p0, holder, tau) in enumerate(self._blocks)}

    @torch.no_grad()
    def merge(self):
        """A plain copy of the original model (same classes, no atlas modules) holding the merged weights."""
        merged = self.merged_parameters()
        memo = {id(p0): nn.Parameter(merged[name]) for name, p0, _, _ in self._blocks}
        self.generic.uninstall()
        for parent, attr, original, _ in self._swaps:
            setattr(parent, attr, original)
        try:
            plain = copy.deepcopy(self.model, memo)
        finally:
            for parent, attr, _, atlas_module in self._swaps:
                setattr(parent, attr, atlas_module)
            self.generic.install()
        for p in plain.parameters():
            p.requires_grad_(True)
        return plain

    def save_coefficients(self, path):
        """Write the coefficients and what they refer to as safetensors (atomic)."""
        from safetensors.torch import save_file
        meta = {"format": COEF_FORMAT, **self._coef_meta()}
        tensors = {"coefficients": self.coefficients.detach().cpu().contiguous()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    def load_coefficients(self, path):
        """Load coefficients saved by save_coefficients for the same blocks, bank size and layout."""
        from safetensors import safe_open
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such coefficient file")
        try:
            with safe_open(path, framework="pt") as f:
                meta, coef = f.metadata() or {}, f.get_tensor("coefficients")
        except Exception as e:
            raise ValueError(f"{path}: unreadable or truncated coefficient file ({e})") from e
        if meta.get("format") != COEF_FORMAT:
            raise ValueError(f"{path}: not an atlas_fast coefficient file")
        for key, value in self._coef_meta().items():
            if key != "sources" and meta.get(key) != value:
                raise ValueError(f"{path}: {key} differs from this model's ({meta.get(key)!r:.80} vs {value!r:.80})")
        if coef.shape != self.coefficients.shape:
            raise ValueError(f"{path}: coefficients of shape {tuple(coef.shape)}, expected "
                             f"{tuple(self.coefficients.shape)}")
        with torch.no_grad():
            self.coefficients.copy_(coef)

    def _coef_meta(self):
        a = self.atlas
        return {"block_names": json.dumps(self.block_names), "granularity": a.granularity,
                "partitions": str(a.partitions), "seed": str(a.seed), "num_tasks": str(len(self.sources)),
                "sources": json.dumps(self.sources)}


def _check_backend(backend):
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS + ('auto',)}")


def compose(model, task_vectors, granularity="block", partitions=1, backend="auto", seed=0, strict=True):
    """Compose `model` (modified in place, θ0 shared, not copied) with a TaskVectors bank.

    granularity "block": one coefficient per task vector and parameter block, (T, B); "task": one per task
    vector, (T,); partitions=K splits every block into K hash-defined parts, (T, B, K). strict=True raises on
    a model parameter the bank lacks or a bank entry naming nothing in the model; strict=False composes the
    intersection and says what it left out in `AtlasModel.report`.
    """
    _check_backend(backend)
    if isinstance(model, AtlasModel):
        raise ValueError("model is already composed")
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    names = [n for n in params if n in task_vectors]
    missing = [n for n in params if n not in task_vectors]
    extra = [n for n in task_vectors.names if n not in params]
    unknown = [n for n in extra if n not in buffers]
    if strict and (missing or unknown):
        parts = [f"{len(missing)} model parameters have no task vector ({', '.join(missing[:5])})"] if missing else []
        parts += [f"{len(unknown)} bank entries name nothing in the model ({', '.join(unknown[:5])})"] if unknown else []
        raise ValueError("compose(strict=True): " + "; ".join(parts) + ". Pass strict=False to compose the "
                         "intersection, or a prefix when building the bank")
    if not names:
        raise ValueError("compose: no parameter of the model has a task vector in the bank")
    for n in names:
        p, tau = params[n], task_vectors[n]
        if tuple(tau.shape[1:]) != tuple(p.shape):
            raise ValueError(f"compose: parameter {n!r} has shape {tuple(p.shape)}, its task vectors "
                             f"{tuple(tau.shape[1:])}")
        if tau.device != p.device:
            raise ValueError(f"compose: parameter {n!r} is on {p.device}, its task vectors on {tau.device}; "
                             f"use task_vectors.to(device)")
    index = {n: b for b, n in enumerate(names)}
    coefs = AtlasCoefficients(len(task_vectors), len(names), granularity, partitions, seed, backend)
    coefs.to(params[names[0]].device)
    for p in model.parameters():
        p.requires_grad_(False)

    swaps, fused, triggers = [], {}, {}

    def visit(module, prefix):
        for attr, child in list(module.named_children()):
            full = prefix + attr
            entry = _swap_entry(child)
            if entry is not None:
                cls, pmap = entry
                blocks = {a: (index[f"{full}.{p}"], f"{full}.{p}") for p, a in pmap.items() if f"{full}.{p}" in index}
                if f"{full}.{next(iter(pmap))}" in index:
                    new = cls(child, coefs, task_vectors, blocks)
                    setattr(module, attr, new)
                    swaps.append((module, attr, child, new))
                    fused.update({name: type(child).__name__ for _, name in blocks.values()})
                    continue
            if isinstance(child, nn.MultiheadAttention):
                # It reads out_proj's parameters directly, never calling out_proj: leave out_proj unswapped
                # and merge its blocks when the attention module itself runs.
                triggers.update({f"{full}.{n}": child for n, _ in child.named_parameters()})
                continue
            visit(child, full + ".")

    visit(model, "")
    generic_entries = []
    for n in names:
        if n not in fused:
            owner_name, _, attr = n.rpartition(".")
            owner = model.get_submodule(owner_name)
            generic_entries.append((n, owner, attr, index[n], triggers.get(n, owner)))
    generic = GenericBlocks(model, generic_entries, coefs, task_vectors)
    report = CompositionReport(composed=names, fused=fused, generic=[e[0] for e in generic_entries],
                               missing_from_bank=missing, unused_bank_entries=unknown,
                               buffers_not_composed=[n for n in extra if n in buffers])
    holders = {name: (new, f"tau_{attr}") for _, _, _, new in swaps for attr, (_, name) in new.blocks.items()}
    holders.update({e[0]: (generic, f"tau_{i}") for i, e in enumerate(generic_entries)})
    blocks = [(n, params[n], *holders[n]) for n in names]
    return AtlasModel(model, coefs, generic, swaps, blocks, report, task_vectors.sources)
