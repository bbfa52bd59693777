"""Public routing op: argument checks, backend choice and dispatch.

The fused backends (capsnet_fused.backends.triton.op, capsnet_fused.backends.cpp) are modules
with the functions of the backend contract in capsnet_fused/backends/__init__.py; the modules
are listed in _BACKEND_MODULES and imported once by load_backends().
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

# The checks are re-exported: capsnet_fused.ops.check_iterations and friends are public.
from capsnet_fused._checks import (  # noqa: F401
    BACKENDS,
    MAX_ITERATIONS,
    SQUASH_EPS,
    check_iterations,
    check_shared_logits,
    check_squash_eps,
    validate_routing_args,
)
from capsnet_fused.reference import reference_routing

BACKEND_ENV = "CAPSNET_FUSED_BACKEND"
_BACKEND_MODULES = {
    "triton": "capsnet_fused.backends.triton.op",
    "cpp": "capsnet_fused.backends.cpp",
}
# Fastest first; "auto" takes the first one available for the device.
_AUTO_ORDER = {"cuda": ("triton", "cpp", "reference"), "cpu": ("cpp", "reference")}


def _import_backend(name: str) -> ModuleType | str:
    """The backend's module, or why it cannot be imported."""
    try:
        return importlib.import_module(_BACKEND_MODULES[name])
    except ImportError as exc:
        return f"{_BACKEND_MODULES[name]} cannot be imported ({exc})"


# Imported once, when capsnet_fused is imported (capsnet_fused/__init__.py calls
# load_backends()), so that backend choice inside torch.compile is a plain dict lookup: dynamo
# cannot trace importlib, and a graph break would defeat fullgraph=True.
_MODULES: dict[str, ModuleType | str] = {}


def load_backends() -> None:
    """Import the fused backend modules (idempotent)."""
    for name in _BACKEND_MODULES:
        if name not in _MODULES:
            _MODULES[name] = _import_backend(name)


def _backend_module(name: str) -> ModuleType | str:
    if name not in _MODULES:
        load_backends()
    return _MODULES[name]


def _missing_device(device: torch.device) -> str | None:
    """Why `device` does not exist on this machine, or None. Only CUDA devices can be absent
    here: every other device a tensor can be on exists, and the fused backends refuse the
    types they do not support."""
    if device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return "CUDA is not available on this machine (torch.cuda.is_available() is False)"
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"{device} does not exist ({torch.cuda.device_count()} CUDA device(s) here)"
    return None


def unavailable_reason(
    backend: str, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> str | None:
    """None when `backend` can run on `device` with `dtype`, else the reason it cannot."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {BACKENDS} or 'auto'"
    missing = _missing_device(torch.device(device))
    if missing is not None:
        return missing
    if backend == "reference":
        return None
    module = _backend_module(backend)
    if isinstance(module, str):
        return module
    return module.unavailable_reason(torch.device(device), dtype)


def available_backends(
    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> list[str]:
    """Backends usable for tensors of `dtype` on `device` (default: cuda if present, else cpu)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return [name for name in BACKENDS if unavailable_reason(name, device, dtype) is None]


def choose_backend(
    device: torch.device | str, dtype: torch.dtype = torch.float32, backend: str = "auto"
) -> str:
    """The backend that dynamic_routing(..., backend=backend) uses for such tensors.

    The environment variable CAPSNET_FUSED_BACKEND, when set, replaces "auto". A backend named
    explicitly (or by that variable) that cannot run raises ValueError with the reason; there is
    no silent fallback. So does "auto" when nothing can run on the device (a CUDA device on a
    machine without one).
    """
    source = f"routing backend {backend!r}"
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto") or "auto"
        source = f"routing backend {backend!r} (from the environment variable {BACKEND_ENV})"
    if backend == "auto":
        order = _AUTO_ORDER.get(torch.device(device).type, ("reference",))
        for name in order:
            if unavailable_reason(name, device, dtype) is None:
                return name
        reason = unavailable_reason("reference", device, dtype)
        raise ValueError(f"no routing backend can run on {device}: {reason}")
    reason = unavailable_reason(backend, device, dtype)
    if reason is not None:
        raise ValueError(f"{source} is not available: {reason}")
    return backend


def _routing_dtype(u: torch.Tensor, weight: torch.Tensor, *optional: torch.Tensor | None):
    """The dtype the routing runs in: autocast's when autocast is on, else the promoted one
    of u, weight and the optional tensors given (prior, bias)."""
    device_type = u.device.type
    # Devices without autocast (meta, for shape inference) cannot even be asked about it.
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = torch.promote_types(u.dtype, weight.dtype)
    for t in optional:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def dynamic_routing(
    u: torch.Tensor,
    weight: torch.Tensor,
    iterations: int = 3,
    *,
    prior: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    softmax_over: str = "out_caps",
    detach_inner: bool = False,
    leaky: bool = False,
    squash_eps: float = SQUASH_EPS,
    shared_logits: str | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Dynamic routing by agreement, computed by the chosen backend.

    u [B, I, N], weight [I, J, N, M], prior [I, J] or None, bias [J, M] or None -> v [B, J, M].
    Same semantics as reference_routing (see there for softmax_over, bias, leaky, detach_inner,
    squash_eps and shared_logits). backend: "auto", "reference", "triton" or "cpp"; see
    available_backends() and choose_backend(). Under torch.autocast the inputs are cast to the
    autocast dtype (accumulation stays float32 in the fused backends); otherwise mixed float
    dtypes are promoted. shared_logits="mean" or "sum" with a backend that does not implement it
    raises NotImplementedError (see shared_logits_unavailable_reason).
    """
    iterations, squash_eps = validate_routing_args(
        u, weight, iterations, prior, softmax_over, bias=bias, leaky=leaky,
        squash_eps=squash_eps, shared_logits=shared_logits,
    )  # fmt: skip
    if not isinstance(backend, str):
        raise ValueError(f"backend must be a string, got {backend!r}")
    dtype = _routing_dtype(u, weight, prior, bias)
    name = choose_backend(u.device, dtype, backend)
    if shared_logits is not None:
        reason = shared_logits_unavailable_reason(name, u.device, dtype)
        if reason is not None:
            raise NotImplementedError(reason)
    u, weight = u.to(dtype), weight.to(dtype)
    prior = None if prior is None else prior.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    options = dict(softmax_over=softmax_over, detach_inner=detach_inner, leaky=leaky)
    if name == "reference":
        return reference_routing(
            u, weight, iterations, prior=prior, bias=bias, squash_eps=squash_eps,
            shared_logits=shared_logits, **options,
        )  # fmt: skip
    module = _backend_module(name)
    args = (u, weight, prior, bias, iterations, softmax_over, detach_inner, leaky, squash_eps)
    with torch.autocast(u.device.type, enabled=False):
        if shared_logits is not None:
            return module.shared_routing(*args, shared_logits)
        return module.routing(*args)


def shared_logits_unavailable_reason(
    backend: str, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> str | None:
    """None when `backend` (which can run on `device` with `dtype`) implements routing logits
    shared by the batch there, else why not ("shared_logits is not implemented in the ...
    backend yet")."""
    if backend == "reference":
        return None
    module = _backend_module(backend)
    if isinstance(module, str):
        return module
    device = torch.device(device)
    check = getattr(module, "shared_logits_unavailable_reason", None)
    reason = f"shared_logits is not implemented in the {backend} backend yet"
    if check is not None and hasattr(module, "shared_routing"):
        detail = check(device, dtype)
        if detail is None:
            return None
        reason = f"{reason} ({detail})"
    return f"{reason}; use backend='reference' for it meanwhile"
