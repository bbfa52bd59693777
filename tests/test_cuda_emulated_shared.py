"""The CUDA kernels for routing logits shared by the batch (issue 18; csrc/routing_cuda.cu), run
on the CPU under the emulation of the CUDA execution model, against the float64 reference.

As in tests/test_cuda_emulated.py: the source nvcc compiles runs here as C++ (every CUDA thread a
fiber, barriers and shuffles between them, shared memory and every buffer the kernels must
write NaN-filled), registered as the test-only ops capsnet_fused::cuda_emulated_shared_routing_fwd
/ _bwd with the schema of cpp_shared_routing_fwd / _bwd. Tile configurations that divide nothing
and several thread orders between barriers must give the reference's values, bit for bit the
same in every order.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from capsnet_fused import reference_routing
from capsnet_fused.reference import SQUASH_EPS
from tests import cuda_emulation
from tests.helpers import (
    ALL_OPTIONS,
    SHAPES,
    SINGLE_OPTIONS,
    VARIANTS,
    Options,
    Shape,
    Variant,
    assert_matches_reference,
    make_bias,
    make_inputs,
    reference64,
    rel_error,
    run_with_grads,
)

OPS = torch.ops.capsnet_fused
TILES_ENV = "CAPSNET_FUSED_CUDA_TILES"
SCHEDULE_ENV = "CUDA_EMU_SCHEDULE"
MODES = ["mean", "sum"]

# Tile configurations (CAPSNET_FUSED_CUDA_TILES) and the thread order each runs in; the tiles
# of tests/test_cuda_emulated.py plus the agreement blocks'.
# "ragged": 3 capsules per GEMM split, agreement and gradient block, 3 samples staged at a time,
#   3 warps: none divides the test shapes.
# "wide": one capsule per GEMM split and per block, one sample staged at a time, one warp.
TILES = {
    "planned": ("", "forward"),
    "ragged": (
        "gemm_caps=3,grads_caps=3,grads_samples=3,grads_warps=3,combine_warps=3,agree_caps=3,"
        "agree_samples=3,agree_warps=3",
        "reverse",
    ),
    "wide": (
        "gemm_caps=1,grads_caps=1,grads_samples=1,grads_warps=1,combine_warps=1,agree_caps=1,"
        "agree_samples=1,agree_warps=1",
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

    use("planned")
    return use


def emulated_routing(
    u,
    weight,
    prior=None,
    bias=None,
    *,
    iterations,
    shared_logits,
    softmax_over="out_caps",
    detach_inner=False,
    leaky=False,
    squash_eps=SQUASH_EPS,
):
    return cuda_emulation.shared_routing(
        u, weight, prior, bias, iterations, softmax_over, detach_inner, leaky, squash_eps,
        shared_logits,
    )  # fmt: skip


def routing_kwargs(shape: Shape, variant, mode: str, options: Options) -> dict:
    softmax_over, detach_inner = variant.softmax_over, variant.detach_inner
    return dict(
        iterations=shape.R, softmax_over=softmax_over, detach_inner=detach_inner,
        shared_logits=mode, **options.kwargs(),
    )  # fmt: skip


def check_against_reference(shape, variant, mode, options, dtype, tol):
    u, weight, prior, grad = make_inputs(shape, variant.prior, dtype=dtype)
    bias = make_bias(shape, options, dtype=dtype)
    kwargs = routing_kwargs(shape, variant, mode, options)
    out = run_with_grads(emulated_routing, u, weight, prior, grad, bias=bias, **kwargs)
    assert out[0].dtype == dtype
    want = reference64(u, weight, prior, grad, bias=bias, **kwargs)
    assert_matches_reference(out, want, tol)


def case_id(variant, mode, options) -> str:
    return f"{variant.id}-{mode}-{options.id}"


OPTION_SETS = [Options(), *ALL_OPTIONS]
# Every odd shape of tests/helpers.py with every variant, the mode and the options turning over.
SHAPE_CASES = [
    (shape, variant, MODES[(k + v) % 2], OPTION_SETS[(k + v) % 3])
    for k, shape in enumerate(SHAPES)
    for v, variant in enumerate(VARIANTS)
]


@pytest.mark.parametrize(
    "shape, variant, mode, options",
    SHAPE_CASES,
    ids=[f"{c[0].id}-{case_id(*c[1:])}" for c in SHAPE_CASES],
)
def test_matches_reference_float64(shape, variant, mode, options, tiles):
    check_against_reference(shape, variant, mode, options, torch.float64, 1e-11)


@pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
@pytest.mark.parametrize("variant", VARIANTS[::3], ids=[v.id for v in VARIANTS[::3]])
def test_matches_reference_float32(shape, variant, tiles):
    check_against_reference(shape, variant, "mean", ALL_OPTIONS[0], torch.float32, 1e-5)


# Every combination: variant x mode x the options (none, each alone, all at both squash eps).
COMBINATIONS = [
    (variant, mode, options)
    for variant in VARIANTS
    for mode in MODES
    for options in [Options(), *SINGLE_OPTIONS, *ALL_OPTIONS]
]


@pytest.mark.parametrize(
    "variant, mode, options", COMBINATIONS, ids=[case_id(*c) for c in COMBINATIONS]
)
def test_every_combination(variant, mode, options, tiles):
    check_against_reference(Shape(3, 11, 3, 3, 4, 3), variant, mode, options, torch.float64, 1e-11)


# Several GEMM splits, agreement and gradient blocks, a J x M row longer than a warp and M over
# 32 (tests/test_cuda_emulated.py's tile shapes).
TILE_SHAPES = [Shape(9, 37, 10, 8, 16, 3), Shape(3, 19, 3, 3, 5, 4), Shape(5, 11, 2, 3, 37, 2)]


@pytest.mark.parametrize("config", ["ragged", "wide"])
@pytest.mark.parametrize("shape", TILE_SHAPES, ids=[s.id for s in TILE_SHAPES])
@pytest.mark.parametrize("variant", VARIANTS, ids=[v.id for v in VARIANTS])
def test_tile_configurations(shape, variant, config, tiles):
    tiles(config)
    k = VARIANTS.index(variant)
    check_against_reference(shape, variant, MODES[k % 2], ALL_OPTIONS[k // 4], torch.float64, 1e-11)


@pytest.mark.parametrize("variant", VARIANTS[1::2], ids=[v.id for v in VARIANTS[1::2]])
def test_thread_order_and_os_threads_do_not_change_results(variant, tiles, monkeypatch):
    # Every sum has one owner adding in a fixed order and every exchange between threads is
    # behind a barrier: neither the emulation's thread order between barriers nor the number of
    # OS threads running the blocks may change a bit.
    shape = Shape(9, 23, 5, 4, 7, 3)
    options = ALL_OPTIONS[0]
    u, weight, prior, grad = make_inputs(shape, variant.prior, dtype=torch.float32)
    bias = make_bias(shape, options, dtype=torch.float32)
    kwargs = routing_kwargs(shape, variant, "mean", options)
    results = []
    for schedule, threads in [("forward", "1"), ("reverse", "2"), ("random:3", "2")]:
        tiles("ragged")
        monkeypatch.setenv(SCHEDULE_ENV, schedule)
        monkeypatch.setenv("CUDA_EMU_THREADS", threads)
        results.append(run_with_grads(emulated_routing, u, weight, prior, grad, bias=bias,
                                      **kwargs))  # fmt: skip
    first = [results[0][0], *results[0][1]]
    for other in results[1:]:
        for a, b in zip(first, [other[0], *other[1]], strict=True):
            assert (a is None and b is None) or torch.equal(a, b)


# detach_inner changes the gradients on purpose (they are not the derivative): not here.
GRADCHECK_VARIANTS = [v for v in VARIANTS if not v.detach_inner]
GRADCHECK_CASES = [
    (variant, MODES[k % 2], Options(bias=True, leaky=True, squash_eps=0.05))
    for k, variant in enumerate(GRADCHECK_VARIANTS)
] + [
    (GRADCHECK_VARIANTS[0], "sum", Options(squash_eps=0.0)),
    (GRADCHECK_VARIANTS[3], "mean", Options(leaky=True, squash_eps=0.0)),
    (GRADCHECK_VARIANTS[1], "sum", Options(bias=True)),
]


@pytest.mark.parametrize(
    "variant, mode, options", GRADCHECK_CASES, ids=[case_id(*c) for c in GRADCHECK_CASES]
)
def test_gradcheck(variant, mode, options, tiles):
    tiles("ragged")
    shape = Shape(3, 5, 3, 2, 3, 3)
    u, weight, prior, _ = make_inputs(shape, variant.prior)
    bias = make_bias(shape, options)
    inputs = [t.requires_grad_() for t in (u, weight, prior, bias) if t is not None]
    kwargs = routing_kwargs(shape, variant, mode, options)

    def fn(u, weight, *optional):
        rest = list(optional)
        p = rest.pop(0) if prior is not None else None
        b = rest.pop(0) if bias is not None else None
        return emulated_routing(u, weight, p, b, **kwargs)

    assert torch.autograd.gradcheck(fn, inputs)


def op_args(shape, variant, mode, options):
    """(forward args, (grad, detached inputs), flags) of the emulated ops."""
    softmax_over, with_prior = variant.softmax_over, variant.prior
    detach_inner = variant.detach_inner
    u, weight, prior, grad = make_inputs(shape, with_prior)
    bias = make_bias(shape, options)
    for t in (u, weight, prior, bias):
        if t is not None:
            t.requires_grad_()
    in_caps = softmax_over == "in_caps"
    flags = (shape.R, in_caps, detach_inner, options.leaky, options.squash_eps, mode == "mean")
    detached = [None if t is None else t.detach() for t in (u, weight, prior, bias)]
    return (u, weight, prior, bias, *flags), (grad, *detached), flags


OPCHECK_CASES = [
    (VARIANTS[0], "mean", Options()),
    (VARIANTS[3], "sum", ALL_OPTIONS[1]),
    (VARIANTS[6], "mean", ALL_OPTIONS[0]),
    (VARIANTS[7], "sum", Options(bias=True)),
]


@pytest.mark.parametrize(
    "variant, mode, options", OPCHECK_CASES, ids=[case_id(*c) for c in OPCHECK_CASES]
)
def test_opcheck(variant, mode, options):
    shape = Shape(2, 5, 3, 2, 4, 2)
    fwd, bwd_inputs, flags = op_args(shape, variant, mode, options)
    torch.library.opcheck(OPS.cuda_emulated_shared_routing_fwd, fwd)
    _, s, v_iter, c = OPS.cuda_emulated_shared_routing_fwd(*fwd)
    needs = (True, True, variant.prior, options.bias)
    bwd = (*bwd_inputs, s, v_iter, c, *flags, *needs)
    torch.library.opcheck(OPS.cuda_emulated_shared_routing_bwd, bwd)


@pytest.mark.parametrize("detach_inner", [False, True], ids=["full", "detach"])
def test_gradients_only_for_inputs_that_need_them(detach_inner):
    # With detach_inner, du and dW read the last iteration alone; dprior and dbias still need
    # the whole chain of the shared logits' gradient.
    shape = Shape(3, 9, 4, 3, 5, 3)
    variant = Variant("in_caps", True, detach_inner)
    options = Options(bias=True, leaky=True)
    fwd, (grad, u, weight, prior, bias), flags = op_args(shape, variant, "mean", options)
    kwargs = routing_kwargs(shape, variant, "mean", options)
    ref = reference64(u, weight, prior, grad, bias=bias, **kwargs)
    _, s, v_iter, c = OPS.cuda_emulated_shared_routing_fwd(*fwd)
    for k in range(4):
        needs = tuple(k == n for n in range(4))
        got_all = OPS.cuda_emulated_shared_routing_bwd(grad, u, weight, prior, bias, s, v_iter, c,
                                                       *flags, *needs)  # fmt: skip
        for need, got, want in zip(needs, got_all, ref[1], strict=True):
            if need:
                assert rel_error(got, want) < 1e-11
            else:
                assert got.shape == (0,)


def test_saved_states_are_the_contract():
    # s^k and v^k per sample as the reference computes them after k + 1 iterations; the
    # couplings without the leaky logit's share.
    shape = Shape(3, 9, 4, 3, 5, 3)
    options = Options(bias=True, leaky=True)
    fwd, (_, u, weight, prior, bias), _ = op_args(
        shape, Variant("in_caps", True, False), "sum", options
    )
    _, s, v_iter, c = OPS.cuda_emulated_shared_routing_fwd(*fwd)
    assert s.shape == v_iter.shape == (3, 3, 4, 5) and c.shape == (3, 9, 4)
    for k in range(3):
        want = reference_routing(
            u, weight, k + 1, prior=prior, bias=bias, softmax_over="in_caps", leaky=True,
            shared_logits="sum",
        )  # fmt: skip
        torch.testing.assert_close(v_iter[:, k], want, rtol=1e-12, atol=1e-14)
    assert ((c.sum(1) < 1) & (c.sum(1) > 0)).all()


HALF_CASES = [
    (VARIANTS[0], "mean", Options()),
    (VARIANTS[3], "sum", ALL_OPTIONS[1]),
    (VARIANTS[6], "mean", ALL_OPTIONS[0]),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize(
    "variant, mode, options", HALF_CASES, ids=[case_id(*c) for c in HALF_CASES]
)
def test_half_precision_within_twice_reference_drift(dtype, variant, mode, options):
    shape = Shape(3, 37, 10, 8, 16, 3)
    u, weight, prior, grad = make_inputs(shape, variant.prior)
    bias = make_bias(shape, options)
    kwargs = routing_kwargs(shape, variant, mode, options)
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


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS[::3], ids=[v.id for v in VARIANTS[::3]])
def test_empty_batch(variant, mode):
    shape = Shape(0, 7, 3, 2, 4, 2)
    options = Options(bias=True, leaky=True)
    u, weight, prior, grad = make_inputs(shape, variant.prior)
    bias = make_bias(shape, options)
    kwargs = routing_kwargs(shape, variant, mode, options)
    v, grads = run_with_grads(emulated_routing, u, weight, prior, grad, bias=bias, **kwargs)
    assert v.shape == (0, 3, 4) and grads[0].shape == (0, 7, 2)
    # No samples: the gradients to the parameters are zero, written by their owners.
    for got, t in zip(grads[1:], (weight, prior, bias), strict=True):
        if t is not None:
            assert torch.equal(got, torch.zeros_like(t))
    fwd, _, _ = op_args(shape, variant, mode, options)
    _, _, _, c = OPS.cuda_emulated_shared_routing_fwd(*fwd)
    # The couplings of an empty batch are the first iteration's in every iteration.
    assert torch.isfinite(c).all() and torch.equal(c[1], c[0])


@pytest.mark.parametrize("softmax_over", ["out_caps", "in_caps"])
def test_ten_iterations(softmax_over):
    shape = Shape(2, 21, 5, 4, 8, 10)
    u, weight, prior, grad = make_inputs(shape, True, dtype=torch.float32)
    kwargs = dict(iterations=10, softmax_over=softmax_over, shared_logits="mean")
    out = run_with_grads(emulated_routing, u, weight, prior, grad, **kwargs)
    assert_matches_reference(out, reference64(u, weight, prior, grad, **kwargs), 1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("softmax_over", ["out_caps", "in_caps"])
def test_large_inputs_stay_finite(softmax_over, mode):
    # Logits in the thousands (and, summed over the batch, more): a softmax without its max
    # subtracted overflows.
    shape = Shape(4, 30, 6, 4, 8, 3)
    u, weight, prior, grad = make_inputs(shape, True, dtype=torch.float32)
    u, prior = 30 * u, 1000 * prior
    kwargs = dict(iterations=3, softmax_over=softmax_over, shared_logits=mode)
    v, grads = run_with_grads(emulated_routing, u, weight, prior, grad, **kwargs)
    assert torch.isfinite(v).all() and all(torch.isfinite(g).all() for g in grads)
    ref_v, _ = reference64(u, weight, prior, grad, **kwargs)
    assert rel_error(v, ref_v) < 1e-4


@pytest.mark.parametrize("softmax_over", ["out_caps", "in_caps"])
def test_zero_inputs_squash_eps(softmax_over):
    # u = 0 gives s = 0 in every iteration: v = 0 and zero gradients for eps > 0, NaN (value and
    # gradients) for the eps-free squash, as the reference defines.
    shape = Shape(2, 5, 3, 2, 4, 2)
    u, weight, prior, grad = make_inputs(shape, True)
    u = torch.zeros_like(u)
    for eps in (SQUASH_EPS, 0.0):
        kwargs = dict(iterations=2, softmax_over=softmax_over, squash_eps=eps, shared_logits="mean")
        v, grads = run_with_grads(emulated_routing, u, weight, prior, grad, **kwargs)
        ref_v, ref_grads = reference64(u, weight, prior, grad, **kwargs)
        for got, want in zip([v, *grads], [ref_v, *ref_grads], strict=True):
            assert torch.equal(torch.isnan(got), torch.isnan(want))
            if eps == 0.0:
                assert torch.isnan(want).all()
            else:
                assert torch.isfinite(got).all()
                torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


def test_wide_output_capsules_need_no_sweep():
    # J x M = 2048 in float64: the per-sample kernels' sweeps do not fit shared memory (227 KB),
    # the shared-logits kernels, which have no sweep, do.
    shape = Shape(2, 3, 32, 2, 64, 2)
    u, weight, prior, grad = make_inputs(shape, True)
    with pytest.raises(RuntimeError, match="do not fit"):
        cuda_emulation.routing(u, weight, prior, None, 2, "out_caps", False, False, SQUASH_EPS)
    kwargs = dict(iterations=2, softmax_over="out_caps", shared_logits="sum")
    out = run_with_grads(emulated_routing, u, weight, prior, grad, **kwargs)
    assert_matches_reference(out, reference64(u, weight, prior, grad, **kwargs), 1e-11)


def test_unknown_tile_is_refused(monkeypatch):
    u, weight, prior, _ = make_inputs(Shape(2, 3, 2, 2, 3, 2), False)
    monkeypatch.setenv(TILES_ENV, "agree_width=6")
    with pytest.raises(RuntimeError, match="unknown tile"):
        emulated_routing(u, weight, prior, iterations=2, shared_logits="mean")
    monkeypatch.setenv(TILES_ENV, "agree_samples=0,agree_warps=40")
    with pytest.raises(RuntimeError, match="agree tiles"):
        emulated_routing(u, weight, prior, iterations=2, shared_logits="mean")


def test_compile_fullgraph():
    # Dynamo (no graph break) and AOTAutograd through the fakes and the autograd of the op pair,
    # every option given.
    shape = Shape(3, 9, 4, 3, 5, 3)
    options = Options(bias=True, leaky=True, squash_eps=0.05)
    u, weight, prior, grad = make_inputs(shape, True)
    bias = make_bias(shape, options)
    kwargs = routing_kwargs(shape, Variant("in_caps", True, False), "mean", options)

    def fn(u, weight, prior, bias):
        return emulated_routing(u, weight, prior, bias, **kwargs)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = run_with_grads(lambda u, w, prior, bias: compiled(u, w, prior, bias),
                         u, weight, prior, grad, bias=bias)  # fmt: skip
    want = run_with_grads(lambda u, w, prior, bias: fn(u, w, prior, bias),
                          u, weight, prior, grad, bias=bias)  # fmt: skip
    for a, b in zip([got[0], *got[1]], [want[0], *want[1]], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize(
    "variant, mode, options, dtype",
    [
        (VARIANTS[2], "mean", ALL_OPTIONS[0], torch.float64),
        (VARIANTS[5], "sum", ALL_OPTIONS[1], torch.float32),
        (VARIANTS[7], "mean", Options(), torch.float32),
    ],
    ids=["out-prior-mean-f64", "in-detach-sum-f32", "in-prior-detach-mean-f32"],
)
def test_on_a_cuda_device(variant, mode, options, dtype):
    # The same kernels compiled by nvcc, where a GPU and a CUDA build of the extension exist
    # (bench/gpu_session.sh runs the tests whose names mention cuda).
    from capsnet_fused import dynamic_routing
    from capsnet_fused.ops import shared_logits_unavailable_reason

    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    reason = shared_logits_unavailable_reason("cpp", "cuda", dtype)
    if reason is not None:
        pytest.skip(reason)
    shape = Shape(9, 37, 10, 8, 16, 3)
    u, weight, prior, grad = make_inputs(shape, variant.prior, dtype=dtype, device="cuda")
    bias = make_bias(shape, options, dtype=dtype, device="cuda")
    kwargs = routing_kwargs(shape, variant, mode, options)

    def cpp_routing(u, weight, prior=None, **kw):
        return dynamic_routing(u, weight, prior=prior, backend="cpp", **kw)

    out = run_with_grads(cpp_routing, u, weight, prior, grad, bias=bias, **kwargs)
    want = reference64(u, weight, prior, grad, bias=bias, **kwargs)
    assert_matches_reference(out, want, 1e-11 if dtype == torch.float64 else 1e-5)
