"""Argument checks shared by the op, the reference, FusedRouter, the trainer and the benchmark.

A leaf module (it imports only torch), so that every caller checks the same way with the same
ValueError text and no two modules import each other for a check. The routing settings' valid
values live here too: the reference, the op and the CLI's choices read them from here.
"""

from __future__ import annotations

import math
import operator

import torch

SQUASH_EPS = 1e-8
SOFTMAX_OVER = ("out_caps", "in_caps")
# Routing logits per sample (None), or one [I, J] tensor for the batch updated with the batch
# mean or sum of the agreements (issue 18).
SHARED_LOGITS = (None, "mean", "sum")
BACKENDS = ("reference", "triton", "cpp")
# Routing iterations beyond this are a mistake (the paper uses 3; the saved states grow with R,
# and 2**40 iterations would try to allocate terabytes).
MAX_ITERATIONS = 1000


def check_iterations(iterations) -> int:
    """iterations as an int in [1, MAX_ITERATIONS]: anything with __index__ (int, numpy
    integers, integer tensors of one element) except bools; else ValueError."""
    is_bool = isinstance(iterations, bool) or (
        isinstance(iterations, torch.Tensor) and iterations.dtype == torch.bool
    )
    try:
        count = None if is_bool else operator.index(iterations)
    except TypeError:
        count = None
    if count is None or not 1 <= count <= MAX_ITERATIONS:
        raise ValueError(
            f"iterations must be an integer in [1, {MAX_ITERATIONS}] (not a bool), "
            f"got {iterations!r}"
        )
    return count


def check_squash_eps(squash_eps) -> float:
    """squash_eps as a float >= 0 (finite; not a bool), else ValueError."""
    valid = isinstance(squash_eps, (int, float)) and not isinstance(squash_eps, bool)
    if valid:
        squash_eps = float(squash_eps)
        valid = math.isfinite(squash_eps) and squash_eps >= 0
    if not valid:
        raise ValueError(
            f"squash_eps must be a finite number >= 0 (0: the eps-free squash), got {squash_eps!r}"
        )
    return squash_eps


def check_shared_logits(shared_logits) -> str | None:
    """shared_logits as None, "mean" or "sum", else ValueError."""
    if not (
        shared_logits is None or (isinstance(shared_logits, str) and shared_logits in SHARED_LOGITS)
    ):
        raise ValueError(
            f"shared_logits must be None (logits per sample), 'mean' or 'sum' (one set of "
            f"logits for the batch), got {shared_logits!r}"
        )
    return shared_logits


def check_softmax_over(softmax_over) -> str:
    """softmax_over as "out_caps" or "in_caps", else ValueError."""
    if not (isinstance(softmax_over, str) and softmax_over in SOFTMAX_OVER):
        raise ValueError(f"softmax_over must be one of {SOFTMAX_OVER}, got {softmax_over!r}")
    return softmax_over


def check_leaky(leaky) -> bool:
    """leaky as a bool, else ValueError."""
    if not isinstance(leaky, bool):
        raise ValueError(f"leaky must be a bool, got {leaky!r}")
    return leaky


def check_backend_name(backend) -> str:
    """backend as "auto" or a name in BACKENDS, else ValueError. Whether that backend can run
    depends on the tensors' device and dtype: capsnet_fused.ops.choose_backend decides that."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend


def check_routing_options(
    iterations, softmax_over, leaky, squash_eps, shared_logits
) -> tuple[int, float]:
    """The checks of the routing settings (not of the tensors): (iterations, squash_eps)."""
    iterations = check_iterations(iterations)
    check_softmax_over(softmax_over)
    check_leaky(leaky)
    check_shared_logits(shared_logits)
    return iterations, check_squash_eps(squash_eps)


def validate_routing_args(
    u: torch.Tensor,
    weight: torch.Tensor,
    iterations: int,
    prior: torch.Tensor | None,
    softmax_over: str,
    *,
    bias: torch.Tensor | None = None,
    leaky: bool = False,
    squash_eps: float = SQUASH_EPS,
    shared_logits: str | None = None,
) -> tuple[int, float]:
    """Raise ValueError, naming the expected shapes, unless the arguments describe a routing.

    Returns (iterations as an int (see check_iterations), squash_eps as a float).
    """
    expect = "expected u [B, I, N], weight [I, J, N, M], prior [I, J] or None, bias [J, M] or None"
    if not isinstance(u, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise ValueError(f"u and weight must be tensors; {expect}")
    if u.dim() != 3:
        raise ValueError(f"u must have 3 dims, got shape {tuple(u.shape)}; {expect}")
    if weight.dim() != 4:
        raise ValueError(f"weight must have 4 dims, got shape {tuple(weight.shape)}; {expect}")
    in_caps, out_caps, in_d, out_d = weight.shape
    if u.shape[1] != in_caps or u.shape[2] != in_d:
        raise ValueError(
            f"u {tuple(u.shape)} does not match weight {tuple(weight.shape)}: "
            f"u must be [B, I={in_caps}, N={in_d}]; {expect}"
        )
    if min(in_caps, out_caps, in_d, out_d) < 1:
        raise ValueError(f"I, J, N and M must be >= 1, got weight {tuple(weight.shape)}")
    for name, t, shape, letters in (
        ("prior", prior, (in_caps, out_caps), f"[I={in_caps}, J={out_caps}]"),
        ("bias", bias, (out_caps, out_d), f"[J={out_caps}, M={out_d}]"),
    ):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be {letters} or None, got {got}")
    named = [("u", u), ("weight", weight), ("prior", prior), ("bias", bias)]
    for name, t in named:
        if t is None:
            continue
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != u.device:
            raise ValueError(f"{name} is on {t.device} but u is on {u.device}")
    return check_routing_options(iterations, softmax_over, leaky, squash_eps, shared_logits)


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """'auto' (or None) -> cuda:local_rank when CUDA is available, else cpu. ValueError for
    anything that is not an existing cpu or cuda device."""
    expect = "expected cpu, cuda, cuda:N or auto"
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"--device {device!r} is not a device; {expect}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: training runs on cpu or cuda; {expect}")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {str(dev)!r} requested but there are {torch.cuda.device_count()} CUDA "
            f"device(s)"
        )
    return dev
