"""What is particular to the Triton kernels for routing logits shared by the batch (issue 18):
the GPU tiles under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1) against the
float64 reference, the tiles' fit for tl.dot, the grid table, launch counts, what they save and
allocate. Every buffer a kernel must write starts as NaN (POISON_OUTPUTS). The checks every
fused implementation passes run these kernels in tests/test_backends.py."""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from capsnet_fused.backends.triton import launch as launcher  # noqa: E402
from capsnet_fused.backends.triton import op as triton_op  # noqa: E402
from capsnet_fused.backends.triton import shared_launch as shared_launcher  # noqa: E402
from capsnet_fused.backends.triton import tiles  # noqa: E402
from capsnet_fused.ops import shared_logits_unavailable_reason  # noqa: E402
from tests.helpers import (  # noqa: E402
    ALL_OPTIONS,
    Options,
    Shape,
    Variant,
    assert_matches_reference,
    make_bias,
    make_inputs,
    reference64,
    run_with_grads,
)
from tests.implementations import require_triton, triton_routing  # noqa: E402

DEVICES = ["cpu", "cuda"]
device_params = pytest.mark.parametrize("device", DEVICES)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(launcher, "POISON_OUTPUTS", True)


def run_case(shape, variant, mode, dtype, device, options: Options | None = None):
    """(Triton's (v, grads), the float64 reference's, the inputs and keywords)."""
    softmax_over, detach_inner = variant.softmax_over, variant.detach_inner
    options = options or Options()
    u, weight, prior, grad = make_inputs(shape, variant.prior, dtype=dtype, device=device)
    bias = make_bias(shape, options, dtype=dtype, device=device)
    kwargs = dict(
        iterations=shape.R, softmax_over=softmax_over, detach_inner=detach_inner,
        shared_logits=mode, **options.kwargs(),
    )  # fmt: skip
    got = run_with_grads(triton_routing, u, weight, prior, grad, bias=bias, **kwargs)
    want = reference64(u, weight, prior, grad, bias=bias, **kwargs)
    return got, want, (u, weight, prior, bias, grad, kwargs)


def case_id(variant, mode, options) -> str:
    return f"{variant.id}-{mode}-{options.id}"


# The GPU's tiles under the interpreter: agree and du walk batches of 16-32 samples with
# tl.dot shapes of at least 16 (two batch tiles at B = 34), columns padded where J x M is small
# (J = 1, M = 1). Small B x J: the GPU's combines take one (b, j) row a program.
GPU_TILE_CASES = [
    (Shape(3, 9, 10, 8, 16, 2), Variant("out_caps", True, False), "mean", ALL_OPTIONS[0]),
    (Shape(34, 9, 1, 3, 5, 2), Variant("in_caps", False, True), "sum", ALL_OPTIONS[1]),
    (Shape(2, 5, 1, 3, 1, 3), Variant("in_caps", True, False), "mean", Options()),
]


@pytest.mark.parametrize(
    "shape, variant, mode, options",
    GPU_TILE_CASES,
    ids=[f"{c[0].id}-{case_id(*c[1:])}" for c in GPU_TILE_CASES],
)
def test_gpu_tiles_match_reference(shape, variant, mode, options, monkeypatch):
    require_triton("cpu")
    monkeypatch.setenv(tiles.TILES_ENV, "gpu")
    cfg = shared_launcher.choose_shared_config(shape.B, shape.I, shape.J, shape.N, shape.M)
    assert cfg.agree_block_b >= 16 and cfg.du_block_b >= 16
    got, want, _ = run_case(shape, variant, mode, torch.float64, "cpu", options)
    assert_matches_reference(got, want, tol=1e-12)


def test_gpu_tiles_fit_tl_dot():
    # Every tl.dot operand of the GPU tiles has each dimension >= 16, and the tiles are powers
    # of two, for every shape the compile check uses and a few extremes.
    shapes = [(b, i, j, n, m) for b in (1, 8, 128, 512) for i, j, n, m in
              [(1152, 10, 8, 16), (5, 1, 3, 1), (37, 5, 4, 12), (7, 40, 2, 64)]]  # fmt: skip
    for batch, in_caps, out_caps, in_d, out_d in shapes:
        cfg = shared_launcher.choose_shared_config(batch, in_caps, out_caps, in_d, out_d, "gpu")
        rows = cfg.agree_block_i * cfg.base.block_n
        cols = cfg.agree_block_j * cfg.base.block_m
        for size in (rows, cols, cfg.agree_block_b, cfg.du_block_b, cfg.du_block_c, cfg.du_block_k):
            assert size >= 16 and size & (size - 1) == 0, (batch, in_caps, out_caps, in_d, out_d)


def test_grid_table():
    """The grids in capsnet_fused/backends/triton/shared_launch.py's docstring are the ones
    chosen."""
    table = {}
    for line in shared_launcher.__doc__.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit():
            table[int(cells[0])] = cells[1:]
    assert sorted(table) == [8, 128, 512]
    for batch, (softmax, agree, du) in table.items():
        cfg = shared_launcher.choose_shared_config(batch, 1152, 10, 8, 16, "gpu")
        over_j, over_i = (int(x) for x in softmax.split("/"))
        assert over_j == math.prod(cfg.softmax_grid(1152, 10, False))
        assert over_i == math.prod(cfg.softmax_grid(1152, 10, True))
        assert int(agree.split("=")[-1]) == math.prod(cfg.agree_grid(1152, 10))
        assert du == " x ".join(map(str, cfg.du_grid(batch, 1152, 8)))


@pytest.mark.parametrize(
    "detach_inner, with_prior, launches",
    [
        # forward 4R - 1; backward: R combines, R - 1 GEMMs, R agree (dW), R - 1 logits_back,
        # du
        (False, False, (11, 11)),
        # + the first iteration's logits_back for the prior's gradient
        (False, True, (11, 12)),
        # detach_inner without the prior's gradient: the last iteration only
        (True, False, (11, 3)),
    ],
    ids=["plain", "prior", "detach"],
)
def test_launch_counts(detach_inner, with_prior, launches, monkeypatch):
    monkeypatch.setenv(tiles.TILES_ENV, "gpu")
    shape = Shape(128, 1152, 10, 8, 16, 3)
    u, weight, prior, grad = make_inputs(shape, with_prior, torch.float32, "meta")
    record = []
    _, s, v_iter, c = shared_launcher.shared_routing_forward(u, weight, prior, 3, False, True,
                                                             record)  # fmt: skip
    forward = len(record)
    shared_launcher.shared_routing_backward(
        grad, u, weight, prior, s, v_iter, c, 3, False, detach_inner, True, True, True,
        with_prior, record=record,
    )  # fmt: skip
    assert (forward, len(record) - forward) == launches


@device_params
def test_saves_and_allocates_no_u_hat_sized_tensor(device, monkeypatch):
    require_triton(device)
    # B > N, so that u_hat [B, I, J, M] is larger than dW [I, J, N, M].
    shape = Shape(6, 40, 6, 4, 8, 3)
    u, weight, prior, grad = make_inputs(shape, True, torch.float32, device)
    u_hat_numel = shape.B * shape.I * shape.J * shape.M
    saved, allocated = [], []
    new = shared_launcher._new
    # The gradients' buffers come from the per-sample launchers' helpers (launch.py).
    for module in (shared_launcher, launcher):
        monkeypatch.setattr(
            module,
            "_new",
            lambda shp, *a: allocated.append(torch.Size(shp).numel()) or new(shp, *a),
        )
    leaves = [t.requires_grad_() for t in (u, weight, prior)]

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        v = triton_routing(*leaves, iterations=shape.R, shared_logits="mean")
    torch.autograd.grad(v, leaves, grad)
    inputs = {t.data_ptr() for t in leaves}
    state = [t.numel() for t in saved if t.data_ptr() not in inputs]
    # s^k and v^k [B, R, J, M] and the couplings [R, I, J].
    assert sum(state) == shape.R * (2 * shape.B * shape.J * shape.M + shape.I * shape.J)
    assert allocated and max(allocated) < u_hat_numel


def test_the_backend_reports_shared_logits():
    require_triton("cpu")
    assert shared_logits_unavailable_reason("triton", "cpu") is None
    assert triton_op.shared_logits_unavailable_reason(torch.device("cpu"), torch.int32)
