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
from tests import cuda_emulation
from tests.helpers import (
    SHAPES,
    VARIANTS,
    Shape,
    assert_matches_reference,
    make_inputs,
    reference64,
    rel_error,
    run_with_grads,
    variant_id,
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


def emulated_routing(u, weight, prior=None, **kwargs):
    softmax_over = kwargs.pop("softmax_over", "out_caps")
    detach_inner = kwargs.pop("detach_inner", False)
    iterations = kwargs.pop("iterations")
    assert not kwargs
    return cuda_emulation.routing(u, weight, prior, iterations, softmax_over, detach_inner)


def routing_kwargs(shape: Shape, variant) -> dict:
    softmax_over, _, detach_inner = variant
    return dict(iterations=shape.R, softmax_over=softmax_over, detach_inner=detach_inner)


def check_against_reference(shape, variant, dtype, tol):
    u, weight, prior, grad = make_inputs(shape, variant[1], dtype=dtype)
    kwargs = routing_kwargs(shape, variant)
    out = run_with_grads(emulated_routing, u, weight, prior, grad, **kwargs)
    assert out[0].dtype == dtype
    assert_matches_reference(out, reference64(u, weight, prior, grad, **kwargs), tol)


@pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
@variant_params
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_matches_reference(shape, variant, dtype, tiles):
    tiles("planned")
    check_against_reference(shape, variant, dtype, 1e-5 if dtype == torch.float32 else 1e-11)


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


@pytest.mark.parametrize("variant", VARIANTS[1::2], ids=map(variant_id, VARIANTS[1::2]))
def test_thread_order_and_os_threads_do_not_change_results(variant, tiles, monkeypatch):
    # Each output has one owner that sums in a fixed order, and every exchange between threads
    # is behind a barrier: the order in which the emulation runs threads between barriers, and
    # how many OS threads run the blocks, must not change a single bit.
    shape = Shape(9, 23, 5, 4, 7, 3)
    u, weight, prior, grad = make_inputs(shape, variant[1], dtype=torch.float32)
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


GRADCHECK_VARIANTS = [v for v in VARIANTS if not v[2]]


@pytest.mark.parametrize("variant", GRADCHECK_VARIANTS, ids=map(variant_id, GRADCHECK_VARIANTS))
def test_gradcheck(variant, tiles):
    tiles("ragged")
    shape = Shape(2, 6, 3, 3, 4, 3)
    u, weight, prior, _ = make_inputs(shape, variant[1])
    inputs = [t.requires_grad_() for t in (u, weight)]
    if prior is not None:
        inputs.append(prior.requires_grad_())
    kwargs = routing_kwargs(shape, variant)

    def fn(u, weight, prior=None):
        return emulated_routing(u, weight, prior, **kwargs)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("variant", VARIANTS[::3], ids=map(variant_id, VARIANTS[::3]))
def test_opcheck(variant):
    shape = Shape(2, 5, 3, 2, 4, 2)
    softmax_over, with_prior, detach_inner = variant
    u, weight, prior, grad = make_inputs(shape, with_prior)
    u.requires_grad_()
    weight.requires_grad_()
    if prior is not None:
        prior.requires_grad_()
    in_caps = softmax_over == "in_caps"
    args = (u, weight, prior, shape.R, in_caps, detach_inner)
    torch.library.opcheck(OPS.cuda_emulated_routing_fwd, args)
    _, s, V, lse = OPS.cuda_emulated_routing_fwd(*args)
    bwd_args = (grad, u.detach(), weight.detach(), None if prior is None else prior.detach(),
                s, V, lse, shape.R, in_caps, detach_inner, True, True, with_prior)  # fmt: skip
    torch.library.opcheck(OPS.cuda_emulated_routing_bwd, bwd_args)


def test_gradients_only_for_inputs_that_need_them():
    shape = Shape(2, 9, 4, 3, 5, 3)
    u, weight, prior, grad = make_inputs(shape, True)
    ref = reference64(u, weight, prior, grad, iterations=3)
    _, s, V, lse = OPS.cuda_emulated_routing_fwd(u, weight, prior, 3, False, False)
    for needs in [(True, False, False), (False, True, False), (False, False, True)]:
        du, dw, dp = OPS.cuda_emulated_routing_bwd(
            grad, u, weight, prior, s, V, lse, 3, False, False, *needs
        )
        for need, got, want in zip(needs, (du, dw, dp), ref[1], strict=True):
            if need:
                assert rel_error(got, want) < 1e-11
            else:
                assert got.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS[::3], ids=map(variant_id, VARIANTS[::3]))
def test_half_precision_within_twice_reference_drift(dtype, variant):
    shape = Shape(2, 37, 10, 8, 16, 3)
    u, weight, prior, grad = make_inputs(shape, variant[1])
    kwargs = routing_kwargs(shape, variant)
    exact = reference64(u, weight, prior, grad, **kwargs)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    out = run_with_grads(emulated_routing, cast(u), cast(weight), cast(prior), grad, **kwargs)
    drift = run_with_grads(reference_routing, cast(u), cast(weight), cast(prior), grad, **kwargs)
    triples = zip([out[0], *out[1]], [drift[0], *drift[1]], [exact[0], *exact[1]], strict=True)
    for got, ref_lowp, want in triples:
        if want is None:
            continue
        assert got.dtype == dtype
        budget = max(2 * rel_error(ref_lowp, want), 1e-2 if dtype == torch.bfloat16 else 2e-3)
        assert rel_error(got, want) <= budget


@pytest.mark.parametrize("variant", VARIANTS[::2], ids=map(variant_id, VARIANTS[::2]))
def test_empty_batch(variant):
    shape = Shape(0, 7, 3, 2, 4, 2)
    u, weight, prior, grad = make_inputs(shape, variant[1])
    out = run_with_grads(emulated_routing, u, weight, prior, grad, **routing_kwargs(shape, variant))
    assert out[0].shape == (0, 3, 4)
    assert out[1][0].shape == (0, 7, 2)
    # No samples: the gradients to the parameters are zero, written by their owners.
    assert torch.equal(out[1][1], torch.zeros_like(weight))
    if prior is not None:
        assert torch.equal(out[1][2], torch.zeros_like(prior))


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
