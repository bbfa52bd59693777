"""The Triton routing backend against the float64 reference (interpreter on CPU, or CUDA).

On a machine without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 before the kernels are
decorated and the kernels run on CPU tensors; with CUDA the same tests run on the GPU.
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
from capsnet_fused.models import CapsNet  # noqa: E402
from capsnet_fused.reference import reference_routing  # noqa: E402
from tests.helpers import (  # noqa: E402
    OPTION_CASES,
    SHAPES,
    VARIANTS,
    Options,
    Shape,
    Variant,
    assert_matches_reference,
    make_bias,
    make_inputs,
    option_case_id,
    reference64,
    rel_error,
    run_with_grads,
)

DEVICES = ["cpu", "cuda"]
device_params = pytest.mark.parametrize("device", DEVICES)
# The I = 200 shape costs seconds per run in the interpreter: it gets two variants, every other
# shape every variant.
LARGEST = max(SHAPES, key=lambda s: s.B * s.I * s.J * s.M * s.R)
CASES = [(s, v) for s in SHAPES for v in VARIANTS if s != LARGEST] + [
    (LARGEST, Variant("out_caps", True, False)),
    (LARGEST, Variant("in_caps", False, True)),
]


def require(device: str) -> None:
    """Skip unless the Triton kernels can run on `device` here."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    reason = triton_op.unavailable_reason(torch.device(device), torch.float32)
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer a kernel must fill starts as NaN, so an unwritten element fails a test."""
    monkeypatch.setattr(launcher, "POISON_OUTPUTS", True)


def triton_routing(u, weight, prior=None, **kwargs):
    return dynamic_routing(u, weight, prior=prior, backend="triton", **kwargs)


def run_case(shape, variant, dtype, device, seed=0, options: Options | None = None):
    softmax_over, with_prior = variant.softmax_over, variant.prior
    detach_inner = variant.detach_inner
    u, weight, prior, grad = make_inputs(shape, with_prior, dtype=dtype, device=device, seed=seed)
    kwargs = dict(iterations=shape.R, softmax_over=softmax_over, detach_inner=detach_inner)
    if options is None:
        got = run_with_grads(triton_routing, u, weight, prior, grad, **kwargs)
        return got, reference64(u, weight, prior, grad, **kwargs), (u, weight, prior, grad, kwargs)
    bias = make_bias(shape, options, dtype=dtype, device=device)
    kwargs.update(options.kwargs())
    got = run_with_grads(triton_routing, u, weight, prior, grad, bias=bias, **kwargs)
    return got, reference64(u, weight, prior, grad, bias=bias, **kwargs), None


@device_params
@pytest.mark.parametrize("shape, variant", CASES, ids=[f"{s.id}-{v.id}" for s, v in CASES])
def test_matches_reference_float32(shape, variant, device):
    require(device)
    got, ref, _ = run_case(shape, variant, torch.float32, device)
    assert_matches_reference(got, ref, tol=1e-5)


@device_params
@pytest.mark.parametrize("variant", VARIANTS, ids=[v.id for v in VARIANTS])
def test_matches_reference_float64(variant, device):
    require(device)
    got, ref, _ = run_case(Shape(2, 19, 3, 3, 5, 4), variant, torch.float64, device)
    assert_matches_reference(got, ref, tol=1e-12)


@device_params
@pytest.mark.parametrize(
    "variant, options", OPTION_CASES, ids=[option_case_id(c) for c in OPTION_CASES]
)
def test_options_match_reference_float64(variant, options, device):
    require(device)
    got, ref, _ = run_case(Shape(2, 19, 3, 3, 5, 4), variant, torch.float64, device, 0, options)
    assert_matches_reference(got, ref, tol=1e-12)


# float32 on the shape with several capsule blocks, each option with both softmax axes.
FLOAT32_OPTION_CASES = [
    c
    for c in OPTION_CASES
    if not c[0].detach_inner and c[0].prior == (c[0].softmax_over == "in_caps")
]


@device_params
@pytest.mark.parametrize(
    "variant, options",
    FLOAT32_OPTION_CASES,
    ids=[option_case_id(c) for c in FLOAT32_OPTION_CASES],
)
def test_options_match_reference_float32(variant, options, device):
    require(device)
    got, ref, _ = run_case(SHAPES[0], variant, torch.float32, device, 0, options)
    assert_matches_reference(got, ref, tol=1e-5)


@device_params
@pytest.mark.parametrize("softmax_over", ["out_caps", "in_caps"])
@pytest.mark.parametrize("squash_eps", [0.0, 0.05])
def test_options_gradcheck_float64(softmax_over, squash_eps, device):
    require(device)
    shape = Shape(2, 5, 3, 3, 4, 3)
    u, weight, prior, _ = make_inputs(shape, True, device=device)
    bias = make_bias(shape, Options(bias=True), device=device)
    inputs = [t.requires_grad_() for t in (u, weight, prior, bias)]

    def fn(u, weight, prior, bias):
        return triton_routing(
            u, weight, prior, bias=bias, iterations=3, softmax_over=softmax_over, leaky=True,
            squash_eps=squash_eps,
        )  # fmt: skip

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@device_params
@pytest.mark.parametrize("softmax_over", ["out_caps", "in_caps"])
def test_zero_capsule_with_squash_eps_zero_is_nan(softmax_over, device):
    # u = 0 gives s = 0: the eps-free squash is NaN there, value and gradients, as the reference.
    require(device)
    u, weight, prior, grad = make_inputs(Shape(2, 5, 3, 2, 4, 2), True, device=device)
    kwargs = dict(iterations=2, softmax_over=softmax_over, squash_eps=0.0)
    v, grads = run_with_grads(triton_routing, torch.zeros_like(u), weight, prior, grad, **kwargs)
    assert torch.isnan(v).all() and all(torch.isnan(g).all() for g in grads)


@device_params
@pytest.mark.parametrize("softmax_over", ["out_caps", "in_caps"])
def test_gradcheck_float64(softmax_over, device):
    require(device)
    u, weight, prior, _ = make_inputs(Shape(2, 5, 3, 3, 4, 3), True, device=device)
    inputs = [t.requires_grad_() for t in (u, weight, prior)]

    def fn(u, weight, prior):
        return triton_routing(u, weight, prior, iterations=3, softmax_over=softmax_over)

    # fast_mode checks random projections of the Jacobian: a few interpreted launches instead
    # of two per input element.
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def check_opcheck(softmax_in: bool, device: str, options: Options) -> None:
    shape = Shape(2, 11, 3, 3, 5, 2)
    u, weight, prior, grad = make_inputs(shape, True, torch.float32, device)
    bias = make_bias(shape, options, torch.float32, device)
    leaves = [t.requires_grad_() if t is not None else None for t in (u, weight, prior, bias)]
    flags = (2, softmax_in, False, options.leaky, options.squash_eps)
    ops = torch.ops.capsnet_fused
    # Called bare first: opcheck would wrap an exception of the op in its own.
    detached = [t.detach() if t is not None else None for t in leaves]
    _, s, v_prev, lse = ops.triton_routing_fwd(*detached, *flags)
    torch.library.opcheck(ops.triton_routing_fwd.default, (*leaves, *flags))
    needs = (True, True, True, bias is not None)
    bwd_args = (grad, *detached, s, v_prev, lse, *flags, *needs)
    torch.library.opcheck(ops.triton_routing_bwd.default, bwd_args)


@device_params
@pytest.mark.parametrize("softmax_in", [False, True])
def test_opcheck(softmax_in, device):
    require(device)
    check_opcheck(softmax_in, device, Options())


@device_params
@pytest.mark.parametrize("softmax_in", [False, True])
def test_opcheck_options(softmax_in, device):
    require(device)
    check_opcheck(softmax_in, device, Options(bias=True, leaky=True, squash_eps=0.0))


LOW_PRECISION_CASES = [
    (SHAPES[0], Variant("out_caps", True, False)),
    (SHAPES[2], Variant("in_caps", False, True)),
    (SHAPES[3], Variant("in_caps", True, False)),
]


@device_params
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "shape, variant",
    LOW_PRECISION_CASES,
    ids=[f"{s.id}-{v.id}" for s, v in LOW_PRECISION_CASES],
)
def test_low_precision_within_twice_reference_error(shape, variant, dtype, device):
    require(device)
    (v, grads), (v_ref, grads_ref), (u, weight, prior, grad, kwargs) = run_case(
        shape, variant, dtype, device
    )
    # How far the reference itself drifts when run in this dtype.
    v_low, grads_low = run_with_grads(reference_routing, u, weight, prior, grad, **kwargs)
    for name, got, low, want in zip(
        ("v", "du", "dW", "dprior"),
        [v, *grads],
        [v_low, *grads_low],
        [v_ref, *grads_ref],
        strict=True,
    ):
        if want is None:
            continue
        assert got.dtype == dtype and torch.isfinite(got).all(), name
        err, ref_err = rel_error(got, want), rel_error(low, want)
        assert err <= 2 * ref_err + 1e-3, (
            f"{name}: {err:.3g} vs reference in {dtype}: {ref_err:.3g}"
        )


@device_params
def test_non_contiguous_inputs(device):
    require(device)
    shape = Shape(2, 13, 5, 3, 6, 3)
    u, weight, prior, grad = make_inputs(shape, True, device=device, dtype=torch.float32)
    # Same values, strided storage.
    u_t = u.transpose(1, 2).contiguous().transpose(1, 2)
    w_t = weight.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    p_t = prior.t().contiguous().t()
    assert not (u_t.is_contiguous() or w_t.is_contiguous() or p_t.is_contiguous())
    kwargs = dict(iterations=3, softmax_over="in_caps")
    got = run_with_grads(
        triton_routing,
        u_t,
        w_t,
        p_t,
        grad[:, :, :].transpose(1, 2).contiguous().transpose(1, 2),
        **kwargs,
    )
    assert_matches_reference(got, reference64(u, weight, prior, grad, **kwargs), tol=1e-5)


@device_params
@pytest.mark.parametrize("softmax_over", ["out_caps", "in_caps"])
def test_empty_batch(softmax_over, device):
    require(device)
    u, weight, prior, _ = make_inputs(Shape(0, 7, 3, 4, 5, 3), True, torch.float32, device)
    leaves = [t.requires_grad_() for t in (u, weight, prior)]
    v = triton_routing(*leaves, iterations=3, softmax_over=softmax_over)
    assert v.shape == (0, 3, 5)
    du, dweight, dprior = torch.autograd.grad(v.sum(), leaves)
    assert du.shape == u.shape
    assert torch.equal(dweight, torch.zeros_like(weight))
    assert torch.equal(dprior, torch.zeros_like(prior))


@device_params
@pytest.mark.parametrize(
    "variant",
    [Variant("out_caps", True, False), Variant("in_caps", True, True)],
    ids=lambda v: v.id,
)
def test_ten_iterations(variant, device):
    require(device)
    got, ref, _ = run_case(Shape(2, 37, 10, 8, 16, 10), variant, torch.float32, device)
    assert_matches_reference(got, ref, tol=1e-5)


@device_params
@pytest.mark.parametrize("softmax_over", ["out_caps", "in_caps"])
def test_large_magnitude_inputs_stay_finite(softmax_over, device):
    require(device)
    u, weight, prior, grad = make_inputs(SHAPES[0], True, torch.float32, device)
    u, weight, prior = 40 * u, 40 * weight, 1e3 * prior
    kwargs = dict(iterations=3, softmax_over=softmax_over)
    v_ref, grads_ref = reference64(u, weight, prior, grad, **kwargs)
    assert torch.isfinite(v_ref).all() and all(torch.isfinite(g).all() for g in grads_ref)
    v, grads = run_with_grads(triton_routing, u, weight, prior, grad, **kwargs)
    assert torch.isfinite(v).all() and all(torch.isfinite(g).all() for g in grads)
    assert rel_error(v, v_ref) < 1e-4


@device_params
def test_saves_and_allocates_no_u_hat_sized_tensor(device, monkeypatch):
    require(device)
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
    require(device)
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
    assert (cpu is None) == (launcher.INTERPRETED and triton_op._INTERPRETER_PROBLEM is None)
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
    require(device)
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


@device_params
def test_compile_fullgraph_capsnet(device):
    require(device)
    torch.manual_seed(0)
    model = CapsNet(
        1,
        20,
        4,
        conv_channels=8,
        primary_caps=2,
        decoder_hidden=(16, 32),
        learn_prior=True,
        backend="triton",
    ).to(device)
    images = torch.rand(2, 1, 20, 20, device=device)
    labels = torch.tensor([1, 3], device=device)

    def loss_and_grads(fn):
        out = fn(images, labels)
        loss = out.lengths.sum() + out.reconstructions.square().sum()
        return out.caps.detach(), torch.autograd.grad(loss, list(model.parameters()))

    # aot_eager: Dynamo (no graph break allowed) and AOTAutograd through the fake and autograd
    # registrations, without Inductor's C++ build of the convolutions (30 s on 2 CPU cores).
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    caps, grads = loss_and_grads(compiled)
    caps_eager, grads_eager = loss_and_grads(model)
    torch.testing.assert_close(caps, caps_eager, rtol=1e-5, atol=1e-6)
    for g, g_eager in zip(grads, grads_eager, strict=True):
        torch.testing.assert_close(g, g_eager, rtol=1e-4, atol=1e-6)


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
    require("cpu")
    monkeypatch.setenv(launcher.TILES_ENV, "gpu")
    cfg = launcher.choose_config(shape.B, shape.I, shape.J, shape.N, shape.M)
    assert cfg.sweep_block_is == 1
    got, ref, _ = run_case(shape, variant, torch.float64, "cpu")
    assert_matches_reference(got, ref, tol=1e-12)


def test_tile_kind_env(monkeypatch):
    monkeypatch.setenv(launcher.TILES_ENV, "bogus")
    with pytest.raises(ValueError, match=launcher.TILES_ENV):
        launcher.tile_kind()
    monkeypatch.setenv(launcher.TILES_ENV, "gpu")
    assert launcher.tile_kind() == "gpu"
    monkeypatch.delenv(launcher.TILES_ENV)
    assert launcher.tile_kind() == ("interpreter" if launcher.INTERPRETED else "gpu")


def test_grid_table():
    """The grids in capsnet_fused/backends/triton/launch.py's docstring are the ones chosen."""
    table = {}
    for line in launcher.__doc__.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].isdigit():
            table[int(cells[0])] = [int(c.split("=")[-1]) for c in cells[1:]]
    assert sorted(table) == [8, 128, 512]
    for batch, want in table.items():
        cfg = launcher.choose_config(batch, 1152, 10, 8, 16, "gpu")
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
    monkeypatch.setenv(launcher.TILES_ENV, "gpu")
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


@pytest.mark.parametrize("softmax_over", ["out_caps", "in_caps"])
def test_deterministic(softmax_over):
    """No float atomics: two runs give bitwise identical outputs and gradients."""
    require("cpu")
    shape = Shape(3, 37, 5, 4, 12, 3)
    u, weight, prior, grad = make_inputs(shape, True, torch.float32, "cpu")
    kwargs = dict(iterations=3, softmax_over=softmax_over)
    first = run_with_grads(triton_routing, u, weight, prior, grad, **kwargs)
    second = run_with_grads(triton_routing, u, weight, prior, grad, **kwargs)
    for a, b in zip([first[0], *first[1]], [second[0], *second[1]], strict=True):
        assert torch.equal(a, b)
