"""Shared test cases and comparisons for every routing backend.

Each backend's tests run the same explicit shape and variant lists against the float64
reference: forward and the gradients to u, weight and prior.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch

from capsnet_fused import reference_routing
from capsnet_fused.testing import random_routing_inputs, rel_error  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Shape:
    B: int
    I: int  # noqa: E741
    J: int
    N: int
    M: int
    R: int

    @property
    def id(self) -> str:
        return f"B{self.B}-I{self.I}-J{self.J}-N{self.N}-M{self.M}-R{self.R}"


# Small odd shapes first; kept small so interpreted kernels stay fast on CPU.
SHAPES = [
    Shape(2, 37, 10, 8, 16, 3),
    Shape(1, 5, 1, 3, 1, 1),
    Shape(3, 37, 5, 4, 12, 2),
    Shape(2, 19, 3, 3, 5, 4),
    Shape(1, 64, 10, 8, 16, 1),
    Shape(4, 33, 7, 2, 3, 5),
    Shape(2, 200, 10, 8, 16, 3),
]

# (softmax_over, with_prior, detach_inner)
VARIANTS = list(itertools.product(("out_caps", "in_caps"), (False, True), (False, True)))


def variant_id(variant) -> str:
    softmax_over, with_prior, detach_inner = variant
    return f"{softmax_over}{'-prior' if with_prior else ''}{'-detach' if detach_inner else ''}"


shape_params = pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
variant_params = pytest.mark.parametrize("variant", VARIANTS, ids=[variant_id(v) for v in VARIANTS])


def make_inputs(shape: Shape, with_prior: bool, dtype=torch.float64, device="cpu", seed=0):
    """u [B, I, N], weight [I, J, N, M], prior [I, J] or None, upstream grad [B, J, M]."""
    tensors = random_routing_inputs(shape.B, shape.I, shape.J, shape.N, shape.M, with_prior, seed)
    return tuple(None if t is None else t.to(device=device, dtype=dtype) for t in tensors)


def run_with_grads(fn, u, weight, prior, grad, **kwargs):
    """Call fn(u, weight, prior=..., **kwargs); return v and the gradients (None where absent)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (u, weight)]
    prior_leaf = None if prior is None else prior.detach().clone().requires_grad_(True)
    if prior_leaf is not None:
        leaves.append(prior_leaf)
    v = fn(leaves[0], leaves[1], prior=prior_leaf, **kwargs)
    grads = torch.autograd.grad(v, leaves, grad.to(v.dtype), allow_unused=True)
    grads = list(grads) + ([None] if prior_leaf is None else [])
    return v.detach(), grads


def reference64(u, weight, prior, grad, **kwargs):
    """The float64 reference's output and gradients, on the inputs' device."""
    to64 = lambda t: None if t is None else t.detach().double()  # noqa: E731
    return run_with_grads(reference_routing, to64(u), to64(weight), to64(prior), grad, **kwargs)


def assert_matches_reference(outputs, reference, tol: float, names=("v", "du", "dW", "dprior")):
    """outputs and reference are (v, [du, dW, dprior]) pairs as returned by run_with_grads."""
    (v, grads), (v_ref, grads_ref) = outputs, reference
    for name, got, want in zip(names, [v, *grads], [v_ref, *grads_ref]):
        if want is None:
            assert got is None or got.abs().max() == 0, f"{name}: expected no gradient"
            continue
        assert got is not None, f"{name}: gradient missing"
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert torch.isfinite(got).all(), f"{name}: non-finite values"
        err = rel_error(got, want)
        assert err < tol, f"{name}: relative error {err:.3g} >= {tol:.1g}"
