"""Build of comm_fast: the Python packages plus the csrc extension ``comm_fast._C``.

The C++ (CPU) part is always built; the CUDA part only where torch has CUDA and nvcc is
found. Set COMM_FAST_NO_EXT=1 to skip the extension entirely, COMM_FAST_NO_CUDA=1 to build
the C++ part only.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("COMM_FAST_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # no torch in the build environment: pure-Python install
        return [], {}
    rel = lambda paths: [os.path.relpath(p, ROOT) for p in paths]
    sources = rel(sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))))
    cuda_sources = rel(sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))))
    if not sources:
        return [], {}
    cxx = ["-O3", "-std=c++20"]  # torch's own headers use C++20 (bit-field initialisers)
    link = []
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        # at::parallel_for is an inline `#pragma omp parallel`: without -fopenmp it runs on one thread
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if os.environ.get("COMM_FAST_NATIVE", "0") == "1":
        cxx.append("-march=native")
    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and bool(cuda_sources)
        and os.environ.get("COMM_FAST_NO_CUDA") != "1"
    )
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "comm_fast._C",
            sources + cuda_sources,
            define_macros=[("COMM_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            extra_link_args=link,
        )
    else:
        ext = cpp_extension.CppExtension("comm_fast._C", sources, extra_compile_args={"cxx": cxx},
                                         extra_link_args=link)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["comm_fast", "comm_fast.*"]) + ["comm_fast.kernels"],
    package_dir={"comm_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
