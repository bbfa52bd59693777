"""The CUDA kernels for routing logits shared by the batch (issue 18; csrc/routing_cuda.cu), run
on the CPU under the emulation of the CUDA execution model, against the float64 reference.

As in tests/test_cuda_emulated.py: the source nvcc compiles runs here as C++ (every CUDA thread a
fiber, barriers and shuffles between them, shared memory and every buffer the kernels must
write NaN-filled), registered as the test-only ops capsnet_fused::cuda_emulated_shared_routing_fwd
/ _bwd with the schema of cpp_shared_routing_fwd / _bwd. Tile configurations that divide nothing
and several thread orders between barriers must give the reference's values, bit for bit the
same in every order. With the tiles the planner picks, these kernels pass the checks of every
fused implementation in tests/test_backends.py ("cuda_emulated"); so does the same source
compiled by nvcc where there is a GPU ("cpp" on CUDA).
"""

from __future__ import annotations

import pytest
import torch

from capsnet_fused.reference import SQUASH_EPS
from tests import cuda_emulation
from tests.helpers import (
    ALL_OPTIONS,
    VARIANTS,
    Options,
    Shape,
    assert_matches_reference,
    make_bias,
    make_inputs,
    reference64,
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
