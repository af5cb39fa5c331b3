"""atlas_fast: aTLAS task-vector composition with fused kernels.

    tv = TaskVectors.from_checkpoints("zeroshot.pt", ["cars.pt", "dtd.pt"], prefix="visual.")
    atlas = compose(clip.visual, tv)            # swaps modules in place; clip.encode_image runs it
    opt = torch.optim.AdamW([atlas.coefficients], lr=1e-1)
"""
from . import adapt, moved  # adapt: the package, callable as the adapt() function
from .adapt import build_bank, evaluate, merge
from .bank.task_vectors import TaskVectors, synthetic_task_vectors
from .composer.compose import AtlasModel, CompositionReport, compose
from .io.hf_clip import hf_clip_task_vectors, hf_clip_vision_state_dict, load_hf_clip_vision
from .io.lora import LoraAdapter, lora_task_vectors, read_lora
from .ops.dense import atlas_conv2d, atlas_linear, merge_blocks
from .ops.grouped import atlas_conv2d_grouped, atlas_linear_grouped, merge_blocks_grouped
from .ops.hashing import block_key

__all__ = ["TaskVectors", "synthetic_task_vectors", "compose", "AtlasModel", "CompositionReport",
           "atlas_linear", "atlas_conv2d", "merge_blocks", "atlas_linear_grouped", "atlas_conv2d_grouped",
           "merge_blocks_grouped", "block_key", "hf_clip_task_vectors", "hf_clip_vision_state_dict",
           "load_hf_clip_vision", "LoraAdapter", "lora_task_vectors", "read_lora", "adapt", "build_bank",
           "evaluate", "merge"]
__version__ = "0.1.0"

moved.register()
