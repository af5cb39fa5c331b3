"""The composer: compose() swaps a model's modules for ones that run θ0 + Σ c·τ through the ops.

    compose.py   compose(), AtlasModel (coefficients, groups, merge, unwrap, save/load) and the generic blocks
    modules.py   the swapped-in modules (linear, conv, embedding, ...) and AtlasCoefficients
    offload.py   banks kept in host memory and streamed to the GPU block by block
"""
