"""`atlas-fast bench` and the baselines it measures against.

    step.py     training steps: every backend against naive merging, plain fine-tuning and the memory floor
    grouped.py  --groups G: one batch carrying G coefficient sets against G separate and merged models
    tta.py      --mode tta --streams S: S test-time streams in one grouped step against the ways peers run them
    common.py   what the three share: the tower and synthetic bank, the child process of each measurement, the
                timing loop, peak memory, the machine and version record
    naive.py    the paper-style composition (θ0 + Σ c·τ rebuilt each step, functional_call): the baseline
"""
