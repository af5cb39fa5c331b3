"""Pure-Python install by default; the CUDA extension is built ahead of time only when asked.

    ATLAS_FAST_BUILD_CUDA=1 pip install --no-build-isolation -e .   # needs torch, nvcc (CUDA_HOME) and ninja

The ahead-of-time build compiles csrc/ into atlas_fast._C with ninja for TORCH_CUDA_ARCH_LIST (default
"8.0;9.0": sm_80 and sm_90) using MAX_JOBS parallel jobs. torch's CUDA headers include the cuSPARSE and
cuBLAS headers: with a toolkit that lacks them, point CPATH at <site-packages>/nvidia/cu13/include.
Without this build the CUDA kernels are compiled on first use (torch.utils.cpp_extension.load, cached),
from the csrc/ sources that ship as atlas_fast/csrc.
The Triton kernels live in kernels/ and install as atlas_fast.kernels.
"""
import glob
import os

from setuptools import setup

packages = ["atlas_fast", "atlas_fast.adapt", "atlas_fast.backends", "atlas_fast.bank", "atlas_fast.bench",
            "atlas_fast.composer", "atlas_fast.io", "atlas_fast.ops", "atlas_fast.kernels",
            "atlas_fast.csrc"]
package_dir = {"atlas_fast.kernels": "kernels", "atlas_fast.csrc": "csrc"}
package_data = {"atlas_fast.csrc": ["*.cu", "*.cuh", "*.h", "*.cpp", "*.c"]}


def cuda_extension():
    """The atlas_fast._C extension and its ninja build command; imports torch, so only when asked."""
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension, is_ninja_available

    if not is_ninja_available():
        raise RuntimeError("ATLAS_FAST_BUILD_CUDA=1 needs ninja: pip install ninja")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(os.path.relpath(p, here) for pattern in ("*.cu", "*.cpp")
                     for p in glob.glob(os.path.join(here, "csrc", pattern)))
    ext = CUDAExtension("atlas_fast._C", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    return ext, BuildExtension.with_options(use_ninja=True)


ext_modules, cmdclass = [], {}
if os.environ.get("ATLAS_FAST_BUILD_CUDA") == "1":
    ext, build_ext = cuda_extension()
    ext_modules, cmdclass = [ext], {"build_ext": build_ext}

setup(packages=packages, package_dir=package_dir, package_data=package_data, ext_modules=ext_modules,
      cmdclass=cmdclass)
