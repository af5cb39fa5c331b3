"""atlas_fast: aTLAS task-vector composition with fused kernels."""
from .hashing import block_key
from .ops import atlas_conv2d, atlas_linear, merge_blocks

__all__ = ["atlas_linear", "atlas_conv2d", "merge_blocks", "block_key"]
