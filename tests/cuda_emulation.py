"""The CUDA kernels of the cpp backend, built for the CPU under csrc/cuda_emulation.h.

load() compiles csrc/routing_cuda.cpp (the torch glue the CUDA build uses) and
csrc/routing_cuda_emulated.cpp (csrc/routing_cuda.cu compiled as C++) with
CAPSNET_FUSED_CUDA_EMULATION defined, through torch.utils.cpp_extension.load (ninja, cached under
TORCH_EXTENSIONS_DIR: a rebuild only when a source changes). The library registers the kernels
for CPU tensors as the test-only ops capsnet_fused::cuda_emulated_routing_fwd / _bwd, with the
schema of cpp_routing_fwd / _bwd; load() adds the fakes and autograd of capsnet_fused._op_glue,
so `routing` below is a backend function like capsnet_fused._cpp_op.routing.
"""

from __future__ import annotations

from pathlib import Path

from capsnet_fused import _op_glue

CSRC = Path(__file__).resolve().parent.parent / "csrc"
PREFIX = "cuda_emulated"
# ninja tracks the headers and routing_cuda.cu (included by routing_cuda_emulated.cpp) through
# the compiler's dependency files, so editing any of them rebuilds what depends on it.
SOURCES = [CSRC / "routing_cuda.cpp", CSRC / "routing_cuda_emulated.cpp"]

_LOADED = False


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
    _op_glue.register(PREFIX)
    _LOADED = True


routing = _op_glue.make_routing(PREFIX)
