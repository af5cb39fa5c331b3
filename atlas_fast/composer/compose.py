"""compose(): run a model with θ0 + Σ c·τ, swapping modules in place through one table.

Parameters of swapped modules (nn.Linear, nn.Conv2d, nn.MultiheadAttention) go through the fused atlas
ops. Every other composed parameter (LayerNorm scales, embeddings, projections, biases of other modules)
takes the generic on-the-fly merge: a forward pre-hook on the composed model merges all of them in one
merge_blocks call and puts the merged tensors on their owners for the duration of the forward; a forward
hook puts θ0 back, also when the forward raises. An owner called on its own (say clip.encode_image on a
composed clip) merges and restores its own blocks in its own hooks. An nn.MultiheadAttention that cannot be
swapped reads its out_proj's parameters itself, so its hooks merge those too.

Outside a forward the model holds exactly what it held before compose, under the same names (θ0, now
frozen), plus one parameter, the coefficients, registered on the composed module as "atlas_coefficients":
its state_dict is the original's plus that key, and it deep-copies like any module. Its class becomes a
subclass of its own (as torch.nn.utils.parametrize does) that keeps the coefficients float32 through
.half()/.bfloat16() and moves the generic blocks' task vectors with it; unwrap() restores the class.

A tied parameter (one tensor held by several modules: GPT-2's lm_head.weight is transformer.wte.weight) is one
block, named as model.named_parameters() names it; the bank may name it under any of its names (identical task
vectors where it names several). Each use runs θ0 + Σ c τ with that block's coefficients: a fused owner through
its op on θ0, the other owners lent the one merged tensor, so the coefficient gradient sums all uses.

Grouped compositions (AtlasModel.groups): G coefficient sets in one forward, each sample with its own. The
forward runs as torch.func.vmap over the samples of the inputs (dim 0 of every tensor positional argument;
inside, each sample is a batch of one, in whatever layout the model's modules use): the fused modules call
the grouped ops, whose batching rule gathers all samples back into one call with a group index per sample;
the generic blocks (and those of a fused module without a grouped op, transformers' Conv1D) are merged once per
group (one GEMM per block) and each sample's merged copy is handed to the model with torch.func.functional_call
(untied: a tied parameter's fused owner keeps θ0), which under vmap applies every use of it (LayerNorm scales,
embeddings, a projection matrix) per sample, exactly, in batched ops. Those copies are the only per-sample
parameters: for ViT-B/32 (projection, positional embedding, LayerNorms) 0.47 M values per sample.
"""
import contextlib
import copy
import json
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..backends import BACKENDS, resolve
from ..backends.torch_backend import merge_block
from ..bank import fingerprint, lowrank, quant
from ..bank.task_vectors import LOWRANK
from ..ops.dense import merge_blocks
from ..ops.grouped import merge_blocks_grouped
from .coefficient_file import read_coefficient_file, write_coefficient_file
from .modules import AtlasBlocks, AtlasCoefficients, apply_keeping_float32, swap_table

COEF_KEY = "atlas_coefficients"


@dataclass
class CompositionReport:
    """What compose() did with each parameter and bank entry. A tied parameter (one tensor under several names,
    an output layer sharing its embedding's weight) is one block, named as model.named_parameters() names it;
    `fused` and `generic` name each of its uses as the model's state_dict does."""
    composed: list                                   # block names, in model.named_parameters() order
    fused: dict = field(default_factory=dict)        # parameter name -> module type running it through a fused op
    generic: list = field(default_factory=list)      # parameter names merged on the fly
    missing_from_bank: list = field(default_factory=list)  # model parameters kept at θ0
    unused_bank_entries: list = field(default_factory=list)  # bank entries naming no parameter or buffer
    buffers_not_composed: list = field(default_factory=list)  # bank entries naming buffers: the model keeps its own
    tied: dict = field(default_factory=dict)         # block name -> the other names of its tensor in the model

    def __str__(self):
        lines = [f"composed {len(self.composed)} blocks: {len(self.fused)} through fused ops, "
                 f"{len(self.generic)} merged on the fly"]
        if self.tied:
            ties = ["{} = {}".format(n, " = ".join(others)) for n, others in self.tied.items()]
            lines.append(f"tied parameters (one tensor, one block, every use composed): {len(ties)}: "
                         f"{'; '.join(ties[:8])}{' ...' if len(ties) > 8 else ''}")
        for label, names in (("kept at θ0 (no task vector)", self.missing_from_bank),
                             ("bank entries naming nothing in the model", self.unused_bank_entries),
                             ("bank entries for buffers, not composed (the model keeps its own)",
                              self.buffers_not_composed)):
            if names:
                lines.append(f"{label}: {len(names)}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
        return "\n".join(lines)


def _swap_entry(module, table, swappable):
    """The swap table's entry for a module of a listed type (or a subclass keeping its forward), else None."""
    for base, entry in table.items():
        if isinstance(module, base) and type(module).forward is base.forward and swappable[base](module):
            return entry
    return None


class GenericBlocks(nn.Module):
    """The task vectors of the blocks merged on the fly, and the hooks that lend the merged tensors to their
    owners for one forward. θ0 stays registered on its owners; it is read from there at every merge.

    A block may have several uses, (owner, attribute) pairs holding one tensor (tied parameters: an embedding
    and an output layer sharing a weight): it is merged once and every use is lent the same merged tensor, so
    the gradients of all uses reach one coefficient set."""

    def __init__(self, root, entries, bank):
        """entries: (bank name, [(owner module, attribute, parameter name, trigger module)], block index) per
        block."""
        super().__init__()
        self.entries = [([(owner, attr, name) for owner, attr, name, _ in uses], b) for _, uses, b in entries]
        for i, (name, *_) in enumerate(entries):
            quant.register_tau(self, f"tau_{i}", bank[name])
        # Each block is merged by its triggers' hooks when a trigger runs outside the composed model.
        self.triggers = []                                   # [(trigger module, block indices)]
        for i, (_, uses, _) in enumerate(entries):
            for *_, trigger in uses:
                found = [ix for t, ix in self.triggers if t is trigger]
                if not found:
                    self.triggers.append((trigger, [i]))
                elif i not in found[0]:
                    found[0].append(i)
        self.root = [root]                                   # a list: not registered as a child
        self._lent = {}                                      # slot (-1: root) -> (blocks, [(owner, attr, θ0)])
        self._handles = []

    def theta0(self, i):
        """θ0 of block i, from its first use (every use holds the same tensor outside a forward)."""
        owner, attr, _ = self.entries[i][0][0]
        return owner._parameters[attr]

    def lend(self, slot, indices):
        """Put θ0 + Σ c τ on every use of these blocks, remembering θ0 to put back."""
        atlas = self.atlas_coefficients()
        blocks = [self.entries[i][1] for i in indices]
        merged = merge_blocks([self.theta0(i) for i in indices], [quant.get_tau(self, f"tau_{i}") for i in indices],
                              atlas.blocks(blocks), [atlas.keys[b] for b in blocks], atlas.backend)
        lent = []
        for i, m in zip(indices, merged):
            for owner, attr, _ in self.entries[i][0]:
                lent.append((owner, attr, owner._parameters[attr]))
                owner._parameters[attr] = m
        self._lent[slot] = (list(indices), lent)

    def _apply(self, fn, recurse=True):
        # The scales of quantised task vectors stay float32 through .half() / .bfloat16().
        return quant.apply_keeping_scales(self, lambda f: super(GenericBlocks, self)._apply(f, recurse), fn)

    def give_back(self, slot):
        for owner, attr, p0 in reversed(self._lent.pop(slot, ((), ()))[1]):
            owner._parameters[attr] = p0

    def atlas_coefficients(self):
        return self.root[0].__dict__["_atlas"]

    def _root_pre(self, module, args):
        if self.atlas_coefficients().grouped is not None:  # AtlasModel passes per-sample merged blocks itself
            return
        self.atlas_coefficients().check_finite_values()
        if self.entries:
            self.lend(-1, range(len(self.entries)))

    def _root_post(self, module, args, output):
        self.give_back(-1)

    def _trigger_pre(self, slot, module, args):
        if self.atlas_coefficients().grouped is not None or slot in self._lent:
            return
        # A block another slot has lent already (the root's, or a tied block's other owner running around this
        # one) stays as it is: its uses hold the merged tensor until that slot gives it back.
        active = {i for indices, _ in self._lent.values() for i in indices}
        indices = [i for i in self.triggers[slot][1] if i not in active]
        if indices:
            self.lend(slot, indices)

    def _trigger_post(self, slot, module, args, output):
        self.give_back(slot)

    def install(self):
        root = self.root[0]
        self._handles = [root.register_forward_pre_hook(self._root_pre),
                         root.register_forward_hook(self._root_post, always_call=True)]
        for slot, (trigger, _) in enumerate(self.triggers):
            if trigger is not root:
                self._handles += [trigger.register_forward_pre_hook(_SlotHook(self._trigger_pre, slot)),
                                  trigger.register_forward_hook(_SlotHook(self._trigger_post, slot),
                                                                always_call=True)]

    def uninstall(self):
        for slot in list(self._lent):
            self.give_back(slot)
        for h in self._handles:
            h.remove()
        self._handles = []


class _SlotHook:
    """A hook bound to one trigger slot; deep-copies with its GenericBlocks (a closure would not)."""

    def __init__(self, method, slot):
        self.method, self.slot = method, slot

    def __call__(self, *args):
        return self.method(self.slot, *args)


class _ConvertOnce:
    """A module._apply conversion that converts each tensor once: the task vectors of a tied parameter, held by
    each module that uses it (a fused owner and the generic blocks, or two fused owners), stay one tensor."""

    def __init__(self, fn):
        self.fn, self.done = fn, {}

    def __call__(self, t):
        hit = self.done.get(id(t))
        if hit is None or hit[0] is not t:
            hit = self.done[id(t)] = (t, self.fn(t))
        return hit[1]


class _ComposedRoot:
    """Mixed into the composed module's class: the coefficients stay float32 through dtype moves, the generic
    blocks' task vectors (held by the AtlasCoefficients in `_atlas`, not a child, so that containers that run
    every child, like nn.Sequential, are unaffected) follow .to(), and a state dict without the coefficients
    (the original model's checkpoint) loads strictly."""

    def _apply(self, fn, recurse=True):
        atlas = self.__dict__["_atlas"]
        fn = _ConvertOnce(fn)

        def convert():
            super(_ComposedRoot, self)._apply(fn, recurse)
            atlas.generic._apply(fn)
        atlas.coefficients = apply_keeping_float32(self, COEF_KEY, convert)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + COEF_KEY not in state_dict and prefix + COEF_KEY in missing_keys:
            missing_keys.remove(prefix + COEF_KEY)

    def __reduce_ex__(self, protocol):
        # Pickles and deep-copies as "the original class, composed", without naming the generated class.
        return _new_composed, (type(self).__mro__[2],), self.__getstate__()


_COMPOSED_CLASSES = {}


def _composed_class(base):
    if base not in _COMPOSED_CLASSES:
        _COMPOSED_CLASSES[base] = type(f"Atlas{base.__name__}", (_ComposedRoot, base), {"__module__": base.__module__})
    return _COMPOSED_CLASSES[base]


def _new_composed(base):
    cls = _composed_class(base)
    return cls.__new__(cls)


class AtlasModel(nn.Module):
    """A model running θ0 + Σ c·τ. `coefficients` is its only trainable parameter.

    Its state_dict is the wrapped model's: the original keys (θ0) plus "atlas_coefficients". `unwrap()` gives
    the original model back as it was before compose.
    """

    def __init__(self, model, swaps, tau_paths, requires_grad, report, sources):
        super().__init__()
        self.model = model
        self.report, self.sources = report, list(sources)
        # (parent path, attribute, original module): the modules compose() replaced, for unwrap() and merge().
        self._swaps = swaps
        # block name -> (held by the generic blocks?, path of its task-vector buffer there or in the model):
        # names and paths, not tensors, so they stay right through .to(), load_state_dict() and deepcopy.
        self._tau_paths = tau_paths
        self._requires_grad = requires_grad          # parameter name -> requires_grad before compose
        self._unwrapped = False
        self._group_call = None                      # (index, coefficients) inside groups()
        self._offload = None                         # offload.BankOffload while offload_bank() is in effect
        self._fingerprint = None                     # bank_fingerprint(), once computed

    def forward(self, *args, **kwargs):
        self._check_composed()
        grouped = self._group_call is not None
        context = self._offload.forward_context(grouped) if self._offload is not None else contextlib.nullcontext()
        with context:
            return self._forward_grouped(args, kwargs) if grouped else self.model(*args, **kwargs)

    # -- out-of-core banks

    def offload_bank(self, pin=True):
        """Keep the fused modules' task vectors in host memory (page-locked unless pin=False) and copy each
        module's blocks to the model's device just before it runs, the next module's on a side stream meanwhile,
        forward and backward (offload.py): a bank larger than the GPU trains. The generically merged blocks stay
        on the device. Returns the offload.BankOffload (its `host_bytes`, `peak_resident`). Move the model first:
        moving, casting or deep-copying an offloaded model raises until onload_bank()."""
        from .offload import BankOffload
        self._check_composed()
        if self._offload is not None:
            raise RuntimeError("offload_bank: the bank is offloaded already")
        self._offload = BankOffload(self.model, self.coefficients.device, pin)
        return self._offload

    def onload_bank(self):
        """Undo offload_bank(): every task vector back on the model's device."""
        if self._offload is not None:
            self._offload.remove()
            self._offload = None

    def _refuse_offloaded(self, what):
        # The offload's hooks hold this model's modules and their host tensors: a moved model would stream to the
        # old device, and a copy's hooks would swap the original's buffers.
        if getattr(self, "_offload", None) is not None:
            raise RuntimeError(f"{what}: the bank is offloaded (offload_bank()); call onload_bank() first, then "
                               f"offload_bank() again on the result")

    def _apply(self, fn, *args, **kwargs):
        self._refuse_offloaded("moving or casting an AtlasModel (.to, .cuda, .cpu, .half, ...)")
        self._fingerprint = None
        return super()._apply(fn, *args, **kwargs)

    def __deepcopy__(self, memo):
        self._refuse_offloaded("copy.deepcopy(AtlasModel)")
        duplicate = self.__class__.__new__(self.__class__)
        memo[id(self)] = duplicate
        duplicate.__setstate__(copy.deepcopy(self.__dict__, memo))
        return duplicate

    # -- grouped compositions

    @contextlib.contextmanager
    def groups(self, index, coefficients):
        """Within this context every forward of this AtlasModel runs G compositions in one batch.

        index: int64 (S,), the group in [0, G) of each sample; samples are dim 0 of every tensor positional
        argument (inputs must be batch-first at the model's boundary; keyword arguments are shared by all
        samples; outputs come back batch-first). coefficients: (G, *self.coefficients.shape), float32, e.g.
        group_coefficients(G) to train G sets, or a router's output (S, T) / (S, T, B) with index =
        arange(S) for per-sample coefficients; gradients flow into it, not into self.coefficients. Each sample's
        outputs and gradients are those of a model composed with its group's coefficients alone. Only a call of
        this AtlasModel is grouped, not a call of a submodule or of the wrapped model. Each sample runs as a
        batch of one: dropout draws per sample; statistics over the batch (BatchNorm in training mode) cannot
        be grouped. Every bank format groups: int8 and int4 banks run the backend's grouped kernels (dequantised in
        registers), low-rank ones stock GEMMs on the factors (backends/torch_grouped.py)."""
        shape = tuple(self.coefficients.shape)
        if not isinstance(coefficients, torch.Tensor) or coefficients.dim() != len(shape) + 1 \
                or tuple(coefficients.shape[1:]) != shape:
            raise ValueError(f"groups: coefficients must be (G, {', '.join(map(str, shape))}), got "
                             f"{tuple(getattr(coefficients, 'shape', ()))}")
        if coefficients.shape[0] == 0:
            raise ValueError(f"groups: coefficients for 0 groups {tuple(coefficients.shape)}; give at least one "
                             f"coefficient set (G >= 1)")
        if coefficients.dtype not in (torch.float32, torch.float64) or coefficients.device != self.coefficients.device:
            raise ValueError(f"groups: coefficients must be float32 on {self.coefficients.device}, got "
                             f"{coefficients.dtype} on {coefficients.device}")
        if not isinstance(index, torch.Tensor) or index.dtype != torch.int64 or index.dim() != 1 \
                or index.device != coefficients.device:
            raise ValueError(f"groups: index must be an int64 (S,) tensor on {coefficients.device}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= coefficients.shape[0]):
            raise ValueError(f"groups: index holds group ids outside [0, {coefficients.shape[0]})")
        previous, self._group_call = self._group_call, (index, coefficients)
        try:
            yield self
        finally:
            self._group_call = previous

    def group_coefficients(self, groups):
        """A new trainable float32 leaf (groups, *coefficients.shape) holding copies of the coefficients."""
        c = self.coefficients.detach()
        return nn.Parameter(c.unsqueeze(0).repeat(groups, *([1] * c.dim())))

    def _forward_grouped(self, args, kwargs):
        atlas = self.atlas
        index, coef = self._group_call
        if atlas.check_finite and not torch.compiler.is_compiling() and not torch.isfinite(coef.detach()).all():
            raise ValueError("groups: the coefficients hold non-finite values")
        for a in args:
            if isinstance(a, torch.Tensor) and (a.dim() == 0 or a.shape[0] != index.shape[0]):
                raise ValueError(f"groups: a positional input of shape {tuple(a.shape)} does not have the "
                                 f"{index.shape[0]} samples of the index on dim 0")
        # Samples sorted by group: inside, every group is a contiguous run of rows (no gather per layer).
        order = torch.argsort(index, stable=True)
        index = index[order]
        args = tuple(a.index_select(0, order) if isinstance(a, torch.Tensor) else a for a in args)
        sample_params = {}
        merges = self._blocks_merged_per_group()
        if merges:
            names, theta0, taus, blocks = zip(*merges)
            merged = merge_blocks_grouped(list(theta0), list(taus), atlas.group_blocks(coef, list(blocks)),
                                          [atlas.keys[b] for b in blocks])
            sample_params = {n: m.index_select(0, index) for uses, m in zip(names, merged) for n in uses}
        model = self.model

        def one(params, *xs):
            xs = tuple(x.unsqueeze(0) if isinstance(x, torch.Tensor) else x for x in xs)
            # Untied: a tied parameter's fused owner keeps θ0 (its op merges); its other uses are named in params.
            out = torch.func.functional_call(model, params, xs, kwargs, tie_weights=False)
            return torch.utils._pytree.tree_map(lambda t: t.squeeze(0) if isinstance(t, torch.Tensor) else t, out)

        in_dims = (0, *(0 if isinstance(a, torch.Tensor) else None for a in args))
        # The modules see the grouped call only while it runs: a call of the wrapped model itself stays plain.
        atlas.grouped = (index, coef)
        try:
            out = torch.func.vmap(one, in_dims=in_dims, randomness="different")(sample_params, *args)
        finally:
            atlas.grouped = None
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return torch.utils._pytree.tree_map(
            lambda t: t.index_select(0, inverse) if isinstance(t, torch.Tensor) else t, out)

    def _blocks_merged_per_group(self):
        """(parameter names, θ0, τ, block index) of each block a grouped call merges per group and hands to the
        model per sample: the generic blocks (every use of a tied one), and those of the fused modules that run a
        grouped call on such merged weights (merges_in_groups)."""
        generic = self.atlas.generic
        out = [([name for _, _, name in uses], generic.theta0(i), quant.get_tau(generic, f"tau_{i}"), b)
               for i, (uses, b) in enumerate(generic.entries)]
        for m in self.model.modules():
            if isinstance(m, AtlasBlocks) and m.merges_in_groups:
                for attr, (b, name) in m.blocks.items():
                    p0 = m._parameters[attr]
                    # .to(): an offloaded bank's task vectors are on the host until the module runs
                    out.append(([name], p0, quant.get_tau(m, f"tau_{attr}").to(p0.device), b))
        return out

    @property
    def atlas(self):
        """The AtlasCoefficients: coefficients, granularity, partitions, seed, backend, block keys."""
        self._check_composed()
        return self.model.__dict__["_atlas"]

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
        _check_backend(name, self.coefficients.device)
        self.atlas.backend = name

    @property
    def check_finite(self):
        """Whether each forward first checks that the coefficients are finite (one tiny device sync)."""
        return self.atlas.check_finite

    @check_finite.setter
    def check_finite(self, flag):
        self.atlas.check_finite = bool(flag)

    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Loads the original model's keys into θ0 and, when present, "atlas_coefficients"."""
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    def _check_composed(self):
        if self._unwrapped:
            raise RuntimeError("this AtlasModel was unwrapped: its model is plain again; compose it anew")

    def _theta0_and_tau(self):
        """(name, θ0, τ) per block, in block order."""
        generic = self.atlas.generic
        return [(name, self.model.get_parameter(name), _tau_at(generic if in_generic else self.model, path))
                for name, (in_generic, path) in ((n, self._tau_paths[n]) for n in self.block_names)]

    @torch.no_grad()
    def merged_parameters(self):
        """{block name: θ0 + Σ c τ} in θ0's dtype, one block at a time (torch backend)."""
        atlas = self.atlas
        return {name: merge_block(p0, tau.to(p0.device), atlas.block(b), atlas.keys[b]).to(p0.dtype)
                for b, (name, p0, tau) in enumerate(self._theta0_and_tau())}

    def _restore_originals(self):
        """Take the atlas machinery out of the model: original modules and class back, hooks and coefficients
        removed. Returns what _reinstall needs."""
        atlas = self.atlas
        swapped = [(self.model.get_submodule(parent_path), attr) for parent_path, attr, _ in self._swaps]
        swapped = [(parent, attr, getattr(parent, attr)) for parent, attr in swapped]
        _uninstall(self.model)
        for (parent, attr, _), (_, _, original) in zip(swapped, self._swaps):
            setattr(parent, attr, original)
        return atlas, swapped

    def _reinstall(self, atlas, swapped):
        for parent, attr, atlas_module in swapped:
            setattr(parent, attr, atlas_module)
        _install(self.model, atlas)

    def _restore_requires_grad(self, model):
        for name, p in model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))

    @torch.no_grad()
    def merge(self):
        """A plain copy of the original model (same classes, no atlas modules) holding the merged weights,
        each parameter with the requires_grad it had before compose."""
        merged = self.merged_parameters()
        memo = {id(p0): nn.Parameter(merged[name], requires_grad=False) for name, p0, _ in self._theta0_and_tau()}
        state = self._restore_originals()
        try:
            plain = copy.deepcopy(self.model, memo)
        finally:
            self._reinstall(*state)
        self._restore_requires_grad(plain)
        return plain

    def unwrap(self):
        """Undo compose(): the original modules and parameters (the same tensors, holding θ0, with the
        requires_grad they had before) back in the model, hooks and coefficients removed. Returns the model;
        this AtlasModel is unusable afterwards."""
        self._restore_originals()
        self._restore_requires_grad(self.model)
        self._unwrapped = True
        return self.model

    # -- coefficient files

    @torch.no_grad()
    def bank_fingerprint(self):
        """(T, B, 2 + fingerprint.SAMPLES) float64: norm, sum and sampled values of every task vector of every
        composed block, in task-vector and block order (fingerprint.py), from one read of the bank. Kept until the
        model is moved or cast: the bank is frozen."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint.fingerprint(tau for _, _, tau in self._theta0_and_tau())
        return self._fingerprint

    def bank_mismatch(self, saved, saved_sources=None):
        """None when `saved` (a bank_fingerprint() of another time or place) is this bank's, else one line
        naming the first block and task vector that differ (saved_sources: the task vectors' names then)."""
        numels = [p0.numel() for _, p0, _ in self._theta0_and_tau()]
        return fingerprint.mismatch(saved, self.bank_fingerprint(), self.block_names, self.sources, numels,
                                    saved_sources)

    def save_coefficients(self, path):
        """Write the coefficients, what they refer to and the bank's fingerprint as safetensors (atomic;
        coefficient_file.py)."""
        write_coefficient_file(path, self.coefficients, self.bank_fingerprint(), self._coef_meta())

    def load_coefficients(self, path, allow_bank_mismatch=False):
        """Load coefficients saved by save_coefficients for the same blocks, layout and bank. A file saved for a
        bank holding other values (other, reordered or swapped task vectors or blocks: its fingerprint differs;
        the task vectors' source names may differ) is refused unless allow_bank_mismatch=True."""
        file = read_coefficient_file(path)
        path, meta, coef, saved = file.path, file.meta, file.coefficients, file.fingerprint
        for key, value in self._coef_meta().items():
            if key != "sources" and meta.get(key) != value:
                raise ValueError(f"{path}: {key} differs from this model's ({meta.get(key)!r:.80} vs {value!r:.80})")
        if coef.shape != self.coefficients.shape:
            raise ValueError(f"{path}: coefficients of shape {tuple(coef.shape)}, expected "
                             f"{tuple(self.coefficients.shape)}")
        if not allow_bank_mismatch:
            self._check_same_bank(path, meta, saved)
        if not torch.isfinite(coef).all():
            raise ValueError(f"{path}: the coefficients hold non-finite values")
        with torch.no_grad():
            self.coefficients.copy_(coef)

    def _check_same_bank(self, path, meta, saved):
        if saved is not None:
            problem = self.bank_mismatch(saved, json.loads(meta.get("sources", "null")))
        elif "fingerprint" in meta:
            problem = fingerprint.legacy_mismatch(json.loads(meta["fingerprint"]), self.bank_fingerprint(),
                                                  self.sources)
        else:
            return
        if problem is not None:
            raise ValueError(f"{path}: saved for another bank: {problem}; pass allow_bank_mismatch=True "
                             f"(--allow-bank-mismatch) to load it anyway")

    def _coef_meta(self):
        a = self.atlas
        return {"block_names": json.dumps(self.block_names), "granularity": a.granularity,
                "partitions": str(a.partitions), "seed": str(a.seed), "num_tasks": str(len(self.sources)),
                "sources": json.dumps(self.sources)}


def _install(root, atlas):
    root.__class__ = _composed_class(type(root))
    root.__dict__["_atlas"] = atlas
    root.register_parameter(COEF_KEY, atlas.coefficients)
    atlas.generic.install()


def _uninstall(root):
    root.__dict__["_atlas"].generic.uninstall()
    del root._parameters[COEF_KEY]
    del root.__dict__["_atlas"]
    root.__class__ = type(root).__mro__[2]


def _tau_at(root, path):
    """The task vectors (tensor or QuantizedBlock) registered under the buffer path `path` of `root`."""
    owner, _, name = path.rpartition(".")
    return quant.get_tau(root.get_submodule(owner) if owner else root, name)


def _check_backend(backend, device):
    """Raise now, not at the first forward, if `backend` cannot run on `device`."""
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS + ('auto',)}")
    resolve(backend, device, torch.float32)


def _check_not_composed(model):
    if isinstance(model, AtlasModel) or any(isinstance(m, (AtlasBlocks, _ComposedRoot)) for m in model.modules()):
        raise ValueError("compose: the model is already composed (it holds atlas modules); unwrap() it first, or "
                         "compose the original model")
    if hasattr(model, COEF_KEY):
        raise ValueError(f"compose: the model already has an attribute {COEF_KEY!r}, where compose() puts the "
                         f"coefficients")


def _shared_prefix(longer, shorter):
    """The prefix p with p + s in `longer` for every s in `shorter`, if there is one."""
    first = next(iter(shorter))
    for name in longer:
        if name.endswith("." + first):
            p = name[:-len(first)]
            if all(p + s in longer for s in shorter):
                return p
    return None


def _prefix_hint(model_names, bank_names):
    """A suggestion when every name of one side is a name of the other behind one prefix, else ''."""
    model_names, bank_names = set(model_names), set(bank_names)
    if not model_names or not bank_names:
        return ""
    p = _shared_prefix(bank_names, model_names)
    if p is not None:
        return f" The bank's names are the model's behind {p!r}: pass prefix={p!r} to compose."
    p = _shared_prefix(model_names, bank_names)
    if p is not None:
        return f" The model's names are the bank's behind {p!r}: compose the submodule, compose(model.{p[:-1]}, ...)."
    return ""


def _parameter_names(model):
    """{name model.named_parameters() gives a tensor: every name of that tensor, that one first}. A tied
    parameter (one tensor held by several modules, as an output layer shares its embedding's weight) has
    several; the state_dict lists it under each."""
    first, names = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(first.setdefault(id(p), name), []).append(name)
    return names


def _same_task_vectors(a, b):
    if a is b:
        return True
    if type(a) is not type(b) or tuple(a.shape) != tuple(b.shape):
        return False
    if quant.is_quantized(a):
        return a.group == b.group and torch.equal(a.data, b.data) and torch.equal(a.scale, b.scale)
    if lowrank.is_lowrank(a):
        return torch.equal(a.a, b.a) and torch.equal(a.bt, b.bt)
    return a.dtype == b.dtype and torch.equal(a, b)


def _one_block(task_vectors, prefix, names):
    """The task vectors of one parameter the bank names under `names` (several names of a tied tensor must
    hold identical task vectors: the tensor is one block, merged once)."""
    first = task_vectors[prefix + names[0]]
    for other in names[1:]:
        if not _same_task_vectors(first, task_vectors[prefix + other]):
            raise ValueError(f"compose: bank entries {prefix + names[0]!r} and {prefix + other!r} name one tied "
                             f"parameter of the model (one tensor) but hold different task vectors; a tied "
                             f"parameter is one block: keep one of the two entries, or untie the parameter in the "
                             f"model")
    return first


def _use(model, name, triggers):
    """(owner module, attribute, name, trigger module) of a generically merged parameter use `name`."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    return owner, attr, name, triggers.get(name, owner)


def compose(model, task_vectors, granularity="block", partitions=1, backend="auto", seed=0, strict=True,
            prefix=None, check_finite=True, offload=False):
    """Compose `model` (modified in place, θ0 shared, not copied) with a TaskVectors bank.

    granularity "block": one coefficient per task vector and parameter block, (T, B); "task": one per task
    vector, (T,); partitions=K splits every block into K hash-defined parts, (T, B, K). strict=True raises on
    a model parameter the bank lacks or a bank entry naming nothing in the model; strict=False composes the
    intersection and says what it left out in `AtlasModel.report`. prefix: the bank's names are prefix + the
    model's (compose(clip.visual, bank_of_clip, prefix="visual.")); bank entries outside it are ignored.
    check_finite: each forward first checks that the coefficients are finite (AtlasModel.check_finite).
    Buffers (BatchNorm statistics, ...) are never composed: the model keeps its own.
    An int8 or int4 bank runs on every backend, dequantised inside each merge and reduction (grouped calls too).
    A low-rank bank runs on every backend (its factored blocks as GEMMs of inner size T·r, ops/lowrank.py, grouped
    calls too) with partitions=1.
    offload: True (or "pinned") composes with AtlasModel.offload_bank(), "pageable" with offload_bank(pin=False):
    the fused modules' task vectors stay in host memory and stream to the model's device module by module, so the
    bank may stay on the CPU (a memory-mapped one too) with the model on a GPU; the small generically merged
    blocks are copied to the model's device.
    A memory-mapped bank whose file changed since it was loaded is refused (TaskVectors.check_mapped_files).
    """
    if offload not in (False, True, "pinned", "pageable"):
        raise ValueError(f"compose(offload={offload!r}): expected False, True, 'pinned' or 'pageable'")
    _check_not_composed(model)
    task_vectors.check_mapped_files()
    params = dict(model.named_parameters())
    uses = _parameter_names(model)
    device = next(iter(params.values())).device if params else torch.device("cpu")
    _check_backend(backend, device)
    bank_format = task_vectors.format if task_vectors.format in quant.FORMATS + (LOWRANK,) else None
    if bank_format == LOWRANK and partitions != 1:
        raise ValueError(f"compose(partitions={partitions}): a low-rank bank takes partitions=1 (partitions mask τ "
                         f"element by element, which a factored τ = B·A cannot do without forming it); use "
                         f"task_vectors.to(dtype=torch.float32) for a dense bank")
    buffers = dict(model.named_buffers())
    bank_names = task_vectors.names
    if prefix:
        bank_names = [n[len(prefix):] for n in bank_names if n.startswith(prefix)]
        if not bank_names:
            raise ValueError(f"compose: no bank entry starts with prefix={prefix!r}")
    bank_set = set(bank_names)
    in_bank = {n: [a for a in uses[n] if a in bank_set] for n in params}   # a tied parameter may be named twice
    names = [n for n in params if in_bank[n]]
    missing = [n for n in params if not in_bank[n]]
    known = {a for names_of in uses.values() for a in names_of}
    extra = [n for n in bank_names if n not in known]
    unknown = [n for n in extra if n not in buffers]
    hint = _prefix_hint(list(params), bank_names) if (not names or (strict and missing and unknown)) else ""
    if not names:
        raise ValueError("compose: no parameter of the model has a task vector in the bank." + hint)
    if strict and (missing or unknown):
        parts = [f"{len(missing)} model parameters have no task vector ({', '.join(missing[:5])})"] if missing else []
        parts += [f"{len(unknown)} bank entries name nothing in the model ({', '.join(unknown[:5])})"] if unknown else []
        raise ValueError("compose(strict=True): " + "; ".join(parts) + ". Pass strict=False to compose the "
                         "intersection." + hint)
    bank = {n: _one_block(task_vectors, prefix or "", in_bank[n]) for n in names}
    for n in names:
        p, tau = params[n], bank[n]
        if tuple(tau.shape[1:]) != tuple(p.shape):
            raise ValueError(f"compose: parameter {n!r} has shape {tuple(p.shape)}, its task vectors "
                             f"{tuple(tau.shape[1:])}")
        if tau.device != p.device and not (offload and tau.device.type == "cpu"):
            raise ValueError(f"compose: parameter {n!r} is on {p.device}, its task vectors on {tau.device}; "
                             f"use task_vectors.to(device), or offload=True to keep a CPU bank on the host")
    buffers_in_bank = [n for n in extra if n in buffers]
    if buffers_in_bank:
        warnings.warn(f"compose: {len(buffers_in_bank)} bank entries name buffers ({', '.join(buffers_in_bank[:3])}"
                      f"{', ...' if len(buffers_in_bank) > 3 else ''}); buffers are not composed, the model keeps "
                      f"its own (see AtlasModel.report)", stacklevel=2)

    index = {a: b for b, n in enumerate(names) for a in uses[n]}     # every name of a block's tensor
    block_of = {a: n for n in names for a in uses[n]}
    bank.update({a: bank[n] for a, n in block_of.items()})
    coefs = AtlasCoefficients(len(task_vectors), len(names), granularity, partitions, seed, backend)
    coefs.to(device)
    coefs.check_finite = bool(check_finite)
    coefs.block_names = list(names)
    coefs.bank_format = bank_format
    requires_grad = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(False)

    swaps, fused, triggers, tau_paths = [], {}, {}, {}
    table, swappable = swap_table()

    def visit(module, path):
        for attr, child in list(module.named_children()):
            full = path + attr
            entry = _swap_entry(child, table, swappable)
            if entry is not None:
                cls, pmap = entry
                blocks = {a: (index[f"{full}.{p}"], f"{full}.{p}") for p, a in pmap.items() if f"{full}.{p}" in index}
                if f"{full}.{next(iter(pmap))}" in index:
                    new = cls(child, coefs, bank, blocks)
                    setattr(module, attr, new)
                    swaps.append((path.rstrip("."), attr, child))
                    fused.update({name: type(child).__name__ for _, name in blocks.values()})
                    for a, (_, name) in blocks.items():
                        tau_paths.setdefault(block_of[name], (False, f"{full}.tau_{a}"))
                    continue
            if isinstance(child, nn.MultiheadAttention):
                # It reads out_proj's parameters directly, never calling out_proj: leave out_proj unswapped
                # and merge its blocks when the attention module itself runs.
                triggers.update({f"{full}.{n}": child for n, _ in child.named_parameters(remove_duplicate=False)})
                continue
            visit(child, full + ".")

    visit(model, "")
    generic_entries = []
    for n in names:
        # The uses of the block that no fused module runs: every one of a tied parameter's other owners
        rest = [a for a in uses[n] if a not in fused]
        if rest:
            bank[n] = bank[n].to(device)
            generic_entries.append((n, [_use(model, a, triggers) for a in rest], index[n]))
            tau_paths.setdefault(n, (True, f"tau_{len(generic_entries) - 1}"))
    coefs.generic = GenericBlocks(model, generic_entries, bank)
    _install(model, coefs)
    generic = [name for _, uses_of, _ in generic_entries for _, _, name, _ in uses_of]
    report = CompositionReport(composed=names, fused=fused, generic=generic, missing_from_bank=missing,
                               unused_bank_entries=unknown, buffers_not_composed=buffers_in_bank,
                               tied={n: uses[n][1:] for n in names if len(uses[n]) > 1})
    atlas = AtlasModel(model, swaps, tau_paths, requires_grad, report, task_vectors.sources)
    if offload:
        atlas.offload_bank(pin=offload != "pageable")
    return atlas
