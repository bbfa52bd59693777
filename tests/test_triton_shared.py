"""The Triton kernels for routing logits shared by the batch (issue 18) against the float64
reference: the interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1), CUDA where there
is a GPU. Every buffer a kernel must write starts as NaN (POISON_OUTPUTS)."""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from capsnet_fused import dynamic_routing, reference_routing  # noqa: E402
from capsnet_fused.backends.triton import launch as launcher  # noqa: E402
from capsnet_fused.backends.triton import op as triton_op  # noqa: E402
from capsnet_fused.backends.triton import shared_launch as shared_launcher  # noqa: E402
from capsnet_fused.models import CapsNet  # noqa: E402
from capsnet_fused.ops import shared_logits_unavailable_reason  # noqa: E402
from tests.helpers import (  # noqa: E402
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

DEVICES = ["cpu", "cuda"]
device_params = pytest.mark.parametrize("device", DEVICES)
MODES = ["mean", "sum"]


def require(device: str) -> None:
    """Skip unless the Triton kernels can run on `device` here."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    reason = triton_op.unavailable_reason(torch.device(device), torch.float32)
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(launcher, "POISON_OUTPUTS", True)


def triton_routing(u, weight, prior=None, **kwargs):
    return dynamic_routing(u, weight, prior=prior, backend="triton", **kwargs)


def run_case(shape, variant, mode, dtype, device, options: Options | None = None, seed=0):
    """(Triton's (v, grads), the float64 reference's, the inputs and keywords)."""
    softmax_over, with_prior = variant.softmax_over, variant.prior
    detach_inner = variant.detach_inner
    options = options or Options()
    u, weight, prior, grad = make_inputs(shape, with_prior, dtype=dtype, device=device, seed=seed)
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


# Every variant without options and with all of them at both squash eps, each variant meeting
# both modes; each single option once, the modes and softmax axes alternating.
FLOAT64_CASES = [
    (variant, MODES[(k + n) % 2], options)
    for k, variant in enumerate(VARIANTS)
    for n, options in enumerate([Options(), *ALL_OPTIONS])
] + [(VARIANTS[3 * k % len(VARIANTS)], MODES[k % 2], o) for k, o in enumerate(SINGLE_OPTIONS)]


@device_params
@pytest.mark.parametrize(
    "variant, mode, options", FLOAT64_CASES, ids=[case_id(*c) for c in FLOAT64_CASES]
)
def test_matches_reference_float64(variant, mode, options, device):
    # J = 3 in two output-capsule blocks (interpreter tiles); several capsule blocks and batch
    # tiles are in the float32 shapes below.
    require(device)
    got, want, _ = run_case(Shape(3, 11, 3, 3, 4, 3), variant, mode, torch.float64, device, options)
    assert_matches_reference(got, want, tol=1e-12)


# The odd shapes of tests/helpers.py (J = 1, M = 1, R = 1, ...) in float32, one variant each,
# alternating the mode and the options; not I = 200 (seconds in the interpreter; I = 37 already
# makes three capsule blocks).
FLOAT32_CASES = [
    (shape, VARIANTS[3 * k % len(VARIANTS)], MODES[k % 2], [Options(), ALL_OPTIONS[0]][k // 2 % 2])
    for k, shape in enumerate(SHAPES)
    if shape.I < 200
]


@device_params
@pytest.mark.parametrize(
    "shape, variant, mode, options",
    FLOAT32_CASES,
    ids=[f"{c[0].id}-{case_id(*c[1:])}" for c in FLOAT32_CASES],
)
def test_matches_reference_float32(shape, variant, mode, options, device):
    require(device)
    got, want, _ = run_case(shape, variant, mode, torch.float32, device, options)
    assert_matches_reference(got, want, tol=1e-5)


@device_params
def test_ten_iterations(device):
    # R = 1 and 2 are among the float32 shapes.
    require(device)
    shape = Shape(3, 7, 3, 3, 4, 10)
    variant = Variant("in_caps", True, False)
    got, want, _ = run_case(shape, variant, "mean", torch.float64, device, ALL_OPTIONS[0])
    assert_matches_reference(got, want, tol=1e-12)


@device_params
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "variant, mode, options",
    [
        (Variant("out_caps", True, False), "mean", Options()),
        (Variant("in_caps", False, True), "sum", ALL_OPTIONS[0]),
    ],
    ids=["out-prior-mean", "in-detach-sum-options"],
)
def test_low_precision_within_twice_reference_drift(dtype, variant, mode, options, device):
    require(device)
    (v, grads), (v_ref, grads_ref), (u, weight, prior, bias, grad, kwargs) = run_case(
        Shape(3, 20, 10, 8, 16, 3), variant, mode, dtype, device, options
    )
    # How far the reference itself drifts when run in this dtype.
    v_low, grads_low = run_with_grads(reference_routing, u, weight, prior, grad, bias=bias,
                                      **kwargs)  # fmt: skip
    for name, got, low, want in zip(
        ("v", "du", "dW", "dprior", "dbias"), [v, *grads], [v_low, *grads_low], [v_ref, *grads_ref]
    ):
        if want is None:
            continue
        assert got.dtype == dtype and torch.isfinite(got).all(), name
        err, ref_err = rel_error(got, want), rel_error(low, want)
        assert err <= 2 * ref_err + 1e-3, (
            f"{name}: {err:.3g}, the reference in {dtype}: {ref_err:.3g}"
        )


@device_params
@pytest.mark.parametrize("softmax_over", ["out_caps", "in_caps"])
def test_gradcheck_float64(softmax_over, device):
    require(device)
    shape = Shape(3, 5, 3, 2, 3, 3)
    u, weight, prior, _ = make_inputs(shape, True, device=device)
    bias = make_bias(shape, Options(bias=True), device=device)
    inputs = [t.requires_grad_() for t in (u, weight, prior, bias)]

    def fn(u, weight, prior, bias):
        return triton_routing(
            u, weight, prior, bias=bias, iterations=3, softmax_over=softmax_over, leaky=True,
            squash_eps=0.05, shared_logits="mean",
        )  # fmt: skip

    # fast_mode: random projections of the Jacobian, a few interpreted launches per input.
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def op_args(shape, softmax_in: bool, options: Options, mean: bool, device: str):
    u, weight, prior, grad = make_inputs(shape, True, torch.float32, device)
    bias = make_bias(shape, options, torch.float32, device)
    flags = (shape.R, softmax_in, False, options.leaky, options.squash_eps, mean)
    return (u, weight, prior, bias), grad, flags


@device_params
@pytest.mark.parametrize(
    "softmax_in, options, mean",
    [(False, Options(), True), (True, Options(bias=True, leaky=True, squash_eps=0.0), False)],
    ids=["out-mean", "in-options-sum"],
)
def test_opcheck(softmax_in, options, mean, device):
    require(device)
    inputs, grad, flags = op_args(Shape(2, 6, 3, 3, 4, 2), softmax_in, options, mean, device)
    ops = torch.ops.capsnet_fused
    leaves = [t.requires_grad_() if t is not None else None for t in inputs]
    # Called bare first: opcheck would wrap an exception of the op in its own.
    _, s, v_iter, c = ops.triton_shared_routing_fwd(*inputs, *flags)
    torch.library.opcheck(ops.triton_shared_routing_fwd.default, (*leaves, *flags))
    needs = (True, True, True, inputs[3] is not None)
    detached = [t.detach() if t is not None else None for t in inputs]
    bwd_args = (grad, *detached, s, v_iter, c, *flags, *needs)
    torch.library.opcheck(ops.triton_shared_routing_bwd.default, bwd_args)


@device_params
def test_saved_states_are_the_contract(device):
    # s^k, v^k per sample and the couplings c^k, as the reference computes them.
    require(device)
    shape = Shape(3, 9, 4, 3, 5, 3)
    (u, weight, prior, bias), _, flags = op_args(
        shape, True, Options(bias=True, leaky=True), True, device
    )
    _, s, v_iter, c = torch.ops.capsnet_fused.triton_shared_routing_fwd(u, weight, prior, bias,
                                                                        *flags)  # fmt: skip
    assert s.shape == v_iter.shape == (3, 3, 4, 5) and c.shape == (3, 9, 4)
    for k in range(3):
        want = reference_routing(
            u.double(), weight.double(), k + 1, prior=prior.double(), bias=bias.double(),
            softmax_over="in_caps", leaky=True, shared_logits="mean",
        )  # fmt: skip
        torch.testing.assert_close(v_iter[:, k].double(), want, rtol=1e-5, atol=1e-6)
    # The couplings normalise over the input capsules, less the leaky logit's share.
    assert ((c.sum(1) < 1) & (c.sum(1) > 0)).all()


@device_params
def test_gradients_only_for_inputs_that_need_them(device):
    require(device)
    shape = Shape(3, 6, 3, 2, 4, 3)
    for detach_inner in (False, True):
        variant = Variant("in_caps", True, detach_inner)
        options = Options(bias=True, leaky=True)
        _, (_, grads_ref), (u, weight, prior, bias, grad, kwargs) = run_case(
            shape, variant, "mean", torch.float64, device, options
        )
        flags = (3, True, detach_inner, True, options.squash_eps, True)
        ops = torch.ops.capsnet_fused
        _, s, v_iter, c = ops.triton_shared_routing_fwd(u, weight, prior, bias, *flags)
        for k in range(4):
            needs = tuple(k == n for n in range(4))
            got_all = ops.triton_shared_routing_bwd(grad, u, weight, prior, bias, s, v_iter, c,
                                                    *flags, *needs)  # fmt: skip
            for need, got, want in zip(needs, got_all, grads_ref, strict=True):
                if need:
                    assert rel_error(got, want) < 1e-12, (detach_inner, k)
                else:
                    assert got.shape == (0,)


@device_params
@pytest.mark.parametrize("mode", MODES)
def test_empty_batch(mode, device):
    require(device)
    shape = Shape(0, 7, 3, 4, 5, 3)
    u, weight, prior, grad = make_inputs(shape, True, torch.float32, device)
    bias = make_bias(shape, Options(bias=True), torch.float32, device)
    leaves = [t.requires_grad_() for t in (u, weight, prior, bias)]
    v = triton_routing(*leaves[:3], bias=leaves[3], iterations=3, shared_logits=mode)
    assert v.shape == (0, 3, 5)
    du, dweight, dprior, dbias = torch.autograd.grad(v, leaves, grad)
    assert du.shape == u.shape
    for g, t in ((dweight, weight), (dprior, prior), (dbias, bias)):
        assert torch.equal(g, torch.zeros_like(t))
    # The saved couplings of an empty batch: the prior's softmax in every iteration.
    _, _, _, c = torch.ops.capsnet_fused.triton_shared_routing_fwd(
        u, weight, prior, None, 3, False, False, False, 1e-8, mode == "mean"
    )
    torch.testing.assert_close(c, torch.softmax(prior, 1).expand(3, -1, -1))


@device_params
def test_non_contiguous_inputs(device):
    require(device)
    shape = Shape(3, 13, 5, 3, 6, 3)
    u, weight, prior, grad = make_inputs(shape, True, torch.float32, device)
    bias = make_bias(shape, Options(bias=True), torch.float32, device)
    u_t = u.transpose(1, 2).contiguous().transpose(1, 2)
    w_t = weight.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    p_t = prior.t().contiguous().t()
    b_t = bias.t().contiguous().t()
    g_t = grad.transpose(1, 2).contiguous().transpose(1, 2)
    assert not any(t.is_contiguous() for t in (u_t, w_t, p_t, b_t, g_t))
    kwargs = dict(iterations=3, softmax_over="in_caps", shared_logits="sum")
    got = run_with_grads(triton_routing, u_t, w_t, p_t, g_t, bias=b_t, **kwargs)
    assert_matches_reference(got, reference64(u, weight, prior, grad, bias=bias, **kwargs), 1e-5)


@device_params
@pytest.mark.parametrize("softmax_over", ["out_caps", "in_caps"])
def test_zero_inputs_with_squash_eps_zero_are_nan(softmax_over, device):
    # u = 0 gives s = 0: the eps-free squash is NaN there, value and gradients, as the reference.
    require(device)
    u, weight, prior, grad = make_inputs(Shape(2, 5, 3, 2, 4, 2), True, device=device)
    kwargs = dict(iterations=2, softmax_over=softmax_over, squash_eps=0.0, shared_logits="mean")
    v, grads = run_with_grads(triton_routing, torch.zeros_like(u), weight, prior, grad, **kwargs)
    assert torch.isnan(v).all() and all(torch.isnan(g).all() for g in grads)


@device_params
def test_large_magnitudes_stay_finite(device):
    # Logits in the thousands (a softmax without its max subtracted overflows) and squash inputs
    # of 1e25 (|s|^2 overflows float32): finite, and the reference's values.
    require(device)
    shape = Shape(3, 11, 4, 3, 5, 3)
    u, weight, prior, grad = make_inputs(shape, True, torch.float32, device)
    bias = torch.full((shape.J, shape.M), 1e25, device=device)
    bias[0] = 0.0
    u, prior = 30 * u, 1000 * prior
    kwargs = dict(iterations=3, softmax_over="in_caps", shared_logits="sum")
    v, grads = run_with_grads(triton_routing, u, weight, prior, grad, bias=bias, **kwargs)
    assert torch.isfinite(v).all() and all(torch.isfinite(g).all() for g in grads)
    v_ref, _ = reference64(u, weight, prior, grad, bias=bias, **kwargs)
    assert rel_error(v, v_ref) < 1e-4


@device_params
def test_batch_dependence_matches_the_reference(device):
    # A sample's output depends on the rest of its batch, in the kernels as in the reference.
    require(device)
    u, weight, _, _ = make_inputs(Shape(4, 9, 4, 3, 5, 3), False, device=device)
    whole = triton_routing(u, weight, iterations=3, shared_logits="mean")
    alone = triton_routing(u[:1], weight, iterations=3, shared_logits="mean")
    assert (whole[0] - alone[0]).abs().max() > 1e-4
    torch.testing.assert_close(alone, reference_routing(u[:1], weight, 3, shared_logits="mean"))


@device_params
def test_compile_fullgraph_capsnet(device):
    require(device)
    torch.manual_seed(0)
    model = CapsNet(
        1, 20, 4, conv_channels=8, primary_caps=2, decoder_hidden=(16, 32), learn_prior=True,
        backend="triton",
    ).to(device)  # fmt: skip
    images = torch.rand(3, 1, 20, 20, device=device)
    labels = torch.tensor([1, 3, 0], device=device)
    router = model.digit

    def forward(images, labels):
        primary = model.primary(model.conv1(images))
        return triton_routing(
            primary, router.weight, router.prior, iterations=3, softmax_over="in_caps",
            shared_logits="mean",
        )  # fmt: skip

    def loss_and_grads(fn):
        caps = fn(images, labels)
        loss = caps.square().sum()
        return caps.detach(), torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    # aot_eager: Dynamo (no graph break allowed) and AOTAutograd through the fake and autograd
    # registrations, without Inductor's C++ build (slow on 2 CPU cores).
    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    caps, grads = loss_and_grads(compiled)
    caps_eager, grads_eager = loss_and_grads(forward)
    torch.testing.assert_close(caps, caps_eager, rtol=1e-5, atol=1e-6)
    for g, g_eager in zip(grads, grads_eager, strict=True):
        assert (g is None) == (g_eager is None)
        if g is not None:
            torch.testing.assert_close(g, g_eager, rtol=1e-4, atol=1e-6)


def test_deterministic():
    """No float atomics: two runs give bitwise identical outputs and gradients (two capsule
    blocks, two batch tiles in the interpreter's tiles)."""
    require("cpu")
    shape = Shape(9, 20, 5, 4, 12, 3)
    variant = Variant("in_caps", True, False)
    first, _, _ = run_case(shape, variant, "mean", torch.float32, "cpu", ALL_OPTIONS[0])
    second, _, _ = run_case(shape, variant, "mean", torch.float32, "cpu", ALL_OPTIONS[0])
    for a, b in zip([first[0], *first[1]], [second[0], *second[1]], strict=True):
        assert torch.equal(a, b)


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
    require("cpu")
    monkeypatch.setenv(launcher.TILES_ENV, "gpu")
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
    monkeypatch.setenv(launcher.TILES_ENV, "gpu")
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
    require(device)
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
    require("cpu")
    assert shared_logits_unavailable_reason("triton", "cpu") is None
    assert triton_op.shared_logits_unavailable_reason(torch.device("cpu"), torch.int32)
