"""The torch backend's pass over a bank on a CPU, compiled: csrc/cpu_walk.c through ctypes.

The stock-op walk of torch_backend.py upcasts every chunk of a half-precision bank into a float32 buffer before
its BLAS calls, and with partitions (K > 1) builds a (K, chunk) matrix per chunk for the merge and another for
the reduction: several passes over each chunk. The C walk reads each element once, widens it in registers and
merges and reduces it against the K partitions' coefficients in the same pass.

It is compiled on first use with the system C compiler (`cc`, -O3 -march=native -fopenmp: a second, no torch
headers) into a cache keyed by the source, the compiler and the CPU's flags (ATLAS_FAST_CACHE, default
~/.cache/atlas_fast), written under a temporary name and renamed, so concurrent processes never load a half-written
library. Without a compiler, or with ATLAS_FAST_CPU_NATIVE=0, available() is False and the torch backend keeps its
stock-op walk, which computes the same sums. Its threads are OpenMP's: the library needs libgomp.so.1, which the
loader resolves to the copy torch has loaded, so the walk runs on torch's own worker threads. Threads of its own
(it had pthreads) shared the two cores of a 2-core CPU with torch's workers, which spin for a while after every
GEMM: inside a ViT-B/32 step the walk then read a bf16 bank at 3.5-4 GB/s, against 9-10 GB/s on torch's threads.

int8 and int4 banks (quant.QuantizedBlock) take the compiled walk where it has AVX-512, with up to 16 partitions
and, for int4, groups of a multiple of 16 columns: it dequantises 16 values at a time in registers (one scale per
row, or per group) instead of a chunk into a float32 buffer.
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ..bank.quant import is_quantized

_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_QUANT = {"int8": 3, "int4": 4}
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_state = {}


def _source():
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "csrc" / "cpu_walk.c", package.parent / "csrc" / "cpu_walk.c"):
        if candidate.is_file():
            return candidate
    return None


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _build(flags=_FLAGS, cache=None):
    """csrc/cpu_walk.c compiled with these flags (once per source, compiler, flags and CPU) and loaded: the ctypes
    library, its atlas_walk and atlas_walk_takes typed, or the reason there is none. Other flags build a variant,
    as the tests build the portable walk of a CPU without AVX-512."""
    if os.environ.get("ATLAS_FAST_CPU_NATIVE", "1") == "0":
        return "disabled by ATLAS_FAST_CPU_NATIVE=0"
    source = _source()
    if source is None:
        return "csrc/cpu_walk.c is not installed with the package"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return "no C compiler (cc) on PATH"
    text = source.read_bytes()
    key = hashlib.sha256(text + cc.encode() + " ".join(flags).encode() + _cpu_flags().encode()).hexdigest()[:16]
    cache = Path(cache or os.environ.get("ATLAS_FAST_CACHE", Path.home() / ".cache" / "atlas_fast"))
    lib = cache / f"cpu_walk-{key}.so"
    if not lib.is_file():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-cpu_walk-", suffix=".so", dir=cache)
            os.close(fd)
            try:
                run = subprocess.run([cc, *flags, str(source), "-o", tmp], capture_output=True, text=True)
                if run.returncode != 0:
                    return f"{cc} failed on {source}: {run.stderr.strip()[-500:]}"
                os.replace(tmp, lib)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        except OSError as e:
            return f"cannot build the CPU walk in {cache}: {e}"
    try:
        handle = ctypes.CDLL(str(lib))
    except OSError as e:
        return f"cannot load the CPU walk {lib}: {e}"
    fn = handle.atlas_walk
    fn.restype = ctypes.c_int
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, ctypes.c_int, i64, i64, i64, ptr, i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
    handle.atlas_walk_takes.restype = ctypes.c_int
    handle.atlas_walk_takes.argtypes = [ctypes.c_int, i64, i64]
    return handle


def _compile():
    """The loaded atlas_walk (atlas_walk_takes in _state["takes"]), or the reason there is none."""
    handle = _build()
    if isinstance(handle, str):
        return handle
    _state["takes"] = handle.atlas_walk_takes
    return handle.atlas_walk


def _function():
    if "fn" not in _state:
        _state["fn"] = _compile()
    return _state["fn"]


def unavailable_reason():
    """None when the compiled walk is ready, else why not (it is built on the first call)."""
    fn = _function()
    return fn if isinstance(fn, str) else None


def available():
    return unavailable_reason() is None


def takes(taus, acc, K):
    """Whether walk() takes these task vectors — a (T, numel) tensor or a QuantizedBlock — for accumulation dtype
    acc and K partitions (a uint8 partition index: K <= 256)."""
    if acc != torch.float32 or K > 256 or taus.device.type != "cpu" or not available():
        return False
    if is_quantized(taus):
        return (taus.data.is_contiguous() and taus.scale.dtype == torch.float32 and taus.scale.is_contiguous()
                and bool(_state["takes"](_QUANT[taus.format], K, taus.group)))
    return taus.dtype in _DTYPES and taus.dim() == 2 and taus.stride(1) == 1


def _ptr(t):
    return None if t is None else t.data_ptr()


def walk(taus, part, K, coef=None, merged=None, g=None, dc=None, base=None):
    """merged = base + Σ_t coef[t, k(i)] τ_t[i] (merged += ... without base); dc[t, k] += Σ_{i: k(i) = k} τ_t[i] g[i],
    in place, one pass. taus (T, n) with contiguous rows, or a QuantizedBlock (takes()); part uint8 (n,) or None
    for K = 1; coef, dc (T, K), merged, g, base (n,) float32."""
    T, n = taus.shape[0], taus.numel() // max(1, taus.shape[0])
    coef = None if coef is None else coef.detach().contiguous()
    g = None if g is None else g.to(torch.float32).contiguous()
    if base is not None and merged is None:
        raise ValueError("cpu walk: base without merged")
    for name, t, shape in (("merged", merged, (n,)), ("dc", dc, (T, K)), ("coef", coef, (T, K)), ("g", g, (n,)),
                           ("base", base, (n,))):
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous() or tuple(t.shape) != shape):
            raise ValueError(f"cpu walk: {name} must be a contiguous float32 {shape}, got {t.dtype} "
                             f"{tuple(t.shape)}")
    if K > 1 and (part is None or part.dtype != torch.uint8 or part.numel() < n or not part.is_contiguous()):
        raise ValueError(f"cpu walk: partitions K={K} need a contiguous uint8 index of {n} elements")
    if is_quantized(taus):
        bank = (_ptr(taus.data), _QUANT[taus.format], T, n, taus.data.stride(0), _ptr(taus.scale), taus.rows,
                taus.cols, taus.group)
    else:
        bank = (_ptr(taus), _DTYPES[taus.dtype], T, n, taus.stride(0), None, 0, 0, 0)
    status = _function()(*bank, _ptr(part) if K > 1 else None, K, _ptr(coef), _ptr(base), _ptr(merged), _ptr(g),
                         _ptr(dc), torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"cpu walk refused T={T}, n={n}, K={K}, bank {taus.dtype}")
