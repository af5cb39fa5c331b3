"""The atlas ops (torch.library custom ops, `torch.ops.atlas_fast.*`), their float64 reference and the partition hash.

    dense.py      atlas_linear, atlas_conv2d, merge_blocks (+ merge_blocks_quant): one coefficient set per call
    grouped.py    atlas_linear_grouped, atlas_conv2d_grouped, merge_blocks_grouped: one coefficient set per group
    lowrank.py    the low-rank ops: task vectors kept as their factors
    common.py     what dense.py and grouped.py share: entry-point checks, quantised task vectors, empty outputs
    reference.py  the float64 oracle of every op
    hashing.py    the partition hash every backend and kernel shares bit for bit

Importing this package registers every op.
"""
from . import lowrank  # noqa: F401  (registers the low-rank ops)
from .dense import atlas_conv2d, atlas_linear, merge_blocks
from .grouped import atlas_conv2d_grouped, atlas_linear_grouped, merge_blocks_grouped

__all__ = ["atlas_linear", "atlas_conv2d", "merge_blocks", "atlas_linear_grouped", "atlas_conv2d_grouped",
           "merge_blocks_grouped"]
