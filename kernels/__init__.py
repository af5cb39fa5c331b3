"""Triton kernels of atlas_fast, one file per op family; installed as atlas_fast.kernels."""
