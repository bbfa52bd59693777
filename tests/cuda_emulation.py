"""The CUDA kernels of the cpp backend, built for the CPU under csrc/cuda_emulation.h.

load() compiles csrc/routing_cuda.cpp (the torch glue the CUDA build uses) and
csrc/routing_cuda_emulated.cpp (csrc/routing_cuda.cu compiled as C++) with
CAPSNET_FUSED_CUDA_EMULATION defined, through torch.utils.cpp_extension.load (ninja, cached under
TORCH_EXTENSIONS_DIR: a rebuild only when a source changes). The library registers the kernels
for CPU tensors as the test-only ops capsnet_fused::cuda_emulated_routing_fwd / _bwd (and
cuda_emulated_shared_routing_fwd / _bwd for routing logits shared by the batch), with the schemas
of cpp_routing_fwd / _bwd (cpp_shared_routing_fwd / _bwd); load() adds the fakes and autograd of
capsnet_fused.backends.glue, so `routing` and `shared_routing` below are backend functions like
capsnet_fused.backends.cpp's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from capsnet_fused.backends import glue

CSRC = Path(__file__).resolve().parent.parent / "csrc"
PREFIX = "cuda_emulated"
# ninja tracks the headers and routing_cuda.cu (included by routing_cuda_emulated.cpp) through
# the compiler's dependency files, so editing any of them rebuilds what depends on it.
SOURCES = [CSRC / "routing_cuda.cpp", CSRC / "routing_cuda_emulated.cpp"]

_LOADED = False
NO_NINJA = "the emulated build needs ninja (pip install ninja)"


def has_ninja() -> bool:
    """Whether load() can build here: ninja on the PATH, or the ninja Python package."""
    if shutil.which("ninja") is not None:
        return True
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return False
    return True


def load_or_skip() -> None:
    """load(), or skip the calling test when the build cannot run here (no ninja)."""
    import pytest

    if not has_ninja():
        pytest.skip(NO_NINJA)
    load()


def load() -> None:
    """Build (first call in a fresh cache: about a minute) and register the emulated ops."""
    global _LOADED
    if _LOADED:
        return
    from torch.utils import cpp_extension

    cpp_extension.load(
        name="capsnet_fused_cuda_emulated",
        sources=[str(s) for s in SOURCES],
        extra_cflags=["-O2", "-DCAPSNET_FUSED_CUDA_EMULATION=1"],
        extra_include_paths=[str(CSRC)],
        is_python_module=False,
        verbose=False,
    )
    glue.register(PREFIX)
    glue.register(PREFIX, shared=True)
    _LOADED = True


def routing(u, weight, prior, bias, iterations, softmax_over, detach_inner, leaky, squash_eps):
    """v [B, J, M] by capsnet_fused::cuda_emulated_routing_fwd (glue.call_routing)."""
    return glue.call_routing(
        PREFIX, u, weight, prior, bias, iterations, softmax_over, detach_inner, leaky, squash_eps
    )


def shared_routing(
    u, weight, prior, bias, iterations, softmax_over, detach_inner, leaky, squash_eps, shared_logits
):
    """v [B, J, M] with routing logits shared by the batch, by
    capsnet_fused::cuda_emulated_shared_routing_fwd (glue.call_shared_routing)."""
    return glue.call_shared_routing(
        PREFIX, u, weight, prior, bias, iterations, softmax_over, detach_inner, leaky, squash_eps,
        shared_logits,
    )  # fmt: skip
