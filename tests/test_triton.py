"""What is particular to the Triton routing backend (interpreter on CPU, or CUDA): its public
entry points and availability, autocast, the GPU tiles under the interpreter, the tile setting,
the grid table, launch counts and what it saves and allocates.

On a machine without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 before the kernels are
decorated and the kernels run on CPU tensors; with CUDA the same tests run on the GPU. The
checks every fused implementation passes (every shape, variant and option against the float64
reference, gradcheck, opcheck, dtypes, edge cases, compile, determinism) run it in
tests/test_backends.py.
"""

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from capsnet_fused import (  # noqa: E402
    FusedRouter,
    choose_backend,
    dynamic_routing,
)
from capsnet_fused.backends.triton import launch as launcher  # noqa: E402
from capsnet_fused.backends.triton import op as triton_op  # noqa: E402
from capsnet_fused.backends.triton import tiles  # noqa: E402
from capsnet_fused.reference import reference_routing  # noqa: E402
from tests.helpers import (  # noqa: E402
    SHAPES,
    Shape,
    Variant,
    assert_matches_reference,
    make_inputs,
    reference64,
    rel_error,
    run_with_grads,
)
from tests.implementations import require_triton, triton_routing  # noqa: E402

DEVICES = ["cpu", "cuda"]
device_params = pytest.mark.parametrize("device", DEVICES)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer a kernel must fill starts as NaN, so an unwritten element fails a test."""
    monkeypatch.setattr(launcher, "POISON_OUTPUTS", True)


def run_case(shape, variant, dtype, device):
    softmax_over, detach_inner = variant.softmax_over, variant.detach_inner
    u, weight, prior, grad = make_inputs(shape, variant.prior, dtype=dtype, device=device)
    kwargs = dict(iterations=shape.R, softmax_over=softmax_over, detach_inner=detach_inner)
    got = run_with_grads(triton_routing, u, weight, prior, grad, **kwargs)
    return got, reference64(u, weight, prior, grad, **kwargs), (u, weight, prior, grad, kwargs)


@device_params
def test_saves_and_allocates_no_u_hat_sized_tensor(device, monkeypatch):
    require_triton(device)
    # B > N, so that u_hat [B, I, J, M] is larger than dW [I, J, N, M].
    shape = Shape(6, 40, 6, 4, 8, 3)
    u, weight, prior, grad = make_inputs(shape, True, torch.float32, device)
    u_hat_numel = shape.B * shape.I * shape.J * shape.M
    saved, allocated = [], []
    new = launcher._new
    monkeypatch.setattr(
        launcher, "_new", lambda shp, *a: allocated.append(torch.Size(shp).numel()) or new(shp, *a)
    )
    leaves = [t.requires_grad_() for t in (u, weight, prior)]

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        v = triton_routing(*leaves, iterations=shape.R, softmax_over="in_caps")
    torch.autograd.grad(v, leaves, grad)
    inputs = {t.data_ptr() for t in leaves}
    state = [t.numel() for t in saved if t.data_ptr() not in inputs]
    # s^t and V^{t-1} [B, R, J, M] plus the log-sum-exp [B, R, J].
    assert sum(state) == shape.B * shape.R * shape.J * (2 * shape.M + 1)
    assert allocated and max(allocated) < u_hat_numel


@device_params
def test_public_entry_points_use_the_kernels(device, monkeypatch):
    require_triton(device)
    calls = []
    forward = triton_op.routing_forward
    monkeypatch.setattr(
        triton_op, "routing_forward", lambda *a, **k: calls.append(1) or forward(*a, **k)
    )
    router = FusedRouter(9, 4, 3, 5, 2, backend="triton", learn_prior=True).to(device)
    u = torch.randn(2, 9, 3, device=device)
    v = router(u)
    assert calls == [1]
    want = reference_routing(u, router.weight, 2, prior=router.prior)
    torch.testing.assert_close(v, want, rtol=1e-5, atol=1e-6)
    dynamic_routing(u, router.weight, 2, backend="triton")
    assert calls == [1, 1]
    # "auto" takes Triton on CUDA and never on CPU.
    assert (choose_backend(device, torch.float32) == "triton") == (device == "cuda")


def test_unavailable_reason():
    assert triton_op.unavailable_reason(torch.device("meta"), torch.float32) is not None
    assert triton_op.unavailable_reason(torch.device("cpu"), torch.int32) is not None
    cpu = triton_op.unavailable_reason(torch.device("cpu"), torch.float32)
    assert (cpu is None) == (tiles.INTERPRETED and triton_op._INTERPRETER_PROBLEM is None)
    assert triton_op.unavailable_reason(torch.device("cuda"), torch.bfloat16) is None


def test_old_triton_interpreter_needs_numpy_below_2_4(monkeypatch):
    """triton 3.6's interpreter fails with numpy 2.4: the backend says so instead of failing."""
    import numpy

    try:
        int(numpy.array([1]))
        refuses = False
    except TypeError:
        refuses = True
    monkeypatch.setattr(triton_op, "INTERPRETED", True)
    monkeypatch.setattr(triton_op.triton, "__version__", "3.6.0")
    reason = triton_op._interpreter_problem()
    assert (reason is not None) == refuses
    assert reason is None or "numpy < 2.4" in reason
    monkeypatch.setattr(triton_op.triton, "__version__", "3.9.0")
    assert triton_op._interpreter_problem() is None


@device_params
def test_autocast_bfloat16(device):
    require_triton(device)
    shape = SHAPES[0]
    u, weight, prior, grad = make_inputs(shape, True, torch.float32, device)
    leaves = [t.requires_grad_() for t in (u, weight, prior)]
    with torch.autocast(device, dtype=torch.bfloat16):
        v = triton_routing(*leaves, iterations=3)
    assert v.dtype == torch.bfloat16
    grads = torch.autograd.grad(v, leaves, grad.to(v.dtype))
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    v_ref, grads_ref = reference64(u, weight, prior, grad, iterations=3)
    assert rel_error(v, v_ref) < 2e-2
    assert all(rel_error(g, r) < 5e-2 for g, r in zip(grads, grads_ref, strict=True))


# The GPU's tiles visit capsules one at a time and split the batch into tiles of up to 32
# samples; run them under the interpreter on shapes where that makes several steps, blocks and
# splits (B = 40: two sample tiles).
GPU_TILE_CASES = [
    (Shape(3, 37, 10, 8, 16, 3), Variant("out_caps", True, False)),
    (Shape(3, 37, 10, 8, 16, 3), Variant("in_caps", True, False)),
    (Shape(40, 9, 3, 3, 5, 2), Variant("in_caps", False, True)),
    (Shape(2, 19, 3, 3, 5, 4), Variant("out_caps", False, False)),
]


@pytest.mark.parametrize(
    "shape, variant", GPU_TILE_CASES, ids=[f"{s.id}-{v.id}" for s, v in GPU_TILE_CASES]
)
def test_gpu_tiles_match_reference(shape, variant, monkeypatch):
    require_triton("cpu")
    monkeypatch.setenv(tiles.TILES_ENV, "gpu")
    cfg = tiles.choose_config(shape.B, shape.I, shape.J, shape.N, shape.M)
    assert cfg.sweep_block_is == 1
    got, ref, _ = run_case(shape, variant, torch.float64, "cpu")
    assert_matches_reference(got, ref, tol=1e-12)


def test_tile_kind_env(monkeypatch):
    monkeypatch.setenv(tiles.TILES_ENV, "bogus")
    with pytest.raises(ValueError, match=tiles.TILES_ENV):
        tiles.tile_kind()
    monkeypatch.setenv(tiles.TILES_ENV, "gpu")
    assert tiles.tile_kind() == "gpu"
    monkeypatch.delenv(tiles.TILES_ENV)
    assert tiles.tile_kind() == ("interpreter" if tiles.INTERPRETED else "gpu")


def test_grid_table():
    """The grids in capsnet_fused/backends/triton/launch.py's docstring are the ones chosen."""
    table = {}
    for line in launcher.__doc__.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].isdigit():
            table[int(cells[0])] = [int(c.split("=")[-1]) for c in cells[1:]]
    assert sorted(table) == [8, 128, 512]
    for batch, want in table.items():
        cfg = tiles.choose_config(batch, 1152, 10, 8, 16, "gpu")
        got = [
            math.prod(cfg.gemm_grid(batch, 1152, 8, 10, 16)),
            math.prod(cfg.sweep_grid(batch, 1152)),
            math.prod(cfg.combine_grid(batch, 10)),
            math.prod(cfg.grads_grid(1152, 10)),
        ]
        assert got == want, batch
        # At least one program per SM of an H100/H200 where the launch has the work for it.
        assert min(got[:2] + got[3:]) >= 132 and (got[2] >= 132 or batch * 10 < 2 * 132)


@pytest.mark.parametrize(
    "variant, with_dprior, launches",
    [
        # forward 2R; backward: R combines, R - 1 sweeps, grads, the sum of its du partials
        (Variant("out_caps", False, False), False, (6, 7)),
        # + softmax(prior) each way, + the first iteration's backward sweep for dprior
        (Variant("in_caps", True, False), True, (7, 9)),
        # detach_inner without a prior gradient: the last iteration's couplings only
        (Variant("out_caps", False, True), False, (6, 4)),
    ],
    ids=["plain", "prior", "detach"],
)
def test_launch_counts(variant, with_dprior, launches, monkeypatch):
    """At most 2R + 2 launches forward and 2R + 3 backward (MNIST shape, GPU tiles, R = 3)."""
    monkeypatch.setenv(tiles.TILES_ENV, "gpu")
    softmax_over, with_prior = variant.softmax_over, variant.prior
    detach_inner = variant.detach_inner
    shape = Shape(128, 1152, 10, 8, 16, 3)
    u, weight, prior, grad = make_inputs(shape, with_prior, torch.float32, "meta")
    # The prior's softmax is a torch op, recorded as a TorchLaunch beside the kernels.
    record = []
    _, s, v_prev, lse = launcher.routing_forward(
        u, weight, prior, 3, softmax_over == "in_caps", record
    )
    forward = len(record)
    launcher.routing_backward(
        grad, u, weight, prior, s, v_prev, lse, 3, softmax_over == "in_caps", detach_inner,
        True, True, with_dprior, record=record,
    )  # fmt: skip
    assert (forward, len(record) - forward) == launches
    assert forward <= 2 * 3 + 2 and len(record) - forward <= 2 * 3 + 3
