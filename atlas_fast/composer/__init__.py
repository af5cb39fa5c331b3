"""The composer: compose() swaps a model's modules for ones that run θ0 + Σ c·τ through the ops.

    compose.py           compose(), AtlasModel (coefficients, groups, merge, unwrap, save/load) and the generic blocks
    modules.py           the swapped-in modules (Linear, Conv2d, transformers' Conv1D, MultiheadAttention) on their
                         base AtlasBlocks, and AtlasCoefficients
    coefficient_file.py  the coefficient file: its format, reader and writer
    offload.py           banks kept in host memory and streamed to the GPU block by block
"""
