"""What the fused backends' torch ops share: their fake implementations and their autograd, and
the call of the forward op behind each backend's routing and shared_routing (call_routing,
call_shared_routing).

Each fused backend defines a pair of ops with the same signatures (the cpp pair in csrc/ops.cpp
with routing_schema.h, the Triton pair as torch.library.custom_op):

    <prefix>_routing_fwd(u, weight, prior, bias, iterations, softmax_in, detach_inner, leaky,
                         squash_eps)
        -> (v [B, J, M], s [B, R, J, M], v_prev [B, R, J, M], lse [B, R, J] or [B, 0, J])
    <prefix>_routing_bwd(grad_v, u, weight, prior, bias, s, v_prev, lse, iterations,
                         softmax_in, detach_inner, leaky, squash_eps,
                         need_du, need_dweight, need_dprior, need_dbias)
        -> (du [B, I, N], dweight [I, J, N, M], dprior [I, J], dbias [J, M]);
           a gradient not needed (or whose input is None) is [0]

s (the squash input s^t + bias), v_prev and lse are the states the backward reads (lse only
with the softmax over in_caps), in the state dtype; they are outputs only so that autograd can
save them.

Routing logits shared by the batch (issue 18) is a second pair per backend, with one more
argument, batch_mean (True: the logits grow by the batch mean of the agreements, False: by
their sum), and other saved states (the cpp pair: routing_schema.h):

    <prefix>_shared_routing_fwd(u, weight, prior, bias, iterations, softmax_in, detach_inner,
                                leaky, squash_eps, batch_mean)
        -> (v [B, J, M], s [B, R, J, M], v_iter [B, R, J, M], c [R, I, J])
    <prefix>_shared_routing_bwd(grad_v, u, weight, prior, bias, s, v_iter, c, iterations,
                                softmax_in, detach_inner, leaky, squash_eps, batch_mean,
                                need_du, need_dweight, need_dprior, need_dbias)
        -> (du, dweight, dprior, dbias) as above

v_iter holds v^t = squash(s^t) of every iteration and c the couplings c^t shared by the batch.
"""

from __future__ import annotations

import torch
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.autograd import forward_ad


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and saved-state dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_fake(u, weight, prior, bias, iterations, softmax_in, detach_inner, leaky, squash_eps):
    batch, out_caps, out_d = u.shape[0], weight.shape[1], weight.shape[3]
    state = (batch, iterations, out_caps, out_d)
    lse = (batch, iterations if softmax_in else 0, out_caps)
    acc = state_dtype(u.dtype)
    return (
        u.new_empty((batch, out_caps, out_d)),
        u.new_empty(state, dtype=acc),
        u.new_empty(state, dtype=acc),
        u.new_empty(lse, dtype=acc),
    )


def _shared_fwd_fake(
    u, weight, prior, bias, iterations, softmax_in, detach_inner, leaky, squash_eps, batch_mean
):
    batch, in_caps, out_caps, out_d = u.shape[0], weight.shape[0], weight.shape[1], weight.shape[3]
    state = (batch, iterations, out_caps, out_d)
    acc = state_dtype(u.dtype)
    return (
        u.new_empty((batch, out_caps, out_d)),
        u.new_empty(state, dtype=acc),
        u.new_empty(state, dtype=acc),
        u.new_empty((iterations, in_caps, out_caps), dtype=acc),
    )


def _bwd_fake(
    grad_v, u, weight, prior, bias, s, v_prev, lse, iterations, softmax_in, detach_inner,
    leaky, squash_eps, need_du, need_dweight, need_dprior, need_dbias,
):  # fmt: skip
    # Each gradient has its input's dtype, also when it is not needed and comes back as [0].
    need_dprior = need_dprior and prior is not None
    need_dbias = need_dbias and bias is not None
    return (
        u.new_empty(u.shape if need_du else (0,)),
        weight.new_empty(weight.shape if need_dweight else (0,)),
        (u if prior is None else prior).new_empty(prior.shape if need_dprior else (0,)),
        (u if bias is None else bias).new_empty(bias.shape if need_dbias else (0,)),
    )


def _shared_bwd_fake(
    grad_v, u, weight, prior, bias, s, v_iter, c, iterations, softmax_in, detach_inner, leaky,
    squash_eps, batch_mean, need_du, need_dweight, need_dprior, need_dbias,
):  # fmt: skip
    # The gradients' shapes do not depend on the saved states or on batch_mean.
    return _bwd_fake(
        grad_v, u, weight, prior, bias, s, v_iter, c, iterations, softmax_in, detach_inner,
        leaky, squash_eps, need_du, need_dweight, need_dprior, need_dbias,
    )  # fmt: skip


def _setup_context(ctx, inputs, output) -> None:
    u, weight, prior, bias = inputs[:4]
    _, s, v_prev, lse = output
    ctx.mark_non_differentiable(s, v_prev, lse)
    ctx.save_for_backward(u, weight, prior, bias, s, v_prev, lse)
    # iterations, softmax_in, detach_inner, leaky, squash_eps (and batch_mean: shared logits)
    ctx.routing_args = tuple(inputs[4:])


def register(prefix: str, shared: bool = False) -> None:
    """Register the fakes of capsnet_fused::<prefix>_routing_fwd / _bwd (shared=True:
    <prefix>_shared_routing_fwd / _bwd), the forward's autograd, which calls the backward op (so
    torch.compile sees one opaque node each way), and the backward's, which raises: double
    backward is not supported."""
    name = f"{prefix}_shared_routing" if shared else f"{prefix}_routing"
    fwd_name = f"capsnet_fused::{name}_fwd"
    bwd_name = f"capsnet_fused::{name}_bwd"
    bwd_op = getattr(torch.ops.capsnet_fused, f"{name}_bwd")

    def backward(ctx, grad_v, _grad_s, _grad_v_prev, _grad_lse):
        u, weight, prior, bias, s, v_prev, lse = ctx.saved_tensors
        need = list(ctx.needs_input_grad[:4])
        need[2] = need[2] and prior is not None
        need[3] = need[3] and bias is not None
        rest = (None,) * len(ctx.routing_args)
        if not any(need):
            return (None,) * 4 + rest
        grads = bwd_op(grad_v, u, weight, prior, bias, s, v_prev, lse, *ctx.routing_args, *need)
        return tuple(g if n else None for g, n in zip(grads, need, strict=True)) + rest

    def double_backward(ctx, *_grads):
        raise RuntimeError(
            f"{bwd_name} is not differentiable: the fused routing backends give first-order "
            f"gradients only. For double backward (differentiating a gradient taken with "
            f"create_graph=True) use backend='reference'."
        )

    torch.library.register_fake(fwd_name)(_shared_fwd_fake if shared else _fwd_fake)
    torch.library.register_fake(bwd_name)(_shared_bwd_fake if shared else _bwd_fake)
    torch.library.register_autograd(fwd_name, backward, setup_context=_setup_context)
    # Without an autograd kernel, differentiating the backward op would silently give zero.
    torch.library.register_autograd(
        bwd_name, double_backward, setup_context=lambda ctx, inputs, output: None
    )


def _refuse_function_transforms(prefix: str, tensors) -> None:
    """Raise where the fused ops would give a wrong derivative or torch's obscure error.

    Forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad) would silently drop
    the tangent: the ops have no jvp rule. torch.func.grad / vjp / jacrev fail inside torch
    (register_autograd's generated autograd.Function has no setup_context). torch.func.vmap works.
    """
    if any(forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        what = "forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad)"
    elif any(t.requires_grad for t in tensors) and any(
        i.key() == torch._C._functorch.TransformType.Grad
        for i in retrieve_all_functorch_interpreters()
    ):
        what = "torch.func.grad, vjp and jacrev (torch.func.vmap works)"
    else:
        return
    raise NotImplementedError(
        f"the fused routing backend {prefix!r} does not support {what}; "
        f"use backend='reference' for it"
    )


def _call_forward(prefix: str, op: str, u, weight, prior, bias, *args) -> torch.Tensor:
    """v from capsnet_fused::<prefix>_<op>_fwd(u, weight, prior, bias, *args), after refusing
    the function transforms the fused ops do not support."""
    # Skipped while torch.compile traces, so that these checks of Python-level autograd
    # state stay out of the graph.
    if not torch.compiler.is_compiling():
        tensors = [t for t in (u, weight, prior, bias) if t is not None]
        _refuse_function_transforms(prefix, tensors)
    forward = getattr(torch.ops.capsnet_fused, f"{prefix}_{op}_fwd")
    v, _, _, _ = forward(u, weight, prior, bias, *args)
    return v


def call_routing(
    prefix: str,
    u: torch.Tensor,
    weight: torch.Tensor,
    prior: torch.Tensor | None,
    bias: torch.Tensor | None,
    iterations: int,
    softmax_over: str,
    detach_inner: bool,
    leaky: bool,
    squash_eps: float,
) -> torch.Tensor:
    """A backend's routing (the contract in capsnet_fused/backends/__init__.py): v [B, J, M]
    from u [B, I, N], weight [I, J, N, M], prior [I, J] or None, bias [J, M] or None
    (validated), by capsnet_fused::<prefix>_routing_fwd."""
    softmax_in = softmax_over == "in_caps"
    return _call_forward(
        prefix, "routing", u, weight, prior, bias, iterations, softmax_in, detach_inner, leaky,
        squash_eps,
    )  # fmt: skip


def call_shared_routing(
    prefix: str,
    u: torch.Tensor,
    weight: torch.Tensor,
    prior: torch.Tensor | None,
    bias: torch.Tensor | None,
    iterations: int,
    softmax_over: str,
    detach_inner: bool,
    leaky: bool,
    squash_eps: float,
    shared_logits: str,
) -> torch.Tensor:
    """A backend's shared_routing (the contract in capsnet_fused/backends/__init__.py,
    shared_logits "mean" or "sum"): v [B, J, M] as call_routing's, routed with logits shared by
    the batch, by capsnet_fused::<prefix>_shared_routing_fwd."""
    softmax_in = softmax_over == "in_caps"
    batch_mean = shared_logits == "mean"
    return _call_forward(
        prefix, "shared_routing", u, weight, prior, bias, iterations, softmax_in, detach_inner,
        leaky, squash_eps, batch_mean,
    )  # fmt: skip
