"""Builds capsnet_fused._C: the CPU kernels always, the CUDA kernels when possible.

Install with `pip install --no-build-isolation -e .` so that the build uses the installed torch
(build isolation would download a CUDA build of torch into the build environment). While
developing: `python setup.py build_ext --inplace`.

Environment:
    CAPSNET_FUSED_CPU_ONLY=1   build the CPU kernels only, even where CUDA could be built.
    CAPSNET_FUSED_NATIVE=1     compile the CPU kernels with -march=native: one kernel clone for
                               the build machine's instruction sets (64-byte vectors where it
                               has AVX-512) instead of the x86-64-v4 / x86-64-v3 / baseline
                               clones chosen at run time; the result may not run on other CPUs.
"""

import os
import shutil

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:
    raise SystemExit(
        "capsnet-fused builds against the installed torch, and none was found. Install torch "
        "first (CPU machines: pip install torch==2.13.0), then: "
        "pip install --no-build-isolation -e ."
    ) from exc

CSRC = "csrc"
CPU_SOURCES = [f"{CSRC}/ops.cpp", f"{CSRC}/routing_cpu.cpp"]
CUDA_SOURCES = [f"{CSRC}/routing_cuda.cpp", f"{CSRC}/routing_cuda.cu"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "") == "1"


def _with_cuda() -> bool:
    """CUDA kernels need a CUDA build of torch and nvcc (CUDA_HOME); the CPU wheel has neither."""
    if _flag("CAPSNET_FUSED_CPU_ONLY"):
        return False
    nvcc = CUDA_HOME is not None and shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc"))
    return torch.version.cuda is not None and bool(nvcc)


def _extension():
    # -fopenmp at compile AND link time: without it at::parallel_for runs on one thread.
    # -O3 because setuptools compiles with -g and no optimisation level of its own choosing.
    # The C++ standard is left to torch (C++20 for torch 2.13 headers; the sources are C++17).
    cxx = ["-O3", "-fopenmp"]
    if _flag("CAPSNET_FUSED_NATIVE"):
        cxx.append("-march=native")
    link = ["-fopenmp"]
    if _with_cuda():
        return CUDAExtension(
            "capsnet_fused._C",
            CPU_SOURCES + CUDA_SOURCES,
            define_macros=[("CAPSNET_FUSED_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=link,
        )
    return CppExtension(
        "capsnet_fused._C",
        CPU_SOURCES,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
