"""Einsum reference for dynamic routing: the one truth every fused backend is checked against.

Shapes: u [B, I, N], weight [I, J, N, M], prior [I, J] or None, output v [B, J, M].
"""

from __future__ import annotations

import torch

SQUASH_EPS = 1e-8
SOFTMAX_OVER = ("out_caps", "in_caps")


def squash(s: torch.Tensor, dim: int = -1, eps: float = SQUASH_EPS) -> torch.Tensor:
    """squash(s) = |s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps), finite (zero) at s = 0.

    Computed without overflow (the formulation every backend uses): with a = max |s_m|,
    t = s / a, qt = |t|^2 in [1, M] and r = 1 / a^2,
            squash(s) = t / (1 + r / qt) / sqrt(qt + eps r),
    so |s| up to the dtype's maximum gives a unit vector instead of 0 or NaN (|s|^2 overflows
    float32 once |s| > 1.8e19, float16 once |s| > 256). float16 and bfloat16 inputs are
    computed in float32 and the result cast back. a is a constant to autograd: v does not depend
    on it, so every derivative (double backward included) is exact.
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
    return torch.where(nonzero, g * t, torch.zeros_like(t)).to(s.dtype)


def reference_routing(
    u: torch.Tensor,
    weight: torch.Tensor,
    iterations: int = 3,
    *,
    prior: torch.Tensor | None = None,
    softmax_over: str = "out_caps",
    detach_inner: bool = False,
) -> torch.Tensor:
    """Dynamic routing (Sabour et al. 2017, Procedure 1) as plain PyTorch ops.

    u [B, I, N] input capsules, weight [I, J, N, M], prior [I, J] initial logits or None.
    Returns v [B, J, M] after `iterations` weighted sums. softmax_over="out_caps" normalises
    the couplings of each input capsule over the output capsules (the paper); "in_caps"
    normalises over input capsules (labml, gram-ai, cezannec). detach_inner=True routes with
    u_hat detached everywhere except the final weighted sum (CapsNet-Keras).
    """
    # Imported here: ops imports this module.
    from capsnet_fused.ops import validate_routing_args

    iterations = validate_routing_args(u, weight, iterations, prior, softmax_over)
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
        coupling = torch.softmax(logits, dim=softmax_dim)
        s = torch.einsum("bij,bijm->bjm", coupling, u_hat if last else u_hat_inner)
        v = squash(s)
        if not last:
            logits = logits + torch.einsum("bijm,bjm->bij", u_hat_inner, v)
    return v
