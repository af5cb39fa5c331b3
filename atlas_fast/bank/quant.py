"""Quantised task-vector blocks: int8 with one scale per output row, int4 with one scale per group of columns.

A block of parameter shape (rows, *rest) is quantised as the matrix (rows, cols), cols = prod(rest): the
input dimension of a linear weight, the flattened (in, kh, kw) of a conv weight, in the row-major flat order
that the kernels and the partition hash use. For T stacked task vectors:

    int8   data int8 (T, rows, cols), q ∈ [−127, 127]              scale float32 (T, rows)
           τ_t[r, c] = q · scale[t, r]
    int4   data uint8 (T, rows, ⌈cols/2⌉): column 2j in the low nibble, 2j + 1 in the high one, each stored
           as q + 8 with q ∈ [−7, 7]                                scale float32 (T, rows, ⌈cols/group⌉)
           τ_t[r, c] = q · scale[t, r, c // group]

Scales are absmax (scale = max |τ| / 127 or / 7 over the row or group), so the largest entry of each row or
group is exact and every other entry is off by at most scale / 2; a row or group of zeros gets scale 0.
Only blocks of two or more dimensions are quantised: 1-D blocks (biases, LayerNorm scales, class
embeddings) are a fraction of a percent of a model and stay float32 in a quantised bank.

A QuantizedBlock stands where a (T, *shape) tensor of task vectors stands in the op contract of
backends/base.py: the torch and Triton backends dequantise it chunk by chunk or tile by tile inside the
merge and the coefficient-gradient reduction, never as a whole. Composed modules keep its data and scales as
two buffers (register_tau / get_tau).
"""
import math

import torch

from . import lowrank
from .stacked import StackedBlock

FORMATS = ("int8", "int4")
DEFAULT_GROUP = 128
_QMAX = {"int8": 127, "int4": 7}


def format_of(dtype):
    """"int8" or "int4" for a quantised storage dtype (torch.int8, "int8", torch.int4 where torch has it,
    "int4"), else None."""
    if dtype in FORMATS:
        return dtype
    if dtype == torch.int8:
        return "int8"
    if getattr(torch, "int4", None) is not None and dtype == torch.int4:
        return "int4"
    return None


def is_quantized(tau):
    return isinstance(tau, QuantizedBlock)


def unpack(tau):
    """(data, scale, group) of a weight's task vectors as the ops and kernels take them: the tensor itself with no
    scale for float task vectors."""
    return (tau.data, tau.scale, tau.group) if is_quantized(tau) else (tau, None, 0)


def quantizable(shape):
    """Whether a parameter of this shape is quantised in a quantised bank (two or more dimensions)."""
    return len(shape) >= 2 and math.prod(shape) > 0


class QuantizedBlock(StackedBlock):
    """T stacked task vectors of one block in int8 or int4, shaped (T, *shape) like the float tensor it
    replaces. `reshape` keeps T and the rows (the im2col view of a conv weight); `dequantize` gives the float
    tensor (tests, conversions; the backends dequantise a chunk at a time with dequantize_rows)."""

    __slots__ = ("data", "scale", "group", "shape")
    _what = "quantised task vectors"

    def __init__(self, data, scale, group, shape):
        shape = torch.Size(shape)
        T, rows = shape[0], shape[1]
        cols = math.prod(shape[2:])
        if data.dtype == torch.int8:
            expected_data, expected_scale, group = (T, rows, cols), (T, rows), 0
        elif data.dtype == torch.uint8:
            if not isinstance(group, int) or group < 1:
                raise ValueError(f"int4 task vectors: group size {group!r}, expected an int >= 1")
            expected_data, expected_scale = (T, rows, (cols + 1) // 2), (T, rows, -(-cols // group))
        else:
            raise ValueError(f"quantised task vectors: data of dtype {data.dtype}, expected int8 or uint8 (int4)")
        if tuple(data.shape) != expected_data or tuple(scale.shape) != expected_scale:
            raise ValueError(f"quantised task vectors of shape {tuple(shape)}: data {tuple(data.shape)} and scales "
                             f"{tuple(scale.shape)}, expected {expected_data} and {expected_scale}")
        if not scale.is_floating_point() or data.device != scale.device:
            raise ValueError(f"quantised task vectors: scales must be floating and on the data's device, got "
                             f"{scale.dtype} on {scale.device} (data on {data.device})")
        self.data, self.scale, self.group, self.shape = data, scale, group, shape

    @property
    def format(self):
        return "int8" if self.data.dtype == torch.int8 else "int4"

    @property
    def dtype(self):
        """The storage dtype of the values: torch.int8, or torch.uint8 holding two int4 values a byte."""
        return self.data.dtype

    @property
    def device(self):
        return self.data.device

    @property
    def nbytes(self):
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def _with_shape(self, shape):
        return QuantizedBlock(self.data, self.scale, self.group, shape)

    def to(self, device=None):
        return QuantizedBlock(self.data.to(device), self.scale.to(device), self.group, self.shape)

    def index_select(self, dim, index):
        """The task vectors at `index` (dim 0 only: a row's values share their scales)."""
        if dim != 0:
            raise ValueError(f"quantised task vectors select along the task axis (dim 0), not dim {dim}")
        return QuantizedBlock(self.data.index_select(0, index), self.scale.index_select(0, index), self.group,
                              (len(index), *self.shape[1:]))

    def dequantize_rows(self, r0, r1, out):
        """Write the float values of rows [r0, r1) of every task vector into out, (T, (r1 − r0)·cols) of a
        float dtype; returns out."""
        T, r, cols = self.shape[0], r1 - r0, self.cols
        o = out.view(T, r, cols)
        scale = self.scale[:, r0:r1].to(out.dtype)
        if self.data.dtype == torch.int8:
            return torch.mul(self.data[:, r0:r1], scale[:, :, None], out=o).view(out.shape)
        # Nibbles straight into the even and odd columns, scales broadcast over whole groups then the short last
        # one: the only temporaries are two uint8 halves of the chunk, an eighth of its float32 size.
        d = self.data[:, r0:r1]
        o[..., 0::2].copy_(d & 15)
        o[..., 1::2].copy_((d >> 4)[..., :cols // 2])
        o.sub_(8)
        g, whole = self.group, cols // self.group
        if whole:
            o[..., :whole * g].view(T, r, whole, g).mul_(scale[..., :whole, None])
        if cols % g:
            o[..., whole * g:].mul_(scale[..., whole:])
        return out

    def dequantize(self, dtype=torch.float32):
        """The whole block as a (T, *shape) tensor of `dtype`."""
        out = torch.empty(self.shape[0], self.numel() // max(1, self.shape[0]), dtype=dtype, device=self.device)
        return self.dequantize_rows(0, self.shape[1], out).view(self.shape)

    def __repr__(self):
        group = f", group {self.group}" if self.format == "int4" else ""
        return f"QuantizedBlock({self.format}{group}, shape={tuple(self.shape)}, {self.device})"


def quantize(tau, fmt, group=DEFAULT_GROUP):
    """The QuantizedBlock of float task vectors tau (T, rows, *rest) in format "int8" or "int4"."""
    if fmt not in FORMATS:
        raise ValueError(f"quantize: format {fmt!r}, expected one of {FORMATS}")
    if tau.dim() < 3:
        raise ValueError(f"quantize: task vectors of shape {tuple(tau.shape)}; only blocks of two or more "
                         f"dimensions are quantised (1-D blocks stay float32)")
    T, rows = tau.shape[:2]
    m = tau.detach().reshape(T, rows, -1).to(torch.float32)
    cols = m.shape[2]
    if fmt == "int8":
        scale = m.abs().amax(2) / _QMAX[fmt]
        q = torch.round(m / torch.where(scale > 0, scale, 1.0)[..., None]).clamp_(-127, 127).to(torch.int8)
        return QuantizedBlock(q, scale, 0, tau.shape)
    if not isinstance(group, int) or group < 1:
        raise ValueError(f"quantize: group size {group!r}, expected an int >= 1 (64 to 128 is usual)")
    groups = -(-cols // group)
    g = torch.nn.functional.pad(m, (0, groups * group - cols)).view(T, rows, groups, group)
    scale = g.abs().amax(3) / _QMAX[fmt]
    q = torch.round(g / torch.where(scale > 0, scale, 1.0)[..., None]).clamp_(-7, 7)
    q = (q.view(T, rows, groups * group)[..., :cols] + 8).to(torch.uint8)
    if cols % 2:
        q = torch.nn.functional.pad(q, (0, 1), value=8)   # the pad nibble holds 0; no kernel reads it
    return QuantizedBlock(q[..., 0::2] | (q[..., 1::2] << 4), scale, group, tau.shape)


def storage_bytes(shape, fmt, group=DEFAULT_GROUP):
    """Bytes of one task vector of a parameter of this shape in an `fmt` bank: data and float32 scales, or
    float32 values for a block that stays float (1-D)."""
    if not quantizable(shape):
        return 4 * math.prod(shape)
    rows, cols = shape[0], math.prod(shape[1:])
    if fmt == "int8":
        return rows * cols + 4 * rows
    return rows * ((cols + 1) // 2) + 4 * rows * -(-cols // group)


def squared_error(tau, block):
    """(Σ (τ − deq)², Σ τ²) over the block, summed in float64: the parts of its relative quantisation error.
    The differences are float32: exact to about 1e-7 of τ, far below any quantisation error."""
    ref = tau.detach().to(torch.float32)
    diff = block.dequantize(torch.float32).sub_(ref)
    return float(diff.square_().sum(dtype=torch.float64)), float(ref.square().sum(dtype=torch.float64))


# ---------------------------------------------------------------- task vectors held by modules

def register_tau(module, name, tau):
    """Register task vectors on a module as non-persistent buffers: `name` for a float tensor, `name` (data) and
    `name`_scale for a QuantizedBlock, whose group size and shape the module remembers, or `name` (factor a) and
    `name`_bt for a lowrank.LowRankBlock."""
    if lowrank.is_lowrank(tau):
        module.register_buffer(name, tau.a, persistent=False)
        module.register_buffer(f"{name}_bt", tau.bt, persistent=False)
        module.__dict__.setdefault("_lowrank_shapes", {})[name] = tuple(tau.shape)
    elif is_quantized(tau):
        module.register_buffer(name, tau.data, persistent=False)
        module.register_buffer(f"{name}_scale", tau.scale, persistent=False)
        meta = module.__dict__.setdefault("_quant_meta", {})
        meta[name] = (tau.group, tuple(tau.shape))
    else:
        module.register_buffer(name, tau, persistent=False)


def get_tau(module, name):
    """The task vectors register_tau put on `module` under `name` (a tensor, QuantizedBlock or LowRankBlock)."""
    shapes = module.__dict__.get("_lowrank_shapes", {})
    if name in shapes:
        return lowrank.LowRankBlock(getattr(module, name), getattr(module, f"{name}_bt"), shapes[name])
    meta = module.__dict__.get("_quant_meta", {})
    if name not in meta:
        return getattr(module, name)
    group, shape = meta[name]
    return QuantizedBlock(getattr(module, name), getattr(module, f"{name}_scale"), group, shape)


def apply_keeping_scales(module, apply, fn):
    """module._apply through `apply(fn)`, with the scale buffers kept float32 through .half()/.bfloat16()
    (moved to the new device all the same): a half-precision scale of a small τ (1e-3 / 127) is subnormal and
    keeps three significant bits."""
    names = [f"{n}_scale" for n in module.__dict__.get("_quant_meta", {})]
    before = {n: module._buffers[n] for n in names}
    result = apply(fn)
    for n, old in before.items():
        new = module._buffers[n]
        if new.dtype in (torch.float16, torch.bfloat16):
            module._buffers[n] = old.to(new.device)
    return result
