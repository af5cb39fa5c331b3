"""Memory-mapped safetensors: tensors that are views of a file mapping, so a bank is opened without reading it.

A safetensors file is an 8-byte little-endian header length, a JSON header ({name: {dtype, shape,
data_offsets}}, "__metadata__") and the tensors' bytes. map_safetensors() maps the file privately
(copy-on-write: the tensors are writable for torch, and a write never reaches the file) and returns views of
it. Pages are read from the file when first touched; they are clean file-backed pages, which the kernel
evicts under memory pressure and reads again when needed, so a bank larger than the memory still runs.
release() drops a tensor's pages from this process at once (after a scan that touched them all); the
tensors are frozen task vectors, never written, so nothing is lost.
"""
import json
import mmap
import os
import struct

import numpy as np
import torch

# safetensors dtype name -> (torch dtype, numpy dtype of the same width to view the bytes through)
_DTYPES = {"F64": (torch.float64, np.float64), "F32": (torch.float32, np.float32),
           "F16": (torch.float16, np.float16), "BF16": (torch.bfloat16, np.int16),
           "I64": (torch.int64, np.int64), "I32": (torch.int32, np.int32), "I16": (torch.int16, np.int16),
           "I8": (torch.int8, np.int8), "U8": (torch.uint8, np.uint8), "BOOL": (torch.bool, np.bool_)}
_PAGE = mmap.PAGESIZE


_RANGE = "_atlas_mapped_range"   # attribute of a mapped tensor: (mmap, byte offset, byte length)


def map_safetensors(path):
    """({name: tensor viewing the file}, metadata dict) of a safetensors file, read lazily from disk."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: unreadable safetensors header ({e})") from e
    meta = header.pop("__metadata__", None) or {}
    start = 8 + n
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    array = np.frombuffer(mapping, dtype=np.uint8)   # the tensors keep it, and so the mapping, alive
    tensors = {}
    for name, entry in header.items():
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which cannot be mapped")
        dtype, np_dtype = _DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        if start + end > size:
            raise ValueError(f"{path}: truncated safetensors file (tensor {name!r} ends past the file)")
        raw = array[start + begin:start + end].view(np_dtype)
        t = torch.from_numpy(raw)
        if dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        t = t.reshape(entry["shape"])
        setattr(t, _RANGE, (mapping, start + begin, end - begin))
        tensors[name] = t
    return tensors, meta


def is_mapped(tensor):
    return hasattr(tensor, _RANGE)


def release(tensor, start=0, stop=None):
    """Drop the pages of elements [start, stop) (in storage order) of a tensor returned by map_safetensors()
    from this process; a no-op for other tensors. The values stay: the next read brings them back from the
    file (or the kernel's page cache)."""
    if not is_mapped(tensor):
        return
    mapping, offset, length = getattr(tensor, _RANGE)
    size = tensor.element_size()
    stop = length // size if stop is None else stop
    first, last = offset + start * size, offset + stop * size
    lo = (first + _PAGE - 1) // _PAGE * _PAGE   # whole pages inside the range only: neighbours keep theirs
    hi = last // _PAGE * _PAGE
    if hi > lo:
        mapping.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
