"""The modules compose() swaps in, and the owner of the coefficients.

Each Atlas module keeps the original module's frozen θ0 parameters (the same tensors, not copies) and
references to its blocks' stacked task vectors, and calls one atlas op per projection.

transformers' Conv1D (the GPT-2 family's linear layer, y = x W + b with W stored (in, out), the transpose of
nn.Linear's) is composed in its stored layout, the one the generic merge, merge() and the partition hash see,
with no transposed copy of θ0 or of the bank: the stored W read as a linear weight (out', in') = (in, out) is
what the linear op takes, and Conv1D's backward is that op's forward and coefficient gradient (AtlasConv1D).
Transposed views would not do: every backend makes its weight and task vectors contiguous (a copy of the layer's
bank per call) and hashes partitions over the flat index of the layout it is given.
"""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..bank import lowrank, quant
from ..ops.dense import atlas_conv2d, atlas_linear, merge_blocks
from ..ops.grouped import call_conv2d_grouped, call_linear_grouped
from ..ops.hashing import block_key

GRANULARITIES = ("block", "task")


def apply_keeping_float32(module, name, convert):
    """Run convert() (module._apply of a dtype or device move) keeping module's parameter `name` and its gradient
    at their float32 values through .half() / .bfloat16(), moved to the new device all the same: coefficients never
    drop below float32 (the master copy, as under autocast). Returns the parameter as it is afterwards."""
    c = module._parameters[name]
    before = (c.data, None if c.grad is None else c.grad.data)
    convert()
    c = module._parameters[name]
    if c.dtype in (torch.float16, torch.bfloat16):
        c.data = before[0].to(c.device)
        if c.grad is not None:
            c.grad.data = before[1].to(c.device)
    return c


class AtlasCoefficients(nn.Module):
    """The single trainable tensor c: (T, B) for "block", (T,) for "task", (T, B, K) for partitions=K.

    compose() registers its coefficients on the composed model as the parameter "atlas_coefficients" (this module
    itself is held outside the model's children), so the model's state_dict holds them under that one key beside
    its own keys. They stay float32 when the model moves to float16 or bfloat16 (apply_keeping_float32); a state
    dict without that key loads without touching them.

    While AtlasModel.groups(index, coefficients) is active, `grouped` holds that (index, coefficients) pair:
    coefficients (G, *shape) with one set per group, index (S,) the group of each sample, and the modules
    call the grouped ops instead.
    """

    def __init__(self, num_tasks, num_blocks, granularity="block", partitions=1, seed=0, backend="auto"):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity={granularity!r}: expected one of {GRANULARITIES}")
        if not isinstance(partitions, int) or partitions < 1:
            raise ValueError(f"partitions={partitions!r}: expected an int >= 1")
        if granularity == "task" and partitions > 1:
            raise ValueError("partitions > 1 needs granularity='block' (partitions split each block)")
        if granularity == "task":
            shape = (num_tasks,)
        elif partitions == 1:
            shape = (num_tasks, num_blocks)
        else:
            shape = (num_tasks, num_blocks, partitions)
        self.coefficients = nn.Parameter(torch.zeros(shape))
        self.granularity, self.partitions, self.seed, self.backend = granularity, partitions, seed, backend
        self.keys = [block_key(seed, b) for b in range(num_blocks)]
        self.block_names = [f"block {b}" for b in range(num_blocks)]
        self.check_finite = True

    grouped = None
    # "int8", "int4" or "lowrank" when compose() was given such a bank, else None.
    bank_format = None

    def check_finite_values(self):
        """Raise if an optimizer step left NaN or Inf in c: one sync on this small tensor, skipped while
        torch.compile traces and when check_finite is False."""
        if not self.check_finite or torch.compiler.is_compiling():
            return
        c = self.coefficients.detach()
        if not torch.isfinite(c).all():
            bad = [tuple(i) for i in torch.nonzero(~torch.isfinite(c)).tolist()[:3]]
            where = ", ".join(f"task {i[0]}" + (f" block {self.block_names[i[1]]!r}" if len(i) > 1 else "")
                              for i in bad)
            raise ValueError(f"the coefficients hold non-finite values ({where}): the last optimizer step "
                             f"diverged; lower the learning rate or clip gradients (check_finite=False turns "
                             f"this check off)")

    def block(self, b):
        """The (T, K) coefficients of block b."""
        c = self.coefficients
        if self.granularity == "task":
            return c.unsqueeze(1)
        return c[:, b:b + 1] if self.partitions == 1 else c[:, b]

    def blocks(self, indices):
        """The (T, len(indices), K) coefficients of several blocks."""
        c = self.coefficients
        if self.granularity == "task":
            return c[:, None, None].expand(-1, len(indices), 1)
        idx = torch.as_tensor(indices, device=c.device)
        return c[:, idx].unsqueeze(-1) if self.partitions == 1 else c[:, idx]

    def group_block(self, b):
        """The (G, T, K) coefficients of block b in the active grouped call."""
        c = self.grouped[1]
        if self.granularity == "task":
            return c.unsqueeze(2)
        return c[:, :, b:b + 1] if self.partitions == 1 else c[:, :, b]

    def group_blocks(self, c, indices):
        """The (G, T, len(indices), K) coefficients of several blocks in grouped coefficients c (G, *shape)."""
        if self.granularity == "task":
            return c[:, :, None, None].expand(-1, -1, len(indices), 1)
        idx = torch.as_tensor(indices, device=c.device)
        return c[:, :, idx].unsqueeze(-1) if self.partitions == 1 else c[:, :, idx]

    def _apply(self, fn, recurse=True):
        apply_keeping_float32(self, "coefficients", lambda: super(AtlasCoefficients, self)._apply(fn, recurse))
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The original model's own checkpoints lack the key: loading one updates θ0 and keeps c.
        if prefix + "coefficients" in state_dict:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)


class AtlasBlocks(nn.Module):
    """The base of every swapped-in module: a block's task vectors as non-persistent buffers, its coefficients
    and key."""

    # True for a module without a grouped op: a grouped call (AtlasModel.groups) merges its blocks per group as
    # it merges the generic ones and hands them to the module per sample, which runs the plain layer on them.
    merges_in_groups = False

    def _attach(self, coefs, bank, blocks):
        """blocks: {attribute: (block index, block name)} of the composed parameters."""
        # A plain attribute, not a submodule: the coefficients are owned (and registered) by the AtlasModel.
        object.__setattr__(self, "atlas", coefs)
        self.blocks = dict(blocks)
        for attr, (_, name) in self.blocks.items():
            quant.register_tau(self, f"tau_{attr}", bank[name])

    def _apply(self, fn, recurse=True):
        # The scales of quantised task vectors stay float32 through .half() / .bfloat16().
        return quant.apply_keeping_scales(self, lambda f: super(AtlasBlocks, self)._apply(f, recurse), fn)

    def _block_args(self, attr):
        """(tau, coef, key) of this module's parameter `attr`, or (None, None, 0) if it is not composed."""
        if attr not in self.blocks:
            return None, None, 0
        b = self.blocks[attr][0]
        coef = self.atlas.block(b) if self.atlas.grouped is None else self.atlas.group_block(b)
        return quant.get_tau(self, f"tau_{attr}"), coef, self.atlas.keys[b]

    def _linear(self, x, w, b, tw, tb, cw, cb, kw, kb):
        """atlas_linear, or in a grouped call the grouped op with the group index of x's samples (the
        AtlasModel runs a grouped forward under vmap: see ops/grouped.py)."""
        if self.atlas.grouped is None:
            return atlas_linear(x, w, b, tw, tb, cw, cb, kw, kb, backend=self.atlas.backend)
        return call_linear_grouped(x, self.atlas.grouped[0], w, b, tw, tb, cw, cb, kw, kb, self.atlas.backend)


def _refuse_mixed_dtypes(x, weight, plain_call):
    """Outside autocast nn.Linear and nn.Conv2d refuse an input whose dtype differs from their weight's, where
    the atlas op would cast: run the plain op on θ0 then, so that torch raises its own error."""
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        plain_call()


class AtlasLinear(AtlasBlocks):
    def __init__(self, linear, coefs, bank, blocks):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self._attach(coefs, bank, blocks)

    def forward(self, x):
        _refuse_mixed_dtypes(x, self.weight, lambda: F.linear(x, self.weight, self.bias))
        tw, cw, kw = self._block_args("weight")
        tb, cb, kb = self._block_args("bias")
        return self._linear(x, self.weight, self.bias, tw, tb, cw, cb, kw, kb)


class AtlasConv2d(AtlasBlocks):
    def __init__(self, conv, coefs, bank, blocks):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.dilation, self.groups = conv.stride, conv.dilation, conv.groups
        self.padding = conv_padding(conv)
        self._attach(coefs, bank, blocks)

    def forward(self, x):
        _refuse_mixed_dtypes(x, self.weight, lambda: F.conv2d(x, self.weight, self.bias, self.stride, self.padding,
                                                              self.dilation, self.groups))
        tw, cw, kw = self._block_args("weight")
        tb, cb, kb = self._block_args("bias")
        if self.atlas.grouped is not None:
            return call_conv2d_grouped(x, self.atlas.grouped[0], self.weight, self.bias, tw, tb, cw, cb, kw, kb,
                                       self.stride, self.padding, self.dilation, self.groups, self.atlas.backend)
        return atlas_conv2d(x, self.weight, self.bias, tw, tb, cw, cb, kw, kb, self.stride, self.padding,
                            self.dilation, self.groups, backend=self.atlas.backend)


class AtlasConv1D(AtlasBlocks):
    """transformers' Conv1D (weight (in, out), bias (out,)) with both blocks composed, in the stored layout."""

    merges_in_groups = True

    def __init__(self, conv, coefs, bank, blocks):
        super().__init__()
        self.nf, self.nx = conv.nf, conv.nx
        self.weight, self.bias = conv.weight, conv.bias
        self._attach(coefs, bank, blocks)

    def forward(self, x):
        _refuse_mixed_dtypes(x, self.weight, lambda: conv1d(x, self.weight, self.bias))
        if self.atlas.grouped is not None:   # weight and bias are this sample's merged ones (AtlasModel.groups)
            return conv1d(x, self.weight, self.bias)
        tw, cw, kw = self._block_args("weight")
        tb, cb, kb = self._block_args("bias")
        backend = self.atlas.backend
        bias = self.bias if tb is None else merge_blocks([self.bias], [tb], cb[:, None], [kb], backend)[0]
        kind, group, tensors = _tau_tensors(tw)
        y = _StoredInOutLinear.apply(x.reshape(-1, x.shape[-1]), cw, bias, self.weight, kw, backend, kind, group,
                                     *tensors)
        return y.view(*x.shape[:-1], self.nf)


def conv1d(x, weight, bias):
    """transformers' Conv1D on these parameters: x W + b with W (in, out)."""
    return torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[-1])


class _StoredInOutLinear(torch.autograd.Function):
    """y = x2 W(c) + bias for a weight W0 stored (in, out); x2 (M, in); bias merged already (or θ0, or None).

        forward   W(c) merged into a transient buffer (merge_blocks: one layer, freed at once), one addmm
        dx        = dy W(c)ᵀ = atlas_linear(dy, W0, τ, c): the linear op with W0 as its (out', in') weight
        dc[t, k]  = Σ_{i : k(i) = k} τ_t[i] (x2ᵀ dy)[i]: that op's coefficient gradient for output gradient x2

    Saved for the backward: x2, c, θ0 and the task vectors' tensors (as tensors, so that an offloaded bank's
    saved-tensor hooks see them); neither W(c) nor the weight gradient outlives its call. The backward calls the
    ops themselves (no autograd inside it), so torch.compile traces it."""

    @staticmethod
    def forward(ctx, x2, coef, bias, weight, key, backend, kind, group, *tau_tensors):
        tau = _tau_of(kind, group, tau_tensors, weight)
        w = merge_blocks([weight], [tau], coef[:, None], [key], backend)[0].to(x2.dtype)
        y = torch.addmm(bias, x2, w) if bias is not None else x2 @ w
        ctx.save_for_backward(x2, coef, weight, *tau_tensors)
        ctx.extra = (key, backend, kind, group, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, coef, weight, *tau_tensors = ctx.saved_tensors
        key, backend, kind, group, bias_dtype = ctx.extra
        need_x, need_c, need_b = ctx.needs_input_grad[:3]
        dx = dc = db = None
        if need_x:
            dx = atlas_linear(dy, weight, None, _tau_of(kind, group, tau_tensors, weight), None, coef, key_w=key,
                              backend=backend).to(x2.dtype)
        if need_c:
            dc = _linear_coef_grad(x2.to(dy.dtype), dy, weight, kind, group, tau_tensors, coef, key, backend)
        if need_b and bias_dtype is not None:
            db = dy.sum(0, dtype=torch.float32).to(bias_dtype)
        return (dx, dc, db) + (None,) * (5 + len(tau_tensors))


def _linear_coef_grad(grad_out, x, weight, kind, group, tau_tensors, coef, key, backend):
    """dc of the linear op y = x W(c)ᵀ for the output gradient grad_out: its backward op, without dx."""
    if kind == "lowrank":
        return torch.ops.atlas_fast.atlas_linear_lowrank_backward(grad_out, x, weight, *tau_tensors, coef, False)[1]
    scale = tau_tensors[1] if kind == "quantized" else None
    return torch.ops.atlas_fast.atlas_linear_backward(grad_out, x, weight, tau_tensors[0], None, coef, key, 0, False,
                                                      backend, scale, group)[1]


def _tau_tensors(tau):
    """(kind, group, tensors) of a weight's task vectors: a float tensor, int8/int4 data and scales, or low-rank
    factors; _tau_of rebuilds them."""
    if lowrank.is_lowrank(tau):
        return "lowrank", 0, (tau.a, tau.bt)
    if quant.is_quantized(tau):
        return "quantized", tau.group, (tau.data, tau.scale)
    return "dense", 0, (tau,)


def _tau_of(kind, group, tensors, weight):
    shape = (tensors[0].shape[0], *weight.shape)
    if kind == "lowrank":
        return lowrank.LowRankBlock(tensors[0], tensors[1], shape)
    if kind == "quantized":
        return quant.QuantizedBlock(tensors[0], tensors[1], group, shape)
    return tensors[0]


def conv_padding(conv):
    """Explicit (ph, pw) zero padding of an nn.Conv2d, or None when the atlas op cannot express it."""
    if conv.padding_mode != "zeros":
        return None
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return tuple(t // 2 for t in total) if all(t % 2 == 0 for t in total) else None
    return tuple(conv.padding)


def supports_mha(mha):
    return mha._qkv_same_embed_dim and mha.bias_k is None and not mha.add_zero_attn


class AtlasMultiheadAttention(AtlasBlocks):
    """nn.MultiheadAttention (packed in_proj, as open_clip's ViT uses it) with both projections composed."""

    def __init__(self, mha, coefs, bank, blocks):
        super().__init__()
        self.embed_dim, self.num_heads, self.dropout = mha.embed_dim, mha.num_heads, mha.dropout
        self.batch_first, self.head_dim = mha.batch_first, mha.head_dim
        self.in_proj_weight, self.in_proj_bias = mha.in_proj_weight, mha.in_proj_bias
        # Kept as a child, never called, so the state_dict keeps nn.MultiheadAttention's key names.
        self.out_proj = mha.out_proj
        self._attach(coefs, bank, blocks)

    def _project(self, x, which):
        owner, prefix = (self, "in_proj_") if which == "in_proj" else (self.out_proj, "")
        w, b = getattr(owner, f"{prefix}weight"), getattr(owner, f"{prefix}bias")
        _refuse_mixed_dtypes(x, w, lambda: F.linear(x, w, b))
        tw, cw, kw = self._block_args(f"{which}_weight")
        tb, cb, kb = self._block_args(f"{which}_bias")
        return self._linear(x, w, b, tw, tb, cw, cb, kw, kb)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if query is key and key is value:
            q, k, v = self._project(query, "in_proj").chunk(3, dim=-1)
        else:
            # Distinct inputs: project each through the packed weight and keep its third.
            q, k, v = (self._project(t, "in_proj").chunk(3, dim=-1)[i] for i, t in enumerate((query, key, value)))
        B, L, S, H = q.shape[0], q.shape[1], k.shape[1], self.num_heads
        q, k, v = (t.reshape(B, n, H, self.head_dim).transpose(1, 2) for t, n in ((q, L), (k, S), (v, S)))
        mask = _attention_mask(attn_mask, key_padding_mask, B, H, L, S, q.dtype)
        p = self.dropout if self.training else 0.0
        causal = is_causal and mask is None
        # A grouped forward runs under vmap, where torch has no batching rule for the CPU flash attention kernel
        # (it would loop over the samples): the explicit product is batched on every device.
        if need_weights or self.atlas.grouped is not None:
            scores = q @ k.transpose(-2, -1) / self.head_dim ** 0.5
            if mask is not None:
                scores = scores + mask
            elif causal:
                scores = scores.masked_fill(torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
            weights = F.dropout(scores.softmax(-1), p, self.training)
            out = weights @ v
            weights = None if not need_weights else weights.mean(1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
            weights = None
        out = self._project(out.transpose(1, 2).reshape(B, L, self.embed_dim), "out_proj")
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _attention_mask(attn_mask, key_padding_mask, B, H, L, S, dtype):
    """Additive float mask (B, H, L, S) from nn.MultiheadAttention's conventions (bool True = masked out)."""
    mask = None
    if attn_mask is not None:
        m = attn_mask
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        mask = m.to(dtype).reshape(-1, H, L, S) if m.dim() == 3 else m.to(dtype).view(1, 1, L, S)
    if key_padding_mask is not None:
        m = key_padding_mask
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        m = m.to(dtype).view(B, 1, 1, S)
        mask = m if mask is None else mask + m
    return mask


# compose() swaps modules by this table: module type -> (Atlas module, {original parameter: its attribute
# there}); the first parameter listed is the weight that must be composed for the swap to happen. Every Atlas
# module keeps the original's parameter names, so a composed model's state_dict has the original keys.
SWAP_TABLE = {
    nn.Linear: (AtlasLinear, {"weight": "weight", "bias": "bias"}),
    nn.Conv2d: (AtlasConv2d, {"weight": "weight", "bias": "bias"}),
    nn.MultiheadAttention: (AtlasMultiheadAttention, {"in_proj_weight": "in_proj_weight",
                                                      "in_proj_bias": "in_proj_bias",
                                                      "out_proj.weight": "out_proj_weight",
                                                      "out_proj.bias": "out_proj_bias"}),
}

# A module is swapped only when the atlas op can express it exactly; otherwise its parameters take the
# generic on-the-fly merge, which is exact for any module.
SWAPPABLE = {
    nn.Linear: lambda m: True,
    nn.Conv2d: lambda m: conv_padding(m) is not None,
    nn.MultiheadAttention: supports_mha,
}

# Module types of optional libraries, swapped when their library is loaded (a model holding one has imported it;
# compose() never imports it): (module path, class name) -> (SWAP_TABLE entry, SWAPPABLE test).
OPTIONAL_SWAPS = {
    ("transformers.pytorch_utils", "Conv1D"): ((AtlasConv1D, {"weight": "weight", "bias": "bias"}), lambda m: True),
}


def swap_table():
    """(SWAP_TABLE, SWAPPABLE) with the OPTIONAL_SWAPS entries of the loaded libraries added."""
    table, swappable = dict(SWAP_TABLE), dict(SWAPPABLE)
    for (module, name), (entry, test) in OPTIONAL_SWAPS.items():
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            table[cls], swappable[cls] = entry, test
    return table, swappable
