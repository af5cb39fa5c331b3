"""Pure-Python install by default; the CUDA extension is built ahead of time only when asked.

    ATLAS_FAST_BUILD_CUDA=1 pip install -e .     # honours TORCH_CUDA_ARCH_LIST and MAX_JOBS, builds with ninja

Without it the CUDA kernels are compiled on first use (torch.utils.cpp_extension.load, cached).
The Triton kernels live in kernels/ and install as atlas_fast.kernels.
"""
import os

from setuptools import setup

packages = ["atlas_fast", "atlas_fast.backends", "atlas_fast.baselines", "atlas_fast.recipes", "atlas_fast.kernels"]
package_dir = {"atlas_fast.kernels": "kernels"}
ext_modules, cmdclass = [], {}

if os.environ.get("ATLAS_FAST_BUILD_CUDA") == "1":
    from atlas_fast_build import cuda_extension  # noqa: E402  (build-time helper, only when asked)
    ext, build_ext = cuda_extension()
    ext_modules, cmdclass = [ext], {"build_ext": build_ext}

setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass,
      package_data={"atlas_fast": ["csrc/*"]})
