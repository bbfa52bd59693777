"""Every kernel launch the Triton launchers issue for given shapes, planned on meta tensors:
nothing runs. The ahead-of-time compile check (tests/triton_aot_compile.py) compiles each
distinct launch for sm_80 and sm_90; the traffic model (bench/traffic.py) counts their bytes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from capsnet_fused.backends.triton.launch import KernelLaunch, routing_backward, routing_forward
from capsnet_fused.backends.triton.shared_launch import (
    shared_routing_backward,
    shared_routing_forward,
)


def planned_launches(
    shapes: list[tuple[int, int, int, int, int, int]], dtype: torch.dtype
) -> list[KernelLaunch]:
    """Every launch the launchers issue for (B, I, J, N, M, R) shapes in `dtype` on this build.

    Covers every routing variant and every combination of needed gradients that autograd can
    ask for; built on meta tensors, nothing runs. Used by the ahead-of-time compile check; the
    torch-op launches (TorchLaunch) are left out.
    """
    launches: list[KernelLaunch] = []
    for case in _planned_cases(shapes, dtype):
        u, weight, prior, extra = case.u, case.weight, case.prior, case.extra
        _, s, v_prev, lse = routing_forward(
            u, weight, prior, case.iterations, case.softmax_in, launches, **extra
        )
        s, v_prev, lse = (torch.empty_like(t, device="meta") for t in (s, v_prev, lse))
        for needs in case.needs:
            routing_backward(
                case.grad_v, u, weight, prior, s, v_prev, lse, case.iterations, case.softmax_in,
                case.detach_inner, *needs[:3], record=launches, need_dbias=needs[3], **extra,
            )  # fmt: skip
    return [launch for launch in launches if isinstance(launch, KernelLaunch)]


@dataclass
class _PlannedCase:
    """One routing variant of the launch plans, on meta tensors, and every combination of
    needed gradients (du, dweight, dprior, dbias) that autograd can ask for with it."""

    u: torch.Tensor
    weight: torch.Tensor
    grad_v: torch.Tensor
    prior: torch.Tensor | None
    iterations: int
    softmax_in: bool
    detach_inner: bool
    # Routing logits shared by the batch: their mean (True) or sum (False); None per sample.
    batch_mean: bool | None
    # bias, leaky and squash_eps, as keyword arguments of the launchers
    extra: dict[str, Any]
    needs: list[tuple[bool, bool, bool, bool]]


def _planned_cases(
    shapes: list[tuple[int, int, int, int, int, int]],
    dtype: torch.dtype,
    batch_means: tuple[bool | None, ...] = (None,),
) -> Iterator[_PlannedCase]:
    """The cases of planned_launches (and of planned_shared_launches, with batch_means
    (False, True)) for (B, I, J, N, M, R) shapes in `dtype`."""
    for batch, in_caps, out_caps, in_d, out_d, iterations in shapes:
        u = torch.empty(batch, in_caps, in_d, dtype=dtype, device="meta")
        weight = torch.empty(in_caps, out_caps, in_d, out_d, dtype=dtype, device="meta")
        grad_v = torch.empty(batch, out_caps, out_d, dtype=dtype, device="meta")
        bias = torch.empty(out_caps, out_d, dtype=dtype, device="meta")
        flags = itertools.product(*[(False, True)] * 4, batch_means)
        for softmax_in, with_prior, detach_inner, options, batch_mean in flags:
            prior = (
                torch.empty(in_caps, out_caps, dtype=dtype, device="meta") if with_prior else None
            )
            # The options of the published implementations come together (bias, leaky, eps 0):
            # each only adds code, so one combination covers them for the compile check.
            extra = dict(bias=bias, leaky=True, squash_eps=0.0) if options else {}
            wanted = []
            for needs in itertools.product((False, True), repeat=4):
                if not any(needs) or (needs[2] and not with_prior) or (needs[3] and not options):
                    continue
                wanted.append(needs)
            yield _PlannedCase(
                u, weight, grad_v, prior, iterations, softmax_in, detach_inner, batch_mean, extra,
                wanted,
            )  # fmt: skip


def planned_shared_launches(
    shapes: list[tuple[int, int, int, int, int, int]], dtype: torch.dtype
) -> list[KernelLaunch]:
    """Every kernel launch of the shared-logits launchers for (B, I, J, N, M, R) shapes in
    `dtype`: every variant and every combination of needed gradients autograd can ask for,
    built on meta tensors (nothing runs). For the ahead-of-time compile check."""
    launches: list = []
    for case in _planned_cases(shapes, dtype, batch_means=(False, True)):
        u, weight, prior, extra = case.u, case.weight, case.prior, case.extra
        _, s, v_iter, c = shared_routing_forward(
            u, weight, prior, case.iterations, case.softmax_in, case.batch_mean, launches, **extra
        )
        for needs in case.needs:
            shared_routing_backward(
                case.grad_v, u, weight, prior, s, v_iter, c, case.iterations, case.softmax_in,
                case.detach_inner, case.batch_mean, *needs[:3], record=launches,
                need_dbias=needs[3], **extra,
            )  # fmt: skip
    return [launch for launch in launches if isinstance(launch, KernelLaunch)]
