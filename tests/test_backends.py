"""The conformance suite: every fused implementation of the routing op (tests/implementations.py:
the cpp CPU kernels, Triton, the CUDA kernels emulated on the CPU and, with a GPU, both on CUDA)
passes the same checks against the float64 reference, with routing logits per sample and shared
by the batch (shared_logits "mean" and "sum"). Test ids read implementation-device-shape-
variant[-options]-dtype. The shapes, variants and options come from tests/helpers.py.

What belongs to one implementation stays in its own file: tests/test_cpp.py (the ISA clones and
the u_hat cache, threads, kernel info), tests/test_triton.py and tests/test_triton_shared.py
(tiles, grids, launch counts, allocations), tests/test_cuda_emulated.py and
tests/test_cuda_emulated_shared.py (tile configurations, thread orders).
"""

from __future__ import annotations

import pytest
import torch

from capsnet_fused import reference_routing
from capsnet_fused.reference import SQUASH_EPS, coupling_softmax, squash
from tests.helpers import (
    ALL_OPTIONS,
    BATCH_SHAPES,
    OPTION_CASES,
    SHAPES,
    SINGLE_OPTIONS,
    VARIANTS,
    Options,
    Shape,
    Variant,
    assert_matches_reference,
    reference64,
    rel_error,
    run_with_grads,
    shared,
)
from tests.implementations import (
    BF16,
    F16,
    F32,
    F64,
    Case,
    case_inputs,
    for_each,
    inputs_and_reference,
)

MODES = ("mean", "sum")
SOFTMAX = ("out_caps", "in_caps")


@pytest.fixture
def impl(request, monkeypatch):
    """The implementation under test, set up (or skipped, with the reason)."""
    implementation = request.param
    implementation.setup(implementation.device, monkeypatch)
    return implementation


V = {v.id: v for v in VARIANTS}
GRID_SHAPES = SHAPES + BATCH_SHAPES
# Every shape and variant, both dtypes.
REFERENCE_CASES = [Case(s, v, dtype=d) for s in GRID_SHAPES for v in VARIANTS for d in (F32, F64)]
# The options of issue 15 with the variants (OPTION_CASES): one sample tile and several capsule
# blocks, J = 1 and M = 1, an odd shape (R = 4), several sample vectors and a ragged last one,
# one iteration and pose vectors of four 32-byte vectors.
OPTION_SHAPES = [SHAPES[0], SHAPES[1], SHAPES[3], BATCH_SHAPES[0], BATCH_SHAPES[2]]
REFERENCE_CASES += [
    Case(s, v, o, d) for s in OPTION_SHAPES for v, o in OPTION_CASES for d in (F32, F64)
]
# Shared logits: every combination (variant x bias x leaky x squash eps x mode, 192), each on one
# of the shapes in turn, both dtypes.
SHARED_COMBINATIONS = [
    (shared(v, mode), Options(bias, leaky, eps))
    for v in VARIANTS
    for bias in (False, True)
    for leaky in (False, True)
    for eps in (SQUASH_EPS, 0.0, 0.05)
    for mode in MODES
]
SHARED_CASES = [
    Case(GRID_SHAPES[k % len(GRID_SHAPES)], v, o, d)
    for k, (v, o) in enumerate(SHARED_COMBINATIONS)
    for d in (F32, F64)
]
# Ten iterations.
MANY_ITERATIONS = [
    Case(Shape(2, 37, 10, 8, 16, 10), V["out_caps-prior"], dtype=F32),
    Case(Shape(2, 37, 10, 8, 16, 10), V["in_caps-prior-detach"], dtype=F32),
    Case(Shape(3, 7, 3, 3, 4, 10), shared(V["in_caps-prior"], "mean"), ALL_OPTIONS[0]),
] + [
    Case(Shape(2, 21, 5, 4, 8, 10), Variant(s, True, False, mode), dtype=F32)
    for s in SOFTMAX
    for mode in (None, "mean")
]

# The Triton interpreter's cases (seconds each): the odd shapes in float32 (I = 200 with two
# variants), one odd shape in float64 with every variant and option case, float32 options on
# several capsule blocks; shared logits in float64 on J = 3 in two output-capsule blocks (every
# variant, mode and option set), the odd shapes in float32, four of the 192 combinations.
LARGEST = max(SHAPES, key=lambda s: s.B * s.I * s.J * s.M * s.R)
INTERPRETER_FLOAT32_OPTIONS = [
    (v, o)
    for v, o in OPTION_CASES
    if not v.detach_inner and v.prior == (v.softmax_over == "in_caps")
]
INTERPRETER_REFERENCE_CASES = (
    [Case(s, v, dtype=F32) for s in SHAPES if s != LARGEST for v in VARIANTS]
    + [Case(LARGEST, V[v], dtype=F32) for v in ("out_caps-prior", "in_caps-detach")]
    + [Case(SHAPES[3], v) for v in VARIANTS]
    + [Case(SHAPES[3], v, o) for v, o in OPTION_CASES]
    + [Case(SHAPES[0], v, o, F32) for v, o in INTERPRETER_FLOAT32_OPTIONS]
    + [
        Case(Shape(3, 11, 3, 3, 4, 3), shared(v, MODES[(k + n) % 2]), o)
        for k, v in enumerate(VARIANTS)
        for n, o in enumerate([Options(), *ALL_OPTIONS])
    ]
    + [
        Case(Shape(3, 11, 3, 3, 4, 3), shared(VARIANTS[3 * k % 8], MODES[k % 2]), o)
        for k, o in enumerate(SINGLE_OPTIONS)
    ]
    + [
        Case(
            s,
            shared(VARIANTS[3 * k % 8], MODES[k % 2]),
            [Options(), ALL_OPTIONS[0]][k // 2 % 2],
            F32,
        )
        for k, s in enumerate(SHAPES)
        if s != LARGEST
    ]
    + [SHARED_CASES[2 * k + 1] for k in (0, 37, 101, 190)]
    + MANY_ITERATIONS[:3]
)


@for_each(REFERENCE_CASES + SHARED_CASES + MANY_ITERATIONS, INTERPRETER_REFERENCE_CASES)
def test_matches_reference(impl, case):
    (u, weight, prior, bias, grad), want = inputs_and_reference(case, impl.device)
    got = run_with_grads(impl, u, weight, prior, grad, bias=bias, **case.kwargs())
    assert got[0].dtype == case.dtype
    assert_matches_reference(got, want, impl.tol(case.dtype))


# ---------------------------------------------------------------------------- the gradients

# detach_inner changes the gradients on purpose (they are not the derivative): not here.
GRADCHECK_VARIANTS = [v for v in VARIANTS if not v.detach_inner]
GRADCHECK_SHAPES = [Shape(2, 6, 3, 3, 4, 3), Shape(1, 4, 2, 2, 16, 2)]
GRADCHECK_CASES = (
    [Case(s, v) for s in GRADCHECK_SHAPES for v in GRADCHECK_VARIANTS]
    + [
        Case(GRADCHECK_SHAPES[0], v, Options(bias=True, leaky=True, squash_eps=eps))
        for v in GRADCHECK_VARIANTS
        for eps in (0.0, 0.05)
    ]
    + [
        Case(GRADCHECK_SHAPES[0], GRADCHECK_VARIANTS[0], Options(squash_eps=0.0)),
        Case(GRADCHECK_SHAPES[0], GRADCHECK_VARIANTS[3], Options(leaky=True, squash_eps=0.0)),
    ]
    + [
        Case(Shape(3, 6, 3, 3, 4, 3), shared(V[v], mode), o)
        for v, mode, o in [
            ("out_caps-prior", "mean", Options(bias=True)),
            ("in_caps-prior", "mean", Options(bias=True, leaky=True, squash_eps=0.0)),
            ("out_caps", "sum", Options(bias=True, leaky=True, squash_eps=0.05)),
            ("in_caps-prior", "sum", Options(squash_eps=0.05)),
        ]
    ]
    + [
        Case(Shape(3, 5, 3, 2, 3, 3), shared(v, MODES[k % 2]), ALL_OPTIONS[0])
        for k, v in enumerate(GRADCHECK_VARIANTS)
    ]
    + [
        Case(Shape(3, 5, 3, 2, 3, 3), shared(GRADCHECK_VARIANTS[k], mode), o)
        for k, mode, o in [
            (0, "sum", Options(squash_eps=0.0)),
            (3, "mean", Options(leaky=True, squash_eps=0.0)),
            (1, "sum", Options(bias=True)),
        ]
    ]
)
INTERPRETER_GRADCHECK_CASES = [
    Case(Shape(2, 5, 3, 3, 4, 3), Variant(s, True), o)
    for s in SOFTMAX
    for o in [Options(), *(Options(bias=True, leaky=True, squash_eps=e) for e in (0.0, 0.05))]
] + [
    Case(Shape(3, 5, 3, 2, 3, 3), Variant(s, True, False, "mean"), ALL_OPTIONS[0]) for s in SOFTMAX
]


@for_each(GRADCHECK_CASES, INTERPRETER_GRADCHECK_CASES)
def test_gradcheck(impl, case):
    u, weight, prior, bias, _ = case_inputs(case, impl.device)
    inputs = [t.requires_grad_() for t in (u, weight, prior, bias) if t is not None]

    def fn(u, weight, *optional):
        rest = list(optional)
        p = rest.pop(0) if prior is not None else None
        b = rest.pop(0) if bias is not None else None
        return impl(u, weight, p, b, **case.kwargs())

    # fast_mode checks random projections of the Jacobian: a few interpreted launches instead
    # of two per input element.
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=impl.interpreted)


# detach_inner's gradient is by definition not the derivative, so gradcheck does not apply:
# against autograd through the reference, which detaches the same way, in float64.
DETACH_CASES = [
    Case(Shape(3, 11, 4, 3, 5, 4), Variant(s, p, True)) for s in SOFTMAX for p in (False, True)
]


@for_each(DETACH_CASES)
def test_detach_inner_matches_reference_autograd(impl, case):
    (u, weight, prior, bias, grad), want = inputs_and_reference(case, impl.device)
    got = run_with_grads(impl, u, weight, prior, grad, bias=bias, **case.kwargs())
    assert_matches_reference(got, want, 1e-12)


# One odd shape: every variant plain, every third with all the options (eps 0), one at eps 0.05;
# shared logits on every 23rd combination and four more.
OPCHECK_CASES = (
    [Case(Shape(2, 5, 3, 2, 4, 2), v) for v in VARIANTS]
    + [Case(Shape(2, 5, 3, 2, 4, 2), v, ALL_OPTIONS[1]) for v in VARIANTS[::3]]
    + [Case(Shape(2, 5, 3, 2, 4, 2), VARIANTS[7], ALL_OPTIONS[0])]
    + [Case(Shape(3, 5, 3, 2, 4, 2), v, o) for v, o in SHARED_COMBINATIONS[::23]]
    + [
        Case(Shape(2, 5, 3, 2, 4, 2), shared(VARIANTS[k], mode), o)
        for k, mode, o in [
            (0, "mean", Options()),
            (3, "sum", ALL_OPTIONS[1]),
            (6, "mean", ALL_OPTIONS[0]),
            (7, "sum", Options(bias=True)),
        ]
    ]
)
INTERPRETER_OPCHECK_CASES = [
    Case(Shape(2, 11, 3, 3, 5, 2), Variant(s, True), o, F32)
    for s in SOFTMAX
    for o in (Options(), ALL_OPTIONS[1])
] + [
    Case(Shape(2, 6, 3, 3, 4, 2), shared(V["out_caps-prior"], "mean"), Options(), F32),
    Case(Shape(2, 6, 3, 3, 4, 2), shared(V["in_caps-prior"], "sum"), ALL_OPTIONS[1], F32),
]


@for_each(OPCHECK_CASES, INTERPRETER_OPCHECK_CASES)
def test_opcheck(impl, case):
    u, weight, prior, bias, grad = case_inputs(case, impl.device)
    mode = case.variant.shared_logits
    detached = (u, weight, prior, bias)
    leaves = [None if t is None else t.clone().requires_grad_() for t in detached]
    fwd, bwd = impl.op("fwd", mode), impl.op("bwd", mode)
    # Called bare first: opcheck would wrap an exception of the op in its own.
    _, *states = fwd(*detached, *case.flags())
    torch.library.opcheck(fwd, (*leaves, *case.flags()))
    needs = (True, True, prior is not None, bias is not None)
    torch.library.opcheck(bwd, (grad, *detached, *states, *case.flags(), *needs))


NEEDS_CASES = [
    Case(Shape(B, 9, 4, 3, 5, 3), Variant("in_caps", True, d, mode), Options(bias=True, leaky=True))
    for B, mode in ((2, None), (3, "mean"))
    for d in (False, True)
]


@for_each(NEEDS_CASES)
def test_gradients_only_for_inputs_that_need_them(impl, case):
    # With detach_inner, a bias's or prior's gradient alone still needs the whole dL/dV chain.
    (u, weight, prior, bias, grad), (_, want) = inputs_and_reference(case, impl.device)
    tol, mode, flags = impl.tol(case.dtype), case.variant.shared_logits, case.flags()
    fwd, bwd = impl.op("fwd", mode), impl.op("bwd", mode)
    _, *states = fwd(u, weight, prior, bias, *flags)
    for k in range(4):
        needs = tuple(k == n for n in range(4))
        got_all = bwd(grad, u, weight, prior, bias, *states, *flags, *needs)
        for need, got, ref in zip(needs, got_all, want, strict=True):
            if need:
                assert rel_error(got, ref) < tol, k
            else:
                assert got.shape == (0,), k
    # No bias: no bias gradient, even when asked for.
    _, *states = fwd(u, weight, prior, None, *flags)
    *_, d_bias = bwd(grad, u, weight, prior, None, *states, *flags, True, True, True, True)
    assert d_bias.shape == (0,)
    # Through autograd: the weight's gradient alone.
    w_leaf = weight.clone().requires_grad_()
    v = impl(u, w_leaf, prior, bias, **case.kwargs())
    (d_weight,) = torch.autograd.grad(v, [w_leaf], grad)
    assert rel_error(d_weight, want[1]) < tol


# ------------------------------------------------------------------- dtypes, layouts, edges

HALF_CASES = [
    Case(Shape(2, 37, 10, 8, 16, 3), v, o, d)
    for v, o in [(v, Options()) for v in VARIANTS[::3]]
    + [(VARIANTS[1], ALL_OPTIONS[1]), (VARIANTS[6], ALL_OPTIONS[0])]
    for d in (F16, BF16)
] + [
    Case(Shape(B, 37, 10, 8, 16, 3), shared(VARIANTS[k], mode), o, d)
    for B, k, mode, o in [
        (3, 0, "mean", Options()),
        (3, 3, "sum", ALL_OPTIONS[1]),
        (3, 6, "mean", ALL_OPTIONS[0]),
        (4, 6, "mean", Options(bias=True)),
    ]
    for d in (F16, BF16)
]
INTERPRETER_HALF_CASES = [
    Case(s, V[v], dtype=d)
    for s, v in [
        (SHAPES[0], "out_caps-prior"),
        (SHAPES[2], "in_caps-detach"),
        (SHAPES[3], "in_caps-prior"),
    ]
    for d in (F16, BF16)
] + [
    Case(Shape(3, 20, 10, 8, 16, 3), shared(V[v], mode), o, d)
    for v, mode, o in [
        ("out_caps-prior", "mean", Options()),
        ("in_caps-detach", "sum", ALL_OPTIONS[0]),
    ]
    for d in (F16, BF16)
]


@for_each(HALF_CASES, INTERPRETER_HALF_CASES)
def test_half_precision_within_twice_reference_drift(impl, case):
    u, weight, prior, bias, grad = case_inputs(case, impl.device, F64)
    kwargs = case.kwargs()
    exact = reference64(u, weight, prior, grad, bias=bias, **kwargs)
    low = [None if t is None else t.to(case.dtype) for t in (u, weight, prior, bias)]
    got = run_with_grads(impl, *low[:3], grad, bias=low[3], **kwargs)
    # How far the reference itself drifts when run in this dtype.
    drift = run_with_grads(reference_routing, *low[:3], grad, bias=low[3], **kwargs)
    floor = 1e-2 if case.dtype == BF16 else 2e-3
    triples = zip([got[0], *got[1]], [drift[0], *drift[1]], [exact[0], *exact[1]], strict=True)
    for name, (g, low_ref, want) in zip(("v", "du", "dW", "dprior", "dbias"), triples):
        if want is None:
            continue
        assert g.dtype == case.dtype and torch.isfinite(g).all(), name
        err, ref_err = rel_error(g, want), rel_error(low_ref, want)
        budget = min(max(2 * ref_err, floor), 2 * ref_err + 1e-3)
        assert err <= budget, f"{name}: {err:.3g}, the reference in {case.dtype}: {ref_err:.3g}"


NON_CONTIGUOUS_CASES = [
    Case(Shape(3, 13, 4, 3, 6, 3), V["in_caps-prior"]),
    Case(Shape(3, 13, 4, 3, 6, 3), shared(V["out_caps-prior"], "sum")),
    Case(Shape(2, 13, 5, 3, 6, 3), V["in_caps-prior"], dtype=F32),
    Case(Shape(3, 13, 5, 3, 6, 3), shared(V["in_caps-prior"], "sum"), Options(bias=True), F32),
]


@for_each(NON_CONTIGUOUS_CASES, NON_CONTIGUOUS_CASES[2:])
def test_non_contiguous_inputs(impl, case):
    (u, weight, prior, bias, grad), want = inputs_and_reference(case, impl.device)

    def strided(t):
        """Same values, storage in the reversed order of the dimensions."""
        if t is None:
            return None
        dims = list(reversed(range(t.dim())))
        return t.permute(dims).contiguous().permute(dims)

    given = [strided(t) for t in (u, weight, prior, bias, grad)]
    assert not any(t.is_contiguous() for t in given if t is not None)
    got = run_with_grads(impl, *given[:3], given[4], bias=given[3], **case.kwargs())
    assert_matches_reference(got, want, impl.tol(case.dtype))


EMPTY = Shape(0, 7, 3, 2, 4, 3)
EMPTY_CASES = [
    Case(EMPTY, v, Options(bias=b, leaky=b)) for v in VARIANTS[::2] for b in (False, True)
] + [
    Case(EMPTY, shared(v, mode), Options(bias=True, leaky=True))
    for v in VARIANTS[::3]
    for mode in MODES
]


@for_each(EMPTY_CASES)
def test_empty_batch(impl, case):
    u, weight, prior, bias, grad = case_inputs(case, impl.device)
    v, grads = run_with_grads(impl, u, weight, prior, grad, bias=bias, **case.kwargs())
    assert v.shape == (0, 3, 4) and grads[0].shape == (0, 7, 2)
    # No samples: the gradients to the parameters are zero, written by their owners.
    for got, t in zip(grads[1:], (weight, prior, bias)):
        if t is not None:
            assert torch.equal(got, torch.zeros_like(t))
    if case.variant.shared_logits is not None:
        # The saved couplings of an empty batch: the prior's softmax in every iteration.
        _, _, _, c = impl.op("fwd", case.variant.shared_logits)(
            u, weight, prior, bias, *case.flags()
        )
        logits = prior if prior is not None else u.new_zeros(7, 3)
        dim = 1 if case.variant.softmax_over == "out_caps" else 0
        torch.testing.assert_close(c[0], coupling_softmax(logits, dim, case.options.leaky))
        assert all(torch.equal(c[k], c[0]) for k in range(EMPTY.R))


ZERO_CASES = [
    Case(Shape(9, 5, 3, 2, 4, 2), Variant(s, True, False, mode), Options(squash_eps=eps))
    for s in SOFTMAX
    for mode in (None, "mean")
    for eps in (SQUASH_EPS, 0.0)
]


@for_each(ZERO_CASES)
def test_zero_capsules_follow_the_reference(impl, case):
    # u = 0 gives s = 0 in every iteration: v = 0 and zero gradients for eps > 0, NaN (value and
    # gradients) for the eps-free squash, as the reference defines.
    u, weight, prior, bias, grad = case_inputs(case, impl.device)
    u = torch.zeros_like(u)
    v, grads = run_with_grads(impl, u, weight, prior, grad, **case.kwargs())
    ref_v, ref_grads = reference64(u, weight, prior, grad, **case.kwargs())
    for got, want in zip([v, *grads], [ref_v, *ref_grads], strict=True):
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        if case.options.squash_eps == 0.0:
            assert torch.isnan(want).all()
        else:
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


# Logits in the thousands (a softmax without its max subtracted overflows to inf / NaN): the
# prior x 1000 and u x 30, or u and the weight x 40 (case, u's scale, the weight's); with a bias,
# squash inputs of 1e25 (|s|^2 overflows float32).
SUM_WITH_BIAS = shared(V["in_caps-prior"], "sum")
LARGE_CASES = (
    [(Case(Shape(2, 30, 6, 4, 8, 3), Variant(s, True), dtype=F32), 30, 1) for s in SOFTMAX]
    + [(Case(SHAPES[0], Variant(s, True), dtype=F32), 40, 40) for s in SOFTMAX]
    + [
        (Case(Shape(4, 30, 6, 4, 8, 3), Variant(s, True, False, mode), dtype=F32), 30, 1)
        for s in SOFTMAX
        for mode in MODES
    ]
    + [(Case(Shape(3, 11, 4, 3, 5, 3), SUM_WITH_BIAS, Options(bias=True), F32), 30, 1)]
)


@for_each(LARGE_CASES, LARGE_CASES[2:4] + LARGE_CASES[-1:], ids=lambda c: f"{c[0].id}-x{c[1]}")
def test_large_inputs_stay_finite(impl, case):
    case, u_scale, w_scale = case
    u, weight, prior, bias, grad = case_inputs(case, impl.device)
    u, weight, prior = u_scale * u, w_scale * weight, 1000 * prior
    if bias is not None:
        bias = torch.full_like(bias, 1e25)
        bias[0] = 0.0
    v_ref, grads_ref = reference64(u, weight, prior, grad, bias=bias, **case.kwargs())
    assert torch.isfinite(v_ref).all() and all(torch.isfinite(g).all() for g in grads_ref)
    v, grads = run_with_grads(impl, u, weight, prior, grad, bias=bias, **case.kwargs())
    assert torch.isfinite(v).all() and all(torch.isfinite(g).all() for g in grads)
    assert rel_error(v, v_ref) < 1e-4


SQUASH_OVERFLOW_CASES = [
    Case(Shape(2, 9, 3, 4, 5, 1), Variant(shared_logits=m), dtype=F32) for m in (None, "mean")
]


@for_each(SQUASH_OVERFLOW_CASES)
def test_squash_does_not_overflow_in_float32(impl, case):
    # |s| ~ 1e20: |s|^2 overflows float32, so the naive squash gives inf / inf = NaN. The
    # overflow-safe one (scaled by max |s_m|) gives v ~ s / |s| and a finite, exact gradient.
    u, weight, _, _, grad = case_inputs(case, impl.device, F64)
    u = u * 1e20
    out = run_with_grads(impl, u.float(), weight.float(), None, grad, **case.kwargs())
    assert all(torch.isfinite(t).all() for t in [out[0], out[1][1]])
    ref = reference64(u, weight, None, grad, **case.kwargs())
    assert rel_error(out[0], ref[0]) < 1e-5
    assert rel_error(out[1][1], ref[1][1]) < 1e-5


# ------------------------------------------------------------------------ shared logits alone

SHARED_PRIOR_CASES = [Case(Shape(6, 21, 4, 3, 8, 3), shared(V["out_caps-prior"], m)) for m in MODES]


@for_each(SHARED_PRIOR_CASES)
def test_batch_dependence(impl, case):
    # A sample's output changes with the rest of its batch; alone (B = 1) it is routed as with
    # logits per sample, values and gradients.
    u, weight, prior, _, grad = case_inputs(case, impl.device)
    kwargs = case.kwargs()
    whole = impl(u, weight, prior, **kwargs)
    other = u.clone()
    other[1:] = 2 * other[1:].flip(0)
    assert (whole[0] - impl(other, weight, prior, **kwargs)[0]).abs().max() > 1e-4
    alone = run_with_grads(impl, u[:1], weight, prior, grad[:1], **kwargs)
    assert (whole[0] - alone[0][0]).abs().max() > 1e-4
    want = reference64(u[:1], weight, prior, grad[:1], **kwargs)
    assert_matches_reference(alone, want, impl.tol64)
    per_sample_kwargs = {**kwargs, "shared_logits": None}
    per_sample = run_with_grads(impl, u[:1], weight, prior, grad[:1], **per_sample_kwargs)
    assert_matches_reference(alone, per_sample, 1e-12)


STATE_CASES = [
    Case(Shape(3, 9, 4, 3, 5, 3), shared(V["in_caps-prior"], "mean"), Options(True, True)),
    Case(Shape(3, 9, 4, 3, 5, 3), shared(V["in_caps-prior"], "sum"), Options(True, True, 0.0)),
]


@for_each(STATE_CASES)
def test_saved_states_are_the_contract(impl, case):
    # s^k (the squash input) and v^k = squash(s^k) per sample as the reference computes them
    # after k + 1 iterations; the couplings c^k shared by the batch, the first the coupling
    # softmax of the prior, without the leaky logit's share.
    u, weight, prior, bias, _ = case_inputs(case, impl.device)
    forward = impl.op("fwd", case.variant.shared_logits)
    v, s, v_iter, c = forward(u, weight, prior, bias, *case.flags())
    assert s.shape == v_iter.shape == (3, 3, 4, 5) and c.shape == (3, 9, 4)
    kwargs = case.kwargs()
    del kwargs["iterations"]
    for k in range(3):
        want = reference_routing(u, weight, k + 1, prior=prior, bias=bias, **kwargs)
        torch.testing.assert_close(v_iter[:, k], want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(c[0], coupling_softmax(prior, 0, True), rtol=1e-14, atol=0)
    eps = case.options.squash_eps
    torch.testing.assert_close(v_iter, squash(s, eps=eps), rtol=1e-14, atol=1e-16)
    assert torch.equal(v, v_iter[:, -1])
    assert ((c.sum(1) < 1) & (c.sum(1) > 0)).all()


# ------------------------------------------------------------------- compile, determinism

COMPILE_CASES = [
    Case(Shape(3, 9, 4, 3, 5, 3), Variant("in_caps", True, False, m), ALL_OPTIONS[0])
    for m in (None, "mean")
]


@for_each(COMPILE_CASES)
def test_compile_fullgraph(impl, case):
    # Dynamo (no graph break) and AOTAutograd through the fakes and the autograd of the op pair
    # (Inductor for cpp), every option given: the same values and gradients, bit for bit.
    u, weight, prior, bias, grad = case_inputs(case, impl.device)

    def fn(u, weight, prior, bias):
        return impl(u, weight, prior, bias, **case.kwargs())

    compiled = torch.compile(fn, fullgraph=True, backend=impl.compile_backend)
    got = run_with_grads(compiled, u, weight, prior, grad, bias=bias)
    want = run_with_grads(fn, u, weight, prior, grad, bias=bias)
    for a, b in zip([got[0], *got[1]], [want[0], *want[1]], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# Several capsule blocks (and two batch tiles in the interpreter's tiles for the shared logits).
DETERMINISM_CASES = [Case(Shape(3, 37, 5, 4, 12, 3), Variant(s, True), dtype=F32) for s in SOFTMAX]
DETERMINISM_CASES += [
    Case(Shape(9, 20, 5, 4, 12, 3), shared(V["in_caps-prior"], "mean"), ALL_OPTIONS[0], F32)
]


@for_each(DETERMINISM_CASES)
def test_deterministic(impl, case):
    """No float atomics: two runs give bitwise identical outputs and gradients."""
    u, weight, prior, bias, grad = case_inputs(case, impl.device)
    first = run_with_grads(impl, u, weight, prior, grad, bias=bias, **case.kwargs())
    second = run_with_grads(impl, u, weight, prior, grad, bias=bias, **case.kwargs())
    for a, b in zip([first[0], *first[1]], [second[0], *second[1]], strict=True):
        assert torch.equal(a, b)
