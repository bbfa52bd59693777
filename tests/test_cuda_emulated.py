"""The CUDA kernels of the cpp backend (csrc/routing_cuda.cu), run on the CPU under the emulation
of the CUDA execution model (csrc/cuda_emulation.h), against the float64 reference.

The same source that nvcc compiles runs here as C++: every CUDA thread is a fiber, __syncthreads
and warp shuffles are barriers between them, shared memory starts as NaN, and the buffers the
kernels must write start as NaN too. Several tile configurations (tiles that do not divide the
batch or the capsules, more warps than sample groups, one capsule per block) and several thread
orders between barriers (forward, reverse, shuffled) make indexing and barrier bugs show up as
wrong or non-reproducible results.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from capsnet_fused import reference_routing
from capsnet_fused.reference import SQUASH_EPS
from tests import cuda_emulation
from tests.helpers import (
    SHAPES,
    VARIANTS,
    Options,
    Shape,
    Variant,
    assert_matches_reference,
    make_bias,
    make_inputs,
    option_case_id,
    option_case_params,
    reference64,
    rel_error,
    run_with_grads,
    variant_params,
)

OPS = torch.ops.capsnet_fused
TILES_ENV = "CAPSNET_FUSED_CUDA_TILES"
SCHEDULE_ENV = "CUDA_EMU_SCHEDULE"

# Tile configurations (CAPSNET_FUSED_CUDA_TILES) and the thread order each runs in.
# "planned": what the planner picks for the shape (one sample tile, many capsule blocks here).
# "ragged": 5 capsules per sweep block staged 2 at a time, 3 capsules per gradient block,
#   3 samples per gradient stage, 3 warps of combines: none divides the test shapes.
# "wide": 3 warps for 2 sample groups (an idle warp at every barrier), 7 capsules staged at once,
#   one capsule per GEMM split and per gradient block, one sample per gradient stage.
TILES = {
    "planned": ("", "forward"),
    "ragged": (
        "sweep_warps=1,sweep_samples=4,sweep_caps=5,sweep_stage=2,gemm_caps=3,"
        "grads_caps=3,grads_samples=3,grads_warps=3,combine_warps=3",
        "reverse",
    ),
    "wide": (
        "sweep_warps=3,sweep_samples=8,sweep_caps=7,sweep_stage=7,gemm_caps=1,"
        "grads_caps=1,grads_samples=1,grads_warps=1,combine_warps=1",
        "random:7",
    ),
}


@pytest.fixture(scope="module", autouse=True)
def emulated_ops():
    if shutil.which("ninja") is None and not _has_ninja_module():
        pytest.skip("the emulated build needs ninja (pip install ninja)")
    cuda_emulation.load()


def _has_ninja_module() -> bool:
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return False
    return True


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer the kernels must write, workspace included, starts as NaN."""
    monkeypatch.setenv("CAPSNET_FUSED_POISON_OUTPUTS", "1")


@pytest.fixture
def tiles(monkeypatch):
    def use(name: str) -> None:
        spec, schedule = TILES[name]
        monkeypatch.setenv(TILES_ENV, spec)
        monkeypatch.setenv(SCHEDULE_ENV, schedule)

    return use


def emulated_routing(
    u,
    weight,
    prior=None,
    bias=None,
    *,
    iterations,
    softmax_over="out_caps",
    detach_inner=False,
    leaky=False,
    squash_eps=SQUASH_EPS,
):
    return cuda_emulation.routing(
        u, weight, prior, bias, iterations, softmax_over, detach_inner, leaky, squash_eps
    )


def routing_kwargs(shape: Shape, variant, options: Options | None = None) -> dict:
    softmax_over, detach_inner = variant.softmax_over, variant.detach_inner
    kwargs = dict(iterations=shape.R, softmax_over=softmax_over, detach_inner=detach_inner)
    return kwargs if options is None else {**kwargs, **options.kwargs()}


def check_against_reference(shape, variant, dtype, tol, options: Options | None = None):
    u, weight, prior, grad = make_inputs(shape, variant.prior, dtype=dtype)
    bias = None if options is None else make_bias(shape, options, dtype=dtype)
    kwargs = routing_kwargs(shape, variant, options)
    out = run_with_grads(emulated_routing, u, weight, prior, grad, bias=bias, **kwargs)
    assert out[0].dtype == dtype
    want = reference64(u, weight, prior, grad, bias=bias, **kwargs)
    assert_matches_reference(out, want, tol)


@pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
@variant_params
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_matches_reference(shape, variant, dtype, tiles):
    tiles("planned")
    check_against_reference(shape, variant, dtype, 1e-5 if dtype == torch.float32 else 1e-11)


# The options of issue 15 (bias, leaky, squash eps) with the variants (OPTION_CASES): the shapes
# with one sample tile and several capsule blocks, J = 1 and M = 1, and a ragged J x M.
OPTION_SHAPES = [SHAPES[0], SHAPES[1], SHAPES[3]]


@pytest.mark.parametrize("shape", OPTION_SHAPES, ids=[s.id for s in OPTION_SHAPES])
@option_case_params
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_options_match_reference(shape, variant, options, dtype, tiles):
    tiles("planned")
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    check_against_reference(shape, variant, dtype, tol, options)


# Shapes for the other tile configurations: several sample tiles (B = 9, 4 samples a tile),
# a J x M row of more than one pass of 32 lanes and M over 32 (rows spanning passes).
TILE_SHAPES = [
    Shape(9, 37, 10, 8, 16, 3),
    Shape(3, 19, 3, 3, 5, 4),
    Shape(5, 11, 2, 3, 37, 2),
]


@pytest.mark.parametrize("config", ["ragged", "wide"])
@pytest.mark.parametrize("shape", TILE_SHAPES, ids=[s.id for s in TILE_SHAPES])
@variant_params
def test_tile_configurations(shape, variant, config, tiles):
    tiles(config)
    check_against_reference(shape, variant, torch.float64, 1e-11)


# Every option case in both non-default tile configurations, on a shape with several sample
# tiles and capsule blocks in both (leaky's extra logit must join the split-softmax merge once
# per (b, j)), small enough to keep the emulation quick.
OPTION_TILE_SHAPE = Shape(9, 13, 3, 3, 5, 3)


@pytest.mark.parametrize("config", ["ragged", "wide"])
@option_case_params
def test_options_tile_configurations(variant, options, config, tiles):
    tiles(config)
    check_against_reference(OPTION_TILE_SHAPE, variant, torch.float64, 1e-11, options)


@pytest.mark.parametrize("variant", VARIANTS[1::2], ids=[v.id for v in VARIANTS[1::2]])
def test_thread_order_and_os_threads_do_not_change_results(variant, tiles, monkeypatch):
    # Each output has one owner that sums in a fixed order, and every exchange between threads
    # is behind a barrier: the order in which the emulation runs threads between barriers, and
    # how many OS threads run the blocks, must not change a single bit.
    shape = Shape(9, 23, 5, 4, 7, 3)
    u, weight, prior, grad = make_inputs(shape, variant.prior, dtype=torch.float32)
    kwargs = routing_kwargs(shape, variant)
    results = []
    for schedule, threads in [("forward", "1"), ("reverse", "2"), ("random:3", "2")]:
        tiles("ragged")
        monkeypatch.setenv(SCHEDULE_ENV, schedule)
        monkeypatch.setenv("CUDA_EMU_THREADS", threads)
        results.append(run_with_grads(emulated_routing, u, weight, prior, grad, **kwargs))
    first = [results[0][0], *results[0][1]]
    for other in results[1:]:
        for a, b in zip(first, [other[0], *other[1]], strict=True):
            assert (a is None and b is None) or torch.equal(a, b)


GRADCHECK_VARIANTS = [v for v in VARIANTS if not v.detach_inner]
# gradcheck of the options: every non-detach variant with all options on, eps > 0 (at eps = 0
# the squash is not differentiable at s = 0, which these inputs never reach, but keep the
# finite-difference step away from it anyway).
GRADCHECK_OPTION_CASES = [(v, Options(bias=True, leaky=True, squash_eps=0.05)) for v in VARIANTS]
GRADCHECK_OPTION_CASES = [c for c in GRADCHECK_OPTION_CASES if not c[0].detach_inner] + [
    (GRADCHECK_VARIANTS[0], Options(squash_eps=0.0)),
    (GRADCHECK_VARIANTS[3], Options(leaky=True, squash_eps=0.0)),
]


def gradcheck_routing(shape, variant, options=None):
    u, weight, prior, _ = make_inputs(shape, variant.prior)
    bias = None if options is None else make_bias(shape, options)
    inputs = [t.requires_grad_() for t in (u, weight, prior, bias) if t is not None]
    kwargs = routing_kwargs(shape, variant, options)

    def fn(u, weight, *optional):
        rest = list(optional)
        p = rest.pop(0) if prior is not None else None
        b = rest.pop(0) if bias is not None else None
        return emulated_routing(u, weight, p, b, **kwargs)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("variant", GRADCHECK_VARIANTS, ids=[v.id for v in GRADCHECK_VARIANTS])
def test_gradcheck(variant, tiles):
    tiles("ragged")
    gradcheck_routing(Shape(2, 6, 3, 3, 4, 3), variant)


@pytest.mark.parametrize(
    "variant, options",
    GRADCHECK_OPTION_CASES,
    ids=[option_case_id(c) for c in GRADCHECK_OPTION_CASES],
)
def test_gradcheck_options(variant, options, tiles):
    tiles("ragged")
    gradcheck_routing(Shape(2, 6, 3, 3, 4, 3), variant, options)


def op_args(shape, variant, options=None):
    """(forward args, backward args without the saved states) of the emulated ops."""
    softmax_over, with_prior = variant.softmax_over, variant.prior
    detach_inner = variant.detach_inner
    options = options or Options()
    u, weight, prior, grad = make_inputs(shape, with_prior)
    bias = make_bias(shape, options)
    for t in (u, weight, prior, bias):
        if t is not None:
            t.requires_grad_()
    in_caps = softmax_over == "in_caps"
    flags = (shape.R, in_caps, detach_inner, options.leaky, options.squash_eps)
    fwd = (u, weight, prior, bias, *flags)
    detached = [None if t is None else t.detach() for t in (u, weight, prior, bias)]
    return fwd, (grad, *detached), flags


OPCHECK_CASES = [(v, Options()) for v in VARIANTS[::3]] + [
    (VARIANTS[0], Options(bias=True, leaky=True, squash_eps=0.0)),
    (VARIANTS[7], Options(bias=True, leaky=True, squash_eps=0.05)),
]


@pytest.mark.parametrize(
    "variant, options", OPCHECK_CASES, ids=[option_case_id(c) for c in OPCHECK_CASES]
)
def test_opcheck(variant, options):
    shape = Shape(2, 5, 3, 2, 4, 2)
    fwd, bwd_inputs, flags = op_args(shape, variant, options)
    torch.library.opcheck(OPS.cuda_emulated_routing_fwd, fwd)
    _, s, V, lse = OPS.cuda_emulated_routing_fwd(*fwd)
    needs = (True, True, variant.prior, options.bias)
    torch.library.opcheck(OPS.cuda_emulated_routing_bwd, (*bwd_inputs, s, V, lse, *flags, *needs))


@pytest.mark.parametrize("detach_inner", [False, True], ids=["full", "detach"])
def test_gradients_only_for_inputs_that_need_them(detach_inner):
    # With detach_inner, a bias's gradient alone still needs the whole dL/dV chain.
    shape = Shape(2, 9, 4, 3, 5, 3)
    variant = Variant("in_caps", True, detach_inner)
    options = Options(bias=True, leaky=True)
    fwd, (grad, u, weight, prior, bias), flags = op_args(shape, variant, options)
    kwargs = routing_kwargs(shape, variant, options)
    ref = reference64(u, weight, prior, grad, bias=bias, **kwargs)
    _, s, V, lse = OPS.cuda_emulated_routing_fwd(*fwd)
    for k in range(4):
        needs = tuple(k == n for n in range(4))
        got_all = OPS.cuda_emulated_routing_bwd(grad, u, weight, prior, bias, s, V, lse, *flags,
                                                *needs)  # fmt: skip
        for need, got, want in zip(needs, got_all, ref[1], strict=True):
            if need:
                assert rel_error(got, want) < 1e-11
            else:
                assert got.shape == (0,)


HALF_CASES = [(v, Options()) for v in VARIANTS[::3]] + [
    (VARIANTS[1], Options(bias=True, leaky=True, squash_eps=0.0)),
    (VARIANTS[6], Options(bias=True, leaky=True, squash_eps=0.05)),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize(
    "variant, options", HALF_CASES, ids=[option_case_id(c) for c in HALF_CASES]
)
def test_half_precision_within_twice_reference_drift(dtype, variant, options):
    shape = Shape(2, 37, 10, 8, 16, 3)
    u, weight, prior, grad = make_inputs(shape, variant.prior)
    bias = make_bias(shape, options)
    kwargs = routing_kwargs(shape, variant, options)
    exact = reference64(u, weight, prior, grad, bias=bias, **kwargs)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    args = (cast(u), cast(weight), cast(prior), grad)
    out = run_with_grads(emulated_routing, *args, bias=cast(bias), **kwargs)
    drift = run_with_grads(reference_routing, *args, bias=cast(bias), **kwargs)
    triples = zip([out[0], *out[1]], [drift[0], *drift[1]], [exact[0], *exact[1]], strict=True)
    for got, ref_lowp, want in triples:
        if want is None:
            continue
        assert got.dtype == dtype
        budget = max(2 * rel_error(ref_lowp, want), 1e-2 if dtype == torch.bfloat16 else 2e-3)
        assert rel_error(got, want) <= budget


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("variant", VARIANTS[::2], ids=[v.id for v in VARIANTS[::2]])
def test_empty_batch(variant, with_bias):
    shape = Shape(0, 7, 3, 2, 4, 2)
    options = Options(bias=with_bias, leaky=with_bias)
    u, weight, prior, grad = make_inputs(shape, variant.prior)
    bias = make_bias(shape, options)
    kwargs = routing_kwargs(shape, variant, options)
    out = run_with_grads(emulated_routing, u, weight, prior, grad, bias=bias, **kwargs)
    assert out[0].shape == (0, 3, 4)
    assert out[1][0].shape == (0, 7, 2)
    # No samples: the gradients to the parameters are zero, written by their owners.
    assert torch.equal(out[1][1], torch.zeros_like(weight))
    if prior is not None:
        assert torch.equal(out[1][2], torch.zeros_like(prior))
    if bias is not None:
        assert torch.equal(out[1][3], torch.zeros_like(bias))


@pytest.mark.parametrize("softmax_over", ["out_caps", "in_caps"])
def test_many_iterations(softmax_over):
    shape = Shape(2, 21, 5, 4, 8, 10)
    u, weight, prior, grad = make_inputs(shape, True, dtype=torch.float32)
    kwargs = dict(iterations=10, softmax_over=softmax_over)
    out = run_with_grads(emulated_routing, u, weight, prior, grad, **kwargs)
    assert_matches_reference(out, reference64(u, weight, prior, grad, **kwargs), 1e-5)


@pytest.mark.parametrize("softmax_over", ["out_caps", "in_caps"])
def test_large_inputs_stay_finite(softmax_over):
    # Logits in the thousands: a softmax without max subtraction overflows to inf / NaN.
    shape = Shape(2, 30, 6, 4, 8, 3)
    u, weight, prior, grad = make_inputs(shape, True, dtype=torch.float32)
    u, prior = 30 * u, 1000 * prior
    kwargs = dict(iterations=3, softmax_over=softmax_over)
    v, grads = run_with_grads(emulated_routing, u, weight, prior, grad, **kwargs)
    assert torch.isfinite(v).all() and all(torch.isfinite(g).all() for g in grads)
    ref_v, _ = reference64(u, weight, prior, grad, **kwargs)
    assert rel_error(v, ref_v) < 1e-4


def test_squash_does_not_overflow_in_float32():
    # |s| ~ 1e20: |s|^2 overflows float32, so the naive squash gives inf / inf = NaN. The
    # overflow-safe one (scaled by max |s_m|) gives v ~ s / |s| and a finite, exact gradient.
    shape = Shape(2, 9, 3, 4, 5, 1)
    u, weight, prior, grad = make_inputs(shape, False)
    u = u * 1e20
    kwargs = dict(iterations=1)
    out = run_with_grads(emulated_routing, u.float(), weight.float(), None, grad, **kwargs)
    assert all(torch.isfinite(t).all() for t in [out[0], out[1][1]])
    ref = reference64(u, weight, None, grad, **kwargs)
    assert rel_error(out[0], ref[0]) < 1e-5
    assert rel_error(out[1][1], ref[1][1]) < 1e-5


@pytest.mark.parametrize("softmax_over", ["out_caps", "in_caps"])
def test_zero_capsule_squash_eps(softmax_over):
    # u = 0 gives s = 0 in every iteration: v = 0 and zero gradients for eps > 0, NaN (value
    # and gradients) for the eps-free squash, as the reference defines.
    shape = Shape(2, 5, 3, 2, 4, 2)
    u, weight, prior, grad = make_inputs(shape, True)
    u = torch.zeros_like(u)
    for eps in (SQUASH_EPS, 0.0):
        kwargs = dict(iterations=2, softmax_over=softmax_over, squash_eps=eps)
        v, grads = run_with_grads(emulated_routing, u, weight, prior, grad, **kwargs)
        ref_v, ref_grads = reference64(u, weight, prior, grad, **kwargs)
        for got, want in zip([v, *grads], [ref_v, *ref_grads], strict=True):
            assert torch.equal(torch.isnan(got), torch.isnan(want))
            if eps == 0.0:
                assert torch.isnan(want).all()
            else:
                assert torch.isfinite(got).all()
                torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


def test_poisoned_inputs_propagate_nan():
    shape = Shape(3, 8, 3, 2, 4, 2)
    u, weight, prior, _ = make_inputs(shape, True)
    u[1, 2, 0] = float("nan")
    v = emulated_routing(u, weight, prior, iterations=2, softmax_over="in_caps")
    # Softmax over input capsules couples every sample's capsule 2 into its own s only.
    assert torch.isnan(v[1]).all()
    assert torch.isfinite(v[0]).all() and torch.isfinite(v[2]).all()


def test_tiles_that_do_not_fit_raise(monkeypatch):
    u, weight, prior, _ = make_inputs(Shape(2, 3, 2, 2, 3, 2), False)
    monkeypatch.setenv(TILES_ENV, "sweep_samples=6")
    with pytest.raises(RuntimeError, match="multiple of 4"):
        emulated_routing(u, weight, prior, iterations=2)
    monkeypatch.setenv(TILES_ENV, "sweep_width=6")
    with pytest.raises(RuntimeError, match="unknown tile"):
        emulated_routing(u, weight, prior, iterations=2)


def test_compile_fullgraph_with_options():
    # Dynamo (no graph break) and AOTAutograd through the fakes and the autograd of the op
    # pair with every option given: bias (and its gradient), leaky, a squash eps.
    shape = Shape(3, 9, 4, 3, 5, 3)
    options = Options(bias=True, leaky=True, squash_eps=0.05)
    u, weight, prior, grad = make_inputs(shape, True)
    bias = make_bias(shape, options)
    kwargs = routing_kwargs(shape, Variant("in_caps", True, False), options)

    def fn(u, weight, prior, bias):
        return emulated_routing(u, weight, prior, bias, **kwargs)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = run_with_grads(lambda u, w, prior, bias: compiled(u, w, prior, bias),
                         u, weight, prior, grad, bias=bias)  # fmt: skip
    want = run_with_grads(lambda u, w, prior, bias: fn(u, w, prior, bias),
                          u, weight, prior, grad, bias=bias)  # fmt: skip
    for a, b in zip([got[0], *got[1]], [want[0], *want[1]], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
