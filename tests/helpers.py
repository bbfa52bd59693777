"""Shared test cases and comparisons for every routing backend.

Each backend's tests run the same explicit shape and variant lists against the float64
reference: forward and the gradients to u, weight, prior and bias. The routing variants are the
benchmark's (capsnet_fused/benchmark/cases.py: Variant, ALL_VARIANTS), so that the tests and the
benchmark name and run the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from capsnet_fused import reference_routing
from capsnet_fused.benchmark.cases import ALL_VARIANTS, Variant
from capsnet_fused.reference import SQUASH_EPS
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
# Batches that fill several sample vectors (8 float32 / 4 float64 lanes of the cpp kernels),
# groups of two vectors, several backward chunks (32 float32 / 16 float64 samples) and a ragged
# last vector; pose sizes of one, two and four vectors and a size that is none of those; then
# batches of several sample tiles (24) with a ragged last one, N = 1, and several column panels
# with a ragged last one (J M = 40, 160). N = 9 in the first: a full block of the cpp kernel's
# eight du rows on batches of several sample vectors, and one row more.
BATCH_SHAPES = [
    Shape(77, 13, 5, 9, 16, 3),
    Shape(45, 9, 3, 3, 8, 2),
    Shape(33, 6, 4, 5, 32, 1),
    Shape(20, 5, 2, 2, 7, 4),
    Shape(30, 50, 3, 1, 12, 3),
    Shape(26, 11, 1, 3, 40, 2),
]

# The eight routing variants with logits per sample (softmax_over x prior x detach_inner); a
# variant with shared_logits="mean" or "sum" is Variant(..., shared_logits=mode).
VARIANTS = list(ALL_VARIANTS)


def shared(variant: Variant, mode: str) -> Variant:
    """The variant with routing logits shared by the batch (mode "mean" or "sum")."""
    return Variant(variant.softmax_over, variant.prior, variant.detach_inner, mode)


shape_params = pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
variant_params = pytest.mark.parametrize("variant", VARIANTS, ids=[v.id for v in VARIANTS])


@dataclass(frozen=True)
class Options:
    """The routing options of issue 15, on top of a variant: a learned bias [J, M] added to s
    before every squash, leaky routing, the squash eps."""

    bias: bool = False
    leaky: bool = False
    squash_eps: float = SQUASH_EPS

    @property
    def id(self) -> str:
        parts = (["bias"] if self.bias else []) + (["leaky"] if self.leaky else [])
        if self.squash_eps != SQUASH_EPS:
            parts.append(f"eps{self.squash_eps:g}")
        return "-".join(parts) or "default"

    def kwargs(self) -> dict:
        """leaky and squash_eps as routing keywords (the bias is a tensor: make_bias)."""
        return dict(leaky=self.leaky, squash_eps=self.squash_eps)


# squash_eps 0.05 is large next to |s|^2 ~ 1 here, so a backend that ignores it fails even the
# float32 tolerance; 0 is the eps-free squash of the published implementations.
SINGLE_OPTIONS = [
    Options(bias=True),
    Options(leaky=True),
    Options(squash_eps=0.0),
    Options(squash_eps=0.05),
]
ALL_OPTIONS = [
    Options(bias=True, leaky=True, squash_eps=0.05),
    Options(bias=True, leaky=True, squash_eps=0.0),
]
# Each option meets each existing variant at least once (every variant with all of them on, at
# both squash eps), and each option alone meets four variants: an explicit list, not the full
# product of variants and options.
OPTION_CASES = [(variant, options) for variant in VARIANTS for options in ALL_OPTIONS] + [
    (variant, SINGLE_OPTIONS[(k + shift) % len(SINGLE_OPTIONS)])
    for k, variant in enumerate(VARIANTS)
    for shift in (0, 1)
]


def option_case_id(case) -> str:
    variant, options = case
    return f"{variant.id}-{options.id}"


option_case_params = pytest.mark.parametrize(
    "variant, options", OPTION_CASES, ids=[option_case_id(c) for c in OPTION_CASES]
)


def make_bias(shape: Shape, options: Options, dtype=torch.float64, device="cpu", seed=1):
    """bias [J, M] for options.bias (random, O(0.3): it moves the squash visibly), else None."""
    if not options.bias:
        return None
    gen = torch.Generator().manual_seed(seed)
    bias = 0.1 + 0.3 * torch.randn(shape.J, shape.M, generator=gen, dtype=torch.float64)
    return bias.to(device=device, dtype=dtype)


def make_inputs(shape: Shape, with_prior: bool, dtype=torch.float64, device="cpu", seed=0):
    """u [B, I, N], weight [I, J, N, M], prior [I, J] or None, upstream grad [B, J, M]."""
    tensors = random_routing_inputs(shape.B, shape.I, shape.J, shape.N, shape.M, with_prior, seed)
    return tuple(None if t is None else t.to(device=device, dtype=dtype) for t in tensors)


def run_with_grads(fn, u, weight, prior, grad, *, bias=None, **kwargs):
    """Call fn(u, weight, prior=..., **kwargs) (and bias=... when a bias is given); return v
    and the gradients [du, dW, dprior or None] (then dbias when a bias is given)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (u, weight)]
    optional = {}
    for name, t in (("prior", prior), ("bias", bias)):
        optional[name] = None if t is None else t.detach().clone().requires_grad_(True)
        if optional[name] is not None:
            leaves.append(optional[name])
    if bias is None:
        del optional["bias"]
    v = fn(leaves[0], leaves[1], **optional, **kwargs)
    grads = list(torch.autograd.grad(v, leaves, grad.to(v.dtype), allow_unused=True))
    if prior is None:
        grads.insert(2, None)
    return v.detach(), grads


def reference64(u, weight, prior, grad, *, bias=None, **kwargs):
    """The float64 reference's output and gradients, on the inputs' device."""
    to64 = lambda t: None if t is None else t.detach().double()  # noqa: E731
    return run_with_grads(
        reference_routing, to64(u), to64(weight), to64(prior), grad, bias=to64(bias), **kwargs
    )


def assert_matches_reference(
    outputs, reference, tol: float, names=("v", "du", "dW", "dprior", "dbias")
):
    """outputs and reference are (v, [du, dW, dprior, (dbias)]) pairs as returned by
    run_with_grads."""
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
