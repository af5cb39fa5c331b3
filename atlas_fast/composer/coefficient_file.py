"""The coefficient file (AtlasModel.save_coefficients / load_coefficients, and the jobs that compose a model laid
out as a file says): safetensors holding the tensor "coefficients", the bank's fingerprint as FINGERPRINT_KEY, and
metadata naming the format, the blocks, the layout (granularity, partitions, seed) and the task vectors' sources.
"""
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..io.atomic import atomic_write

COEF_FORMAT = "atlas_fast.coefficients/3"
# /1 files carry no bank fingerprint, /2 files one [norm, sum] per task vector (metadata "fingerprint"), /3 files
# the per-block fingerprint of fingerprint.py as the tensor FINGERPRINT_KEY
READABLE_FORMATS = ("atlas_fast.coefficients/1", "atlas_fast.coefficients/2", COEF_FORMAT)
FINGERPRINT_KEY = "bank_fingerprint"


@dataclass
class CoefficientFile:
    path: str
    meta: dict                          # the safetensors metadata, strings
    coefficients: torch.Tensor
    fingerprint: Optional[torch.Tensor]  # None in a /1 or /2 file


def read_coefficient_file(path):
    """A CoefficientFile; ValueError naming the file when it is missing, unreadable, truncated or not one."""
    from safetensors import safe_open
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such coefficient file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            ours = meta.get("format") in READABLE_FORMATS
            coef = f.get_tensor("coefficients") if ours else None
            saved = f.get_tensor(FINGERPRINT_KEY) if ours and FINGERPRINT_KEY in f.keys() else None
    except Exception as e:
        raise ValueError(f"{path}: unreadable or truncated coefficient file ({e})") from e
    if not ours:
        raise ValueError(f"{path}: not an atlas_fast coefficient file")
    return CoefficientFile(path, meta, coef, saved)


def write_coefficient_file(path, coefficients, fingerprint, meta):
    """Write a COEF_FORMAT file atomically; meta: the layout entries (strings) beside the format."""
    from safetensors.torch import save_file
    tensors = {"coefficients": coefficients.detach().cpu().contiguous(), FINGERPRINT_KEY: fingerprint.contiguous()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": COEF_FORMAT, **meta}))
