"""Random routing problems and the error measure, shared by the tests and the benchmark."""

from __future__ import annotations

import torch


def random_routing_inputs(
    B: int,
    I: int,  # noqa: E741 (the shape letter used everywhere)
    J: int,
    N: int,
    M: int,
    with_prior: bool,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """u [B, I, N], weight [I, J, N, M], prior [I, J] or None, upstream grad [B, J, M].

    float64 on the CPU, the same in every process for a seed. Scaled so that u_hat is O(1):
    the squash and the agreement updates are non-trivial. The prior is drawn either way, so
    u, weight and grad do not depend on with_prior.
    """
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    u = 0.6 * torch.randn(B, I, N, generator=gen, dtype=f64)
    weight = torch.randn(I, J, N, M, generator=gen, dtype=f64) / N**0.5
    prior = torch.randn(I, J, generator=gen, dtype=f64)
    grad = torch.randn(B, J, M, generator=gen, dtype=f64)
    return u, weight, prior if with_prior else None, grad


def rel_error(out: torch.Tensor, ref: torch.Tensor, floor: float = 1e-6) -> float:
    """||out - ref|| / max(||ref||, floor), computed in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(floor)).item()
