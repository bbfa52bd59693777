"""Einsum reference for dynamic routing: the one truth every fused backend is checked against.

Shapes: u [B, I, N], weight [I, J, N, M], prior [I, J] or None, output v [B, J, M].
"""

from __future__ import annotations

import torch

# The routing settings' valid values (re-exported from here, where they were first defined).
from capsnet_fused._checks import (  # noqa: F401
    SHARED_LOGITS,
    SOFTMAX_OVER,
    SQUASH_EPS,
    validate_routing_args,
)


def squash(s: torch.Tensor, dim: int = -1, eps: float = SQUASH_EPS) -> torch.Tensor:
    """squash(s) = |s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps), eps >= 0.

    Computed without overflow (the formulation every backend uses): with a = max |s_m|,
    t = s / a, qt = |t|^2 in [1, M] and r = 1 / a^2,
            squash(s) = t / (1 + r / qt) / sqrt(qt + eps r),
    so |s| up to the dtype's maximum gives a unit vector instead of 0 or NaN (|s|^2 overflows
    float32 once |s| > 1.8e19, float16 once |s| > 256). float16 and bfloat16 inputs are
    computed in float32 and the result cast back. a is a constant to autograd: v does not depend
    on it, so every derivative (double backward included) is exact.

    At s = 0: with eps > 0, v = 0 and a zero gradient (the limit). With eps = 0 the formula is
    the eps-free one of the published implementations, s / |s| * |s|^2 / (1 + |s|^2), which is
    0/0 there: v and its gradient are NaN, as theirs are. Every backend follows this.
    """
    x = s.float() if s.dtype in (torch.float16, torch.bfloat16) else s
    a = x.detach().abs().amax(dim=dim, keepdim=True)
    # a != 0 also holds for NaN, which then propagates; an all-zero capsule gives v = 0 (and a
    # zero gradient) through the torch.where below, with a = qt = 1 so that the branch not
    # taken stays finite (a NaN there would leak into the gradient).
    nonzero = a != 0
    a = torch.where(nonzero, a, torch.ones_like(a))
    t = x / a
    qt = torch.where(nonzero, (t * t).sum(dim=dim, keepdim=True), torch.ones_like(a))
    # 1 / a^2 is inf for tiny a (float32: a < 5e-20); the dtype's largest value gives the same
    # forward (v underflows to 0 either way) and keeps inf * 0 = NaN out of the gradient.
    r = (1.0 / (a * a)).clamp(max=torch.finfo(a.dtype).max)
    er = eps * r if eps != 0 else torch.zeros_like(r)
    # qt / (qt + r) is 1 / (1 + r / qt); written so, its derivative for small a does not pass
    # through (qt / r)^2, a float32 denormal (1% error in the gradient at |s| = 1e-10).
    g = qt / (qt + r) / torch.sqrt(qt + er)
    # eps = 0: NaN at s = 0, and NaN as its gradient (x times NaN there, times 0 elsewhere, so
    # that no NaN reaches the gradient of the capsules where the other branch is taken).
    if eps != 0:
        at_zero = torch.zeros_like(t)
    else:
        at_zero = x * torch.where(nonzero, 0.0, float("nan")).to(x.dtype)
    return torch.where(nonzero, g * t, at_zero).to(s.dtype)


def coupling_softmax(logits: torch.Tensor, dim: int, leaky: bool = False) -> torch.Tensor:
    """softmax(logits) over `dim`; with leaky=True one more logit, fixed at 0, joins the
    softmax and its share is dropped: c_k = exp(l_k) / (1 + sum_k' exp(l_k')) (the leaky
    routing of Sabour et al.'s code, there over the output capsules)."""
    if not leaky:
        return torch.softmax(logits, dim=dim)
    shape = list(logits.shape)
    shape[dim] = 1
    padded = torch.cat([logits.new_zeros(shape), logits], dim=dim)
    return torch.softmax(padded, dim=dim).narrow(dim, 1, logits.shape[dim])


def reference_routing(
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
) -> torch.Tensor:
    """Dynamic routing (Sabour et al. 2017, Procedure 1) as plain PyTorch ops.

    u [B, I, N] input capsules, weight [I, J, N, M], prior [I, J] initial logits or None,
    bias [J, M] or None. Returns v [B, J, M] after `iterations` weighted sums.

    - softmax_over="out_caps" normalises the couplings of each input capsule over the output
      capsules (the paper); "in_caps" normalises over input capsules (labml, gram-ai, cezannec).
    - bias is added to every weighted sum before its squash, s^t + bias (the official code's
      learned biases).
    - leaky=True adds one logit fixed at 0 to the softmax axis (the official code's leaky
      routing; over in_caps the extra logit is on the input-capsule axis).
    - detach_inner=True routes with u_hat detached everywhere except the final weighted sum
      (XifengGuo/CapsNet-Pytorch; CapsNet-Keras before December 2017): same values, other
      gradients.
    - squash_eps >= 0 is the eps of squash (see there); 0 reproduces the eps-free squash.
    - shared_logits="mean" or "sum" keeps one set of logits [I, J] for the whole batch
      (starting at the prior, or 0) and adds the batch mean (or sum) of the agreements
      u_hat_bij . v_bj after every iteration but the last, so every sample is routed with the
      same couplings and a sample's output depends on the rest of its batch (xanderchf/pyCapsNet,
      jindongwang/Pytorch-CapsuleNet). The mean over an empty batch is taken as 0.
    """
    iterations, squash_eps = validate_routing_args(
        u, weight, iterations, prior, softmax_over, bias=bias, leaky=leaky,
        squash_eps=squash_eps, shared_logits=shared_logits,
    )  # fmt: skip
    if shared_logits is not None:
        return _shared_logits_routing(
            u, weight, iterations, prior, bias, softmax_over, detach_inner, leaky, squash_eps,
            shared_logits,
        )  # fmt: skip
    batch, in_caps = u.shape[0], u.shape[1]
    out_caps = weight.shape[1]
    softmax_dim = 2 if softmax_over == "out_caps" else 1

    u_hat = torch.einsum("bin,ijnm->bijm", u, weight)
    u_hat_inner = u_hat.detach() if detach_inner else u_hat
    if prior is None:
        logits = u_hat.new_zeros(batch, in_caps, out_caps)
    else:
        logits = prior.to(u_hat.dtype).expand(batch, in_caps, out_caps)

    for t in range(iterations):
        last = t == iterations - 1
        coupling = coupling_softmax(logits, softmax_dim, leaky)
        s = torch.einsum("bij,bijm->bjm", coupling, u_hat if last else u_hat_inner)
        if bias is not None:
            s = s + bias.to(s.dtype)
        v = squash(s, eps=squash_eps)
        if not last:
            logits = logits + torch.einsum("bijm,bjm->bij", u_hat_inner, v)
    return v


def _shared_logits_routing(
    u: torch.Tensor,
    weight: torch.Tensor,
    iterations: int,
    prior: torch.Tensor | None,
    bias: torch.Tensor | None,
    softmax_over: str,
    detach_inner: bool,
    leaky: bool,
    squash_eps: float,
    shared_logits: str,
) -> torch.Tensor:
    """reference_routing with one set of logits [I, J] for the batch (validated arguments)."""
    batch, in_caps = u.shape[0], u.shape[1]
    out_caps = weight.shape[1]
    softmax_dim = 1 if softmax_over == "out_caps" else 0
    u_hat = torch.einsum("bin,ijnm->bijm", u, weight)
    u_hat_inner = u_hat.detach() if detach_inner else u_hat
    if prior is None:
        logits = u_hat.new_zeros(in_caps, out_caps)
    else:
        logits = prior.to(u_hat.dtype)
    for t in range(iterations):
        last = t == iterations - 1
        coupling = coupling_softmax(logits, softmax_dim, leaky)
        s = torch.einsum("ij,bijm->bjm", coupling, u_hat if last else u_hat_inner)
        if bias is not None:
            s = s + bias.to(s.dtype)
        v = squash(s, eps=squash_eps)
        if not last:
            agreement = torch.einsum("bijm,bjm->ij", u_hat_inner, v)
            # The mean of an empty batch is 0 here, not torch.mean's NaN: B = 0 then routes
            # nothing and every gradient is 0, as without shared logits.
            logits = logits + (agreement / max(batch, 1) if shared_logits == "mean" else agreement)
    return v
