"""Einsum reference for dynamic routing: the one truth every fused backend is checked against.

Shapes: u [B, I, N], weight [I, J, N, M], prior [I, J] or None, output v [B, J, M].
"""

from __future__ import annotations

import torch

SQUASH_EPS = 1e-8
SOFTMAX_OVER = ("out_caps", "in_caps")


def squash(s: torch.Tensor, dim: int = -1, eps: float = SQUASH_EPS) -> torch.Tensor:
    """squash(s) = |s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps), finite (zero) at s = 0."""
    sq_norm = (s * s).sum(dim=dim, keepdim=True)
    return sq_norm / (1.0 + sq_norm) * s / torch.sqrt(sq_norm + eps)


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

    validate_routing_args(u, weight, iterations, prior, softmax_over)
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
