"""The "cpp" routing backend: fused C++ (CPU) and CUDA kernels from capsnet_fused._C.

The ops capsnet_fused::cpp_routing_fwd and cpp_routing_bwd (and cpp_shared_routing_fwd / _bwd
for routing logits shared by the batch) are defined in csrc/ (TORCH_LIBRARY); this module loads
them, registers their fakes and autograd (capsnet_fused.backends.glue, shared with the Triton
backend), and satisfies the backend contract (capsnet_fused/backends/__init__.py):
unavailable_reason(device, dtype) and routing(...), shared_logits_unavailable_reason(device,
dtype) and shared_routing(...).

Shapes: u [B, I, N], weight [I, J, N, M], prior [I, J] or None -> v [B, J, M]; R iterations.
The forward saves s and V [B, R, J, M] (and lse [B, R, J] for softmax over in_caps), never a
B x I x J x M tensor. float16/bfloat16 are computed in float32 and cast back.

Building: `pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`)
compiles capsnet_fused._C. For development without that step, set CAPSNET_FUSED_JIT=1: when
_C cannot be imported, this module then compiles csrc/ with torch.utils.cpp_extension.load
(ninja, cached under TORCH_EXTENSIONS_DIR) and loads it; the CUDA sources are included when
torch is a CUDA build and CUDA_HOME is set.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import torch

from capsnet_fused.backends import glue

JIT_ENV = "CAPSNET_FUSED_JIT"
_BUILD_HINT = "run pip install --no-build-isolation -e . (or set CAPSNET_FUSED_JIT=1)"


def _jit_load() -> None:
    """Compile csrc/ with cpp_extension.load and load it, which registers the ops."""
    from torch.utils import cpp_extension

    # capsnet_fused/backends/cpp.py -> the repository root, beside capsnet_fused/.
    csrc = Path(__file__).resolve().parents[2] / "csrc"
    sources = [csrc / "ops.cpp", csrc / "routing_cpu.cpp", csrc / "routing_cpu_shared.cpp"]
    cflags = ["-O3", "-fopenmp"]
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        sources += [csrc / "routing_cuda.cpp", csrc / "routing_cuda.cu"]
        cflags.append("-DCAPSNET_FUSED_WITH_CUDA=1")
    cpp_extension.load(
        name="capsnet_fused_jit",
        sources=[str(s) for s in sources],
        extra_cflags=cflags,
        extra_cuda_cflags=["-O3"],
        extra_ldflags=["-fopenmp"],
        with_cuda=with_cuda,
        is_python_module=False,
    )


def _load() -> str | None:
    """Load the compiled ops; None on success, else why they are unavailable."""
    if importlib.util.find_spec("capsnet_fused._C") is not None:
        try:
            importlib.import_module("capsnet_fused._C")
            return None
        except ImportError as exc:  # built, but against another torch or missing a library
            return f"capsnet_fused._C cannot be loaded ({exc}): {_BUILD_HINT}"
    if os.environ.get(JIT_ENV) != "1":
        return f"capsnet_fused._C is not built: {_BUILD_HINT}"
    try:
        _jit_load()
    except Exception as exc:  # a compiler failure surfaces as several exception types
        return f"capsnet_fused._C is not built and the {JIT_ENV}=1 build failed: {exc}"
    return None


_LOAD_ERROR = _load()


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the cpp backend can route tensors of `dtype` on `device`, else why not."""
    if _LOAD_ERROR is not None:
        return _LOAD_ERROR
    if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        return f"the cpp backend supports float32, float64, float16 and bfloat16, not {dtype}"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if torch._C._dispatch_has_kernel_for_dispatch_key("capsnet_fused::cpp_routing_fwd", "CUDA"):
            return None
        return (
            "capsnet_fused._C was built without CUDA kernels (it needs a CUDA build of torch "
            "and nvcc when building; CAPSNET_FUSED_CPU_ONLY=1 also disables them)"
        )
    return f"the cpp backend runs on cpu and cuda, not {device.type}"


# Device types with kernels for routing logits shared by the batch, looked up once: dynamo
# cannot trace the dispatcher query, and the answer does not change after import.
_SHARED_KERNELS = (
    {
        device_type
        for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if torch._C._dispatch_has_kernel_for_dispatch_key(
            "capsnet_fused::cpp_shared_routing_fwd", key
        )
    }
    if _LOAD_ERROR is None
    else set()
)


def shared_logits_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the cpp backend (available for `device` and `dtype`) has kernels for routing
    logits shared by the batch on that device, else why not."""
    if _LOAD_ERROR is not None:
        return _LOAD_ERROR
    if device.type in _SHARED_KERNELS:
        return None
    where = {"cpu": "CPU kernels", "cuda": "CUDA kernels"}.get(device.type, device.type)
    return f"its {where} do not have it"


if _LOAD_ERROR is None:
    glue.register("cpp")
    glue.register("cpp", shared=True)


def routing(u, weight, prior, bias, iterations, softmax_over, detach_inner, leaky, squash_eps):
    """v [B, J, M] by capsnet_fused::cpp_routing_fwd (glue.call_routing)."""
    return glue.call_routing(
        "cpp", u, weight, prior, bias, iterations, softmax_over, detach_inner, leaky, squash_eps
    )


def shared_routing(
    u, weight, prior, bias, iterations, softmax_over, detach_inner, leaky, squash_eps, shared_logits
):
    """v [B, J, M] with routing logits shared by the batch, by
    capsnet_fused::cpp_shared_routing_fwd (glue.call_shared_routing)."""
    return glue.call_shared_routing(
        "cpp", u, weight, prior, bias, iterations, softmax_over, detach_inner, leaky, squash_eps,
        shared_logits,
    )  # fmt: skip
