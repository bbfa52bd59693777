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

Building also writes capsnet_fused/_build_info.json (git-ignored) beside _C: what was built and
how, for `capsnet-fused info`.
"""

import json
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import (
        CUDA_HOME,
        BuildExtension,
        CppExtension,
        CUDAExtension,
        get_cxx_compiler,
    )
except ImportError as exc:
    raise SystemExit(
        "capsnet-fused builds against the installed torch, and none was found. Install torch "
        "first (CPU machines: pip install torch==2.13.0), then: "
        "pip install --no-build-isolation -e ."
    ) from exc

CSRC = "csrc"
CPU_SOURCES = [f"{CSRC}/ops.cpp", f"{CSRC}/routing_cpu.cpp", f"{CSRC}/routing_cpu_shared.cpp"]
CUDA_SOURCES = [f"{CSRC}/routing_cuda.cpp", f"{CSRC}/routing_cuda.cu"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "") == "1"


def _without_cuda_reason() -> str | None:
    """None when the CUDA kernels can be built, else why not."""
    if _flag("CAPSNET_FUSED_CPU_ONLY"):
        return "CAPSNET_FUSED_CPU_ONLY=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if CUDA_HOME is None or not shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return f"no nvcc (CUDA_HOME={CUDA_HOME})"
    return None


def _with_cuda() -> bool:
    """CUDA kernels need a CUDA build of torch and nvcc (CUDA_HOME); the CPU wheel has neither."""
    return _without_cuda_reason() is None


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


def _version_line(program: str) -> str:
    """`program --version`'s line naming the release (nvcc's), else its first line (gcc's)."""
    try:
        done = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return f"{program}: unknown version"
    lines = (done.stdout or done.stderr).strip().splitlines()
    if done.returncode != 0 or not lines:
        return f"{program}: unknown version"
    return next((line for line in lines if "release" in line), lines[0])


def _cuda_archs() -> list[str]:
    """The targets nvcc compiles for: sm_XY (machine code) and compute_XY (PTX), as
    BuildExtension chooses them (TORCH_CUDA_ARCH_LIST, else the build machine's GPUs)."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    try:
        flags = _get_cuda_arch_flags()
    except Exception:  # a private helper; without GPUs and TORCH_CUDA_ARCH_LIST it can fail
        return ["unknown"]
    return sorted({m for flag in flags for m in re.findall(r"code=((?:sm|compute)_\w+)", flag)})


class BuildExtensionWithInfo(BuildExtension.with_options(use_ninja=True)):
    """Builds _C, then records how next to it in _build_info.json."""

    def finalize_options(self) -> None:
        super().finalize_options()
        # setuptools compiles an editable install in a new temporary folder each time, so every
        # `pip install -e` recompiled everything (391 s on the 2-core Zen 3 under load); in a
        # fixed folder ninja finds the objects up to date (its depfiles track the headers).
        if getattr(self, "editable_mode", False):
            self.build_temp = os.path.join(
                os.path.dirname(os.path.abspath(__file__)), "build", "editable-temp"
            )

    def run(self) -> None:
        super().run()
        ext = self.extensions[0]
        cuda_reason = _without_cuda_reason()
        cxx = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else []
        info = {
            "package_version": self.distribution.get_version(),
            "python": platform.python_version(),
            "platform": f"{sys.platform}-{platform.machine()}",
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            # The C++ compiler ninja runs (CXX, else c++), as cpp_extension chooses it.
            "compiler": _version_line(get_cxx_compiler()),
            "cxx_flags": cxx,
            "native": _flag("CAPSNET_FUSED_NATIVE"),
            "cuda_kernels": cuda_reason is None,
            "cuda_kernels_reason": cuda_reason,
            "cuda_archs": _cuda_archs() if cuda_reason is None else [],
            "nvcc": (
                _version_line(os.path.join(CUDA_HOME, "bin", "nvcc"))
                if cuda_reason is None
                else None
            ),
        }
        # Beside _C: the source package for --inplace and editable installs, else build_lib.
        folder = os.path.dirname(self.get_ext_fullpath(ext.name))
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "_build_info.json"), "w") as file:
            json.dump(info, file, indent=1)
            file.write("\n")


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtensionWithInfo},
)
