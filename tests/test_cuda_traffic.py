"""bench/cuda_traffic.py against the CUDA kernels it describes: every launch's kernel, grid,
block and shared memory as the emulated kernels launch them (CUDA_EMU_LOG), and totals that
follow from the sizes alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench import cuda_traffic
from capsnet_fused.reference import SQUASH_EPS
from tests import cuda_emulation
from tests.helpers import VARIANTS, Options, Shape, make_bias, make_inputs

OPS = torch.ops.capsnet_fused


@pytest.fixture(scope="module", autouse=True)
def emulated_ops():
    cuda_emulation.load()


def logged_launches(path: Path) -> list[tuple]:
    lines = path.read_text().splitlines() if path.exists() else []
    path.unlink(missing_ok=True)
    out = []
    for line in lines:
        name, *numbers = line.split()
        gx, gy, gz, bx, by, bz, shared = map(int, numbers)
        out.append((name, (gx, gy, gz), (bx, by, bz), shared))
    return out


def modelled(items) -> list[tuple]:
    return [(x.kernel, x.grid, (x.block, 1, 1), x.shared_bytes) for x in items]


# (shape, tiles): planned tiles at several batch sizes, ragged tiles, and a J x M large enough
# that the planner shrinks the sweep tiles to fit shared memory.
CASES = [
    (Shape(2, 37, 10, 8, 16, 3), ""),
    (Shape(40, 19, 3, 3, 5, 4), ""),
    (Shape(9, 23, 5, 4, 7, 1), "sweep_warps=1,sweep_samples=4,sweep_caps=5,sweep_stage=2"),
    (Shape(3, 11, 4, 2, 12, 2), "gemm_caps=2,grads_caps=3,grads_samples=2,grads_warps=3"),
    (Shape(32, 3, 64, 4, 32, 2), ""),
]
# (need_du, need_dweight, need_dprior, need_dbias)
NEEDS = [
    (True, True, True, True),
    (False, True, False, False),
    (True, False, False, False),
    (False, False, True, False),
    (False, False, False, True),
]
# Every variant for the small cases; the large one (slow under the emulation) needs fewer to
# show that the shrunk tiles agree. With a bias (and leaky routing, which changes no launch):
# half the variants on two cases.
MATCH = [(c, v, False) for c in range(len(CASES) - 1) for v in VARIANTS]
MATCH += [(len(CASES) - 1, v, False) for v in VARIANTS[::3]]
MATCH += [(c, v, True) for c in (1, 2) for v in VARIANTS[1::2]]


@pytest.mark.parametrize(
    "case, variant, with_bias",
    MATCH,
    ids=[f"{c}-{v.id}{'-bias' if b else ''}" for c, v, b in MATCH],
)
def test_launches_match_the_kernels(case, variant, with_bias, monkeypatch, tmp_path):
    shape, tiles = CASES[case]
    softmax_over, detach_inner = variant.softmax_over, variant.detach_inner
    with_prior = variant.prior
    log = tmp_path / "launches.log"
    monkeypatch.setenv("CUDA_EMU_LOG", str(log))
    monkeypatch.setenv("CAPSNET_FUSED_CUDA_TILES", tiles)
    dtype = torch.float32 if case % 2 == 0 else torch.float64
    u, weight, prior, grad = make_inputs(shape, with_prior, dtype=dtype)
    bias = make_bias(shape, Options(bias=with_bias), dtype=dtype)
    in_caps = softmax_over == "in_caps"
    flags = (shape.R, in_caps, detach_inner, with_bias, SQUASH_EPS)
    fwd = OPS.cuda_emulated_routing_fwd(u, weight, prior, bias, *flags)
    sizes = (shape.B, shape.I, shape.J, shape.N, shape.M, shape.R)
    common = dict(
        softmax_over=softmax_over,
        prior=with_prior,
        bias=with_bias,
        detach_inner=detach_inner,
        dtype_bytes=dtype.itemsize,
        tiles=cuda_traffic.Tiles.parse(tiles),
    )
    want = cuda_traffic.launches(*sizes, backward=False, **common)
    assert logged_launches(log) == modelled(want)
    for needs in NEEDS:
        if (needs[2] and not with_prior) or (needs[3] and not with_bias):
            continue
        OPS.cuda_emulated_routing_bwd(grad, u, weight, prior, bias, *fwd[1:], *flags, *needs)
        need = dict(zip(("need_du", "need_dweight", "need_dprior", "need_dbias"), needs))
        full = cuda_traffic.launches(*sizes, **need, **common)
        assert logged_launches(log) == modelled(full[len(want) :])


def test_totals_follow_from_the_sizes():
    B, I, J, N, M, R = 128, 1152, 10, 8, 16, 3  # noqa: E741
    items = cuda_traffic.launches(B, I, J, N, M, R, prior=True)
    forward = [x for x in items if x.phase == "forward"]
    backward = [x for x in items if x.phase == "backward"]
    # u_hat once per iteration (the first as a GEMM); du and dW once in the backward plus u_hat
    # in each of its R - 1 + 1 sweeps (the first for the prior's gradient)
    assert sum(x.useful_flops for x in forward) == R * 2 * B * I * N * J * M
    assert sum(x.useful_flops for x in backward) == (R + 2) * 2 * B * I * N * J * M
    grads = backward[-1]
    assert grads.stores == {"du": 4 * B * I * N, "dweight": 4 * I * J * N * M, "dprior": 4 * I * J}
    # Every sweep reads u once and W once per sample tile; outputs are written once.
    p = cuda_traffic.plan(B, I, J, N, M, R)
    for sweep in [x for x in items if x.kernel.startswith("sweep")]:
        assert sweep.loads["u"] == 4 * B * I * N
        assert sweep.loads["weight"] == 4 * p.sample_tiles * I * J * N * M
    assert sum(x.stores.get("v", 0) for x in forward) == 4 * B * J * M
    assert [x.kernel for x in forward].count("sweep_forward") == R - 1


def test_too_large_for_shared_memory_raises(monkeypatch):
    shape = Shape(32, 3, 64, 4, 32, 2)
    with pytest.raises(ValueError, match="shared memory"):
        cuda_traffic.plan(*(shape.B, shape.I, shape.J, shape.N, shape.M, shape.R), elem=8)
    u, weight, _, _ = make_inputs(shape, False)
    with pytest.raises(RuntimeError, match="shared memory"):
        OPS.cuda_emulated_routing_fwd(u, weight, None, None, shape.R, False, False, False, 1e-8)
