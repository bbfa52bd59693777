"""The Triton routing backend as torch ops: capsnet_fused::triton_routing_fwd / _bwd, and
triton_shared_routing_fwd / _bwd for routing logits shared by the batch (issue 18).

Both ops are torch.library.custom_op; their fake (meta) implementations and the forward's
autograd, which calls the backward op, are registered by capsnet_fused.backends.glue (shared with
the cpp backend), so opcheck passes and torch.compile (fullgraph=True) treats the routing as one
opaque node forward and one backward. (triton_op with wrap_triton would let Inductor see the
kernels, but its fake path runs the interpreted kernel on fake tensors, so it cannot be checked
on a CPU machine.)

Contract with capsnet_fused.ops (capsnet_fused/backends/__init__.py): unavailable_reason(device,
dtype) and routing(u, weight, prior, bias, iterations, softmax_over, detach_inner, leaky,
squash_eps) -> v; shared_logits_unavailable_reason(device, dtype) and shared_routing(...,
shared_logits) -> v.
"""

from __future__ import annotations

import numpy
import torch
import triton

from capsnet_fused.backends import glue
from capsnet_fused.backends.triton.launch import routing_backward, routing_forward
from capsnet_fused.backends.triton.shared_launch import (
    shared_routing_backward,
    shared_routing_forward,
)
from capsnet_fused.backends.triton.tiles import INTERPRETED

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Kernels decorated under TRITON_INTERPRET=1 run on CPU tensors (slowly: tests only).
_INTERPRET_REASON = (
    "the Triton backend runs on CUDA devices; on CPU only under the Triton interpreter "
    "(TRITON_INTERPRET=1 set before capsnet_fused is imported)"
)


def _interpreter_problem() -> str | None:
    """Why this triton's interpreter cannot run the kernels with this numpy, or None.

    Before triton 3.9 the interpreter turns its one-element arrays into loop bounds with int(),
    which numpy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars");
    checked with triton 3.6: numpy 2.3.5 works, 2.4 does not.
    """
    version = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())
    if not INTERPRETED or version >= (3, 9):
        return None
    try:
        int(numpy.array([1]))
    except TypeError:
        return (
            f"the Triton {triton.__version__} interpreter needs numpy < 2.4 (found "
            f"{numpy.__version__}): pip install 'numpy<2.4', or triton >= 3.9"
        )
    return None


_INTERPRETER_PROBLEM = _interpreter_problem()


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the Triton kernels can run for tensors of `dtype` on `device`, else why not."""
    if dtype not in _DTYPES:
        return f"the Triton backend supports {[str(d) for d in _DTYPES]}, got {dtype}"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and INTERPRETED:
        return _INTERPRETER_PROBLEM
    return _INTERPRET_REASON if device.type == "cpu" else f"no Triton backend for {device.type}"


@torch.library.custom_op("capsnet_fused::triton_routing_fwd", mutates_args=())
def routing_fwd(
    u: torch.Tensor,
    weight: torch.Tensor,
    prior: torch.Tensor | None,
    bias: torch.Tensor | None,
    iterations: int,
    softmax_in: bool,
    detach_inner: bool,
    leaky: bool,
    squash_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(v [B, J, M], s [B, R, J, M] (s^t + bias), v_prev [B, R, J, M], lse [B, R, J or 0]).

    detach_inner does not change the forward; it is an argument so that the backward sees it.
    """
    return routing_forward(
        u, weight, prior, iterations, softmax_in, bias=bias, leaky=leaky, squash_eps=squash_eps
    )


@torch.library.custom_op("capsnet_fused::triton_routing_bwd", mutates_args=())
def routing_bwd(
    grad_v: torch.Tensor,
    u: torch.Tensor,
    weight: torch.Tensor,
    prior: torch.Tensor | None,
    bias: torch.Tensor | None,
    s: torch.Tensor,
    v_prev: torch.Tensor,
    lse: torch.Tensor,
    iterations: int,
    softmax_in: bool,
    detach_inner: bool,
    leaky: bool,
    squash_eps: float,
    need_du: bool,
    need_dweight: bool,
    need_dprior: bool,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(du [B, I, N], dweight [I, J, N, M], dprior [I, J], dbias [J, M]); a gradient not
    needed is [0]."""
    return routing_backward(
        grad_v,
        u,
        weight,
        prior,
        s,
        v_prev,
        lse,
        iterations,
        softmax_in,
        detach_inner,
        need_du,
        need_dweight,
        need_dprior,
        bias=bias,
        leaky=leaky,
        squash_eps=squash_eps,
        need_dbias=need_dbias,
    )


def shared_logits_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None: wherever the Triton kernels run, they have routing logits shared by the batch."""
    return unavailable_reason(device, dtype)


@torch.library.custom_op("capsnet_fused::triton_shared_routing_fwd", mutates_args=())
def shared_routing_fwd(
    u: torch.Tensor,
    weight: torch.Tensor,
    prior: torch.Tensor | None,
    bias: torch.Tensor | None,
    iterations: int,
    softmax_in: bool,
    detach_inner: bool,
    leaky: bool,
    squash_eps: float,
    batch_mean: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(v [B, J, M], s [B, R, J, M] (s^k + bias), v_iter [B, R, J, M] (v^k), c [R, I, J]
    (the couplings shared by the batch)); batch_mean: mean of the agreements, else their sum."""
    return shared_routing_forward(
        u, weight, prior, iterations, softmax_in, batch_mean, bias=bias, leaky=leaky,
        squash_eps=squash_eps,
    )  # fmt: skip


@torch.library.custom_op("capsnet_fused::triton_shared_routing_bwd", mutates_args=())
def shared_routing_bwd(
    grad_v: torch.Tensor,
    u: torch.Tensor,
    weight: torch.Tensor,
    prior: torch.Tensor | None,
    bias: torch.Tensor | None,
    s: torch.Tensor,
    v_iter: torch.Tensor,
    c: torch.Tensor,
    iterations: int,
    softmax_in: bool,
    detach_inner: bool,
    leaky: bool,
    squash_eps: float,
    batch_mean: bool,
    need_du: bool,
    need_dweight: bool,
    need_dprior: bool,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(du, dweight, dprior, dbias) of the shared-logits routing; a gradient not needed is
    [0]."""
    return shared_routing_backward(
        grad_v, u, weight, prior, s, v_iter, c, iterations, softmax_in, detach_inner,
        batch_mean, need_du, need_dweight, need_dprior, bias=bias, leaky=leaky,
        squash_eps=squash_eps, need_dbias=need_dbias,
    )  # fmt: skip


glue.register("triton")
glue.register("triton", shared=True)


def routing(u, weight, prior, bias, iterations, softmax_over, detach_inner, leaky, squash_eps):
    """v [B, J, M] by capsnet_fused::triton_routing_fwd (glue.call_routing)."""
    return glue.call_routing(
        "triton", u, weight, prior, bias, iterations, softmax_over, detach_inner, leaky, squash_eps
    )


def shared_routing(
    u, weight, prior, bias, iterations, softmax_over, detach_inner, leaky, squash_eps, shared_logits
):
    """v [B, J, M] with routing logits shared by the batch, by
    capsnet_fused::triton_shared_routing_fwd (glue.call_shared_routing)."""
    return glue.call_shared_routing(
        "triton", u, weight, prior, bias, iterations, softmax_over, detach_inner, leaky, squash_eps,
        shared_logits,
    )  # fmt: skip
