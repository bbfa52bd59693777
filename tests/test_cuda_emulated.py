"""The CUDA kernels of the cpp backend (csrc/routing_cuda.cu), run on the CPU under the emulation
of the CUDA execution model (csrc/cuda_emulation.h), against the float64 reference.

The same source that nvcc compiles runs here as C++: every CUDA thread is a fiber, __syncthreads
and warp shuffles are barriers between them, shared memory starts as NaN, and the buffers the
kernels must write start as NaN too. Several tile configurations (tiles that do not divide the
batch or the capsules, more warps than sample groups, one capsule per block) and several thread
orders between barriers (forward, reverse, shuffled) make indexing and barrier bugs show up as
wrong or non-reproducible results. With the tiles the planner picks, these kernels pass the
checks of every fused implementation in tests/test_backends.py ("cuda_emulated").
"""

from __future__ import annotations

import pytest
import torch

from capsnet_fused.reference import SQUASH_EPS
from tests import cuda_emulation
from tests.helpers import (
    VARIANTS,
    Options,
    Shape,
    assert_matches_reference,
    make_bias,
    make_inputs,
    option_case_params,
    reference64,
    run_with_grads,
    variant_params,
)

OPS = torch.ops.capsnet_fused
TILES_ENV = "CAPSNET_FUSED_CUDA_TILES"
SCHEDULE_ENV = "CUDA_EMU_SCHEDULE"

# Tile configurations (CAPSNET_FUSED_CUDA_TILES) and the thread order each runs in.
# What the planner picks for the shape (no setting) runs in tests/test_backends.py.
# "ragged": 5 capsules per sweep block staged 2 at a time, 3 capsules per gradient block,
#   3 samples per gradient stage, 3 warps of combines: none divides the test shapes.
# "wide": 3 warps for 2 sample groups (an idle warp at every barrier), 7 capsules staged at once,
#   one capsule per GEMM split and per gradient block, one sample per gradient stage.
TILES = {
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
    cuda_emulation.load_or_skip()


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
