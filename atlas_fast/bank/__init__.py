"""The bank of task vectors and its storage formats.

    task_vectors.py  TaskVectors: τ_t = θ_t − θ0 matched to parameters by name; the bank file formats
    quant.py         int8 / int4 blocks (QuantizedBlock)
    lowrank.py       low-rank blocks τ_t = B_t A_t (LowRankBlock)
    stacked.py       what a quantised and a low-rank block share
    mapped.py        memory-mapped safetensors banks
    fingerprint.py   what a coefficient file or a checkpoint records of the bank it was learned on
"""
