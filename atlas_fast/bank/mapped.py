"""Memory-mapped safetensors: tensors that are views of a file mapping, so a bank is opened without reading it.

A safetensors file is an 8-byte little-endian header length, a JSON header ({name: {dtype, shape,
data_offsets}}, "__metadata__") and the tensors' bytes. map_safetensors() maps the file read-only and returns
views of it. Pages are read from the file when first touched; they are clean file-backed pages, which the kernel
evicts under memory pressure and reads again when needed, so a bank larger than the memory still runs.
release() drops a tensor's pages from this process at once (after a scan that touched them all).

Read-only, not private (copy-on-write): a write into a private mapping lands in an anonymous copy of the page,
which release() (MADV_DONTNEED) would silently throw away, the next read bringing the file's value back. Telling
written pages from clean ones would take /proc/self/pagemap (Linux only, and racy against a writer thread), and a
bank edited in memory no longer matches its file, which the checks below rely on. Read-only, a write into a mapped
tensor faults at once, at the write (SIGSEGV: clone() the tensor to edit it), and release() can never lose one.

The file must stay as it was while it is mapped: it is the memory of the tensors. Each mapping records the file's
identity (device, inode), size and mtime_ns when it was opened; check_unchanged() refuses, naming the file, one that
was since replaced, removed, truncated or modified in place (a value written into it after the finite scan of
TaskVectors.load would reach the forward unchecked). TaskVectors.load checks before each block's scan and compose()
at its start. What these checks cannot cover is a change while a scan or a forward runs: a write then reaches that
computation, and a truncation makes the next read past the new end a SIGBUS, which cannot be resumed. For those,
and for a write into a mapped tensor (SIGSEGV), a handler in C (csrc/mapped_fault.c, compiled on the first mapping
with the system C compiler into ATLAS_FAST_CACHE, default ~/.cache/atlas_fast) writes one line naming the file and
ends the process with status 1; a fault anywhere else goes on to the previous handler. Without a C compiler the
signal kills the process as before (status 135 or 139 from a shell).
"""
import ctypes
import hashlib
import json
import mmap
import os
import shutil
import struct
import subprocess
import threading
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch

from ..errors import FileChangedError

# safetensors dtype name -> (torch dtype, numpy dtype of the same width to view the bytes through)
_DTYPES = {"F64": (torch.float64, np.float64), "F32": (torch.float32, np.float32),
           "F16": (torch.float16, np.float16), "BF16": (torch.bfloat16, np.int16),
           "I64": (torch.int64, np.int64), "I32": (torch.int32, np.int32), "I16": (torch.int16, np.int16),
           "I8": (torch.int8, np.int8), "U8": (torch.uint8, np.uint8), "BOOL": (torch.bool, np.bool_)}
_PAGE = mmap.PAGESIZE


_RANGE = "_atlas_mapped_range"   # attribute of a mapped tensor: (MappedFile, byte offset, byte length)


class MappedFile:
    """One read-only mapping of a file, with the file's stamp (device, inode, size, mtime_ns) when it was opened and
    the bytes its tensors need (`end`)."""

    def __init__(self, path, mapping, stamp, end):
        self.path, self.mapping, self.stamp, self.end = path, mapping, stamp, end

    def changed(self):
        """None while the file is the one mapped, unchanged; else what happened to it."""
        try:
            now = _stamp(os.stat(self.path))
        except OSError:
            return "was removed or renamed since it was opened"
        (dev, ino, size, mtime), (dev0, ino0, size0, mtime0) = now, self.stamp
        if (dev, ino) != (dev0, ino0):
            return "was replaced by another file since it was opened (the mapped tensors read the old one)"
        if size < self.end:
            return (f"was truncated since it was opened ({size} bytes, its tensors need {self.end}): reading them "
                    f"would kill the process with SIGBUS")
        if (size, mtime) != (size0, mtime0):
            return "was modified since it was opened (its values may no longer be the ones checked when it was read)"
        return None


def _stamp(st):
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def map_safetensors(path):
    """({name: tensor viewing the file}, metadata dict) of a safetensors file, read lazily from disk. The tensors
    are read-only: clone() one to edit it."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        stamp = _stamp(os.fstat(f.fileno()))
        size = stamp[2]
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
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    meta = header.pop("__metadata__", None) or {}
    start = 8 + n
    array = np.frombuffer(mapping, dtype=np.uint8)   # the tensors keep it, and so the mapping, alive
    _watch_faults(array, path)
    file = MappedFile(path, mapping, stamp, start)
    tensors = {}
    for name, entry in header.items():
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which cannot be mapped")
        dtype, np_dtype = _DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        if start + end > size:
            raise ValueError(f"{path}: truncated safetensors file (tensor {name!r} ends past the file)")
        file.end = max(file.end, start + end)
        raw = array[start + begin:start + end].view(np_dtype)
        with warnings.catch_warnings():   # torch has no read-only tensors: the mapping itself refuses writes
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(raw)
        if dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        t = t.reshape(entry["shape"])
        setattr(t, _RANGE, (file, start + begin, end - begin))
        tensors[name] = t
    return tensors, meta


_faults = {"lock": threading.Lock()}   # "library": the loaded fault handler, or None where there is none
_MESSAGE = 1023                        # bytes of a message the handler keeps (csrc/mapped_fault.c: MESSAGE - 1)


def _watch_faults(array, path):
    """Register the mapping under `array` with the fault handler, for as long as `array` lives."""
    library = _fault_library()
    if library is None or array.size == 0:
        return
    bus = (f"atlas_fast: error: {path}: this memory-mapped file was truncated while its tensors were in use (SIGBUS "
           f"reading past its new end); keep a loaded bank's file unchanged\n")
    segv = (f"atlas_fast: error: a write into a tensor mapped read-only from {path} (SIGSEGV); clone() a mapped "
            f"tensor to edit it\n")
    with _faults["lock"]:
        slot = library.atlas_mapped_fault_register(array.ctypes.data, array.size, _fit(bus), _fit(segv))
    if slot >= 0:
        weakref.finalize(array, library.atlas_mapped_fault_unregister, slot)


def _fit(message):
    data = os.fsencode(message)
    return data if len(data) <= _MESSAGE else data[:_MESSAGE - 4] + b"...\n"


def _fault_library():
    with _faults["lock"]:
        if "library" not in _faults:
            _faults["library"] = _build_fault_library()
    return _faults["library"]


def _build_fault_library():
    """csrc/mapped_fault.c compiled (once per source and compiler), loaded and installed; None where it cannot be."""
    package = Path(__file__).resolve().parent.parent   # atlas_fast/
    source = next((p for p in (package / "csrc" / "mapped_fault.c", package.parent / "csrc" / "mapped_fault.c")
                   if p.is_file()), None)
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if source is None or cc is None or os.name != "posix":
        return None
    from ..io.atomic import atomic_write
    key = hashlib.sha256(source.read_bytes() + cc.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("ATLAS_FAST_CACHE", Path.home() / ".cache" / "atlas_fast"))
    built = cache / f"mapped_fault-{key}.so"
    try:
        if not built.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            atomic_write(built, lambda tmp: subprocess.run([cc, "-O2", "-shared", "-fPIC", str(source), "-o", tmp],
                                                           check=True, capture_output=True))
        library = ctypes.CDLL(str(built))
    except (OSError, subprocess.CalledProcessError):
        return None
    library.atlas_mapped_fault_register.restype = ctypes.c_int
    library.atlas_mapped_fault_register.argtypes = [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_char_p,
                                                    ctypes.c_char_p]
    library.atlas_mapped_fault_unregister.argtypes = [ctypes.c_int]
    return library if library.atlas_mapped_fault_install() == 0 else None


def is_mapped(tensor):
    return hasattr(tensor, _RANGE)


def check_unchanged(tensors):
    """Raise FileChangedError naming the file if the file of any mapped tensor among `tensors` changed since it was
    mapped (see MappedFile.changed); other tensors pass. Each file is looked at once."""
    seen = set()
    for t in tensors:
        if not is_mapped(t):
            continue
        file = getattr(t, _RANGE)[0]
        if id(file) in seen:
            continue
        seen.add(id(file))
        what = file.changed()
        if what is not None:
            raise FileChangedError(f"{file.path}: this memory-mapped file {what}; load it again")


def release(tensor, start=0, stop=None):
    """Drop the pages of elements [start, stop) (in storage order) of a tensor returned by map_safetensors()
    from this process; a no-op for other tensors. The values stay: the next read brings them back from the
    file (or the kernel's page cache): the mapping is read-only, so the pages dropped are clean copies of it."""
    if not is_mapped(tensor):
        return
    file, offset, length = getattr(tensor, _RANGE)
    mapping = file.mapping
    size = tensor.element_size()
    stop = length // size if stop is None else stop
    first, last = offset + start * size, offset + stop * size
    lo = (first + _PAGE - 1) // _PAGE * _PAGE   # whole pages inside the range only: neighbours keep theirs
    hi = last // _PAGE * _PAGE
    if hi > lo:
        mapping.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
